"""`asgi_app` under a real hypercorn, the way clients abuse it: streams read and abandoned,
bodies too large or too many, floods past the thread pool, and HTTP/2."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests import rawhttp, servers
from tests.test_contract import BLOB, build, digest

WAIT = 10  # the longest any test waits for something that should take well under a second


@pytest.fixture(scope="module")
def hypercorn() -> Iterator[servers.Server]:
    running = servers.start("hypercorn-asgi", module="tests.contract_app")
    yield running
    running.stop()


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def streams(server: servers.Server, what: str) -> int:
    """How many event streams the server's log says were `opened` or `closed`."""
    return sum(f"event stream {what}" in line for line in list(server.lines))


def until(condition: object, seconds: float = WAIT) -> float:
    """Poll `condition` (a callable) until true; the seconds it took, or fail."""
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not true after {seconds} s")
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_streamed_body_reaches_the_client_as_it_is_made(hypercorn: servers.Server) -> None:
    """Five chunks 0.2 s apart arrive 0.2 s apart, not all together at the end."""
    arrivals = []
    with httpx.stream("GET", hypercorn.url + "/stream?n=5&delay=0.2", timeout=WAIT) as response:
        for chunk in response.iter_raw():
            arrivals.extend(time.perf_counter() for _ in range(chunk.count(b"chunk ")))
    assert len(arrivals) == 5
    assert arrivals[-1] - arrivals[0] > 0.5  # buffered whole, they would come within a few ms


def test_server_sent_events_flow_from_an_endless_stream(hypercorn: servers.Server) -> None:
    """An endless event stream answers at once and keeps giving events as they are made."""
    events = 0
    with httpx.stream("GET", hypercorn.url + "/sse", timeout=WAIT) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break
    assert events == 3


def test_clients_that_leave_streams_free_their_threads(hypercorn: servers.Server) -> None:
    """100 clients open an endless stream and leave: every stream is closed within a few
    seconds (none is run for a client already gone), and `/` answers."""
    request = build("GET", "/sse").replace(b"Connection: close", b"Connection: keep-alive")
    clients = [socket.create_connection(("127.0.0.1", hypercorn.port)) for _ in range(100)]
    for client in clients:
        client.sendall(request)
    opened_before = streams(hypercorn, "opened")
    until(lambda: streams(hypercorn, "opened") - opened_before >= 32)  # every thread streams
    for client in clients:
        client.close()
    took = until(lambda: streams(hypercorn, "opened") == streams(hypercorn, "closed"))
    assert took < 5  # each stream stops at its next event (0.1 s) after its client left
    assert hypercorn.get("/").status_code == 200


def test_a_declared_body_over_the_limit_is_refused_unread(hypercorn: servers.Server) -> None:
    """300 MB declared to a GET-only route: 413 after a few KB, not after the whole body."""
    head = build("POST", "/", length=300_000_000)
    with socket.create_connection(("127.0.0.1", hypercorn.port), timeout=WAIT) as client:
        client.sendall(head + bytes(4096))
        answer = rawhttp.read_answer(rawhttp._Reader(client))
    assert answer.status == 413
    assert json.loads(answer.body) == {"error": "Request Entity Too Large", "status": 413}


