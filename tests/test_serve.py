"""Tests for application.serve in-process: the launcher of WEB_CONCURRENCY hypercorns, run in
the test's own process, the main thread, as scripts/serve runs it.

The supervision is pinned with stand-in children (a few lines of Python taking the same
`--bind fd://N` arguments a hypercorn gets); `main` with real hypercorns serving the app and the
launcher's /metrics. Under real servers, from outside: test_serve_servers.py.
"""

from __future__ import annotations

import io
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import structlog

import application
from application import serve
from application.config import Config
from tests import servers

# The child's own view of what it was given: `--bind fd://N` with the app's name after it.
BIND = """
import os, signal, socket, sys, time
fd = int(sys.argv[sys.argv.index("--bind") + 1].removeprefix("fd://"))
"""


def child(code: str) -> list[str]:
    """The command `_supervise` starts for each process in place of hypercorn's."""
    return [sys.executable, "-c", BIND + code]


@pytest.fixture(autouse=True)
def signal_handlers() -> Iterator[None]:
    """The launcher takes SIGTERM and SIGINT over in this process; they are given back."""
    handlers = {signum: signal.getsignal(signum) for signum in serve.FORWARDED}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture
def serve_log(capture_logs, monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """The launcher's lines, as the service writes them."""
    stream = capture_logs(Config())
    monkeypatch.setattr(serve, "log", structlog.get_logger())
    return stream


@pytest.fixture
def reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory the children write to, named in their environment as REPORTS."""
    directory = tmp_path / "reports"
    directory.mkdir()
    monkeypatch.setenv("REPORTS", str(directory))
    return directory


def settings(processes: int = 2) -> Config:
    port = servers.free_port()
    return Config(port=port, metrics_port=servers.free_port(port), web_concurrency=processes)


def logged_pids(stream: io.StringIO) -> list[int]:
    [line] = [line for line in stream.getvalue().splitlines() if "] serving " in line]
    assert re.search(r'\[INFO\] serving processes=2 pids="\[\d+, \d+\]"$', line), line
    return [int(pid) for pid in re.findall(r"\d+", line.rpartition("pids=")[2])]


def test_each_process_gets_a_listening_socket_of_its_own_on_the_port(serve_log, reports):
    """WEB_CONCURRENCY=2: two processes, the ones the line names, each handed a listening
    socket on PORT in one SO_REUSEPORT group, and the app's name; every one ending well
    ends the launcher with 0."""
    config = settings()
    report = """
with socket.socket(fileno=fd) as listener:
    seen = [
        listener.getsockname()[1],
        listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
        listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT),
        os.fstat(fd).st_ino,
        sys.argv[-1],
    ]
    with open(os.path.join(os.environ["REPORTS"], str(os.getpid())), "w") as out:
        out.write(" ".join(map(str, seen)))
"""
    assert serve._supervise(config, child(report), None) == 0
    pids = logged_pids(serve_log)
    seen = {int(path.name): path.read_text().split() for path in reports.iterdir()}
    assert sorted(seen) == pids
    for port, listening, reuse_port, _, app in seen.values():
        assert (int(port), listening, reuse_port, app) == (
            config.port,
            "1",
            "1",
            "application:asgi_app",
        )
    assert len({inode for _, _, _, inode, _ in seen.values()}) == 2


@pytest.mark.parametrize(
    ("ending", "status"),
    [("sys.exit(3)", 3), ("os.kill(os.getpid(), signal.SIGKILL)", 1)],
    ids=["exit-3", "killed"],
)
def test_a_failing_process_stops_the_others_and_fails_the_launcher(
    serve_log, reports, ending: str, status: int
):
    """One process exits 3 (or is killed) while the other serves: the other gets SIGTERM, the
    launcher says so and exits with that status (1 for a process killed by a signal)."""
    failing = f"""
try:
    os.close(os.open(os.path.join(os.environ["REPORTS"], "first"), os.O_CREAT | os.O_EXCL))
