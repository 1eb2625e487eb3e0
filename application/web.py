"""The Flask app: an index, and the envelope every request travels in, which answers the
health routes itself."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from http import HTTPStatus
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

import structlog
from flask import Flask, Response, abort, current_app, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from . import logs
from .config import Config
from .health import HealthChecker, Report
from .metrics import UNMATCHED, Metrics, instruments
from .probes import probe_for

HEALTH_METHODS = ["GET", "HEAD", "OPTIONS"]  # HAProxy's `option httpchk /health` sends OPTIONS
# The health routes: path -> whether it asks the datastores (readiness) or not (liveness).
HEALTH_ROUTES = {"/health": True, "/health/ready": True, "/health/live": False}
# environ key: when the server took the request (perf_counter), set by asgi_app, which then
# counts the request in flight itself, from that moment on
STARTED = "application.started"
ROUTE = "application.route"  # environ key: the template of the rule that matched, for metrics

Environ = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WsgiApp = Callable[[Environ, Any], Iterable[bytes]]  # Any: each server has its own start_response

_log = logging.getLogger("application")  # Flask's own app.logger, for an app named "application"


def create_app(config: Config, checker: HealthChecker | None = None) -> Flask:
    """The app for `config`; its health checker is made from the configured datastores."""
    app = Flask("application")
    app.async_to_sync = run_on_thread_loop  # type: ignore[method-assign]
    app.config["SERVICE"] = config
    metrics = app.extensions["metrics"] = instruments() if config.metrics_port else None
    app.extensions["health"] = checker or HealthChecker(
        [probe_for(datastore, config.health_timeout) for datastore in config.datastores],
        timeout=config.health_timeout,
        cache_ttl=config.health_cache_ttl,
        metrics=metrics,
    )
    app.before_request(_before_view)
    app.register_error_handler(HTTPException, _error_as_json)
    app.add_url_rule("/", "index", _index)
    # The Envelope answers the health routes before Flask; Flask knows their rules, for
    # `url_for` and for the 405 to any other method, but has no view to run for them.
    for path, readiness in HEALTH_ROUTES.items():
        endpoint = "health.ready" if readiness else "health.live"
        app.add_url_rule(path, endpoint, methods=HEALTH_METHODS, provide_automatic_options=False)
    wsgi_app = trust_proxies(app.wsgi_app, config.trusted_proxies)
    app.wsgi_app = Envelope(wsgi_app, config, metrics, health=app.extensions["health"])  # type: ignore[method-assign]
    return app


def health_route(path: str, method: str) -> bool | None:
    """For a health check answered before Flask, whether it asks the datastores; else None."""
    return HEALTH_ROUTES.get(path) if method in HEALTH_METHODS else None


def health_answer(report: Report, commit: str, query: str) -> tuple[int, bytes]:
    """A health check's status and JSON; `?verbose=1` (or true, yes) adds each datastore's."""
    verbose = parse_qs(query).get("verbose", [""])[0].lower() in ("1", "true", "yes")
    return report.http_status, report.body(commit, verbose=verbose)


def trust_proxies(app: WsgiApp, hops: int) -> WsgiApp:
    """werkzeug's ProxyFix for `hops` proxies in front; with none, X-Forwarded-* change nothing."""
    if hops == 0:
        return app
    return ProxyFix(app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops, x_prefix=hops)


