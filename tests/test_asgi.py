"""Tests for application.asgi in-process: scopes in, messages out, case by case, the way
hypercorn tests its own app wrappers. tests/test_contract.py holds the same rules against
gunicorn over real sockets; these pin each translation rule on its own, fast."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
import structlog
from flask import Flask, Response, request
from prometheus_client import REGISTRY

from application import asgi as asgi_module
from application import drain
from application.asgi import (
    EARLY_BODY,
    STREAM_AHEAD,
    WAITING_PER_THREAD,
    AsgiApp,
    Client,
    RequestBody,
    Threads,
    _split_path,
)
from application.config import Config
from application.health import HealthChecker

Message = dict[str, Any]


def scope(path: str = "/", **overrides: Any) -> dict[str, Any]:
    """An HTTP scope as hypercorn makes it for `GET path`."""
    raw, _, query = path.partition("?")
    base = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": raw,
        "raw_path": raw.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"service.test")],
        "client": ("10.0.0.7", 50123),
        "server": ("127.0.0.1", 5000),
    }
    return {**base, **overrides}


class Exchange:
    """Drives one ASGI request: the body messages to receive, what was sent back."""

    def __init__(
        self,
        bodies: Iterable[bytes] = (b"",),
        *,
        leave: bool = False,
        ends: bool = True,
        messages: Iterable[Message] = (),
    ) -> None:
        """`ends=False`: the last body message says more is coming, and nothing comes;
        `messages`: sent as they are instead of `bodies`."""
        chunks = list(bodies)
        self.incoming: asyncio.Queue[Message] = asyncio.Queue()
        for message in messages or (
            {"type": "http.request", "body": chunk, "more_body": not ends or i < len(chunks) - 1}
            for i, chunk in enumerate(chunks)
        ):
            self.incoming.put_nowait(message)
        if leave:
            self.incoming.put_nowait({"type": "http.disconnect"})
        self.sent: list[Message] = []

    def leave(self) -> None:
        self.incoming.put_nowait({"type": "http.disconnect"})

    async def all_taken(self) -> None:
        """Wait until the app has taken every message the client sent."""
        for _ in range(500):
            if self.incoming.empty():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{self.incoming.qsize()} messages were never taken")

    async def receive(self) -> Message:
        return await self.incoming.get()

    async def send(self, message: Message) -> None:
        """Takes a response as a server does: one start, then body messages until the last."""
        answer = [m for m in self.sent if m["type"].startswith("http.response.")]
        if message["type"] == "http.response.start":
            assert not answer, f"a second start: {message}"
        elif message["type"] == "http.response.body":
            assert answer, f"a body before the start: {message}"
            last = answer[-1]
            assert last["type"] == "http.response.start" or last.get("more_body", False), (
                f"a body after the last: {message}"
            )
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(next(m["status"] for m in self.sent if m["type"] == "http.response.start"))

    @property
    def headers(self) -> dict[bytes, bytes]:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return dict(start["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def make_app(config: Config | None = None) -> tuple[Flask, AsgiApp]:
    """The service, plus routes that show what Flask was given."""
    from application.web import create_app

    flask_app = create_app(config or Config(commit="c0ffee"))

    @flask_app.route("/environ", methods=["GET", "POST"])
    def environ() -> dict[str, object]:
        shown = {k: v for k, v in request.environ.items() if isinstance(v, str | int | tuple)}
        shown["body"] = request.get_data().decode("latin-1")
        return shown

    @flask_app.get("/chunks")
    def chunks() -> Response:
        return Response(iter([b"one,", b"two,", b"three"]))

    @flask_app.get("/endless")
    def endless() -> Response:
        return Response(b"%d," % n for n in range(10**9))

    @flask_app.post("/echo-stream")
    def echo_stream() -> Response:
        received = request.get_data()
        return Response(b"%d," % n for n in range(len(received), 10**9))

    @flask_app.get("/thread")
    def thread() -> str:
        return threading.current_thread().name

    @flask_app.get("/in-flight")
    def in_flight() -> str:
        return str(sample("http_requests_in_flight"))

    entered, gate = threading.Event(), threading.Event()
    flask_app.config["GATE"] = entered, gate

    @flask_app.get("/gate")
    def held() -> str:
        """Holds its thread until the test opens the gate."""
        entered.set()
        gate.wait(10)
        return "through"

    return flask_app, AsgiApp(flask_app)


@pytest.fixture
def app() -> Iterator[AsgiApp]:
    _, asgi = make_app()
    yield asgi
    asgi.threads.shutdown()
    asgi.checker.close()


async def environ_of(app: AsgiApp, **overrides: Any) -> dict[str, Any]:
    exchange = Exchange(overrides.pop("bodies", (b"",)))
    await app(scope("/environ", **overrides), exchange.receive, exchange.send)
    assert exchange.status == 200, exchange.body
    return json.loads(exchange.body)  # type: ignore[no-any-return]


# -- the environ, rule by rule -----------------------------------------------------------------

SPLITS = [
    # (raw path, root path) -> (SCRIPT_NAME, PATH_INFO), as gunicorn makes them
    ((b"/", ""), ("", "/")),
    ((b"/a%20b", ""), ("", "/a b")),
    ((b"/a%2Fb", ""), ("", "/a/b")),
    ((b"/%E2%82%AC", ""), ("", "/\u00e2\u0082\u00ac")),  # UTF-8 bytes, as latin-1: PEP 3333
    ((b"/%FF", ""), ("", "/\u00ff")),  # not UTF-8 at all: the byte survives
    ((b"/prefix/x", "/prefix"), ("/prefix", "/x")),
    ((b"/prefix", "/prefix"), ("/prefix", "")),
    ((b"/elsewhere", "/prefix"), ("/prefix", "/elsewhere")),  # routes nowhere: a 404
]


@pytest.mark.parametrize(("given", "expected"), SPLITS, ids=[str(g) for g, _ in SPLITS])
def test_path_split(given: tuple[bytes, str], expected: tuple[str, str]) -> None:
    """PATH_INFO is the raw path percent-decoded to bytes, read as latin-1, root path off."""
    raw_path, root_path = given
    assert _split_path({"raw_path": raw_path, "path": "", "root_path": root_path}) == expected


HEADER_CASES = [
    # scope headers -> environ entries they make (None: absent)
    ([(b"x-custom", b"real"), (b"x_custom", b"smuggled")], {"HTTP_X_CUSTOM": "real"}),
    ([(b"x-multi", b"a"), (b"x-multi", b"b")], {"HTTP_X_MULTI": "a,b"}),
    ([(b"content-type", b"text/plain")], {"CONTENT_TYPE": "text/plain", "HTTP_CONTENT_TYPE": None}),
    ([(b"content-length", b"0")], {"CONTENT_LENGTH": "0", "HTTP_CONTENT_LENGTH": None}),
    ([(b"x-latin", b"caf\xe9")], {"HTTP_X_LATIN": "caf\u00e9"}),
]


@pytest.mark.parametrize(("headers", "expected"), HEADER_CASES)
async def test_headers_become_environ_entries(
    app: AsgiApp, headers: list[tuple[bytes, bytes]], expected: dict[str, str | None]
) -> None:
    """gunicorn's rules: `_` names dropped, repeats joined, CONTENT_* without HTTP_."""
    environ = await environ_of(app, headers=[(b"host", b"service.test"), *headers])
    assert {key: environ.get(key) for key in expected} == expected