def test_many_large_bodies_stay_out_of_memory_and_off_disk(tmp_path: Path) -> None:
    """150 clients each sending 4 MB at once (572 MiB in all): the server's memory grows by
    what each connection buffers, not by the bodies, and nothing goes to its temp directory."""
    env = {"TMPDIR": str(tmp_path)}
    running = servers.start("hypercorn-asgi", env, module="tests.contract_app")
    try:
        pid = running.process.pid
        before = rss_kib(pid)
        request = build("POST", "/", body=bytes(4_000_000))
        with ThreadPoolExecutor(150) as pool:
            answers = list(pool.map(lambda _: rawhttp.request(running.port, request), range(150)))
        grown_mib = (rss_kib(pid) - before) / 1024
        temp_files = [
            link for fd in Path(f"/proc/{pid}/fd").iterdir()
            if str(tmp_path) in (link := os.readlink(fd))
        ]  # fmt: skip
    finally:
        running.stop()
    print(f"RSS grew by {grown_mib:.1f} MiB for 150 x 4 MB bodies")
    assert {answer.status for answer in answers} == {405}
    assert grown_mib < 100  # measured 27-55 MiB; held whole, the bodies alone are 572 MiB
    assert temp_files == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("method", "path", "size"),
    [("GET", "/health", 0), ("GET", "/health/live", 0), ("GET", "/health", 4_000_000),
     ("POST", "/", 4_000_000)],
)  # fmt: skip
def test_every_exchange_lets_its_connection_close(
    hypercorn: servers.Server, method: str, path: str, size: int
) -> None:
    """After the answer to a request that said `Connection: close`, the connection closes,
    whatever the route read of the body. (hypercorn waits for ever for the app to take the
    request's last message; asgi_app takes it, or drops the rest of a body nobody reads.)"""
    with socket.create_connection(("127.0.0.1", hypercorn.port), timeout=WAIT) as client:
        try:
            client.sendall(build(method, path, body=bytes(size)))
        except (BrokenPipeError, ConnectionResetError):
            pass
        reader = rawhttp._Reader(client)
        assert rawhttp.read_answer(reader).status in (200, 405)
        assert reader.rest() == b""  # closed by the server; left open, this times out


@pytest.fixture
def two_threads() -> Iterator[servers.Server]:
    """A server with two threads, so its line of waiting requests holds 64."""
    running = servers.start("hypercorn-asgi", {"WSGI_THREADS": "2"}, module="tests.contract_app")
    yield running
    running.stop()


def test_a_flood_past_the_pool_is_refused_and_health_still_answers(
    two_threads: servers.Server, tmp_path: Path
) -> None:
    """100 requests to a held view with 2 threads: 2 run, 64 wait, 34 get 503 with Retry-After
    at once; /health answers meanwhile; once released, every waiting request is served."""
    release = tmp_path / "release"
    request = build("GET", f"/hold?until={release}")
    with ThreadPoolExecutor(100) as pool:
        answers = [pool.submit(rawhttp.request, two_threads.port, request) for _ in range(100)]
        until(lambda: sum(answer.done() for answer in answers) == 34)
        assert two_threads.get("/health").status_code == 200
        assert two_threads.get("/").status_code == 503  # the line is full: an answer, not a hang
        release.touch()
        statuses = [answer.result().status for answer in answers]
    assert statuses.count(200) == 66 and statuses.count(503) == 34
    refused = next(a.result() for a in answers if a.result().status == 503)
    assert refused.header("retry-after") == "1"
    assert two_threads.get("/").status_code == 200


def test_slow_bodies_hold_no_thread(two_threads: servers.Server) -> None:
    """20 clients trickling small bodies a byte at a time: with 2 threads, `/` still answers,
    because a body of up to 64 KiB is read before a thread is taken."""
    head = build("POST", "/echo", length=100).replace(
        b"Connection: close", b"Connection: keep-alive"
    )
    slow = [socket.create_connection(("127.0.0.1", two_threads.port)) for _ in range(20)]
    try:
        for client in slow:
            client.sendall(head + b"x")
        for _ in range(3):
            time.sleep(0.2)
            for client in slow:
                client.sendall(b"x")
        started = time.perf_counter()
        assert two_threads.get("/").status_code == 200
        assert time.perf_counter() - started < 2  # behind 20 held threads it would never come
    finally:
        for client in slow:
            client.close()


def test_a_request_whose_client_left_while_waiting_is_not_run(
    two_threads: servers.Server, tmp_path: Path
) -> None:
    """Requests that wait for a thread and lose their client never reach the app: a 499 line."""
    release = tmp_path / "release"
    request = build("GET", f"/hold?until={release}", request_id="gone")
    busy = [socket.create_connection(("127.0.0.1", two_threads.port)) for _ in range(2)]
    for client in busy:
        client.sendall(build("GET", f"/hold?until={release}"))
    two_threads.wait_for_line("hold started")
    until(lambda: sum("hold started" in line for line in two_threads.lines) == 2)
    leaving = [socket.create_connection(("127.0.0.1", two_threads.port)) for _ in range(5)]
    for client in leaving:
        client.sendall(request)
    time.sleep(0.3)  # they are in the line
    for client in leaving:
        client.close()
    until(lambda: sum("status=499" in line for line in two_threads.lines) == 5)
    release.touch()
    for client in busy:
        assert rawhttp.read_answer(rawhttp._Reader(client)).status == 200
        client.close()
    assert sum("hold started" in line for line in two_threads.lines) == 2


