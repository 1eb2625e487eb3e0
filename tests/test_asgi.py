"""Tests for application.asgi in-process: scopes in, messages out, case by case, the way
hypercorn tests its own app wrappers. tests/test_contract.py holds the same rules against
gunicorn over real sockets; these pin each translation rule on its own, fast."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from flask import Flask, Response, request

from application.asgi import AsgiApp, RequestBody, Threads, _split_path
from application.config import Config

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

    def __init__(self, bodies: Iterable[bytes] = (b"",), *, leave: bool = False) -> None:
        chunks = list(bodies)
        self.incoming: asyncio.Queue[Message] = asyncio.Queue()
        for index, chunk in enumerate(chunks):
            more = index < len(chunks) - 1
            self.incoming.put_nowait({"type": "http.request", "body": chunk, "more_body": more})
        if leave:
            self.incoming.put_nowait({"type": "http.disconnect"})
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        return await self.incoming.get()

    async def send(self, message: Message) -> None:
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
        shown = {k: v for k, v in request.environ.items() if isinstance(v, str | int | bool)}
        shown["body"] = request.get_data().decode("latin-1")
        return shown

    @flask_app.get("/chunks")
    def chunks() -> Response:
        return Response(iter([b"one,", b"two,", b"three"]))

    return flask_app, AsgiApp(flask_app)


@pytest.fixture
def app() -> Iterator[AsgiApp]:
    _, asgi = make_app()
    yield asgi
    asgi.threads.executor.shutdown()
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


async def test_a_streamed_body_goes_out_chunk_by_chunk(app: AsgiApp) -> None:
    """A body without a length: each chunk in a message of its own, then the end."""
    exchange = Exchange()
    await app(scope("/chunks"), exchange.receive, exchange.send)
    bodies = [m for m in exchange.sent if m["type"] == "http.response.body"]
    assert [m["body"] for m in bodies] == [b"one,", b"two,", b"three", b""]
    assert [m.get("more_body", False) for m in bodies] == [True, True, True, False]


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
    threads.executor.shutdown()


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
    threads.executor.shutdown()


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
    threads.executor.shutdown()