class Envelope:
    """Around every request, under every server: the request id bound to every line logged
    while it runs, and unbound after; `wsgi.errors` into the log; a body without a length
    held to MAX_BODY_SIZE; a response that fails before its first byte made a JSON 500; and
    one access line with the status the client got; and the request counted in the metrics, by
    its route template (`metrics` None: not counted). The health routes are answered here,
    from `health`, without Flask: a load balancer's check costs no dispatch, and a cached
    report no event loop.

    `quiet`: no access line for a successful request at all (the metrics listener's scrapes,
    under LOG_QUIET_HEALTH); failures are always logged.
    """

    def __init__(
        self,
        app: WsgiApp,
        config: Config,
        metrics: Metrics | None,
        *,
        health: HealthChecker | None = None,
        quiet: bool = False,
    ) -> None:
        self.app = app
        self.health = health
        self.commit = config.commit
        self._forwarded = trust_proxies(no_body, config.trusted_proxies)
        self.quiet_health = config.log_quiet_health
        self.quiet = quiet
        self.max_body_size = config.max_body_size
        self.metrics = metrics

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        exchange = _Exchange(environ, start_response, self)
        if self.health is not None:
            readiness = health_route(environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"])
            if readiness is not None:
                return self._health(self.health, readiness, environ, exchange)
        environ["wsgi.errors"] = ERRORS
        if not environ.get("CONTENT_LENGTH"):
            environ["wsgi.input"] = BodyLimit(environ["wsgi.input"], self.max_body_size)
        iterable: Iterable[bytes] = ()
        try:
            iterable = self.app(environ, exchange.start_response)
            rest = iter(iterable)
            first = next((chunk for chunk in rest if chunk), None)
            exchange.send_headers()  # only now: until the first byte, a failure can be a 500
        except Exception:
            _close(iterable)
            _log.exception(
                "Exception on %s [%s]", environ.get("PATH_INFO"), environ.get("REQUEST_METHOD")
            )
            return exchange.fail(sys.exc_info())  # type: ignore[arg-type]
        except BaseException:
            exchange.finish(complete=False)
            raise
        if first is None:
            _close(iterable)
            exchange.finish(complete=True)
            return []
        return _Body(first, rest, iterable, exchange)

    def _health(
        self, checker: HealthChecker, readiness: bool, environ: Environ, exchange: _Exchange
    ) -> _Body:
        report = checker.wait_in_thread() if readiness else Report()
        status, body = health_answer(report, self.commit, environ.get("QUERY_STRING", ""))
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
        exchange.start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        exchange.send_headers()
        environ[ROUTE] = environ["PATH_INFO"]
        self._forwarded(environ, None)  # REMOTE_ADDR for the access line, as Flask's
        sent = b"" if environ["REQUEST_METHOD"] == "HEAD" else body  # as werkzeug does
        return _Body(sent, iter(()), (), exchange)


class _Exchange:
    """One request on its way through: its id, and its status, passed to the server only with
    the first byte of the body, so that a failure before it can still become a 500."""

    def __init__(self, environ: Environ, start_response: StartResponse, envelope: Envelope) -> None:
        self.environ = environ
        self.envelope = envelope
        self.request_id = logs.bind_request_id(
            environ.get("HTTP_X_REQUEST_ID"), environ.get("HTTP_TRACEPARENT")
        )
        started = environ.get(STARTED)
        self.started = started or time.perf_counter()
        metrics = envelope.metrics
        self.in_flight = started is None  # else asgi_app counts it, from when it took it
        if metrics is not None and self.in_flight:
            metrics.in_flight.inc()
        self.status = 0
        self._server_start_response = start_response
        self._response: tuple[str, list[tuple[str, str]]] | None = None
        self._write: Callable[[bytes], object] | None = None  # the server's, once it was told

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        if self._write is not None:  # the server has the status: its rules apply
            return self._server_start_response(status, headers, exc_info)
        self._response = (status, [*headers, ("X-Request-ID", self.request_id)])
        self.status = int(status[:3])
        return self._legacy_write

    def send_headers(self) -> Callable[[bytes], object]:
        if self._write is None:
            if self._response is None:
                raise RuntimeError("the app returned without calling start_response")
            self._write = self._server_start_response(*self._response)
        return self._write

    def fail(self, exc_info: ExcInfo) -> list[bytes]:
        """The JSON 500 for a response that failed before its first byte."""
        body = json.dumps({"error": "Internal Server Error", "status": 500}).encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("X-Request-ID", self.request_id),
        ]
        self.status = 500
        self._write = self._server_start_response("500 INTERNAL SERVER ERROR", headers, exc_info)
        self.finish(complete=True)
        return [body]

    def finish(self, *, complete: bool) -> None:
        method = self.environ.get("REQUEST_METHOD", "")
        status = self.status or 500
        metrics = self.envelope.metrics
        if metrics is not None:
            seconds = time.perf_counter() - self.started
            metrics.request_done(method, _route(self.environ), status, seconds)
            if self.in_flight:
                metrics.in_flight.dec()
        if not (self.envelope.quiet and status < 400):
            logs.log_request(
                method=method,
                path=self.environ.get("PATH_INFO", ""),
                status=status,
                started=self.started,
                remote=self.environ.get("REMOTE_ADDR"),
                quiet_health=self.envelope.quiet_health,
                complete=complete,
            )
        structlog.contextvars.clear_contextvars()

    def _legacy_write(self, data: bytes) -> object:
        """PEP 3333's `write`, for apps that push their body instead of returning it."""
        return self.send_headers()(data)


