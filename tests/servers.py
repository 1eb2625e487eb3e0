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


def _logged_keys() -> frozenset[str]:
    """Every field the project logs: keywords of its log and bind calls, and what processors add.

    Read from the source of the application and of the test apps the servers run, so a new
    field needs no list kept by hand, and a key nobody logs stands out.
    """
    keys = {"logger", "exception"}  # structlog's add_logger_name and format_exc_info
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """One server process; `lines` fills with its stdout as it prints."""

    mode: str
    port: int
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kwargs)  # type: ignore[arg-type]

    def wait_for_line(self, *texts: str, timeout: float = 10) -> str:
        """The first stdout line containing every one of `texts`, waiting for it to be printed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if all(text in line for text in texts):
                    return line
            time.sleep(0.02)
        printed = "\n".join(self.lines)
        raise AssertionError(f"no line with {texts!r} in {self.mode} stdout:\n{printed}")

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
    env: Mapping[str, str] | None = None,
    *,
    module: str = "application",
    ready: str = "/health/live",
    timeout: float = 20,
    args: Sequence[str] = (),
) -> Server:
    """Start a server in `mode` on a free port and wait until `ready` answers; `args` go on
    the command line before the app."""
    port = free_port()
    *command, app = [part.format(port=port, module=module) for part in MODES[mode]]
    command = [str(BIN / command[0]), *command[1:], *args, app]
    full_env = {
        "PATH": os.environ["PATH"],
        "COMMIT_SHA": "test-commit",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    server = Server(mode, port, process)
    server.readers = [_drain(process.stdout, server.lines), _drain(process.stderr, server.stderr)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            printed = "\n".join(server.lines)
            raise AssertionError(f"{mode} exited with {process.returncode}:\n{printed}")
        try:
            httpx.get(server.url + ready, timeout=1)
            return server
        except httpx.TransportError:
            time.sleep(0.05)
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
