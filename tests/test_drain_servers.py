"""The drain on SIGTERM (application/drain.py) under real servers: readiness, connections, the
listener, the graceful deadline and the exit, each judged from outside the process.

A request in flight is a `/health` waiting on a database behind a fault proxy: slow (delay
mode) or hung (blackhole), so the same request exists under every server and process count.
"""

from __future__ import annotations

import http.client
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from application.drain import EXIT_GRACE
from tests import servers
from tests.conftest import through
from tests.faultproxy import FaultProxy

DELAY = 1.5  # SHUTDOWN_DELAY in these tests: time to act within it, short for the suite
DRAINING = "SIGTERM: draining"
LAST_RESORT = "[WARNING] exiting with threads still busy past the graceful timeout"

# id -> (mode, settings, processes that log DRAINING: the master alone under gunicorn)
SUBJECTS = {
    "hypercorn-asgi": ("hypercorn-asgi", {}, 1),
    "gunicorn-gthread": ("gunicorn-gthread", {}, 1),
    "serve-2": ("serve", {"WEB_CONCURRENCY": "2"}, 2),
}
ONE_PROCESS = ["hypercorn-asgi", "gunicorn-gthread"]

Subject = tuple[str, dict[str, str], int]


@pytest.fixture
def subject(request: pytest.FixtureRequest) -> Subject:
    return SUBJECTS[request.param]


@pytest.fixture
def database(database_proxy: FaultProxy, database_url: str) -> dict[str, str]:
    """Settings probing the real PostgreSQL through the fault proxy, never from a cache."""
    return {"DATABASE_URL": through(database_proxy, database_url), "HEALTH_CACHE_TTL": "0"}


def start_draining(subject: Subject, settings: dict[str, str]) -> servers.Server:
    """A server of `subject`; SIGTERM once it serves, returning when every process drains."""
    mode, env, processes = subject
    server = servers.start(mode, {**env, **settings})
    server.process.send_signal(signal.SIGTERM)
    server.wait_for_line(DRAINING, count=processes)
    return server


