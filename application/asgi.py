"""The Flask app as ASGI, without serializing: health routes answered on the event loop,
every other request run by Flask on a thread pool.

asgiref's `WsgiToAsgi` runs every request on one shared thread; a pool lets requests run side
by side. The health routes never take a pool thread, so any number of `/health` requests
waiting on a hung datastore cannot starve the routes behind them.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from tempfile import SpooledTemporaryFile
from typing import IO, Any
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async
from flask import Flask

from . import drain, logs
from .config import Config
from .health import HealthChecker, Report
from .web import HEALTH_METHODS, health, is_verbose, live

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
WsgiResponse = tuple[int, list[tuple[bytes, bytes]], bytes]

_SPOOL_BYTES = 1 << 20  # request bodies past 1 MiB wait on disk, not in memory


class AsgiApp:
    """An ASGI callable serving `flask_app`."""

    def __init__(self, flask_app: Flask) -> None:
        self.flask_app = flask_app
        self.config: Config = flask_app.config["SERVICE"]
        self.checker: HealthChecker = flask_app.extensions["health"]
        self._pool = ThreadPoolExecutor(self.config.wsgi_threads, thread_name_prefix="wsgi")
        self._run_wsgi = sync_to_async(_run_wsgi, thread_sensitive=False, executor=self._pool)
        # The health blueprint's routes, answered here: path -> endpoint ("health.ready", ...).
        self._health_paths = {
            rule.rule: rule.endpoint
            for rule in flask_app.url_map.iter_rules()
            if rule.endpoint.startswith(f"{health.name}.")
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            send = drain.track(scope, send)  # drain: Connection: close; cut past the deadline
            if scope["path"] in self._health_paths and scope["method"] in HEALTH_METHODS:
                await self._health(scope, send)
            else:
                await self._flask(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await send({"type": "websocket.close"})

    async def _health(self, scope: Scope, send: Send) -> None:
        started = time.perf_counter()
        request_id = logs.bind_request_id(_header(scope, b"x-request-id"))
        if self._health_paths[scope["path"]] == f"{health.name}.{live.__name__}":
            status, body = 200, Report().body(self.config.commit)
        else:
            report = await self.checker.wait()
            query = parse_qs(scope["query_string"].decode("latin-1"))
            verbose = is_verbose(query.get("verbose", [""])[0])
            status, body = report.http_status, report.body(self.config.commit, verbose=verbose)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-request-id", request_id.encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if scope["method"] == "HEAD":
            body = b""
        await send({"type": "http.response.body", "body": body})
        logs.log_request(
            method=scope["method"],
            path=scope["path"],
            status=status,
            started=started,
            remote=_client(scope),
            quiet_health=self.config.log_quiet_health,
        )

    async def _flask(self, scope: Scope, receive: Receive, send: Send) -> None:
        with SpooledTemporaryFile(max_size=_SPOOL_BYTES) as body:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body.write(message.get("body", b""))
                if not message.get("more_body"):
                    break
            body.seek(0)
            status, headers, content = await self._run_wsgi(self.flask_app, _environ(scope, body))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                drain.on_lifespan_startup(self.config)  # drain: SIGTERM drains, then stops
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.to_thread(self.checker.close)
                self._pool.shutdown(wait=False)
                await send({"type": "lifespan.shutdown.complete"})
                return


def _run_wsgi(app: Flask, environ: dict[str, Any]) -> WsgiResponse:
    """Run one request through the WSGI app, in a pool thread; the response is buffered."""
    started: list[tuple[str, list[tuple[str, str]]]] = []
    chunks: list[bytes] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info and started:
            raise exc_info[1].with_traceback(exc_info[2])
        started[:] = [(status, headers)]
        return chunks.append

    iterable: Iterable[bytes] = app(environ, start_response)
    try:
        chunks.extend(iterable)
    finally:
        if close := getattr(iterable, "close", None):
            close()
    status, headers = started[0]
    return (
        int(status.split(" ", 1)[0]),
        [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers],
        b"".join(chunks),
    )


def _environ(scope: Scope, body: IO[bytes]) -> dict[str, Any]:
    """PEP 3333's environ for an ASGI HTTP scope."""
    server = scope.get("server") or ("localhost", 80)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode().decode("latin-1"),
        "PATH_INFO": scope["path"].encode().decode("latin-1"),
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1] or 80),
        "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": body,
        "wsgi.errors": sys.stdout,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    if client := _client(scope):
        environ["REMOTE_ADDR"] = client
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        if name not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            name = f"HTTP_{name}"
        value = raw_value.decode("latin-1")
        environ[name] = f"{environ[name]},{value}" if name in environ else value
    return environ


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None
