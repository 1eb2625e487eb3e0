"""Real servers for the tests: hypercorn and gunicorn as subprocesses, stdout kept line by line."""

from __future__ import annotations

import ast
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
from logfmtkv import Pair, parse_pairs

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOG_LINE = r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} \[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\] "

# How each serving mode is started; {port} is filled in. (hypercorn serving `app` through
# its own WSGI wrapper is not a supported mode: README, "Serving".)
MODES: dict[str, list[str]] = {
    "hypercorn-asgi": [
        "hypercorn", "--config", "hypercorn.toml", "--bind", "127.0.0.1:{port}", "{module}:asgi_app"
    ],
    "gunicorn-gthread": [
        "gunicorn", "--bind", "127.0.0.1:{port}", "--workers", "1", "{module}:app"
    ],
    "gunicorn-sync": [
        "gunicorn", "--bind", "127.0.0.1:{port}", "--workers", "1", "--worker-class", "sync",
        "{module}:app",
    ],
}  # fmt: skip

# As a user runs them, the process count from WEB_CONCURRENCY: gunicorn with its
# gunicorn.conf.py, and scripts/serve's launcher in this venv (on $PORT, application only).
COMMANDS: dict[str, list[str]] = {
    "gunicorn": ["gunicorn", "--bind", "127.0.0.1:{port}", "{module}:app"],
    "serve": ["python", "-m", "application.serve"],
}


def script_env() -> dict[str, str]:
    """The environment to run scripts/serve in: this run's interpreter (PYTHON, as scripts/test
    got it), a free PORT, and nothing else from the test's own environment."""
    port = free_port()
    env = {"PATH": os.environ["PATH"], "PORT": str(port), "METRICS_PORT": str(free_port(port))}
    if python := os.environ.get("PYTHON"):
        env["PYTHON"] = python
    return env


