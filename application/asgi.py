"""The Flask app as ASGI, answering as gunicorn does: health routes on the event loop, every
other request run by Flask on a bounded pool of threads, bodies streamed both ways.

asgiref's `WsgiToAsgi` runs every request on one shared thread, spools whole bodies and never
closes the app's iterable; a2wsgi streams, but reads chunked bodies as empty and joins a
forged `X_Custom` into `X-Custom`; neither notices a client that left (the README compares
them). So the translation is ours, pinned case by case against gunicorn in tests/test_asgi.py.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import unquote_to_bytes

import structlog
from flask import Flask
from werkzeug.exceptions import HTTPException

from . import drain, logs
from .config import Config
from .exporter import Exporter, cannot_listen
from .health import HealthChecker, Report
from .metrics import UNMATCHED, Metrics
from .web import (
    ERRORS,
    STARTED,
    Environ,
    ExcInfo,
    WsgiApp,
    health_answer,
    health_route,
    no_body,
    trust_proxies,
)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]

EARLY_BODY = 64 * 1024  # read on the event loop before a thread is taken; the rest streams
STREAM_AHEAD = 256 * 1024  # bytes of a streamed response the app may make ahead of its client
WAITING_PER_THREAD = 32  # the line for threads: 1,024 with 32, near gunicorn's 1,000 connections

log = structlog.get_logger()


class AsgiApp:
    """An ASGI callable serving `flask_app`."""

    def __init__(self, flask_app: Flask) -> None:
        self.flask_app = flask_app
        self.config: Config = flask_app.config["SERVICE"]
        self.checker: HealthChecker = flask_app.extensions["health"]
        self.metrics: Metrics | None = flask_app.extensions["metrics"]
        self.exporter: Exporter | None = None
        threads = self.config.wsgi_threads
        self.threads = Threads(threads, max_waiting=WAITING_PER_THREAD * threads)
        self._forwarded = trust_proxies(no_body, self.config.trusted_proxies)
        self._routes = flask_app.url_map.bind("")  # for the requests refused before Flask

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            send = drain.track(scope, send)  # drain: Connection: close; cut past the deadline
            script_name, path_info = _split_path(scope)
            if self.metrics is not None:  # in flight from here: waiting for a thread counts
                self.metrics.in_flight.inc()
            try:
                readiness = health_route(path_info, scope["method"])
                if readiness is not None:
                    await self._health(scope, path_info, readiness, receive, send)
                else:
                    await self._wsgi(scope, script_name, path_info, receive, send)
            finally:
                if self.metrics is not None:
                    self.metrics.in_flight.dec()
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await send({"type": "websocket.close"})

    async def _health(
        self, scope: Scope, path: str, readiness: bool, receive: Receive, send: Send
    ) -> None:
        """A health route, answered on the event loop as the Envelope answers it in a thread."""
        started = time.perf_counter()
        request_id = _bind_request(scope)
        if (await receive()).get("more_body"):  # taken, or hypercorn waits for it for ever
            _drop_the_rest(receive)  # a health check with a body: nothing reads it
        try:
            report = await self.checker.wait() if readiness else Report()
            query = scope["query_string"].decode("latin-1")
            status, body = health_answer(report, self.config.commit, query)
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                (b"cache-control", b"no-store"),
                (b"x-request-id", request_id.encode()),
            ]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            self._log(scope, path, status, started, route=path)
        finally:
            structlog.contextvars.clear_contextvars()

    async def _wsgi(
        self, scope: Scope, script_name: str, path_info: str, receive: Receive, send: Send
    ) -> None:
        started = time.perf_counter()
        early, more = await _early_body(scope, receive)
        if early is None:
            return  # the client left before sending its body: nothing to answer
        loop = asyncio.get_running_loop()
        client = Client(receive, body_done=not more)
        body = RequestBody(loop, client, early, more)
        environ = _environ(scope, script_name, path_info, body)
        environ[STARTED] = started
        if not await self.threads.take(client):
            if not client.body_done:
                _drop_the_rest(receive)
            await self._refuse(scope, path_info, started, client, send)
            return
        response = Response(loop, send, client)
        running = self.threads.run(response.run, self.flask_app, environ)
        try:
            whole = await running
        except Exception:
            if response.started:
                await response.sent()  # what the app made before it failed, as gunicorn sends
                raise  # the status is out: hypercorn logs it and cuts the connection short
            log.exception("WSGI app failed before its response", path=path_info)
            whole = _error(500, b"Internal Server Error")
        else:
            await response.sent()
        finally:
            response.stop()  # sent by now, unless this request was cancelled
            client.stop_watching()
            # Cancelled while Flask runs: the body is still Flask's to read.
            if not running.cancelled() and not client.body_done:
                _drop_the_rest(receive)  # before the last message goes: see there
        if whole is None:
            await send({"type": "http.response.body", "body": b""})
        else:
            status, headers, content = whole
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": content})

    async def _refuse(
        self, scope: Scope, path: str, started: float, client: Client, send: Send
    ) -> None:
        """503 when too many requests wait for a thread; only a line when the client left."""
        _bind_request(scope)
        try:
            if client.gone:
                self._log(scope, path, 499, started)  # nginx's "client closed request"
                return
            status, headers, body = _error(503, b"Service Unavailable")
            headers += [(b"retry-after", b"1"), (b"connection", b"close")]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            self._log(scope, path, 503, started)
        finally:
            structlog.contextvars.clear_contextvars()

    def _log(
        self, scope: Scope, path: str, status: int, started: float, route: str | None = None
    ) -> None:
        """The access line, and the count, of an answer made here without Flask; `route`
        None: looked up (a refusal, rarely made)."""
        if self.metrics is not None:
            route = route or self._route(path, scope["method"])
            seconds = time.perf_counter() - started
            self.metrics.request_done(scope["method"], route, status, seconds)
        logs.log_request(
            method=scope["method"],
            path=path,
            status=status,
            started=started,
            remote=self._remote(scope),
            quiet_health=self.config.log_quiet_health,
        )

    def _route(self, path: str, method: str) -> str:
        """The template of the rule Flask would have matched, as the Envelope counts it."""
        try:
            rule, _ = self._routes.match(path, method, return_rule=True)
        except HTTPException:  # no rule, another method, a redirect: Flask's url_rule is None
            return UNMATCHED
        return str(rule.rule)

    def _remote(self, scope: Scope) -> str | None:
        """The client's address, through the trusted proxies' X-Forwarded-For as in Flask."""
        client = scope.get("client")
        environ: Environ = {"REMOTE_ADDR": str(client[0]) if client else None}
        if self.config.trusted_proxies:
            environ["HTTP_X_FORWARDED_FOR"] = _header(scope, b"x-forwarded-for")
            self._forwarded(environ, None)
        return environ["REMOTE_ADDR"]  # type: ignore[no-any-return]

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                drain.on_lifespan_startup(self.config)  # drain: SIGTERM drains, then stops
                try:
                    self._serve_metrics()
                except OSError as error:  # hypercorn logs the message and exits non-zero
                    failed = cannot_listen(self.config, error)
                    await send({"type": "lifespan.startup.failed", "message": failed})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.exporter is not None:  # its loop notices within 0.5 s: not on this one
                    await asyncio.to_thread(self.exporter.stop)
                await asyncio.to_thread(self.checker.close)
                self.threads.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _serve_metrics(self) -> None:
        """/metrics from this process, when it serves alone: started here, on the server's
        start, and never at import (gunicorn's master imports the app too). A process with a
        multiprocess directory has a supervisor that serves the sum of them all."""
        if self.config.metrics_port and self.config.multiprocess_dir is None:
            self.exporter = Exporter(self.config, None)


class Threads:
    """The threads that run Flask, and a bounded, first-come line of requests waiting for one.

    A job reaches a thread through a queue and its outcome comes back in one
    `call_soon_threadsafe`: ThreadPoolExecutor's futures, locks and conditions, bridged by
    `asyncio.wrap_future`, took 2.7 times the instructions a round trip (163k against 61k,
    `python -m bench.instructions`), and `take` already keeps the count of threads in use."""

    def __init__(self, threads: int, max_waiting: int) -> None:
        self._size = threads
        self._free = threads
        self.started: list[threading.Thread] = []  # as requests need them, up to `threads`
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._line: deque[asyncio.Future[None]] = deque()
        self._max_waiting = max_waiting

    async def take(self, client: Client) -> bool:
        """A thread for this request; False when the line is full or its client left in it."""
        if self._free:
            self._free -= 1
            return True
        if len(self._line) >= self._max_waiting:
            return False
        turn = asyncio.get_running_loop().create_future()
        self._line.append(turn)
        try:
            await client.until_gone_or(turn)
        except BaseException:
            self._leave(turn)
            raise
        if client.gone:
            self._leave(turn)
            return False
        return True

    def run(self, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """`func(*args)` on a thread `take` gave this request. The thread is given back once
        `func` returns, even when nobody awaits its outcome any more (the request was
        cancelled): until then it is not free."""
        loop = asyncio.get_running_loop()
        outcome = loop.create_future()
        if len(self.started) < self._size - self._free:  # every thread started is in use
            name = f"wsgi_{len(self.started)}"
            thread = threading.Thread(target=self._work, name=name, daemon=True)
            thread.start()
            self.started.append(thread)
        self._jobs.put((loop, outcome, func, args))
        return outcome

    def shutdown(self) -> None:
        """Each thread ends once its job (if any) is done; none holds the process up."""
        for _ in self.started:
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, outcome, func, args = job
            try:
                result, error = func(*args), None
            except BaseException as raised:  # it goes to the request awaiting it
                result, error = None, raised
            try:
                loop.call_soon_threadsafe(self._finished, outcome, result, error)
            except RuntimeError:  # the loop has closed: nobody waits for it
                pass
            del job, func, args, result, error  # hold nothing of a request while idle

    def _finished(
        self, outcome: asyncio.Future[Any], result: object, error: BaseException | None
    ) -> None:
        self.give_back()
        if outcome.cancelled():
            return
        if error is None:
            outcome.set_result(result)
        else:
            outcome.set_exception(error)

    def give_back(self) -> None:
        """The thread goes to the first request still waiting, else back to the pool."""
        while self._line:
            turn = self._line.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1

    def _leave(self, turn: asyncio.Future[None]) -> None:
        if turn.done() and not turn.cancelled():
            self.give_back()  # it was handed a thread it will not use
        else:
            turn.cancel()
            self._line.remove(turn)


class Client:
    """The other end of one request: noticed leaving once its request body has been read."""

    def __init__(self, receive: Receive, *, body_done: bool) -> None:
        self.receive = receive
        self.body_done = body_done
        self._watch: asyncio.Task[None] | None = None

    @property
    def gone(self) -> bool:
        return self._watch is not None and self._watch.done()

    async def until_gone_or(self, other: asyncio.Future[None]) -> None:
        """Wait for `other`, or for the client to leave (noticeable only after its body)."""
        watching = self.watch()
        if watching is None:
            await other
        else:
            await asyncio.wait((watching, other), return_when=asyncio.FIRST_COMPLETED)

    def watch(self) -> asyncio.Future[None] | None:
        """Listen for the disconnect once the body has been read: nothing else can come then."""
        if self._watch is None and self.body_done:
            self._watch = asyncio.ensure_future(_until_disconnect(self.receive))
        return self._watch

    def stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.cancel()


class RequestBody:
    """`wsgi.input`: the body as the client sends it, pulled from the event loop as Flask
    reads, so a request holds at most a message of it in memory and nothing on disk."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, client: Client, early: bytes, more: bool
    ) -> None:
        self._loop = loop
        self._client = client
        self._buffer = bytearray(early)
        self._more = more

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self._buffer) < size) and self._fill():
            pass
        return self._take(len(self._buffer) if size < 0 else size)

    def readline(self, size: int = -1) -> bytes:
        while True:
            end = self._buffer.find(b"\n") + 1
            if end or 0 <= size <= len(self._buffer) or not self._fill():
                break
        end = end or len(self._buffer)
        return self._take(end if size < 0 else min(end, size))

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def _take(self, size: int) -> bytes:
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _fill(self) -> bool:
        """One more message of the body; False once it has all been read."""
        if not self._more:
            return False
        receiving = asyncio.run_coroutine_threadsafe(self._client_message(), self._loop)
        body, self._more = receiving.result()
        self._buffer += body
        return True

    async def _client_message(self) -> tuple[bytes, bool]:
        message = await self._client.receive()
        if message["type"] == "http.disconnect":
            raise OSError("the client left before sending the whole body")
        more = bool(message.get("more_body", False))
        self._client.body_done = not more
        return message.get("body", b""), more


