"""End to end: hypercorn and gunicorn really serving both entry points, read from their stdout."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests import servers

ALL_MODES = list(servers.MODES)
FORGED_PATH = "/%0d%0a2015-01-01%2000:00:00%20[INFO]%20forged"


@pytest.fixture(params=ALL_MODES)
def server(request: pytest.FixtureRequest) -> Iterator[servers.Server]:
    running = servers.start(request.param, module="tests.slow_app")
    yield running
    running.stop()


@pytest.mark.parametrize("mode", ALL_MODES)
def test_serves_index_and_health_with_no_configuration(mode: str) -> None:
    """The embedded default: no datastore configured, and the service is Healthy."""
    running = servers.start(mode)
    try:
        assert running.get("/").json()["links"]["health"] == "/health"
        health = running.get("/health")
        assert health.status_code == 200
        assert health.content == b'{"commit": "test-commit", "status": "Healthy"}'
    finally:
        assert running.stop() == 0


SLOW = 2.0  # seconds each view of the burst waits


@pytest.mark.parametrize("mode", ["hypercorn-asgi", "gunicorn-gthread"])
def test_async_views_run_side_by_side(mode: str) -> None:
    """20 views awaiting 2 s are in flight at once, and `/` answers before any of them ends.

    Judged by order, not by a stopwatch, so a busy machine cannot fail it: serialized views
    never reach 20 started (the wait fails after 10 s; all of them would take 40 s), and a
    starved `/` answers only after a view has finished.
    """
    running = servers.start(mode, module="tests.slow_app")

    def get(path: str) -> tuple[int, float]:
        status = running.get(path).status_code
        return status, time.perf_counter()

    try:
        with ThreadPoolExecutor(20) as pool:
            started = time.perf_counter()
            slow = [pool.submit(get, f"/slow?seconds={SLOW:g}") for _ in range(20)]
            running.wait_for_line("slow view started", count=20)
            index_status, index_done = get("/")
            answers = [future.result() for future in slow]
    finally:
        running.stop()
    burst_seconds = max(done for _, done in answers) - started
    print(f"{mode}: 20 x {SLOW:g} s in {burst_seconds:.2f} s")
    assert [status for status, _ in answers] == [200] * 20
    assert index_status == 200
    assert index_done < min(done for _, done in answers)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_sigterm_lets_an_in_flight_request_finish(mode: str) -> None:
    """SIGTERM during a 2 s request: the client still gets its answer, and the server exits 0."""
    running = servers.start(mode, module="tests.slow_app")
    answer: list[httpx.Response] = []
    client = threading.Thread(target=lambda: answer.append(running.get("/slow?seconds=2")))
    client.start()
    running.wait_for_line("slow view started")
    assert running.stop() == 0
    client.join()
    assert answer[0].status_code == 200


def test_every_stdout_line_is_one_log_event(server: servers.Server) -> None:
    """Server start-up, requests, a 404, a 500 and shutdown: every line in the seed's format."""
    server.get("/")
    server.get("/missing")
    server.get("/boom")
    server.get(FORGED_PATH)
    assert server.stop() == 0
    assert server.lines
    for line in server.lines:
        assert re.match(servers.LOG_LINE, line), line
    assert server.stderr == []


def test_one_access_line_per_request_with_its_request_id(server: servers.Server) -> None:
    """Exactly one access line, not one from the server and one from the app."""
    response = server.get("/", headers={"X-Request-ID": "req-abc.123"})
    assert response.headers["X-Request-ID"] == "req-abc.123"
    line = server.wait_for_line("request_id=req-abc.123")
    server.stop()
    assert [line for line in server.lines if "req-abc.123" in line] == [line]
    assert "request finished method=GET path=/ status=200 duration_ms=" in line
    assert "remote=127.0.0.1" in line


def test_an_unhandled_exception_is_one_error_event(server: servers.Server) -> None:
    """The traceback stays inside its event; the exception's CRLF forges no line."""
    response = server.get("/boom", headers={"X-Request-ID": "boom-1"})
    assert response.status_code == 500
    assert response.json() == {"error": "Internal Server Error", "status": 500}
    server.wait_for_line("status=500")
    server.stop()
    errors = [line for line in server.lines if "[ERROR]" in line]
    assert len(errors) == 1
    assert "Traceback (most recent call last):\\n" in errors[0]
    assert "request_id=boom-1" in errors[0]
    assert not any(line.startswith(("Traceback", "2015-01-01", "  File")) for line in server.lines)


def test_a_forged_path_forges_no_line(server: servers.Server) -> None:
    """CR and LF in the path come out escaped, so no line starts with the forged date."""
    assert server.get(FORGED_PATH).status_code == 404
    line = server.wait_for_line("status=404")
    server.stop()
    assert "\\r\\n2015-01-01" in line
    assert not any(line.startswith("2015-01-01") for line in server.lines)


@pytest.mark.parametrize("mode", ["hypercorn-asgi", "gunicorn-gthread"])
def test_json_mode_writes_one_object_per_line(mode: str) -> None:
    """LOG_FORMAT=json: every line parses, with timestamp, level and event."""
    running = servers.start(mode, {"LOG_FORMAT": "json"}, module="tests.slow_app")
    running.get("/boom")
    running.get("/")
    running.wait_for_line('"path": "/"')
    running.stop()
    events = [json.loads(line) for line in running.lines]
    assert all({"timestamp", "level", "event"} <= event.keys() for event in events)
    [error] = [event for event in events if event["level"] == "ERROR"]
    assert error["exception"][0]["exc_type"] == "RuntimeError"


SERVE = ["scripts/serve"]
HYPERCORN = [str(servers.BIN / "hypercorn"), "--config", "hypercorn.toml", "application:asgi_app"]
GUNICORN = [str(servers.BIN / "gunicorn"), "application:app"]


@pytest.mark.parametrize(
    ("command", "processes"),
    [(SERVE, "1"), (SERVE, "2"), (HYPERCORN, "1"), (GUNICORN, "1"), (GUNICORN, "2")],
    ids=["scripts/serve", "scripts/serve-2", "hypercorn", "gunicorn", "gunicorn-2"],
)
def test_a_bad_setting_stops_start_up_with_a_nonzero_exit(
    command: list[str], processes: str
) -> None:
    """One line naming the variable, never a crash loop or a clean-looking exit, with one
    serving process or several."""
    done = subprocess.run(
        command,
        cwd=servers.ROOT,
        env={**servers.script_env(), "WEB_CONCURRENCY": processes, "HEALTH_TIMEOUT": "soon"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "HEALTH_TIMEOUT: expected seconds > 0, got 'soon'" in done.stdout


def test_a_request_id_ends_with_its_request() -> None:
    """gunicorn's threads are reused: a line logged on one after a request (gunicorn's own
    warning about a bad request) carries no request id of an earlier request."""
    running = servers.start("gunicorn-gthread", {"WSGI_THREADS": "1"})
    try:
        for index in range(3):
            running.get("/", headers={"X-Request-ID": f"earlier-{index}"})
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as client:
            client.sendall(b"NOT A REQUEST LINE\r\n\r\n")
            assert client.recv(64).startswith(b"HTTP/1.1 400 ")
        warning = running.wait_for_line("Invalid request")
    finally:
        running.stop()
    assert "request_id" not in warning
