"""The service plus the routes the HTTP contract tests need: echoes, cookies, redirects, files,
streams, failures, and a few raw WSGI apps that misuse `start_response` on purpose."""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import structlog
from flask import Response, redirect, request, send_file, session, stream_with_context, url_for

from tests.slow_app import app, asgi_app

__all__ = ["app", "asgi_app"]

FILE = Path(__file__).with_name("contract_file.txt")
app.secret_key = "contract-tests-only"  # noqa: S105 - signs the test session cookie


def _digest(data: bytes) -> list[object]:
    return [len(data), hashlib.sha256(data).hexdigest()[:16]]


@app.route("/echo", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
@app.route("/echo/<path:rest>", methods=["GET", "POST"])
def echo(rest: str | None = None) -> dict[str, object]:
    """What the app was told: path, query, headers that matter, body, form, files, URLs."""
    data = request.get_data(cache=True)
    return {
        "method": request.method,
        "script_root": request.script_root,
        "path": request.path,
        "rest": rest,
        "args": request.args.to_dict(flat=False),
        "headers": {
            name: request.headers.get(name) for name in ("X-Custom", "X-Multi", "Content-Type")
        },
        "body": _digest(data),
        "form": request.form.to_dict(flat=False),
        "files": {name: _digest(f.read()) for name, f in request.files.items()},
        "json": request.get_json(silent=True),
        "remote_addr": request.remote_addr,
        "scheme": request.scheme,
        "host": request.host,
        "url": request.url,
        "url_for": url_for("echo", _external=True),
    }


@app.get("/cookies")
def cookies() -> Response:
    """Two cookies and a session."""
    session["visits"] = session.get("visits", 0) + 1
    response = Response("cookies set")
    response.set_cookie("first", "1", httponly=True)
    response.set_cookie("second", "2", path="/echo", samesite="Lax")
    return response


@app.get("/session")
def read_session() -> dict[str, object]:
    return dict(session)


@app.get("/redirect")
def go() -> Response:
    return redirect(url_for("echo", _external="external" in request.args))


@app.get("/file")
def file() -> Response:
    return send_file(FILE, mimetype="text/plain")


@app.get("/stream")
def stream() -> Response:
    """`n` chunks, `delay` seconds apart."""
    count, delay = int(request.args.get("n", "5")), float(request.args.get("delay", "0"))

    def chunks() -> Iterator[str]:
        for index in range(count):
            if index:
                time.sleep(delay)
            yield f"chunk {index}\n"

    return Response(chunks(), mimetype="text/plain")


@app.get("/sse")
def events() -> Response:
    """An endless event stream, saying in the log when it opens and when it is closed."""

    def forever() -> Iterator[str]:
        structlog.get_logger().info("event stream opened")
        try:
            for index in itertools.count():
                yield f"data: {index}\n\n"
                time.sleep(0.1)
        finally:
            structlog.get_logger().info("event stream closed")

    return Response(stream_with_context(forever()), mimetype="text/event-stream")


@app.get("/hold")
def hold() -> str:
    """Holds its thread until the file `until` exists (at most 30 s): a pool kept busy."""
    until = Path(request.args["until"])
    structlog.get_logger().info("hold started")
    deadline = time.monotonic() + 30
    while not until.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return "released"


@app.get("/big")
def big() -> Response:
    """`mb` MiB of zeros in 64 KiB chunks, for streaming throughput."""
    chunk = bytes(64 * 1024)
    return Response(itertools.repeat(chunk, int(request.args.get("mb", "1")) * 16))


@app.get("/errors")
def errors() -> str:
    """Writes two lines to wsgi.errors, the second trying to pass for a log line of its own."""
    request.environ["wsgi.errors"].write("first problem\n2015-01-01 00:00:00 [INFO] forged\n")
    return "written"


@app.get("/boom-first")
def boom_first() -> Response:
    """A streamed body that fails before its first chunk."""

    def chunks() -> Iterator[bytes]:
        raise RuntimeError("failed before the first chunk")
        yield b""  # pragma: no cover - makes this a generator

    return Response(chunks())


@app.get("/boom-stream")
def boom_stream() -> Response:
    """A streamed body that fails after its first chunk went out."""

    def chunks() -> Iterator[bytes]:
        yield b"first chunk\n"
        raise RuntimeError("failed while streaming")

    return Response(chunks())


# -- raw WSGI apps, outside Flask and the service's envelope ----------------------------------

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _replaces_its_status(
    environ: dict[str, Any], start_response: Callable[..., Any]
) -> list[bytes]:
    """Starts a 200, then replaces it with a 503 before any body: PEP 3333 allows it."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    try:
        raise RuntimeError("changed its mind")
    except RuntimeError:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info())
    return [b"replaced"]


def _never_starts(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """Returns a body without ever calling start_response."""
    return [b"no status"]


ENVIRON_KEYS = (
    "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "RAW_URI", "SERVER_NAME",
    "SERVER_PROTOCOL", "CONTENT_TYPE", "CONTENT_LENGTH", "REMOTE_ADDR",
    "wsgi.url_scheme", "wsgi.input_terminated", "wsgi.version", "wsgi.run_once",
)  # fmt: skip


def _environ(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """The environ as the server made it (before the service touches it), and the body read.
    SERVER_PORT is left out: each server listens on a port of its own."""
    shown = {key: environ.get(key) for key in ENVIRON_KEYS}
    shown.update((key, value) for key, value in environ.items() if key.startswith("HTTP_"))
    shown["body"] = _digest(environ["wsgi.input"].read())
    body = json.dumps(shown, sort_keys=True).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


RAW: dict[str, WsgiApp] = {
    "/raw/environ": _environ,
    "/raw/replaces-status": _replaces_its_status,
    "/raw/never-starts": _never_starts,
}


def _route_raw(inner: WsgiApp) -> WsgiApp:
    def route(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        raw = RAW.get(environ.get("PATH_INFO", ""))
        return (raw or inner)(environ, start_response)

    return route


app.wsgi_app = _route_raw(app.wsgi_app)  # type: ignore[method-assign]