async def test_the_environ_carries_what_pep_3333_asks(app: AsgiApp) -> None:
    """Method, query, server, client, protocol, scheme, and an input that ends with the body."""
    environ = await environ_of(
        app,
        method="POST",
        query_string=b"a=1&a=2",
        http_version="2",
        scheme="https",
        bodies=[b"abc", b"def"],
    )
    assert environ["REQUEST_METHOD"] == "POST"
    assert environ["QUERY_STRING"] == "a=1&a=2"
    assert environ["RAW_URI"] == "/environ?a=1&a=2"
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("127.0.0.1", "5000")
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("10.0.0.7", "50123")
    assert environ["SERVER_PROTOCOL"] == "HTTP/2"
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["wsgi.input_terminated"] is True
    assert environ["body"] == "abcdef"


# -- wsgi.input --------------------------------------------------------------------------------


@pytest.fixture
def loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop in a thread, as hypercorn's, for RequestBody to pull from."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def body_of(
    loop: asyncio.AbstractEventLoop, first: bytes, later: list[bytes], *, ends: bool = True
) -> RequestBody:
    """A body whose first bytes came early and the rest in `later` messages; `ends=False`:
    the client leaves after them instead of ending the body."""
    from application.asgi import Client

    messages: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": not ends or i < len(later) - 1}
        for i, chunk in enumerate(later)
    ]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return RequestBody(loop, Client(receive, body_done=not later), first, bool(later))


@pytest.mark.parametrize(
    ("reads", "expected"),
    [
        ([-1], [b"line 1\nline 2\nend"]),
        ([3, 4, -1], [b"lin", b"e 1\n", b"line 2\nend"]),
        ([100], [b"line 1\nline 2\nend"]),
    ],
)
def test_read_spans_messages(
    loop_thread: asyncio.AbstractEventLoop, reads: list[int], expected: list[bytes]
) -> None:
    """read(n) gives n bytes while there are, across messages; read() the rest."""
    body = body_of(loop_thread, b"line 1", [b"\nline", b" 2\nend"])
    assert [body.read(size) for size in reads] == expected
    assert body.read() == b""


def test_readline_and_iteration_span_messages(loop_thread: asyncio.AbstractEventLoop) -> None:
    """Lines are whole however the messages cut them; readline(n) stops at n."""
    body = body_of(loop_thread, b"li", [b"ne 1\nline", b" 2\nend"])
    assert body.readline(2) == b"li"
    assert body.readline() == b"ne 1\n"
    assert list(body) == [b"line 2\n", b"end"]


