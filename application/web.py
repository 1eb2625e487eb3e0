"""The Flask app: an index, the health routes, a request id and an access line for each request."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from . import logs
from .config import Config
from .health import HealthChecker, Report
from .probes import probe_for

HEALTH_METHODS = ["GET", "HEAD", "OPTIONS"]  # HAProxy's `option httpchk /health` sends OPTIONS

health = Blueprint("health", __name__)


def create_app(config: Config, checker: HealthChecker | None = None) -> Flask:
    """The app for `config`; its health checker is made from the configured datastores."""
    app = Flask("application")
    app.async_to_sync = run_on_thread_loop  # type: ignore[method-assign]
    app.config["SERVICE"] = config
    app.extensions["health"] = checker or HealthChecker(
        [probe_for(datastore, config.health_timeout) for datastore in config.datastores],
        timeout=config.health_timeout,
        cache_ttl=config.health_cache_ttl,
    )
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.register_error_handler(HTTPException, _error_as_json)
    app.register_blueprint(health)
    app.add_url_rule("/", "index", _index)
    return app


_thread_loops = threading.local()


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


@health.route("/health", methods=HEALTH_METHODS, provide_automatic_options=False)
@health.route("/health/ready", methods=HEALTH_METHODS, provide_automatic_options=False)
async def ready() -> Response:
    """Healthy only when every configured datastore answered within the deadline."""
    checker: HealthChecker = current_app.extensions["health"]
    report = await checker.wait()
    verbose = is_verbose(request.args.get("verbose"))
    body = report.body(current_app.config["SERVICE"].commit, verbose=verbose)
    return _health_response(report.http_status, body)


@health.route("/health/live", methods=HEALTH_METHODS, provide_automatic_options=False)
def live() -> Response:
    """Alive while the process serves; asks no datastore, so an outage restarts nothing."""
    return _health_response(200, Report().body(current_app.config["SERVICE"].commit))


def _health_response(status: int, body: bytes) -> Response:
    response = Response(body, status, mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


def is_verbose(value: str | None) -> bool:
    """`?verbose=1` (or true, yes) asks for each datastore's result."""
    return (value or "").lower() in ("1", "true", "yes")


def _start_request() -> None:
    g.started = time.perf_counter()
    g.request_id = logs.bind_request_id(request.headers.get("X-Request-ID"))


def _finish_request(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.request_id
    logs.log_request(
        method=request.method,
        path=request.path,
        status=response.status_code,
        started=g.started,
        remote=request.remote_addr,
        quiet_health=current_app.config["SERVICE"].log_quiet_health,
    )
    return response


def _error_as_json(error: HTTPException) -> Response:
    response = _json(error.code or 500, {"error": error.name, "status": error.code})
    response.headers.extend((k, v) for k, v in error.get_headers() if k == "Allow")
    return response


def _json(status: int, document: object) -> Response:
    return Response(json.dumps(document), status, mimetype="application/json")
