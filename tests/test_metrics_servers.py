"""Metrics and traces under real servers: the multiprocess directory's life, a worker that dies,
the listener on or off or refused, and every line of a traced request, in each serving mode."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests import servers
from tests.test_servers import GUNICORN, HYPERCORN, SERVE

TWO = {"WEB_CONCURRENCY": "2"}
TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


def mapped(pid: int) -> set[Path]:
    """The multiprocess files process `pid` has mapped: its own, once it has counted."""
    paths = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1]
        if path.endswith(".db") and "/prometheus-" in path:
            paths.add(Path(path))
    return paths


def until_each_has(server: servers.Server, pids: list[int], prefix: str) -> Path:
    """Fresh connections to `/` until every process in `pids` has its `prefix`<pid>.db file
    (the kernel or the workers pick who answers); the directory they share."""
    deadline = time.monotonic() + 30
    while not all(any(p.name == f"{prefix}{pid}.db" for p in mapped(pid)) for pid in pids):
        assert time.monotonic() < deadline, [mapped(pid) for pid in pids]
        asyncio.run(_burst(server.url + "/", 20))
    [directory] = {path.parent for pid in pids for path in mapped(pid)}
    return directory


async def _burst(url: str, count: int) -> list[int]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        answers = await asyncio.gather(*(client.get(url) for _ in range(count)))
    return [answer.status_code for answer in answers]


@pytest.mark.parametrize("mode", ["gunicorn", "serve"])
def test_serving_processes_share_one_directory_removed_at_exit(mode: str, tmp_path: Path) -> None:
    """Two processes write their numbers to one directory the supervisor made (not to one set
    outside, which stays); it is gone once the supervisor has exited."""
    outside = tmp_path / "outside"
    outside.mkdir()
    server = servers.start(mode, {**TWO, "PROMETHEUS_MULTIPROC_DIR": str(outside)})
    try:
        children = server.children(2)
        directory = until_each_has(server, children, "counter_")
        assert directory.is_dir()
        assert {f"counter_{pid}.db" for pid in children} <= {p.name for p in directory.iterdir()}
    finally:
        server.stop()
    assert not directory.exists()
    assert outside.is_dir()
    assert not [path for path in outside.iterdir() for pid in children if f"_{pid}." in path.name]


def test_a_dead_workers_live_gauges_leave_and_its_counts_stay() -> None:
    """gunicorn's child_exit marks a killed worker dead: its in-flight and datastore-up files
    go, its counters stay in the sum (a counter never goes back)."""
    server = servers.start("gunicorn", TWO)
    try:
        children = server.children(2)
        directory = until_each_has(server, children, "gauge_livesum_")
        sent = _counted(server, "/")
        victim = children[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (directory / f"gauge_livesum_{victim}.db").exists():
            assert time.monotonic() < deadline, sorted(p.name for p in directory.iterdir())
            time.sleep(0.1)
        assert (directory / f"counter_{victim}.db").exists()
        assert _counted(server, "/") == sent
        assert "http_requests_in_flight 0.0" in httpx.get(server.metrics_url, timeout=10).text
    finally:
        server.stop()


def _counted(server: servers.Server, route: str) -> float:
    """GET requests to `route` answered 200, from the server's /metrics."""
    text = httpx.get(server.metrics_url, timeout=10).text
    sample = f'http_requests_total{{method="GET",route="{route}",status="200"}} '
    [line] = [line for line in text.splitlines() if line.startswith(sample)]
    return float(line.removeprefix(sample))


def listening(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.parametrize("mode", ["hypercorn-asgi", "gunicorn-gthread"])
@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
def test_the_listener_is_there_unless_metrics_are_off(mode: str, on: bool) -> None:
    """The serving (or supervising) process listens on METRICS_PORT; with 0, on nothing more."""
    server = servers.start(mode, {} if on else {"METRICS_PORT": "0"})
    try:
        ports = listening(server.process.pid)
        scrape = httpx.get(server.metrics_url, timeout=10) if on else None
    finally:
        server.stop()
    assert ports == ({server.port, server.metrics_port} if on else {server.port})
    if scrape is not None:
        assert scrape.status_code == 200
        assert "request finished method=GET path=/metrics status=200" in "\n".join(server.lines)


@pytest.mark.parametrize(
    ("command", "processes"),
    [(HYPERCORN, "1"), (GUNICORN, "2"), (SERVE, "2")],
    ids=["hypercorn", "gunicorn-2", "scripts/serve-2"],
)
def test_a_taken_metrics_port_stops_start_up(command: list[str], processes: str) -> None:
    """Something else on METRICS_PORT: a non-zero exit and a line naming the setting."""
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            command,
            cwd=servers.ROOT,
            env={**servers.script_env(), "WEB_CONCURRENCY": processes, "METRICS_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0
    assert f"metrics: cannot listen on METRICS_PORT {port}: " in done.stdout + done.stderr


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("mode", ["hypercorn-asgi", "gunicorn-gthread"])
@pytest.mark.parametrize("path", ["/health", "/"])
def test_every_line_of_a_traced_request_carries_its_trace(
    mode: str, log_format: str, path: str
) -> None:
    """/health with a refused database: its probe line and its access line; / (Flask under
    both servers): its access line. Every line with the request's id has the trace too."""
    env = {
        "LOG_FORMAT": log_format,
        "DATABASE_URL": f"postgresql://127.0.0.1:{servers.free_port()}/x",
    }
    server = servers.start(mode, env)
    try:
        headers = {"traceparent": f"00-{TRACE}-{SPAN}-01", "X-Request-ID": "traced-1"}
        answer = server.get(path, headers=headers)
        server.wait_for_line("request finished", "traced-1")
    finally:
        server.stop()
    assert answer.status_code == (500 if path == "/health" else 200)
    lines = [line for line in server.lines if "traced-1" in line]
    if path == "/health":
        assert any("datastore unhealthy" in line for line in lines), server.lines
    for line in lines:
        if log_format == "json":
            event = json.loads(line)
            assert (event["trace_id"], event["span_id"]) == (TRACE, SPAN), line
        else:
            fields = dict(servers.log_pairs(line))
            assert (fields["trace_id"], fields["span_id"]) == (TRACE, SPAN), line