class Response:
    """One request's WSGI side, run on a pool thread. A body that is whole when the app is done
    goes back to the event loop in one piece. A streamed one goes out as the app makes it:
    each chunk is handed to the loop without waiting for it to be sent, chunks made while the
    one before is being sent go out together, and the app is paused while more than
    STREAM_AHEAD bytes wait for a slow client. It stops as soon as the client has gone."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Send, client: Client) -> None:
        self._loop = loop
        self._send = send
        self._client = client
        self.started = False  # the status is committed: the chunks go out, no other answer
        self._status: int | None = None
        self._headers: Headers = []
        self._length: int | None = None
        self._size = 0
        self._chunks: list[bytes] = []  # made by the app, not taken by the loop yet
        self._room = threading.Condition()  # guards what follows; notified as chunks leave
        self._waiting = 0  # the bytes of those chunks
        self._sending = False  # a sender on the loop will look at the chunks again
        self._gone = False  # the client has left, or a send failed: the app should stop
        self._sender: asyncio.Task[None] | None = None  # the last one
        self._announced = False  # the status and headers went out
        self._watched = False

    def run(self, app: WsgiApp, environ: Environ) -> tuple[int, Headers, bytes] | None:
        """Call the app; its whole response, or None when it was streamed."""
        iterable = app(environ, self.start_response)
        try:
            for chunk in iterable:
                if chunk and not self.write(chunk):
                    break  # the client has gone
        finally:
            if close := getattr(iterable, "close", None):
                close()
        if self.started:
            return None
        if self._status is None:
            raise RuntimeError("the WSGI app returned without calling start_response")
        return self._status, self._headers, b"".join(self._chunks)

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], bool]:
        if exc_info is not None:
            if self.started:
                raise exc_info[1].with_traceback(exc_info[2])
        elif self._status is not None:
            raise RuntimeError("start_response called a second time without exc_info")
        self._status = int(status.split(" ", 1)[0])
        self._headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        self._length = next(
            (int(v) for k, v in headers if k.lower() == "content-length" and v.isdigit()), None
        )
        return self.write

    def write(self, chunk: bytes) -> bool:
        """Hand `chunk` (the part of it Content-Length allows) to the loop, waiting only while
        the client is STREAM_AHEAD bytes behind; False once the client is gone."""
        if self._status is None:
            raise RuntimeError("the WSGI app sent a body before calling start_response")
        if self._length is not None:
            chunk = chunk[: max(self._length - self._size, 0)]
        self._size += len(chunk)
        if not self.started and self._size == self._length:
            self._chunks.append(chunk)
            return True  # all of it is here: it goes out in one piece when the app is done
        with self._room:
            if not self._gone:
                self.started = True
                self._chunks.append(chunk)
                self._waiting += len(chunk)
                if not self._sending:
                    self._sending = True
                    self._loop.call_soon_threadsafe(self._start_sending)
                self._room.wait_for(self._has_room)
            return not self._gone

    def _has_room(self) -> bool:
        return self._waiting <= STREAM_AHEAD or self._gone

    async def sent(self) -> None:
        """Once every chunk the app has made is sent, or the client has gone; a failed send
        raises its error here."""
        if self._sender is not None:
            await asyncio.wait((self._sender,))
            if not self._sender.cancelled():
                self._sender.result()

    def _start_sending(self) -> None:
        self._sender = self._loop.create_task(self._send_waiting())

    async def _send_waiting(self) -> None:
        """Send the chunks waiting, the status and headers before the first, until none is
        left; then the next chunk starts another sender."""
        try:
            while True:
                self._watch_client()
                with self._room:
                    if self._gone or not self._chunks:  # gone: see _watch_client
                        self._sending = False
                        self._room.notify()
                        return
                    body = b"".join(self._chunks)
                    self._chunks.clear()
                    self._waiting = 0
                    self._room.notify()
                if not self._announced:
                    self._announced = True
                    start = {"type": "http.response.start", "status": self._status}
                    await self._send({**start, "headers": self._headers})
                await self._send({"type": "http.response.body", "body": body, "more_body": True})
                # A server's send need not yield (room in the socket buffer): without this, an
                # app that keeps chunks waiting would hold the loop, its other requests and
                # this client's watch.
                await asyncio.sleep(0)
        except BaseException:
            self._halt()
            raise

    def _watch_client(self) -> None:
        """Once the request body has been read, a client that leaves stops the app at once,
        even while it waits for room, and the send under way."""
        if not self._watched and (watching := self._client.watch()) is not None:
            self._watched = True
            watching.add_done_callback(self.stop)

    def stop(self, _: object = None) -> None:
        """The client has gone, or the request is over: the app stops at its next write (at
        once if it waits for room), and a send under way is given up."""
        self._halt()
        if self._sender is not None:
            self._sender.cancel()

    def _halt(self) -> None:
        with self._room:
            self._gone = True  # for good: no write sends anything after this
            self._room.notify()


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


_dropping: set[asyncio.Task[None]] = set()


def _drop_the_rest(receive: Receive) -> None:
    """Read and drop what the app left of a body, until the connection closes.

    hypercorn stops reading a socket while the request's message queue is full, and on the
    app's last message it puts the disconnect in that same queue, waiting for room: if
    nobody takes the rest of the body out, that last `send` never returns and the
    connection, its buffers and its task stay for ever. So it starts before the last message.
    """
    task = asyncio.ensure_future(_until_disconnect(receive))
    _dropping.add(task)
    task.add_done_callback(_dropping.discard)


async def _early_body(scope: Scope, receive: Receive) -> tuple[bytes | None, bool]:
    """A small body (up to EARLY_BODY bytes, or the first of a body without a length), read
    before a thread is taken, so a slow client holds no thread; None when the client left.

    A longer declared body is left for the app: it may answer (413, 405) without reading it.
    """
    length = _header(scope, b"content-length")
    if length is not None and not (length.isdigit() and int(length) <= EARLY_BODY):
        return b"", True
    early = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, False
        early += message.get("body", b"")
        more = bool(message.get("more_body", False))
        if not more or len(early) >= EARLY_BODY:
            return early, more


def _split_path(scope: Scope) -> tuple[str, str]:
    """SCRIPT_NAME and PATH_INFO as gunicorn makes them: percent-decoded bytes as latin-1,
    the root path taken off the front."""
    raw = scope.get("raw_path") or scope["path"].encode()
    path = unquote_to_bytes(raw).decode("latin-1")
    root = scope.get("root_path", "").encode().decode("latin-1")
    if root and path.startswith(root):
        return root, path[len(root) :]
    return root, path


def _environ(scope: Scope, script_name: str, path_info: str, body: RequestBody) -> Environ:
    """PEP 3333's environ for an ASGI HTTP scope, with gunicorn's choices where PEP 3333 has
    none: headers whose names hold `_` are dropped (else `X_Custom` would join `X-Custom`),
    repeated headers are joined with a comma, and the input ends where the body does."""
    server = scope.get("server") or ("localhost", 80)
    query = scope["query_string"].decode("latin-1")
    raw_path = scope.get("raw_path") or scope["path"].encode()
    environ: Environ = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": script_name,
        "PATH_INFO": path_info,
        "QUERY_STRING": query,
        "RAW_URI": raw_path.decode("latin-1") + (f"?{query}" if query else ""),
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1] or ""),
        "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": body,
        "wsgi.input_terminated": True,
        "wsgi.errors": ERRORS,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    if client := scope.get("client"):
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = str(client[0]), str(client[1])
    for raw_name, raw_value in scope["headers"]:
        if b"_" in raw_name:
            continue
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        if name not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            name = f"HTTP_{name}"
        value = raw_value.decode("latin-1")
        environ[name] = f"{environ[name]},{value}" if name in environ else value
    return environ


def _error(status: int, reason: bytes) -> tuple[int, Headers, bytes]:
    """An error in the app's own JSON shape, for the few answers made without Flask."""
    body = b'{"error": "%s", "status": %d}' % (reason, status)
    return (
        status,
        [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
        body,
    )


def _bind_request(scope: Scope) -> str:
    """Bind the request id and trace as the Envelope does from the environ, where repeated
    headers are joined (two `traceparent`s make no valid one)."""
    traceparents = [value for key, value in scope["headers"] if key == b"traceparent"]
    traceparent = b",".join(traceparents).decode("latin-1") if traceparents else None
    return logs.bind_request_id(_header(scope, b"x-request-id"), traceparent)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