def test_a_client_leaving_mid_body_is_an_error_for_the_reader(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    """A body cut short by a disconnect raises OSError (werkzeug makes it ClientDisconnected)."""
    body = body_of(loop_thread, b"start", [b"more"], ends=False)
    assert body.read(9) == b"startmore"
    with pytest.raises(OSError, match="left before sending the whole body"):
        body.read(1)


# -- responses ---------------------------------------------------------------------------------


async def test_a_whole_body_goes_out_in_one_message(app: AsgiApp) -> None:
    """A Flask response with its length: one start, one body, nothing streamed."""
    exchange = Exchange()
    await app(scope("/"), exchange.receive, exchange.send)
    assert [m["type"] for m in exchange.sent] == ["http.response.start", "http.response.body"]
    assert exchange.sent[-1].get("more_body", False) is False
    assert json.loads(exchange.body)["commit"] == "c0ffee"


async def test_a_streamed_body_goes_out_in_messages_then_an_empty_last(app: AsgiApp) -> None:
    """A body without a length: messages saying more is coming, then an empty one that ends it."""
    exchange = Exchange()
    await app(scope("/chunks"), exchange.receive, exchange.send)
    bodies = [m for m in exchange.sent if m["type"] == "http.response.body"]
    assert b"".join(m["body"] for m in bodies) == b"one,two,three"
    assert bodies[-1] == {"type": "http.response.body", "body": b""}
    assert all(m["body"] and m["more_body"] is True for m in bodies[:-1])


@pytest.mark.parametrize("path", ["/health", "/health/ready", "/health/live"])
async def test_native_health_answers_are_never_cached(app: AsgiApp, path: str) -> None:
    """Answered without Flask, the health routes still carry Cache-Control: no-store."""
    exchange = Exchange()
    await app(scope(path), exchange.receive, exchange.send)
    assert exchange.status == 200
    assert exchange.headers[b"cache-control"] == b"no-store"
    assert exchange.headers[b"content-type"] == b"application/json"
    assert exchange.body == b'{"commit": "c0ffee", "status": "Healthy"}'


async def test_native_health_is_found_under_a_root_path(app: AsgiApp) -> None:
    """With a root path, /prefix/health/live is the health route, not a 404."""
    exchange = Exchange()
    path = "/prefix/health/live"
    await app(scope(path, root_path="/prefix"), exchange.receive, exchange.send)
    assert exchange.status == 200


async def test_native_health_echoes_a_sane_request_id(app: AsgiApp) -> None:
    """X-Request-ID comes back on natively answered health routes too."""
    exchange = Exchange()
    headers = [(b"host", b"h"), (b"x-request-id", b"probe-7")]
    await app(scope("/health", headers=headers), exchange.receive, exchange.send)
    assert exchange.headers[b"x-request-id"] == b"probe-7"


# -- the line for threads ----------------------------------------------------------------------


class FakeClient:
    """A client for Threads.take: gone or not, as the test says."""

    def __init__(self) -> None:
        self.left: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def gone(self) -> bool:
        return self.left.done()

    async def until_gone_or(self, other: asyncio.Future[None]) -> None:
        await asyncio.wait((self.left, other), return_when=asyncio.FIRST_COMPLETED)


async def test_threads_are_handed_out_then_queued_then_refused() -> None:
    """One thread, a line of one: the first runs, the second waits, the third is refused."""
    threads = Threads(1, max_waiting=1)
    assert await threads.take(FakeClient())  # type: ignore[arg-type]
    waiting = asyncio.ensure_future(threads.take(FakeClient()))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert not await threads.take(FakeClient())  # type: ignore[arg-type]
    assert not waiting.done()
    threads.give_back()
    assert await waiting
    threads.shutdown()


async def test_a_client_gone_from_the_line_gives_up_its_place() -> None:
    """A waiting request whose client leaves is not run, and the thread goes to the next."""
    threads = Threads(1, max_waiting=2)
    assert await threads.take(FakeClient())  # type: ignore[arg-type]
    leaving, staying = FakeClient(), FakeClient()
    first = asyncio.ensure_future(threads.take(leaving))  # type: ignore[arg-type]
    second = asyncio.ensure_future(threads.take(staying))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    leaving.left.set_result(None)
    assert await first is False
    threads.give_back()
    assert await second is True
    threads.shutdown()


async def test_a_request_whose_body_is_still_coming_waits_in_line_unwatched() -> None:
    """Its client is not listened to in the line (the next message is body, Flask's to read):
    it waits for its turn, and every message is left where it was."""
    threads = Threads(1, max_waiting=1)
    assert await threads.take(FakeClient())  # type: ignore[arg-type]
    exchange = Exchange(ends=False)
    waiting = asyncio.ensure_future(threads.take(Client(exchange.receive, body_done=False)))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    threads.give_back()
    assert await waiting
    assert exchange.incoming.qsize() == 1
    threads.shutdown()


async def test_a_cancelled_waiter_leaves_no_thread_behind() -> None:
    """Cancelled while waiting: its place is freed, and the thread count stays right."""
    threads = Threads(1, max_waiting=2)
    assert await threads.take(FakeClient())  # type: ignore[arg-type]
    waiter = asyncio.ensure_future(threads.take(FakeClient()))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    threads.give_back()
    assert await threads.take(FakeClient())  # type: ignore[arg-type]
    threads.shutdown()


# -- more of the environ -----------------------------------------------------------------------


async def test_the_environ_has_pep_3333s_fixed_keys(app: AsgiApp) -> None:
    """A threaded, multi-process server that runs the app more than once, WSGI 1.0."""
    environ = await environ_of(app)
    assert environ["wsgi.version"] == [1, 0]
    assert environ["wsgi.multithread"] is True
    assert environ["wsgi.multiprocess"] is True
    assert environ["wsgi.run_once"] is False


async def test_the_environ_falls_back_where_the_scope_is_silent(app: AsgiApp) -> None:
    """ASGI's optional keys: no server, scheme, raw path or root path in the scope."""
    given = scope("/environ")
    for optional in ("server", "scheme", "raw_path", "root_path"):
        del given[optional]
    exchange = Exchange()
    await app(given, exchange.receive, exchange.send)
    environ = json.loads(exchange.body)
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("localhost", "80")
    assert environ["wsgi.url_scheme"] == "http"
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("", "/environ")
    assert environ["RAW_URI"] == "/environ"


async def test_raw_uri_is_the_path_as_the_client_sent_it(app: AsgiApp) -> None:
    """RAW_URI keeps the percent-encoding that PATH_INFO decodes; no `?` without a query."""
    environ = await environ_of(app, raw_path=b"/envir%6Fn")
    assert environ["PATH_INFO"] == "/environ"
    assert environ["RAW_URI"] == "/envir%6Fn"


async def test_the_root_path_is_the_script_name(app: AsgiApp) -> None:
    """Mounted under /prefix: SCRIPT_NAME is the prefix, PATH_INFO the rest."""
    exchange = Exchange()
    await app(scope("/prefix/environ", root_path="/prefix"), exchange.receive, exchange.send)
    environ = json.loads(exchange.body)
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("/prefix", "/environ")


async def test_a_unix_socket_server_has_no_port(app: AsgiApp) -> None:
    """ASGI's server for a unix socket is (path, None): SERVER_PORT is empty."""
    environ = await environ_of(app, server=["/run/app.sock", None])
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("/run/app.sock", "")


async def test_a_dropped_header_drops_only_itself(app: AsgiApp) -> None:
    """A name with `_` first: the headers after it still arrive."""
    headers = [(b"host", b"h"), (b"x_forged", b"1"), (b"x-after", b"2")]
    environ = await environ_of(app, headers=headers)
    assert environ["HTTP_X_AFTER"] == "2"
    assert "HTTP_X_FORGED" not in environ


def test_path_split_without_raw_path_or_root_path() -> None:
    """ASGI's raw_path and root_path are optional: the path alone is PATH_INFO."""
    assert _split_path({"path": "/a b"}) == ("", "/a b")


async def test_a_request_read_whole_leaves_nothing_reading_its_connection(app: AsgiApp) -> None:
    """Only a body the app left unread is drained after the answer; a GET's connection is left
    to hypercorn, with no task of ours waiting on it."""
    before = set(asgi_module._dropping)
    exchange = Exchange()
    await app(scope("/"), exchange.receive, exchange.send)
    assert exchange.status == 200
    assert set(asgi_module._dropping) == before


async def test_flask_runs_on_threads_named_for_it(app: AsgiApp) -> None:
    """The pool's threads are named `wsgi_N`, as a thread dump or a crash line shows them."""
    exchange = Exchange()
    await app(scope("/thread"), exchange.receive, exchange.send)
    assert exchange.body.startswith(b"wsgi_")


async def test_flasks_own_statuses_pass_through(app: AsgiApp) -> None:
    """A status with a reason of several words (404 NOT FOUND) keeps its code."""
    exchange = Exchange()
    await app(scope("/nowhere"), exchange.receive, exchange.send)
    assert exchange.status == 404
    assert exchange.headers[b"content-type"] == b"application/json"


# -- request bodies through the app ------------------------------------------------------------


def long_body(size: int = 100_000, piece: int = 10_000) -> list[bytes]:
    return [bytes([65 + i % 26]) * piece for i in range(size // piece)]


async def test_a_long_body_arrives_whole(app: AsgiApp) -> None:
    """Longer than the early read: the rest is pulled from the client as the app reads."""
    body = long_body()
    length = str(sum(map(len, body))).encode()
    headers = [(b"host", b"h"), (b"content-length", length)]
    environ = await environ_of(app, method="POST", headers=headers, bodies=body)
    assert environ["body"] == b"".join(body).decode()


@pytest.mark.parametrize("length", [None, b"100000"], ids=["early", "pulled"])
async def test_body_and_more_body_may_be_left_out(app: AsgiApp, length: bytes | None) -> None:
    """ASGI's defaults: a message without `body` has none, without `more_body` is the last."""
    messages: list[Message] = [{"type": "http.request"}]
    if length:
        messages.insert(0, {"type": "http.request", "body": b"x" * 100_000, "more_body": True})
    headers = [(b"host", b"h"), *([(b"content-length", length)] if length else [])]
    exchange = Exchange(messages=messages)
    request_scope = scope("/environ", method="POST", headers=headers)
    await asyncio.wait_for(app(request_scope, exchange.receive, exchange.send), 10)
    assert exchange.status == 200
    assert json.loads(exchange.body)["body"] == ("x" * 100_000 if length else "")


async def test_a_long_declared_body_is_not_waited_for(app: AsgiApp) -> None:
    """1 MB declared and only its first message sent: the app, which reads none of it,
    answers at once, and what comes after is taken and dropped."""
    exchange = Exchange([b"x" * 1000], ends=False)
    headers = [(b"host", b"h"), (b"content-length", b"1000000")]
    await asyncio.wait_for(app(scope("/", headers=headers), exchange.receive, exchange.send), 10)
    assert exchange.status == 200
    exchange.leave()
    await exchange.all_taken()


async def test_a_body_without_a_length_is_read_early_only_up_to_its_limit(app: AsgiApp) -> None:
    """EARLY_BODY bytes of a body without a length, more announced and not sent: the app
    starts, and answers without reading it."""
    exchange = Exchange([b"x" * EARLY_BODY], ends=False)
    await asyncio.wait_for(app(scope("/"), exchange.receive, exchange.send), 10)
    assert exchange.status == 200
    exchange.leave()
    await exchange.all_taken()


async def test_a_body_the_app_never_reads_is_taken_and_dropped(app: AsgiApp) -> None:
    """After the answer, the rest of the body and then the disconnect are taken out (else
    hypercorn would wait for room in its queue for ever); then nothing of ours is left on it."""
    before = set(asgi_module._dropping)
    body = long_body()
    headers = [(b"host", b"h"), (b"content-length", b"100000")]
    exchange = Exchange(body)
    await app(scope("/", headers=headers), exchange.receive, exchange.send)
    assert exchange.status == 200
    await exchange.all_taken()
    exchange.leave()
    await exchange.all_taken()
    for _ in range(100):  # the task that took the disconnect ends at its next step
        if set(asgi_module._dropping) == before:
            break
        await asyncio.sleep(0.01)
    assert set(asgi_module._dropping) == before


async def test_a_client_that_leaves_before_its_body_gets_no_answer(app: AsgiApp) -> None:
    """Gone before the body came: the app does not run, nothing is sent."""
    exchange = Exchange(messages=[{"type": "http.disconnect"}])
    await app(scope("/environ", method="POST"), exchange.receive, exchange.send)
    assert exchange.sent == []


# -- streamed responses and a client that leaves ------------------------------------------------


class LeavingExchange(Exchange):
    """A client that leaves once it has had `after` body messages."""

    def __init__(self, after: int, bodies: Iterable[bytes] = (b"",)) -> None:
        super().__init__(bodies)
        self.after = after

    async def send(self, message: Message) -> None:
        await super().send(message)
        if len([m for m in self.sent if m["type"] == "http.response.body"]) == self.after:
            self.leave()


async def test_a_stream_stops_when_its_client_leaves(app: AsgiApp) -> None:
    """An endless stream ends soon after the client has gone, and the request with it. The
    50 messages before go out without a pause between them (10 s for all of it)."""
    exchange = LeavingExchange(after=50)
    await asyncio.wait_for(app(scope("/endless"), exchange.receive, exchange.send), 10)
    assert exchange.status == 200
    assert exchange.body.startswith(b"0,1,2,")


async def test_a_stream_stops_when_its_client_leaves_after_a_body_the_app_read(
    app: AsgiApp,
) -> None:
    """The same once the app has pulled a long body in: the end of the body is noticed."""
    body = long_body()
    exchange = LeavingExchange(after=3, bodies=body)
    headers = [(b"host", b"h"), (b"content-length", b"100000")]
    request_scope = scope("/echo-stream", method="POST", headers=headers)
    await asyncio.wait_for(app(request_scope, exchange.receive, exchange.send), 10)
    assert exchange.body.startswith(b"100000,100001,")


async def test_a_streamed_response_starts_once_then_sends_its_body(app: AsgiApp) -> None:
    """One start message with the status and headers, before every body message."""
    exchange = Exchange()
    await app(scope("/chunks"), exchange.receive, exchange.send)
    types = [m["type"] for m in exchange.sent]
    assert types[0] == "http.response.start"
    assert set(types[1:]) == {"http.response.body"}
    assert exchange.status == 200
    assert exchange.headers[b"content-type"] == b"text/html; charset=utf-8"


# -- the native health routes --------------------------------------------------------------------


class RefusedProbe:
    """A datastore whose port refuses every connection."""

    name = "db"
    target = "postgres://db.invalid:5432/app"

    async def ping(self) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    async def close(self) -> None:
        pass


@pytest.fixture
def unhealthy() -> Iterator[AsgiApp]:
    """The service with one datastore that refuses connections."""
    from application.web import create_app

    checker = HealthChecker([RefusedProbe()], timeout=0.5, cache_ttl=0)  # type: ignore[list-item]
    asgi = AsgiApp(create_app(Config(commit="c0ffee"), checker=checker))
    yield asgi
    asgi.threads.shutdown()
    checker.close()


async def answer(app: AsgiApp, path: str, **overrides: Any) -> Exchange:
    exchange = Exchange(overrides.pop("bodies", (b"",)))
    await app(scope(path, **overrides), exchange.receive, exchange.send)
    return exchange


async def test_live_asks_no_datastore_where_ready_does(unhealthy: AsgiApp) -> None:
    """With a datastore down, natively: live 200, ready and /health 500."""
    assert (await answer(unhealthy, "/health/live")).status == 200
    assert (await answer(unhealthy, "/health/ready")).status == 500
    assert (await answer(unhealthy, "/health")).status == 500


async def test_native_verbose_adds_each_datastores_check(unhealthy: AsgiApp) -> None:
    """?verbose=1 natively, as through Flask; without it only commit and status."""
    verbose = json.loads((await answer(unhealthy, "/health?verbose=1")).body)
    assert verbose["checks"]["db"]["error"] == "connection refused"
    plain = json.loads((await answer(unhealthy, "/health?other=1")).body)
    assert set(plain) == {"commit", "status"}


async def test_native_health_declares_its_length(app: AsgiApp) -> None:
    """Content-Length is the body's length."""
    exchange = await answer(app, "/health/live")
    assert exchange.headers[b"content-length"] == b"%d" % len(exchange.body)


async def test_a_health_check_with_a_body_has_it_taken_and_dropped(app: AsgiApp) -> None:
    """A body on a health check: answered, and the rest of it taken out after."""
    exchange = await answer(app, "/health/live", bodies=[b"a", b"b", b"c"])
    assert exchange.status == 200
    await exchange.all_taken()
    exchange.leave()
    await exchange.all_taken()


@pytest.fixture
def lines(
    capture_logs: Callable[[Config], io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> Callable[[], list[str]]:
    """The log lines written from here on."""
    stream = capture_logs(Config())
    monkeypatch.setattr(asgi_module, "log", structlog.get_logger())
    return lambda: stream.getvalue().splitlines()


def access(lines: list[str]) -> list[str]:
    return [line for line in lines if "request finished" in line]


TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_native_health_writes_the_access_line(
    app: AsgiApp, lines: Callable[[], list[str]]
) -> None:
    """Method, path, status and the client's address, with the request's id and trace."""
    headers = [(b"host", b"h"), (b"x-request-id", b"probe-7"), (b"traceparent", TRACEPARENT)]
    await answer(app, "/health/live", method="HEAD", headers=headers)
    [line] = access(lines())
    assert "method=HEAD path=/health/live status=200 " in line
    assert "remote=10.0.0.7" in line
    assert "request_id=probe-7" in line
    assert "trace_id=0af7651916cd43dd8448eb211c80319c" in line
    assert "span_id=b7ad6b7169203331" in line


async def test_two_traceparents_make_no_trace(app: AsgiApp, lines: Callable[[], list[str]]) -> None:
    """Repeated traceparent headers are joined, as in the environ, into no valid one."""
    headers = [(b"host", b"h"), (b"traceparent", TRACEPARENT), (b"traceparent", TRACEPARENT)]
    await answer(app, "/health/live", headers=headers)
    [line] = access(lines())
    assert "trace_id" not in line


async def test_native_health_without_a_client_address(
    app: AsgiApp, lines: Callable[[], list[str]]
) -> None:
    """A scope without a client (a unix socket): the line says so."""
    await answer(app, "/health/live", client=None)
    [line] = access(lines())
    assert "remote=null" in line


async def test_native_health_reads_the_trusted_proxys_forwarded_for(
    lines: Callable[[], list[str]],
) -> None:
    """TRUSTED_PROXIES=1: the address the proxy names, as Flask's requests get it."""
    _, app = make_app(Config(commit="c0ffee", trusted_proxies=1))
    headers = [(b"host", b"h"), (b"x-forwarded-for", b"203.0.113.9")]
    try:
        await answer(app, "/health/live", headers=headers)
    finally:
        app.threads.shutdown()
        app.checker.close()
    [line] = access(lines())
    assert "remote=203.0.113.9" in line


async def test_log_quiet_health_quiets_native_health(lines: Callable[[], list[str]]) -> None:
    """LOG_QUIET_HEALTH=1: no line for a health check that passed; one for one that failed."""
    from application.web import create_app

    checker = HealthChecker([RefusedProbe()], timeout=0.5, cache_ttl=0)  # type: ignore[list-item]
    app = AsgiApp(create_app(Config(log_quiet_health=True), checker=checker))
    try:
        await answer(app, "/health/live")
        await answer(app, "/health/ready")
    finally:
        app.threads.shutdown()
        checker.close()
    [line] = access(lines())
    assert "path=/health/ready status=500" in line


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_native_health_is_counted_and_timed(app: AsgiApp) -> None:
    """Counted by method, route and status; the time observed is the request's own."""
    labels = {"method": "GET", "route": "/health/live"}
    before = sample("http_requests_total", **labels, status="200")
    seconds = sample("http_request_duration_seconds_sum", **labels)
    started = time.perf_counter()
    await answer(app, "/health/live")
    elapsed = time.perf_counter() - started
    assert sample("http_requests_total", **labels, status="200") == before + 1
    assert 0 <= sample("http_request_duration_seconds_sum", **labels) - seconds <= elapsed


async def test_a_request_is_in_flight_from_when_it_is_taken(app: AsgiApp) -> None:
    """Counted once while it runs (not again by the Envelope), and not after."""
    before = sample("http_requests_in_flight")
    seen: list[float] = []

    async def send(message: Message) -> None:
        seen.append(sample("http_requests_in_flight"))

    await app(scope("/"), Exchange().receive, send)
    assert seen == [before + 1, before + 1]
    assert sample("http_requests_in_flight") == before
    assert (await answer(app, "/in-flight")).body == b"%r" % (before + 1)  # as the view sees it


async def test_without_metrics_requests_are_served(lines: Callable[[], list[str]]) -> None:
    """METRICS_PORT=0: nothing counted, everything answered."""
    _, app = make_app(Config(commit="c0ffee", metrics_port=0))
    try:
        assert (await answer(app, "/health/live")).status == 200
        assert (await answer(app, "/")).status == 200
    finally:
        app.threads.shutdown()
        app.checker.close()


# -- a raw WSGI app behind the bridge ------------------------------------------------------------


Wsgi = Callable[[dict[str, Any], Any], Iterable[bytes]]


@pytest.fixture
def serve() -> Iterator[Callable[[Wsgi], AsgiApp]]:
    """The bridge in front of a plain WSGI app instead of the service's routes."""
    made: list[AsgiApp] = []

    def bridge(wsgi: Wsgi) -> AsgiApp:
        flask_app, asgi = make_app()
        flask_app.wsgi_app = wsgi  # type: ignore[method-assign]
        made.append(asgi)
        return asgi

    yield bridge
    for asgi in made:
        asgi.threads.shutdown()
        asgi.checker.close()


class Closing:
    """An iterable with close(), as PEP 3333 lets an app return."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("leave", [False, True], ids=["finished", "client-left"])
async def test_the_apps_iterable_is_closed(serve: Callable[[Wsgi], AsgiApp], leave: bool) -> None:
    """close() is called whether the body was sent whole or the client left during it."""
    iterable = Closing([b"a"] * 10)

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return iterable

    exchange = LeavingExchange(after=1) if leave else Exchange()
    await asyncio.wait_for(serve(wsgi)(scope("/"), exchange.receive, exchange.send), 10)
    assert iterable.closed


class Watching(Exchange):
    """A client whose first body message is held in `send` until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.sending = threading.Event()  # the first body message is being sent
        self.release = threading.Event()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not self.sending.is_set():
            self.sending.set()
            while not self.release.is_set():  # noqa: ASYNC110 (set by the app's thread)
                await asyncio.sleep(0.005)
        await super().send(message)

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


async def test_a_chunk_goes_out_before_the_app_makes_the_next(
    serve: Callable[[Wsgi], AsgiApp],
) -> None:
    """The first chunk is sent while the app still works on the second (it waits for that)."""
    exchange = Watching()
    exchange.release.set()

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"first,"
        assert exchange.sending.wait(5), "the first chunk was held back"
        yield b"second"

    await asyncio.wait_for(serve(wsgi)(scope("/"), exchange.receive, exchange.send), 10)
    assert exchange.bodies() == [b"first,", b"second", b""]


async def test_chunks_made_while_one_is_sent_go_out_together(
    serve: Callable[[Wsgi], AsgiApp],
) -> None:
    """The app goes on while its client takes a chunk; what it made meanwhile is one message."""
    exchange = Watching()

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"a"
        assert exchange.sending.wait(5)
        yield b"b"
        yield b"c"
        exchange.release.set()

    await asyncio.wait_for(serve(wsgi)(scope("/"), exchange.receive, exchange.send), 10)
    assert exchange.bodies() == [b"a", b"bc", b""]


async def test_a_slow_client_pauses_the_app_once_it_is_stream_ahead_behind(
    serve: Callable[[Wsgi], AsgiApp],
) -> None:
    """While a client takes nothing, the app goes on until more than STREAM_AHEAD bytes wait
    besides the chunk being sent, and no further; then the rest follows whole."""
    chunk = b"x" * 65536
    exchange = Watching()
    made = 0

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        nonlocal made
        start_response("200 OK", [])
        for _ in range(20):
            made += 1
            yield chunk
            assert exchange.sending.wait(5)  # the first chunk is on its way, alone

    serving = asyncio.ensure_future(serve(wsgi)(scope("/"), exchange.receive, exchange.send))
    await asyncio.to_thread(exchange.sending.wait, 5)
    await asyncio.sleep(0.3)  # time for an app that is not paused to make them all
    # 4 chunks are exactly STREAM_AHEAD, not more: the app makes a fifth, then waits
    assert made == 1 + STREAM_AHEAD // len(chunk) + 1
    exchange.release.set()
    await asyncio.wait_for(serving, 10)
    assert b"".join(exchange.bodies()) == chunk * 20


async def test_a_client_leaving_frees_an_app_paused_for_it(
    serve: Callable[[Wsgi], AsgiApp],
) -> None:
    """An app waiting for a client that takes nothing stops, and is closed, when the client
    leaves; the send it was stuck in is given up."""
    iterable = Closing([b"x" * 65536] * 100)

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return iterable

    exchange = Watching()  # never released
    serving = asyncio.ensure_future(serve(wsgi)(scope("/"), exchange.receive, exchange.send))
    await asyncio.to_thread(exchange.sending.wait, 5)
    exchange.leave()
    await asyncio.wait_for(serving, 5)
    assert iterable.closed
    assert exchange.bodies() == [b""]  # nothing more went out


async def test_a_cancelled_request_stops_its_stream(serve: Callable[[Wsgi], AsgiApp]) -> None:
    """The server cancels a request whose app streams without end (and has not read its
    body, so no disconnect can be seen): the app stops and is closed all the same."""
    iterable = Closing(itertools.repeat(b"event\n"))

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return iterable

    exchange = Exchange(ends=False)  # the body never ends
    request = scope("/", method="POST", headers=[(b"content-length", b"100000")])
    serving = asyncio.ensure_future(serve(wsgi)(request, exchange.receive, exchange.send))
    for _ in range(500):
        if exchange.sent:
            break
        await asyncio.sleep(0.01)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    for _ in range(500):
        if iterable.closed:
            break
        await asyncio.sleep(0.01)
    assert iterable.closed


async def test_a_list_body_is_sent(serve: Callable[[Wsgi], AsgiApp]) -> None:
    """An iterable without close() (a list) is fine."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", "5")])
        return [b"he", b"llo"]

    assert (await answer(serve(wsgi), "/")).body == b"hello"


async def test_the_body_is_cut_at_its_content_length(serve: Callable[[Wsgi], AsgiApp]) -> None:
    """Bytes past Content-Length are dropped, however the chunks fall."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", "3")])
        return [b"he", b"l", b"lo", b"!"]

    assert (await answer(serve(wsgi), "/")).body == b"hel"


async def test_the_apps_iterable_runs_to_its_end(serve: Callable[[Wsgi], AsgiApp]) -> None:
    """Content-Length reached before the end: the app's iterable still runs to its end."""
    finished = threading.Event()

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Length", "2")])
        yield b"ok"
        yield b"past the length"
        finished.set()

    assert (await answer(serve(wsgi), "/")).body == b"ok"
    assert finished.is_set()


async def test_only_content_length_limits_the_body(serve: Callable[[Wsgi], AsgiApp]) -> None:
    """Another header with a number for its value limits nothing; names go out lower-case."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("X-Items", "3")])
        return [b"hello"]

    exchange = await answer(serve(wsgi), "/")
    assert exchange.body == b"hello"
    assert exchange.headers[b"x-items"] == b"3"


async def test_the_environ_has_an_error_stream_into_the_log(
    serve: Callable[[Wsgi], AsgiApp], lines: Callable[[], list[str]]
) -> None:
    """wsgi.errors, for an app the Envelope does not wrap, writes ERROR log lines."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ["wsgi.errors"].write("the app complains\n")
        start_response("204 No Content", [])
        return []

    assert (await answer(serve(wsgi), "/")).status == 204
    assert any("[ERROR] the app complains" in line for line in lines())


def failing(problem: str) -> Wsgi:
    """A WSGI app that breaks PEP 3333 in the way `problem` names."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if problem == "raises":
            raise ValueError("the app broke")
        if problem == "twice":
            start_response("200 OK", [])
            start_response("200 OK", [])
        if problem == "body first":
            return [b"body"]
        return []

    return wsgi


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("raises", "ValueError: the app broke"),
        ("no start", "RuntimeError: the WSGI app returned without calling start_response"),
        ("body first", "RuntimeError: the WSGI app sent a body before calling start_response"),
        ("twice", "RuntimeError: start_response called a second time without exc_info"),
    ],
)
async def test_an_app_failing_before_its_response_is_a_500(
    serve: Callable[[Wsgi], AsgiApp], lines: Callable[[], list[str]], problem: str, message: str
) -> None:
    """A JSON 500 for the client, and the error with its path in the log."""
    exchange = await answer(serve(failing(problem)), "/somewhere")
    assert exchange.status == 500
    assert json.loads(exchange.body) == {"error": "Internal Server Error", "status": 500}
    assert exchange.headers[b"content-type"] == b"application/json"
    assert exchange.headers[b"content-length"] == b"%d" % len(exchange.body)
    [line] = [line for line in lines() if "WSGI app failed" in line]
    assert "[ERROR] WSGI app failed before its response path=/somewhere" in line
    assert message in "\n".join(lines())


async def test_exc_info_replaces_a_response_not_yet_sent(serve: Callable[[Wsgi], AsgiApp]) -> None:
    """start_response again, with exc_info, before the body: the new status goes out."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        try:
            raise ValueError("late")
        except ValueError:
            start_response("502 Bad Gateway", [("Content-Length", "3")], sys_exc_info())
        return [b"bad"]

    exchange = await answer(serve(wsgi), "/")
    assert (exchange.status, exchange.body) == (502, b"bad")


def sys_exc_info() -> Any:
    import sys

    return sys.exc_info()


def raise_in_the_app() -> None:
    raise ValueError("after the status")


async def test_exc_info_after_the_status_went_out_raises_the_apps_error(
    serve: Callable[[Wsgi], AsgiApp],
) -> None:
    """Too late for another status: the app's own error is raised, with its traceback, and
    the server cuts the response short."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"partial"
        try:
            raise_in_the_app()
        except ValueError:
            start_response("500 Internal Server Error", [], sys_exc_info())
        yield b"never"

    exchange = Exchange()
    with pytest.raises(ValueError, match="after the status") as raised:
        await serve(wsgi)(scope("/"), exchange.receive, exchange.send)
    assert any(entry.name == "raise_in_the_app" for entry in raised.traceback)
    assert exchange.body == b"partial"


# -- the line for threads, through the app -------------------------------------------------------


@pytest.fixture
def pool(request: pytest.FixtureRequest) -> Iterator[tuple[Flask, AsgiApp]]:
    """The service with `threads` threads (the test's parameter, else 1)."""
    threads = getattr(request, "param", 1)
    flask_app, asgi = make_app(Config(commit="c0ffee", wsgi_threads=threads))
    yield flask_app, asgi
    flask_app.config["GATE"][1].set()
    asgi.threads.shutdown()
    asgi.checker.close()


async def hold_every_thread(flask_app: Flask, app: AsgiApp, threads: int) -> list[asyncio.Task]:
    """Requests that each hold a thread until the gate opens."""
    entered, _ = flask_app.config["GATE"]
    holders = []
    for _ in range(threads):
        entered.clear()
        holding = Exchange()
        holders.append(asyncio.ensure_future(app(scope("/gate"), holding.receive, holding.send)))
        assert await asyncio.to_thread(entered.wait, 10)
    return holders


async def settle() -> None:
    """Let every task that can run, run, until each waits on something."""
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.parametrize("pool", [1, 2], indirect=True)
@pytest.mark.parametrize(
    ("method", "path", "route"),
    [("GET", "/", "/"), ("GET", "/chunks", "/chunks"), ("POST", "/chunks", "unmatched")],
)
async def test_a_full_line_is_refused_with_503(
    pool: tuple[Flask, AsgiApp],
    lines: Callable[[], list[str]],
    method: str,
    path: str,
    route: str,
) -> None:
    """Every thread busy and WAITING_PER_THREAD requests per thread in line: the next gets
    503 with Retry-After, is counted by the route Flask would have matched (none for a
    method the route does not take) and logged; the line is served after."""
    flask_app, app = pool
    threads = app.config.wsgi_threads
    holders = await hold_every_thread(flask_app, app, threads)
    waiting = [Exchange() for _ in range(WAITING_PER_THREAD * threads)]
    tasks = [asyncio.ensure_future(app(scope("/"), w.receive, w.send)) for w in waiting]
    await settle()
    labels = {"method": method, "route": route, "status": "503"}
    before = sample("http_requests_total", **labels)
    refused = Exchange(long_body())
    headers = [(b"host", b"h"), (b"content-length", b"100000")]
    request = scope(path, method=method, headers=headers)
    await app(request, refused.receive, refused.send)
    assert refused.status == 503
    assert json.loads(refused.body) == {"error": "Service Unavailable", "status": 503}
    assert refused.headers[b"content-type"] == b"application/json"
    assert refused.headers[b"retry-after"] == b"1"
    assert refused.headers[b"connection"] == b"close"
    assert refused.headers[b"content-length"] == b"%d" % len(refused.body)
    assert sample("http_requests_total", **labels) == before + 1
    [line] = access(lines())
    assert f"method={method} path={path} status=503" in line
    await refused.all_taken()
    flask_app.config["GATE"][1].set()
    await asyncio.wait_for(asyncio.gather(*holders, *tasks), 10)
    assert {w.status for w in waiting} == {200}


@pytest.mark.parametrize("size", [0, EARLY_BODY], ids=["no-body", "early-body"])
async def test_a_client_that_leaves_the_line_is_never_run(
    pool: tuple[Flask, AsgiApp], lines: Callable[[], list[str]], size: int
) -> None:
    """Its body read (up to EARLY_BODY bytes), a client that leaves while waiting for a
    thread gets nothing, and the line says 499."""
    flask_app, app = pool
    holders = await hold_every_thread(flask_app, app, 1)
    leaving = Exchange([b"x" * size], leave=True)
    headers = [(b"host", b"h"), (b"content-length", b"%d" % size)]
    request_scope = scope("/environ", method="POST", headers=headers)
    task = asyncio.ensure_future(app(request_scope, leaving.receive, leaving.send))
    await settle()
    flask_app.config["GATE"][1].set()
    await asyncio.wait_for(asyncio.gather(task, *holders), 10)
    assert leaving.sent == []
    [line] = [line for line in access(lines()) if "path=/environ" in line]
    assert "method=POST path=/environ status=499" in line


async def test_a_request_cancelled_while_flask_runs_frees_its_thread_after(
    pool: tuple[Flask, AsgiApp],
) -> None:
    """The server cancels a request whose view still runs: once the view returns, its
    thread serves the next request."""
    flask_app, app = pool
    [holder] = await hold_every_thread(flask_app, app, 1)
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    flask_app.config["GATE"][1].set()
    exchange = Exchange()
    await asyncio.wait_for(app(scope("/"), exchange.receive, exchange.send), 10)
    assert exchange.status == 200


# -- the line for threads, on its own --------------------------------------------------------------


async def test_threads_given_back_can_all_be_taken_again() -> None:
    """Two threads taken and given back: two, and no more, are there to take."""
    threads = Threads(2, max_waiting=1)
    for _ in range(2):
        assert await threads.take(FakeClient())  # type: ignore[arg-type]
    threads.give_back()
    threads.give_back()
    for _ in range(2):
        assert await threads.take(FakeClient())  # type: ignore[arg-type]
    third = asyncio.ensure_future(threads.take(FakeClient()))  # type: ignore[arg-type]
    await settle()
    assert not third.done()
    threads.give_back()
    assert await third
    threads.shutdown()


async def test_a_client_leaving_behind_others_hands_them_nothing() -> None:
    """The second in line leaves: the first keeps waiting for a thread, as it should."""
    threads = Threads(1, max_waiting=3)
    assert await threads.take(FakeClient())  # type: ignore[arg-type]
    first, second = FakeClient(), FakeClient()
    waiting = asyncio.ensure_future(threads.take(first))  # type: ignore[arg-type]
    leaving = asyncio.ensure_future(threads.take(second))  # type: ignore[arg-type]
    await settle()
    second.left.set_result(None)
    assert await leaving is False
    await settle()
    assert not waiting.done()
    threads.give_back()
    assert await waiting
    threads.shutdown()


async def test_a_thread_handed_to_a_client_that_left_goes_to_the_pool() -> None:
    """Handed a thread just as its client left: the thread is not lost."""
    threads = Threads(1, max_waiting=1)
    assert await threads.take(FakeClient())  # type: ignore[arg-type]
    leaving = FakeClient()
    waiting = asyncio.ensure_future(threads.take(leaving))  # type: ignore[arg-type]
    await settle()
    threads.give_back()
    leaving.left.set_result(None)
    assert await waiting is False
    assert await asyncio.wait_for(threads.take(FakeClient()), 10)  # type: ignore[arg-type]
    threads.shutdown()


async def test_a_job_that_raises_hands_its_error_over_and_frees_its_thread() -> None:
    """What Flask raises (a BaseException too) reaches the request awaiting it; the thread is
    free again, and the same thread runs the next job: the pool never shrinks."""
    threads = Threads(1, max_waiting=1)

    def fail() -> None:
        raise SystemExit("from a view")

    assert await threads.take(FakeClient())  # type: ignore[arg-type]
    with pytest.raises(SystemExit, match="from a view"):
        await threads.run(fail)
    assert await asyncio.wait_for(threads.take(FakeClient()), 10)  # type: ignore[arg-type]
    assert await threads.run(threading.current_thread) is threads.started[0]
    assert len(threads.started) == 1
    threads.shutdown()


async def test_threads_start_only_as_requests_need_them() -> None:
    """A pool of 4 serving one request at a time runs on one thread; two at once, on two."""
    threads = Threads(4, max_waiting=1)
    for _ in range(3):
        assert await threads.take(FakeClient())  # type: ignore[arg-type]
        await threads.run(time.sleep, 0)
    assert len(threads.started) == 1
    release = threading.Event()
    assert await threads.take(FakeClient())  # type: ignore[arg-type]
    held = threads.run(release.wait, 10)
    assert await threads.take(FakeClient())  # type: ignore[arg-type]
    await threads.run(time.sleep, 0)
    release.set()
    assert await held
    assert len(threads.started) == 2
    assert all(thread.daemon for thread in threads.started)  # a stuck view holds no exit
    threads.shutdown()


# -- more of wsgi.input ----------------------------------------------------------------------------


def test_reading_nothing_waits_for_nothing(loop_thread: asyncio.AbstractEventLoop) -> None:
    """read(0) and readline(0) give b"" at once, without asking the client for more."""
    body = body_of(loop_thread, b"ab\ncd", [b"more"], ends=False)
    assert body.read(0) == b""
    assert body.readline(0) == b""
    assert body.read(5) == b"ab\ncd"


def test_readline_with_the_bytes_asked_for_in_hand_asks_for_no_more(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    """readline(0), and readline(n) with n bytes in hand but no newline, answer from the
    buffer: the client has nothing more to give (asking again would find it gone)."""
    body = body_of(loop_thread, b"abc", [b""], ends=False)
    assert body.readline(0) == b""
    assert body.readline(3) == b"abc"


def test_readline_stops_at_the_first_line_without_reading_on(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    """A whole line (or `size` bytes) in hand is returned without asking for more."""
    body = body_of(loop_thread, b"one\ntwo\nthree", [b"more"], ends=False)
    assert body.readline() == b"one\n"
    assert body.readline(2) == b"tw"
    assert body.readline(4) == b"o\n"
    assert body.readline(5) == b"three"


def test_readline_with_a_size_shorter_than_the_line(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    """readline(n) gives n bytes of a longer line, then the rest of it."""
    body = body_of(loop_thread, b"abcdef\n", [])
    assert body.readline(3) == b"abc"
    assert body.readline() == b"def\n"


def test_readlines_gives_every_line(loop_thread: asyncio.AbstractEventLoop) -> None:
    """readlines() reads to the end of the body, across messages."""
    body = body_of(loop_thread, b"a\nb", [b"\nc"])
    assert body.readlines() == [b"a\n", b"b\n", b"c"]


def test_the_reader_is_told_exactly_why_the_body_ended(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    """The OSError's message, as werkzeug and the logs pass it on."""
    body = body_of(loop_thread, b"", [b"more"], ends=False)
    with pytest.raises(OSError, match=r"^the client left before sending the whole body$"):
        body.read()


def test_a_message_without_more_body_ends_the_body(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    """ASGI's default for `more_body` is False; for `body`, b""."""
    from application.asgi import Client

    messages: list[Message] = [{"type": "http.request"}]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    body = RequestBody(loop_thread, Client(receive, body_done=False), b"start", True)
    assert body.read() == b"start"
    assert body.read() == b""


# -- lifespan and other scopes ---------------------------------------------------------------------


class Lifespan:
    """The server's side of the lifespan protocol, run against the app in a task."""

    def __init__(self, app: AsgiApp) -> None:
        self.incoming: asyncio.Queue[Message] = asyncio.Queue()
        self.sent: asyncio.Queue[Message] = asyncio.Queue()
        self.task = asyncio.ensure_future(
            app({"type": "lifespan"}, self.incoming.get, self.sent.put)
        )

    async def step(self, kind: str) -> Message:
        """Send `kind`; the app's answer."""
        self.incoming.put_nowait({"type": kind})
        return await asyncio.wait_for(self.sent.get(), 10)

    async def ended(self) -> None:
        try:
            await asyncio.wait_for(self.task, 10)
        finally:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_lifespan_starts_and_stops_the_metrics_listener() -> None:
    """Started on the server's start, stopped on its shutdown, with the thread pool."""
    port = free_port()
    _, app = make_app(Config(commit="c0ffee", metrics_port=port))
    server = Lifespan(app)
    assert await server.step("lifespan.startup") == {"type": "lifespan.startup.complete"}
    assert await asyncio.to_thread(listening, port)
    assert await app.threads.take(FakeClient())  # type: ignore[arg-type]
    assert await app.threads.run(threading.get_ident) != threading.get_ident()
    [thread] = app.threads.started
    assert await server.step("lifespan.shutdown") == {"type": "lifespan.shutdown.complete"}
    await server.ended()
    assert not await asyncio.to_thread(listening, port)
    await asyncio.to_thread(thread.join, 2)
    assert not thread.is_alive()


async def test_lifespan_startup_hands_sigterm_to_the_drain() -> None:
    """After the startup, SIGTERM starts the drain with the app's settings (hypercorn's own
    handler would stop at once), and nothing fails on the loop."""
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
    _, app = make_app(Config(metrics_port=0, shutdown_delay=10.0**9))  # the stop never comes
    server = Lifespan(app)
    assert await server.step("lifespan.startup") == {"type": "lifespan.startup.complete"}
    try:
        signal.raise_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            while not drain.draining():  # noqa: ASYNC110 - a byte of shared memory: no event
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the rest of the handler's turn
        assert errors == []
    finally:
        drain._state[0] = 0  # the flag is process-wide
        assert await server.step("lifespan.shutdown") == {"type": "lifespan.shutdown.complete"}
        await server.ended()


@pytest.mark.parametrize(
    "config",
    [Config(metrics_port=0), Config(multiprocess_dir="/nonexistent")],
    ids=["metrics-off", "multiprocess"],
)
async def test_lifespan_without_its_own_metrics_starts_no_listener(config: Config) -> None:
    """METRICS_PORT=0, or a multiprocess directory (a supervisor serves it): no listener."""
    _, app = make_app(config)
    server = Lifespan(app)
    assert await server.step("lifespan.startup") == {"type": "lifespan.startup.complete"}
    assert app.exporter is None
    assert await server.step("lifespan.shutdown") == {"type": "lifespan.shutdown.complete"}
    await server.ended()


async def test_a_taken_metrics_port_fails_the_start() -> None:
    """Another process on METRICS_PORT: startup fails with one message naming it."""
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        _, app = make_app(Config(metrics_port=port))
        server = Lifespan(app)
        try:
            failed = await server.step("lifespan.startup")
            await server.ended()
        finally:
            app.threads.shutdown()
            app.checker.close()
    assert failed["type"] == "lifespan.startup.failed"
    assert failed["message"].startswith(f"metrics: cannot listen on METRICS_PORT {port}: ")


async def test_a_websocket_is_closed(app: AsgiApp) -> None:
    """No websocket routes: a websocket is closed at once."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": "websocket"}, Exchange().receive, send)
    assert sent == [{"type": "websocket.close"}]
