"""Tests for application.drain in-process: the flag and who sees it, `track`'s send, cutting
what is still in flight, and the gunicorn hooks with gunicorn's own worker and request.

What happens over the drain's seconds (the listener closing, the graceful deadline, the exit)
is judged from outside real servers in test_drain_servers.py.
"""

from __future__ import annotations

import asyncio
import io
import os
import selectors
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import gunicorn.config
import pytest
import structlog
from gunicorn.http.message import Request
from gunicorn.http.unreader import IterUnreader
from gunicorn.workers.gthread import ThreadWorker
from gunicorn.workers.sync import SyncWorker

from application import drain
from application.config import Config

DRAINING = "SIGTERM: draining; readiness fails, serving goes on until the listener closes"
# A drain delay longer than any test run: its timers never fire here.
FOREVER = 10.0**9


@pytest.fixture(autouse=True)
def not_draining() -> Iterator[None]:
    """Each test starts before SIGTERM and leaves the process so (the flag is process-wide)."""
    assert not drain.draining()
    yield
    drain._state[0] = 0


@pytest.fixture
def drain_log(capture_logs, monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """The drain's lines, as the service writes them."""
    stream = capture_logs(Config())
    monkeypatch.setattr(drain, "log", structlog.get_logger())
    return stream


@pytest.fixture
def sigterm_handler() -> Iterator[None]:
    """SIGTERM's handler in this process is what it was before the test."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def lines(stream: io.StringIO, text: str) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if text in line]


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> bool:
    """Poll: a signal sent from another thread may reach this process on any of its threads,
    and the handler runs once the main thread runs Python again."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- the flag -----------------------------------------------------------------------------------


def test_processes_forked_before_the_drain_see_it():
    """gunicorn forks its workers at start and its master takes SIGTERM later: the flag the
    master sets is the one its workers read."""
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork with threads running; the child only reads a byte and
        # the flag, writes them back and leaves without touching any lock.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        os.write(from_child, b"1" if drain.draining() else b"0")
        os.read(to_child, 1)  # the master's SIGTERM has been handled
        os.write(from_child, b"1" if drain.draining() else b"0")
        os._exit(0)
    try:
        seen = os.read(to_parent, 1)
        drain._start(Config(), "gunicorn")
        os.write(from_parent, b"x")
        seen += os.read(to_parent, 1)
    finally:
        os.waitpid(pid, 0)
        for fd in (to_child, from_parent, to_parent, from_child):
            os.close(fd)
    assert seen == b"01"  # not draining before, draining after


def test_the_drain_starts_with_a_line_naming_the_server_and_its_seconds(drain_log):
    """One INFO line: what happens now, which server, the delay and the graceful timeout."""
    drain._start(Config(shutdown_delay=2.5, graceful_timeout=7), "gunicorn")
    assert drain.draining()
    [line] = drain_log.getvalue().splitlines()
    assert f"[INFO] {DRAINING} " in line
    assert line.endswith("server=gunicorn shutdown_delay=2.5 graceful_timeout=7")


# -- track: Connection: close, and what is cut past the graceful timeout ---------------------

KEEP_ALIVE = [(b"connection", b"keep-alive")]


@pytest.mark.parametrize(
    ("http_version", "is_draining", "app_headers", "connection"),
    [
        ("1.1", False, [], []),
        ("1.1", True, [], [b"close"]),
        ("1.0", True, [], [b"close"]),
        ("1.1", True, KEEP_ALIVE, [b"close"]),
        ("1.1", True, [(b"Connection", b"keep-alive")], [b"close"]),
        ("1.1", False, KEEP_ALIVE, [b"keep-alive"]),
        ("2", True, [], []),  # HTTP/2 forbids the header (h2 would refuse the response)
    ],
)
async def test_a_response_started_while_draining_asks_for_a_new_connection(
    http_version: str,
    is_draining: bool,
    app_headers: list[tuple[bytes, bytes]],
    connection: list[bytes],
) -> None:
    """`track`'s send: one `Connection: close` on HTTP/1 while draining, else as the app sent."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    if is_draining:
        drain._start(Config(), "hypercorn")
    headers = [(b"content-type", b"text/plain"), *app_headers]
    tracked = drain.track({"type": "http", "http_version": http_version}, send)
    await tracked({"type": "http.response.start", "status": 200, "headers": headers})
    await tracked({"type": "http.response.body", "body": b"x"})
    [start, body] = sent
    assert (b"content-type", b"text/plain") in start["headers"]
    connections = [
        (name, value) for name, value in start["headers"] if name.lower() == b"connection"
    ]
    assert connections == [(b"connection", value) for value in connection]
    assert body == {"type": "http.response.body", "body": b"x"}


async def test_a_response_without_headers_started_while_draining_gets_connection_close():
    """ASGI's `headers` is optional: the one header is then Connection: close."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    drain._start(Config(), "hypercorn")
    tracked = drain.track({"type": "http", "http_version": "1.1"}, send)
    await tracked({"type": "http.response.start", "status": 204})
    assert sent == [
        {"type": "http.response.start", "status": 204, "headers": [(b"connection", b"close")]}
    ]


async def test_the_graceful_timeout_cuts_requests_in_flight_and_only_those(drain_log):
    """The requests still running are cancelled, with one WARNING counting them; one that
    ended before is no longer tracked, and a request started since is cut next time."""

    async def request(done: asyncio.Event | None = None) -> None:
        drain.track({"type": "http", "http_version": "1.1"}, _ignore)
        if done is not None:
            await done.wait()
        else:
            await asyncio.sleep(FOREVER)

    finished = asyncio.Event()
    ended = asyncio.create_task(request(finished))
    stuck = [asyncio.create_task(request()) for _ in range(2)]
    await asyncio.sleep(0)  # every request has started
    finished.set()
    await ended
    drain._cut_in_flight()
    results = await asyncio.gather(*stuck, return_exceptions=True)
    assert all(isinstance(result, asyncio.CancelledError) for result in results)
    [line] = lines(drain_log, "graceful timeout")
    assert "[WARNING] graceful timeout: cutting requests still in flight requests=2" in line

    drain._cut_in_flight()  # nothing left: nothing to say
    assert len(lines(drain_log, "graceful timeout")) == 1


async def _ignore(message: dict[str, Any]) -> None:
    """A send that goes nowhere."""


# -- hypercorn: SIGTERM taken over on the serving loop -----------------------------------------


async def test_sigterm_on_the_serving_loop_drains_once(drain_log, sigterm_handler):
    """After the lifespan startup, SIGTERM starts the drain instead of stopping the server; a
    second SIGTERM changes nothing; neither fails. (The stop, the cut and the exit come
    seconds later: test_drain_servers.py.)"""
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
    drain.on_lifespan_startup(Config(shutdown_delay=FOREVER))
    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(10):
        while not drain.draining():  # noqa: ASYNC110 - a byte of shared memory: no event
            await asyncio.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(0.1)  # the loop's turn to run a second handler, if there were one
    [line] = lines(drain_log, DRAINING)
    assert "server=hypercorn " in line
    assert errors == []


# -- gunicorn: the master's SIGTERM, a gthread worker's listener, a request's connection -------


class Arbiter:
    """gunicorn's Arbiter as its SIGTERM reaches the hook: `handle_term`, gunicorn's graceful
    stop (the real one raises StopIteration out of the master's loop), counted here."""

    def __init__(self) -> None:
        self.stops = 0

    def handle_term(self) -> None:
        self.stops += 1


def test_gunicorns_stop_waits_for_the_drain_delay(drain_log, sigterm_handler):
    """The master's SIGTERM marks the drain at once; gunicorn's own stop follows once, after
    the delay, however many SIGTERMs came meanwhile."""
    arbiter = Arbiter()
    # As gunicorn's master does: its SIGTERM handler ends in arbiter.handle_term().
    signal.signal(signal.SIGTERM, lambda signum, frame: arbiter.handle_term())
    drain.hold_gunicorn_stop(arbiter, Config(shutdown_delay=1.0))
    sent = time.monotonic()
    os.kill(os.getpid(), signal.SIGTERM)
    assert wait_for(drain.draining)
    timers = [thread for thread in threading.enumerate() if isinstance(thread, threading.Timer)]
    assert timers
    assert all(timer.daemon for timer in timers)  # a master stopped meanwhile exits at once
    os.kill(os.getpid(), signal.SIGTERM)
    assert arbiter.stops == 0
    assert wait_for(lambda: arbiter.stops > 0)
    assert time.monotonic() - sent >= 1.0
    [line] = lines(drain_log, DRAINING)
    assert "server=gunicorn " in line
    assert arbiter.stops == 1


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


@pytest.fixture
def gthread_worker(listener: socket.socket) -> Iterator[ThreadWorker]:
    """gunicorn's gthread worker on `listener`, accepting, as its run loop leaves it."""
    worker = ThreadWorker(1, os.getppid(), [listener], None, 30, gunicorn.config.Config(), None)
    worker.poller = selectors.DefaultSelector()
    worker.method_queue.init()
    drain.close_gunicorn_listener(worker)
    worker.set_accept_enabled(True)
    yield worker
    worker.method_queue.close()
    worker.poller.close()
    worker.tmp.close()


def test_ctrl_c_stops_a_gthread_worker_caught_inside_its_pools_submit(listener):
    """SIGINT or SIGQUIT landing while the worker's main thread is inside its thread pool's
    `submit` (the pool's lock held, as when it starts a thread): the worker still exits at
    once. gunicorn's own handler shuts the pool down first, and waited on that lock for ever."""
    worker = drain.gthread_worker()(
        1, os.getppid(), [listener], None, 30, gunicorn.config.Config(), None
    )
    worker.tpool = worker.get_thread_pool()
    exits: list[SystemExit] = []

    def handle_quit() -> None:
        try:
            worker.handle_quit(signal.SIGQUIT, None)
        except SystemExit as stopped:
            exits.append(stopped)

    # What an interrupted submit holds (CPython's ThreadPoolExecutor, 3.11 to 3.13).
    with worker.tpool._shutdown_lock:
        quitting = threading.Thread(target=handle_quit, daemon=True)
        quitting.start()
        quitting.join(5)
    assert [stopped.code for stopped in exits] == [0]
    assert not worker.alive
    worker.tpool.shutdown()
    worker.tmp.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_stopping_gthread_worker_closes_its_listener(gthread_worker, listener):
    """Told to stop, it stops accepting and closes its copy of the socket: connections are
    refused at once instead of queueing until the graceful timeout."""
    port = listener.getsockname()[1]
    gthread_worker.handle_exit(signal.SIGTERM, None)
    gthread_worker.set_accept_enabled(False)
    assert listener.fileno() == -1
    assert refused(port)


def test_a_gthread_worker_pausing_keeps_its_listener(gthread_worker, listener):
    """A worker that stops accepting for a while (all its connections busy) keeps serving on
    the same socket afterwards."""
    port = listener.getsockname()[1]
    gthread_worker.set_accept_enabled(False)
    gthread_worker.set_accept_enabled(True)
    assert listener.fileno() != -1
    assert not refused(port)


def test_other_worker_classes_are_left_as_they_are(listener):
    """A sync worker closes its listeners itself when it stops: the hook changes nothing."""
    worker = SyncWorker(1, os.getppid(), [listener], None, 30, gunicorn.config.Config(), None)
    try:
        before = dict(vars(worker))
        drain.close_gunicorn_listener(worker)
        assert vars(worker) == before
    finally:
        worker.tmp.close()


def request() -> Request:
    """A keep-alive HTTP/1.1 request as gunicorn parses it."""
    unreader = IterUnreader(iter([b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"]))
    return Request(gunicorn.config.Config(), unreader, ("127.0.0.1", 1))


def test_gunicorn_closes_the_connection_after_a_request_taken_while_draining():
    """`pre_request`: gunicorn itself closes the connection after answering while draining,
    and keeps it open otherwise."""
    before = request()
    drain.close_gunicorn_connection(None, before)
    drain._start(Config(), "gunicorn")
    during = request()
    drain.close_gunicorn_connection(None, during)
    assert not before.should_close()
    assert during.should_close()