def _logged_keys() -> frozenset[str]:
    """Every field the project logs: keywords of its log and bind calls, and what processors add.

    Read from the source of the application and of the test apps the servers run, so a new
    field needs no list kept by hand, and a key nobody logs stands out.
    """
    keys = {"logger", "exception"}  # structlog's add_logger_name and format_exc_info
    keys |= {  # application/trace.py's processor, for Cloud Logging in JSON
        "severity",
        "logging.googleapis.com/trace",
        "logging.googleapis.com/spanId",
        "logging.googleapis.com/trace_sampled",
    }
    methods = {"debug", "info", "warning", "error", "exception", "critical", "bind",
               "bind_contextvars"}  # fmt: skip
    for path in [*ROOT.glob("application/*.py"), *ROOT.glob("tests/*_app.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in methods:
                keys.update(keyword.arg for keyword in node.keywords if keyword.arg)
    return frozenset(keys - {"exc_info", "stack_info", "stacklevel", "extra"})


LOGGED_KEYS = _logged_keys()


def log_pairs(line: str) -> list[Pair]:
    """What a logfmt parser (go-logfmt's rules, strictly) reads after the timestamp and level.

    The message's words come first as bare keys (value None), then the fields.
    """
    prefix = re.match(LOG_LINE, line)
    assert prefix, f"not a log line: {line!r}"
    return parse_pairs(line[prefix.end() :], strict=True)


def check_log_line(line: str) -> None:
    """Fields the project logs, each once, after the message: none made of text that was logged."""
    if line.startswith("{"):  # LOG_FORMAT=json
        extra = json.loads(line).keys() - LOGGED_KEYS - {"timestamp", "level", "event"}
        assert not extra, f"keys {sorted(extra)} are not fields the project logs: {line!r}"
        return
    pairs = log_pairs(line)
    words = list(itertools.takewhile(lambda pair: pair.value is None, pairs))
    fields = [key for key, value in pairs[len(words) :] if value is not None]
    assert len(words) + len(fields) == len(pairs), f"a word after the fields: {line!r}"
    assert set(fields) <= LOGGED_KEYS, f"{set(fields) - LOGGED_KEYS} never logged: {line!r}"
    assert len(set(fields)) == len(fields), f"a field twice: {line!r}"


def free_port(*taken: int) -> int:
    """A port nothing listens on now, other than the ones `taken` by this test already."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            return port


@dataclass
class Server:
    """One server process; `lines` fills with its stdout as it prints."""

    mode: str
    port: int
    process: subprocess.Popen[str]
    metrics_port: int = 0  # 0: metrics off
    lines: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        kwargs.setdefault("timeout", 10)
        return httpx.get(self.url + path, **kwargs)  # type: ignore[arg-type]

    def wait_for_line(self, *texts: str, timeout: float = 10, count: int = 1) -> str:
        """The `count`th stdout line containing every one of `texts`, waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if all(text in line for text in texts)]
            if len(found) >= count:
                return found[count - 1]
            time.sleep(0.02)
        printed = "\n".join(self.lines)
        raise AssertionError(f"not {count} lines with {texts!r} in {self.mode} stdout:\n{printed}")

    def children(self, count: int = 0, timeout: float = 10) -> list[int]:
        """The serving processes under this one (gunicorn's workers, scripts/serve's
        hypercorns), after waiting until there are `count` of them."""
        pid = self.process.pid
        deadline = time.monotonic() + timeout
        while True:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if len(children) >= count or time.monotonic() > deadline:
                return [int(child) for child in children]
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit code once it has drained; every line it printed is checked."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            for reader in self.readers:
                reader.join()
        for line in self.lines:
            check_log_line(line)
        return code


def start(
    mode: str,
    env: Mapping[str, str | None] | None = None,
    *,
    module: str = "application",
    ready: str = "/health/live",
    timeout: float = 20,
    port: int | None = None,
    args: Sequence[str] = (),
) -> Server:
    """Start a server in `mode` on `port` (else a free one) and wait until `ready` answers;
    `args` go on the command line before the app."""
    port = port or free_port()
    parts = [part.format(port=port, module=module) for part in {**MODES, **COMMANDS}[mode]]
    *command, app = parts
    command = [str(BIN / command[0]), *command[1:], *args, app]
    given = {
        "PATH": os.environ["PATH"],
        "COMMIT_SHA": "test-commit",
        "PYTHONPATH": str(ROOT),
        "PORT": str(port),
        "SHUTDOWN_DELAY": "0",  # stop() at once, unless a test is about the drain
        "METRICS_PORT": str(free_port(port)),  # on, as by default, where nothing else listens
        "WEB_CONCURRENCY": "1",  # one process unless a test asks (by default: one a core)
        **(env or {}),
    }
    full_env = {name: value for name, value in given.items() if value is not None}  # None: unset
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    server = Server(mode, port, process, int(full_env["METRICS_PORT"] or 0))
    server.readers = [_drain(process.stdout, server.lines), _drain(process.stderr, server.stderr)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            printed = "\n".join(server.lines)
            raise AssertionError(f"{mode} exited with {process.returncode}:\n{printed}")
        try:
            httpx.get(server.url + ready, timeout=1)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        if mode == "serve":  # one hypercorn answered: wait for every one of them
            processes = int(full_env.get("WEB_CONCURRENCY") or 1)
            try:
                remaining = deadline - time.monotonic()
                server.wait_for_line("Running on", timeout=remaining, count=processes)
            except AssertionError:
                server.stop()
                raise
        return server
    server.stop()
    raise AssertionError(f"{mode} did not answer on {ready} in {timeout} s")


def _drain(stream: IO[str] | None, into: list[str]) -> threading.Thread:
    def read() -> None:
        assert stream is not None
        with stream:
            for line in stream:
                into.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


def connections(pid: int, port: int, *, local: bool = False) -> int:
    """TCP connections process `pid` has open to `port` on this machine (a fault proxy's), or
    with `local`, accepted on its own `port`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            matched = int(fields[1 if local else 2].rsplit(":", 1)[1], 16) == port
            established = fields[3] == "01"
            if matched and established and fields[9] in inodes:
                count += 1
    return count