def stop_now(server: servers.Server) -> int:
    """SIGINT, which skips the drain delay; the exit code."""
    server.process.send_signal(signal.SIGINT)
    return server.stop()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def exchange(sock: socket.socket, path: str) -> http.client.HTTPResponse:
    """One GET on an open connection, its body read."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response


@pytest.mark.parametrize("subject", ONE_PROCESS, indirect=True)
def test_readiness_says_shutting_down_at_once_and_liveness_holds(
    subject: Subject, database: dict[str, str], database_proxy: FaultProxy
) -> None:
    """Draining, /health and /health/ready answer 503 "shutting down" without asking the hung
    database (which would take HEALTH_TIMEOUT, 5 s, and fail); /health/live answers 200."""
    database_proxy.set_mode("blackhole")
    server = start_draining(subject, {**database, "SHUTDOWN_DELAY": "30", "HEALTH_TIMEOUT": "5"})
    try:
        answers = {path: server.get(path) for path in ("/health", "/health/ready", "/health/live")}
    finally:
        stop_now(server)
    shutting_down = {"commit": "test-commit", "status": "shutting down"}
    assert [answers[path].status_code for path in ("/health", "/health/ready")] == [503, 503]
    assert answers["/health"].json() == answers["/health/ready"].json() == shutting_down
    assert answers["/health/live"].status_code == 200
    assert database_proxy.accepted == 0


@pytest.mark.parametrize("subject", ONE_PROCESS, indirect=True)
def test_responses_while_draining_ask_keep_alive_clients_to_reconnect(subject: Subject) -> None:
    """A connection kept alive from before SIGTERM gets its next answer with `Connection:
    close`, and the server closes it after that answer."""
    mode, env, processes = subject
    server = servers.start(mode, {**env, "SHUTDOWN_DELAY": "30"})
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            before = exchange(sock, "/")
            server.process.send_signal(signal.SIGTERM)
            server.wait_for_line(DRAINING, count=processes)
            during = exchange(sock, "/")
            closed = sock.recv(1) == b""
    finally:
        stop_now(server)
    assert (before.status, before.getheader("Connection")) in {(200, None), (200, "keep-alive")}
    assert (during.status, during.getheader("Connection")) == (200, "close")
    assert closed


@pytest.mark.parametrize("subject", list(SUBJECTS), indirect=True)
def test_sigterm_serves_through_the_delay_then_refuses_and_exits_0(
    subject: Subject, database: dict[str, str], database_proxy: FaultProxy
) -> None:
    """A request in flight at SIGTERM is answered; a new one during the delay is served; after
    the delay connections are refused; exit 0 within delay + graceful timeout."""
    mode, env, processes = subject
    graceful = 5
    database_proxy.set_mode("delay", delay=DELAY + 1)  # the probe's connection: past the delay
    settings = {**database, "SHUTDOWN_DELAY": str(DELAY), "GRACEFUL_TIMEOUT": str(graceful)}
    server = servers.start(mode, {**env, **settings, "HEALTH_TIMEOUT": "10"})
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(server.get, "/health")
        assert database_proxy.wait_accepted(1, timeout=10)
        server.process.send_signal(signal.SIGTERM)
        sent = time.perf_counter()
        server.wait_for_line(DRAINING, count=processes)
        during = server.get("/")
        served_until = time.perf_counter() - sent
        time.sleep(max(0.0, DELAY - (time.perf_counter() - sent)))
        while not refused(server.port):
            assert time.perf_counter() - sent < DELAY + 3, "still accepting 3 s after the delay"
            time.sleep(0.1)
        answer = in_flight.result()
    code = server.process.wait(timeout=DELAY + graceful + 10)
    exited = time.perf_counter() - sent
    server.stop()
    assert (answer.status_code, answer.json()["status"]) == (200, "Healthy")
    assert served_until < DELAY
    assert (during.status_code, during.headers["Connection"]) == (200, "close")
    assert code == 0
    assert exited < DELAY + graceful


@pytest.mark.parametrize("subject", ONE_PROCESS, indirect=True)
def test_a_request_past_the_graceful_timeout_is_cut_and_the_process_exits_in_time(
    subject: Subject, database: dict[str, str], database_proxy: FaultProxy
) -> None:
    """A /health hung for a minute is cut at the graceful timeout and the process exits 0
    right after, on every Python: hypercorn alone would wait for it on 3.12+ (upstream #308)
    and for its own graceful_timeout (15 s) on 3.11."""
    mode, env, _ = subject
    graceful = 1
    database_proxy.set_mode("blackhole")
    settings = {**database, "SHUTDOWN_DELAY": "0.5", "GRACEFUL_TIMEOUT": str(graceful)}
    server = servers.start(mode, {**env, **settings, "HEALTH_TIMEOUT": "60"})
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: server.get("/health", timeout=70))
        assert database_proxy.wait_accepted(1, timeout=10)
        code, exited = exit_after_sigterm(server)
    server.stop()
    assert code == 0
    assert exited < 0.5 + graceful + 1.5  # closing the probe pools, exiting; not EXIT_GRACE


def test_a_view_stuck_in_a_thread_does_not_hold_hypercorns_exit() -> None:
    """A Flask view busy for a minute on asgi_app's thread line: the process exits 0 once the
    graceful timeout cut it, without the last resort (the line's threads are daemons)."""
    graceful = 1
    settings = {"SHUTDOWN_DELAY": "0.5", "GRACEFUL_TIMEOUT": str(graceful)}
    server = servers.start("hypercorn-asgi", settings, module="tests.slow_app")
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: server.get("/slow?seconds=60", timeout=70))
        server.wait_for_line("slow view started")
        code, exited = exit_after_sigterm(server)
    server.stop()
    assert code == 0
    assert exited < 0.5 + graceful + EXIT_GRACE + 1  # the exit itself, on a busy machine
    assert not [line for line in server.lines if LAST_RESORT in line]


def test_a_thread_a_view_left_running_is_ended_by_the_last_resort() -> None:
    """A thread of the app's own, which the interpreter would wait a minute for at exit: the
    process says so and exits 0 by delay + graceful timeout + EXIT_GRACE."""
    graceful = 1
    settings = {"SHUTDOWN_DELAY": "0.5", "GRACEFUL_TIMEOUT": str(graceful)}
    server = servers.start("hypercorn-asgi", settings, module="tests.slow_app")
    assert server.get("/linger?seconds=60").status_code == 200
    code, exited = exit_after_sigterm(server)
    server.stop()
    assert code == 0
    assert 0.5 + graceful + EXIT_GRACE <= exited < 0.5 + graceful + EXIT_GRACE + 1
    assert [line for line in server.lines if LAST_RESORT in line]


def exit_after_sigterm(server: servers.Server) -> tuple[int, float]:
    """SIGTERM, then the exit code and the seconds it took to come."""
    server.process.send_signal(signal.SIGTERM)
    sent = time.perf_counter()
    code = server.process.wait(timeout=60)
    return code, time.perf_counter() - sent


@pytest.mark.parametrize("subject", list(SUBJECTS), indirect=True)
def test_sigint_stops_at_once_without_the_delay(subject: Subject) -> None:
    """Ctrl-C: exit 0 in seconds although SHUTDOWN_DELAY is 30 s."""
    mode, env, _ = subject
    server = servers.start(mode, {**env, "SHUTDOWN_DELAY": "30"})
    server.process.send_signal(signal.SIGINT)
    sent = time.perf_counter()
    code = server.process.wait(timeout=40)
    exited = time.perf_counter() - sent
    server.stop()
    assert code == 0
    assert exited < 5