except FileExistsError:
    time.sleep(30)  # serving, until stopped
    sys.exit(4)
{ending}
"""
    started = time.monotonic()
    assert serve._supervise(settings(), child(failing), None) == status
    assert time.monotonic() - started < 30  # the other was stopped, not waited for
    [line] = [line for line in serve_log.getvalue().splitlines() if "failed" in line]
    code = 3 if status == 3 else -signal.SIGKILL
    assert re.search(
        rf"\[ERROR\] a serving process failed; stopping the others pid=\d+ code={code}$", line
    )


@pytest.mark.parametrize("signum", serve.FORWARDED, ids=lambda signum: signum.name)
@pytest.mark.parametrize("reaction", ["exits-0", "dies-of-it"])
def test_a_signal_to_the_launcher_reaches_every_process(
    serve_log, reports, signum: signal.Signals, reaction: str
):
    """SIGTERM or SIGINT to the launcher (here sent by one of the processes once it runs) goes
    to every process; whether they exit 0 on it (hypercorn's drain) or die of it, that is a
    clean stop: the launcher exits 0 and says nothing of a failure."""
    handle = "sys.exit(0)" if reaction == "exits-0" else "signal.SIG_DFL"
    handler = f"lambda signum, frame: {handle}" if reaction == "exits-0" else handle
    signalled = f"""
signal.signal({signum!s}, {handler})
reports = os.environ["REPORTS"]
open(os.path.join(reports, f"ready-{{os.getpid()}}"), "w").close()
try:
    os.close(os.open(os.path.join(reports, "first"), os.O_CREAT | os.O_EXCL))
except FileExistsError:
    pass
else:
    while len([name for name in os.listdir(reports) if name.startswith("ready-")]) < 2:
        time.sleep(0.01)  # until the other one has its handler too
    os.kill(os.getppid(), {signum!s})
time.sleep(30)  # serving, until stopped
sys.exit(4)
"""
    started = time.monotonic()
    assert serve._supervise(settings(), child(signalled), None) == 0
    assert time.monotonic() - started < 30
    assert "failed" not in serve_log.getvalue()


def test_a_process_that_ended_no_longer_counts_in_live_gauges(tmp_path: Path, reports):
    """With metrics on, each process gets the multiprocess directory; once it has ended, its
    in-flight and up gauges leave the sum, and its counts stay."""
    metrics = """
assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == os.environ["REPORTS"]
import prometheus_client
prometheus_client.Gauge("in_flight", "x", multiprocess_mode="livesum").set(1)
prometheus_client.Counter("requests", "x").inc()
"""
    assert serve._supervise(settings(), child(metrics), str(reports)) == 0
    files = sorted(re.sub(r"\d+", "PID", path.name) for path in reports.iterdir())
    assert files == ["counter_PID.db", "counter_PID.db"]


def test_without_metrics_the_processes_get_no_multiprocess_directory(monkeypatch, reports):
    """METRICS_PORT=0: each process keeps its numbers to itself, and there are none."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    none = 'assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ'
    assert serve._supervise(settings(), child(none), None) == 0


def serve_until_answered(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, dict[str, object]]:
    """`main` with `config` (TMPDIR `tmp_path`) in this thread, as scripts/serve runs it; from
    another, once the app answers: a request, a scrape if metrics are on, a look at TMPDIR;
    then Ctrl-C. The exit status, and what was seen."""
    monkeypatch.setattr(application, "config", config)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the directory is made
    for name, value in {"PORT": config.port, "METRICS_PORT": config.metrics_port}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    seen: dict[str, object] = {}
    launcher_done = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not launcher_done.is_set():
            try:
                seen["app"] = httpx.get(f"http://127.0.0.1:{config.port}/", timeout=10)
                if config.metrics_port:
                    url = f"http://127.0.0.1:{config.metrics_port}/metrics"
                    seen["metrics"] = httpx.get(url, timeout=10)
                seen["tmpdir"] = [path.name for path in tmp_path.iterdir()]
                break
            except httpx.TransportError:
                time.sleep(0.1)
        if not launcher_done.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        status = serve.main([])
    finally:
        launcher_done.set()
        thread.join()
    return status, seen


def test_main_serves_the_app_and_the_sum_of_its_processes_metrics(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """scripts/serve with WEB_CONCURRENCY=2: two hypercorns serve the app; the launcher serves
    /metrics from their files; on SIGINT all stop, the launcher exits 0, its listener is gone
    and so is the directory."""
    config = settings()
    status, seen = serve_until_answered(config, tmp_path, monkeypatch)
    assert status == 0
    app, metrics = seen["app"], seen["metrics"]
    assert isinstance(app, httpx.Response) and isinstance(metrics, httpx.Response)
    assert app.status_code == 200
    assert metrics.status_code == 200
    assert 'http_requests_total{method="GET",route="/",status="200"} 1.0' in metrics.text
    [directory] = seen["tmpdir"]
    assert directory.startswith("prometheus-")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{config.metrics_port}/metrics", timeout=10)


def test_main_with_metrics_off_makes_no_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """METRICS_PORT=0: the hypercorns serve, and there is no directory and no listener."""
    config = replace(settings(), metrics_port=0)
    status, seen = serve_until_answered(config, tmp_path, monkeypatch)
    assert status == 0
    app = seen["app"]
    assert isinstance(app, httpx.Response)
    assert app.status_code == 200
    assert seen["tmpdir"] == []