def test_the_access_line_counts_the_wait_for_a_thread(tmp_path: Path) -> None:
    """With one thread, the second of two 2 s requests waited 2 s: its line says about 4 s."""
    running = servers.start("hypercorn-asgi", {"WSGI_THREADS": "1"}, module="tests.contract_app")
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(running.get, "/slow?seconds=2", headers={"X-Request-ID": "one"})
            running.wait_for_line("slow view started")
            second = pool.submit(running.get, "/slow?seconds=2", headers={"X-Request-ID": "two"})
            assert first.result().status_code == second.result().status_code == 200
        line = running.wait_for_line("request finished", "request_id=two")
    finally:
        running.stop()
    duration_ms = float(re.search(r"duration_ms=([\d.]+)", line).group(1))  # type: ignore[union-attr]
    assert duration_ms > 3000  # its own 2 s and most of the other's; without the wait, ~2000


def test_a_stream_cut_by_a_failure_is_logged_as_incomplete(hypercorn: servers.Server) -> None:
    """The status went out as 200 and the body was cut: the access line says so."""
    answer = rawhttp.request(hypercorn.port, build("GET", "/boom-stream", request_id="cut"))
    assert (answer.status, answer.complete) == (200, False)
    line = hypercorn.wait_for_line("request finished", "request_id=cut")
    assert "status=200" in line and "incomplete=true" in line


def test_wsgi_errors_become_log_events(hypercorn: servers.Server) -> None:
    """What an app writes to wsgi.errors comes out as ERROR events in the log format."""
    hypercorn.get("/errors", headers={"X-Request-ID": "errs"})
    line = hypercorn.wait_for_line("first problem")
    assert re.match(servers.LOG_LINE.replace("(DEBUG|INFO|WARNING|ERROR|CRITICAL)", "ERROR"), line)
    assert "request_id=errs" in line
    assert not any(line.startswith("2015-01-01") for line in hypercorn.lines)


@pytest.mark.parametrize("path", ["/health", "/health/ready", "/health/live"])
def test_health_answers_from_asgi_app_are_never_cached(
    hypercorn: servers.Server, path: str
) -> None:
    """The natively answered health routes carry Cache-Control: no-store too."""
    assert hypercorn.get(path).headers["cache-control"] == "no-store"


# -- HTTP/2 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h2(hypercorn: servers.Server) -> Iterator[httpx.Client]:
    """An HTTP/2 client (prior knowledge, over cleartext), as hypercorn serves it."""
    with httpx.Client(base_url=hypercorn.url, http1=False, http2=True, timeout=WAIT) as client:
        yield client


def test_http2_post_without_a_length_reaches_the_app(h2: httpx.Client) -> None:
    """An HTTP/2 body sent in frames, with no Content-Length, arrives whole."""

    def frames() -> Iterator[bytes]:
        yield from (BLOB[i : i + 1000] for i in range(0, len(BLOB), 1000))

    response = h2.post("/echo", content=frames())
    assert response.http_version == "HTTP/2"
    assert response.json()["body"] == digest(BLOB)


def test_http2_answers_as_http1_does(h2: httpx.Client, hypercorn: servers.Server) -> None:
    """The same request over HTTP/2 and HTTP/1.1: the same status and JSON."""
    params = {"a": ["1", "2"]}
    over_h2 = h2.get("/echo", params=params, headers={"X-Multi": "x"})
    over_h1 = hypercorn.get("/echo", params=params, headers={"X-Multi": "x"})
    assert over_h2.http_version == "HTTP/2"
    assert over_h2.status_code == over_h1.status_code == 200
    assert over_h2.json() == over_h1.json()


def test_http2_head_and_stream(h2: httpx.Client) -> None:
    """HEAD has headers and no body; a stream arrives whole, over HTTP/2."""
    head = h2.head("/health")
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-type"] == "application/json"
    assert h2.get("/stream?n=3").text == "chunk 0\nchunk 1\nchunk 2\n"