def _route(environ: Environ) -> str:
    """The template of the rule that matched (`/items/<int:id>`), else UNMATCHED."""
    template: str = environ.get(ROUTE, UNMATCHED)
    return template


class BodyLimit:
    """`wsgi.input` for a body without a Content-Length (chunked, HTTP/2): reading past
    MAX_BODY_SIZE is a 413, where werkzeug's own limit would silently cut the body short."""

    def __init__(self, stream: Any, limit: int) -> None:
        self._stream = stream
        self._left = limit

    def read(self, size: int = -1) -> bytes:
        return self._count(self._stream.read(self._capped(size)))

    def readline(self, size: int = -1) -> bytes:
        return self._count(self._stream.readline(self._capped(size)))

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def _capped(self, size: int) -> int:
        """Never more than one byte past the limit: enough to know it was passed."""
        return self._left + 1 if size < 0 or size > self._left + 1 else size

    def _count(self, data: bytes) -> bytes:
        self._left -= len(data)
        if self._left < 0:
            raise RequestEntityTooLarge()
        return data


class _Body:
    """A streamed body: chunks pass through; closing it writes the access line."""

    def __init__(
        self, first: bytes, rest: Iterator[bytes], iterable: Iterable[bytes], exchange: _Exchange
    ) -> None:
        self._pending: bytes | None = first
        self._rest = rest
        self._iterable = iterable
        self._exchange = exchange
        self._complete = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._pending is not None:
            chunk, self._pending = self._pending, None
            return chunk
        try:
            return next(self._rest)
        except StopIteration:
            self._complete = True
            raise

    def close(self) -> None:
        try:
            _close(self._iterable)
        finally:
            self._exchange.finish(complete=self._complete)


def _close(iterable: object) -> None:
    if close := getattr(iterable, "close", None):
        close()


class ErrorStream:
    """`wsgi.errors` as log lines, so what an app writes there keeps the format and escaping."""

    _log = logging.getLogger("wsgi.errors")

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self._log.error(line)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Every write is already a log record."""


_thread_loops = threading.local()


ERRORS = ErrorStream()  # one for every request: it keeps nothing of its own


def run_on_thread_loop(
    func: Callable[..., Coroutine[Any, Any, Any]],
) -> Callable[..., Any]:
    """Run an async view on its worker thread's own event loop, kept for the thread's life.

    asgiref's `async_to_sync`, Flask's default, starts a thread and a loop for every call
    when no outer loop is running (every request under gunicorn): the measured cost was half
    of `/health`'s throughput. The checker's rounds never depend on which loop waits.
    """

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        loop = getattr(_thread_loops, "loop", None)
        if loop is None:
            loop = _thread_loops.loop = asyncio.new_event_loop()
        return loop.run_until_complete(func(*args, **kwargs))

    return run


def _index() -> Response:
    config: Config = current_app.config["SERVICE"]
    return _json(
        200,
        {
            "service": "application",
            "commit": config.commit,
            "links": {"health": "/health", "ready": "/health/ready", "live": "/health/live"},
        },
    )


def _before_view() -> None:
    """Note the matched rule where the Envelope finds it: Flask takes its request object out of
    the environ when the request ends, before the access line and the metrics. Refuse a declared
    length over MAX_BODY_SIZE before anything reads the body (a body without one is held to it
    as it is read: `BodyLimit`)."""
    this = request._get_current_object()  # type: ignore[attr-defined]  # looked up once
    if this.url_rule is not None:
        this.environ[ROUTE] = this.url_rule.rule
    length = this.content_length
    if length is not None and length > current_app.config["SERVICE"].max_body_size:
        abort(413)


def _error_as_json(error: HTTPException) -> Response:
    response = _json(error.code or 500, {"error": error.name, "status": error.code})
    response.headers.extend(
        (name, value) for name, value in error.get_headers() if name.lower() != "content-type"
    )
    return response


def _json(status: int, document: object) -> Response:
    return Response(json.dumps(document), status, mimetype="application/json")


def no_body(environ: Environ, start_response: object) -> list[bytes]:
    return []
