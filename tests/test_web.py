"""Tests for application.web through Flask's test client."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import re
import sys
import time
from collections.abc import Iterator

import flask
import pytest
from flask import Response, request, stream_with_context
from prometheus_client import REGISTRY
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import (
    MethodNotAllowed,
    RequestEntityTooLarge,
    ServiceUnavailable,
    Unauthorized,
)
from werkzeug.test import EnvironBuilder

from application.config import Config, Datastore
from application.health import HealthChecker
from application.web import STARTED, BodyLimit, Envelope, create_app
from tests import servers

COMMIT = "abc123"
REFUSED = Datastore("db", "tcp://127.0.0.1:1")  # nothing listens on port 1: refused at once
READY_PATHS = ["/health", "/health/ready"]
HEALTH_METHODS = ["GET", "HEAD", "OPTIONS"]


class RefusedProbe:
    """A datastore whose port refuses every connection."""

    name = "db"
    target = "postgres://db.invalid:5432/app"

    async def ping(self) -> None:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    async def close(self) -> None:
        pass


@pytest.fixture
def config():
    return Config(commit=COMMIT)


@pytest.fixture
def app(config):
    """The app as configured, with one more route whose view fails."""
    # Not TESTING: the 500 page is only made when Flask handles the exception, as in production.
    app = create_app(config)

    @app.route("/fail")
    def fail():
        raise RuntimeError("the view failed")

    return app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def unhealthy_client(config):
    """A client of an app whose one datastore refuses connections."""
    checker = HealthChecker([RefusedProbe()], timeout=0.5, cache_ttl=0)
    yield create_app(config, checker=checker).test_client()
    checker.close()


def test_index_names_the_service_and_links_the_health_routes(client):
    """`/` says which service and commit answered, and where its health routes are."""
    response = client.get("/")
    assert response.status_code == 200
    assert response.json == {
        "service": "application",
        "commit": COMMIT,
        "links": {"health": "/health", "ready": "/health/ready", "live": "/health/live"},
    }


@pytest.mark.parametrize("path", [*READY_PATHS, "/health/live"])
def test_healthy_body_is_exactly_the_seed_json(client, path):
    """With no datastores the health routes answer 200 with the seed's exact bytes."""
    response = client.get(path)
    assert response.status_code == 200
    assert response.data == b'{"commit": "abc123", "status": "Healthy"}'


@pytest.mark.parametrize("path", [*READY_PATHS, "/health/live"])
def test_health_is_json_and_never_cached(client, path):
    """Health answers are JSON and tell every cache on the way not to keep them."""
    response = client.get(path)
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("method", HEALTH_METHODS)
@pytest.mark.parametrize("path", READY_PATHS)
def test_every_health_method_runs_the_checks(unhealthy_client, path, method):
    """GET, HEAD and OPTIONS all ask the datastores: none is answered by Flask on its own."""
    assert unhealthy_client.open(path, method=method).status_code == 500


def test_head_has_headers_and_no_body(unhealthy_client):
    """HEAD gets GET's status and headers, and no body."""
    response = unhealthy_client.head("/health")
    assert response.data == b""
    assert response.headers["Content-Type"] == "application/json"
    assert int(response.headers["Content-Length"]) == len(unhealthy_client.get("/health").data)


@pytest.mark.parametrize("path", READY_PATHS)
def test_unhealthy_body_names_the_datastore_and_reason(unhealthy_client, path):
    """A failing datastore makes a 500 whose status says which and why, in the seed's shape."""
    response = unhealthy_client.get(path)
    assert response.status_code == 500
    assert response.data == b'{"commit": "abc123", "status": "db: connection refused"}'


@pytest.mark.parametrize("flag", ["1", "true", "yes"])
def test_verbose_adds_each_datastores_check(unhealthy_client, flag):
    """`?verbose=1` adds `checks`: each datastore's status, duration and error."""
    body = unhealthy_client.get(f"/health?verbose={flag}").json
    assert body.keys() == {"commit", "status", "checks"}
    check = body["checks"]["db"]
    assert check.keys() == {"status", "duration_ms", "error"}
    assert (check["status"], check["error"]) == ("Unhealthy", "connection refused")
    assert 0 <= check["duration_ms"] < 500


@pytest.mark.parametrize("query", ["", "?verbose=0", "?verbose=no", "?other=1"])
def test_body_has_only_commit_and_status_by_default(unhealthy_client, query):
    """Without `verbose` the body stays the seed's two keys."""
    assert unhealthy_client.get(f"/health{query}").json.keys() == {"commit", "status"}


def test_live_stays_healthy_while_a_datastore_fails(unhealthy_client):
    """`/health/live` asks no datastore, so an outage restarts nothing."""
    response = unhealthy_client.get("/health/live")
    assert response.status_code == 200
    assert response.json == {"commit": COMMIT, "status": "Healthy"}


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", [*READY_PATHS, "/health/live"])
def test_other_methods_are_405_json_with_allow(client, path, method):
    """A write to a health route is refused in JSON, naming the methods that are allowed."""
    response = client.open(path, method=method)
    assert response.status_code == 405
    assert response.json == {"error": "Method Not Allowed", "status": 405}
    assert set(response.headers["Allow"].split(", ")) == set(HEALTH_METHODS)


def test_unknown_route_is_404_json(client):
    """A route that does not exist is a JSON 404, not Flask's HTML page."""
    response = client.get("/no/such/route")
    assert response.status_code == 404
    assert response.json == {"error": "Not Found", "status": 404}


def test_failing_view_is_500_json(client):
    """An exception in a view becomes a JSON 500 that says nothing about the exception."""
    response = client.get("/fail")
    assert response.status_code == 500
    assert response.json == {"error": "Internal Server Error", "status": 500}
    assert b"the view failed" not in response.data


@pytest.mark.parametrize("path", ["/", "/health", "/health/live", "/no/such/route", "/fail"])
@pytest.mark.parametrize("request_id", ["abc", "req-1.2_3", "a" * 128])
def test_sane_request_id_is_echoed(client, path, request_id):
    """A sane X-Request-ID comes back on every response, errors included."""
    response = client.get(path, headers={"X-Request-ID": request_id})
    assert response.headers["X-Request-ID"] == request_id


@pytest.mark.parametrize("request_id", [None, "", "a" * 200, "has space", "a/b", "ünï"])
def test_insane_request_id_is_replaced(client, request_id):
    """A missing or unusable X-Request-ID is replaced by a fresh 32-hex id."""
    headers = {} if request_id is None else {"X-Request-ID": request_id}
    response = client.get("/health", headers=headers)
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


def test_each_request_gets_its_own_fresh_id(client):
    """Two requests without an id are told two different ids."""
    first, second = (client.get("/health").headers["X-Request-ID"] for _ in range(2))
    assert first != second


@pytest.mark.parametrize(
    ("error", "header", "value"),
    [
        (Unauthorized(www_authenticate=WWWAuthenticate("Bearer")), "WWW-Authenticate", "Bearer"),
        (ServiceUnavailable(retry_after=30), "Retry-After", "30"),
        (MethodNotAllowed(valid_methods=["GET"]), "Allow", "GET"),
    ],
)
def test_an_http_error_keeps_its_headers_in_json(app, error, header, value):
    """The JSON error keeps every header the exception carries: a 401's challenge, a 503's
    Retry-After, a 405's Allow; only the content type is the JSON's own."""

    @app.route("/refuse")
    def refuse():
        raise error

    response = app.test_client().get("/refuse")
    assert response.status_code == error.code
    assert response.headers[header] == value
    assert response.headers.getlist("Content-Type") == ["application/json"]
    assert response.json == {"error": error.name, "status": error.code}


@pytest.mark.parametrize("path", ["/health", "/health/ready", "/health/live"])
def test_health_is_answered_before_flask_and_its_hooks(app, path):
    """A team's before_request (authentication, say) never turns a load balancer away."""

    @app.before_request
    def refuse_everyone():
        raise Unauthorized()

    assert app.test_client().get(path).status_code == 200
    assert app.test_client().get("/").status_code == 401


def test_flask_still_knows_the_health_routes(app):
    with app.test_request_context():
        assert flask.url_for("health.ready") == "/health"  # the first of its two rules
        assert flask.url_for("health.live", _external=True) == "http://localhost/health/live"


# -- the access line and the Envelope ----------------------------------------------------------


def fetch(client, path: str, **request):
    """A request as a server makes it: the body read to its end, then closed."""
    response = client.open(path, **request)
    response.get_data()
    response.close()
    return response


def fields(line: str) -> dict[str, str | None]:
    """A log line's fields as a logfmt parser reads them."""
    return dict(servers.log_pairs(line))


def access_lines(stream: io.StringIO) -> list[dict[str, str | None]]:
    """The fields of each access line logged so far."""
    lines = stream.getvalue().splitlines()
    return [fields(line) for line in lines if " request finished " in line]


@pytest.fixture
def logged(capture_logs) -> io.StringIO:
    """What the service logs during the test, as text lines."""
    return capture_logs(Config())


def test_a_request_has_one_access_line_with_its_fields(client, logged):
    """Method, path, the status the client got, duration, client address and request id."""
    started = time.perf_counter()
    fetch(client, "/no/such/route", method="POST", headers={"X-Request-ID": "req-1"})
    took_ms = (time.perf_counter() - started) * 1000
    [line] = access_lines(logged)
    assert line["method"] == "POST"
    assert line["path"] == "/no/such/route"
    assert line["status"] == "404"
    assert line["remote"] == "127.0.0.1"
    assert line["request_id"] == "req-1"
    assert 0 <= float(line["duration_ms"]) <= round(took_ms, 1)
    assert "incomplete" not in line


def test_the_access_line_counts_from_when_the_server_took_the_request(client, logged):
    """asgi_app's STARTED reading (when hypercorn took it) is where duration_ms starts."""
    started = time.perf_counter() - 10_000  # taken ten thousand seconds ago
    fetch(client, "/", environ_overrides={STARTED: started})
    took_ms = (time.perf_counter() - started) * 1000
    [line] = access_lines(logged)
    assert 10_000_000 <= float(line["duration_ms"]) <= round(took_ms, 1)


@pytest.mark.parametrize(
    ("path", "status", "logged_lines"),
    [("/health", 200, 0), ("/health/live", 200, 0), ("/", 200, 1), ("/no/such/route", 404, 1)],
)
def test_log_quiet_health_quiets_successful_health_requests(
    capture_logs, path, status, logged_lines
):
    """LOG_QUIET_HEALTH=1: no access line for a health check that passed; all others stay."""
    stream = capture_logs(Config())
    client = create_app(Config(log_quiet_health=True)).test_client()
    assert fetch(client, path).status_code == status
    assert len(access_lines(stream)) == logged_lines


def test_a_streamed_body_read_to_its_end_is_complete(app, logged):
    """The access line of a streamed body is written once it is closed, without `incomplete`."""
    closed = []

    @app.route("/stream")
    def stream():
        response = Response(iter([b"one", b"", b"two"]))
        response.call_on_close(lambda: closed.append(True))
        return response

    response = app.test_client().get("/stream")
    assert response.get_data() == b"onetwo"
    assert access_lines(logged) == []  # not before the server closes the body
    response.close()
    assert closed == [True]
    [line] = access_lines(logged)
    assert (line["status"], "incomplete" in line) == ("200", False)


def test_a_streamed_body_closed_early_is_incomplete(app, logged):
    """A client that left before the end: the line says `incomplete=true`, and the app's
    iterable is still closed."""
    closed = []

    @app.route("/stream")
    def stream():
        response = Response(iter([b"one", b"two"]))
        response.call_on_close(lambda: closed.append(True))
        return response

    response = app.test_client().get("/stream")
    next(iter(response.response))  # one chunk, then the client is gone
    response.close()
    assert closed == [True]
    [line] = access_lines(logged)
    assert (line["status"], line["incomplete"]) == ("200", "true")


def test_an_empty_body_is_closed_and_logged_at_once(app, logged):
    """No byte to send: the app's iterable is closed and the line written before the server
    is handed the empty body."""
    closed = []

    @app.route("/empty")
    def empty():
        response = Response(b"", 204)
        response.call_on_close(lambda: closed.append(True))
        return response

    assert app.test_client().get("/empty").status_code == 204
    assert closed == [True]
    [line] = access_lines(logged)
    assert (line["status"], "incomplete" in line) == ("204", False)


class StartResponse:
    """A server's start_response that keeps what it was given, as PEP 3333 describes it:
    called again once the headers went out, it raises the exc_info it must be given."""

    def __init__(self) -> None:
        self.status = ""
        self.headers: list[tuple[str, str]] = []
        self.written: list[bytes] = []

    def __call__(self, status, headers, exc_info=None):
        if self.status:
            if exc_info is None:
                raise AssertionError("start_response called again without exc_info")
            raise exc_info[1].with_traceback(exc_info[2])
        self.status, self.headers = status, headers
        return self.written.append


def serve(app, *, config: Config | None = None, quiet: bool = False, **request):
    """`app` in an Envelope, as a server runs it: the status, headers and body it sent."""
    environ = EnvironBuilder(**request).get_environ()
    environ["REMOTE_ADDR"] = "10.0.0.7"
    server = StartResponse()
    iterable = Envelope(app, config or Config(), None, quiet=quiet)(environ, server)
    try:
        body = b"".join(server.written) + b"".join(iterable)
    finally:
        if close := getattr(iterable, "close", None):
            close()
    return server, body


def failing_at_first_chunk(environ, start_response):
    """A WSGI app whose body fails before its first byte, after it called start_response."""
    start_response("200 OK", [("Content-Type", "text/plain")])

    class Body:
        closed = False

        def __iter__(self):
            raise RuntimeError("the body failed")

        def close(self):
            Body.closed = True

    failing_at_first_chunk.body = Body
    return Body()


def test_a_body_failing_before_its_first_byte_is_a_json_500(logged):
    """The client gets the JSON 500 with the request id; the error and the access line say so,
    and the app's iterable is closed."""
    server, body = serve(failing_at_first_chunk, path="/report", headers={"X-Request-ID": "r-9"})
    assert server.status.startswith("500 ")
    assert json.loads(body) == {"error": "Internal Server Error", "status": 500}
    headers = {name.lower(): value for name, value in server.headers}
    assert headers == {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "x-request-id": "r-9",
    }
    assert failing_at_first_chunk.body.closed
    error, _ = logged.getvalue().splitlines()
    assert error.startswith(f"{error[:19]} [ERROR] Exception on /report [GET] ")
    assert fields(error)["logger"] == "application"
    assert "RuntimeError: the body failed" in fields(error)["exception"]
    [line] = access_lines(logged)
    assert (line["status"], line["request_id"], "incomplete" in line) == ("500", "r-9", False)


def test_a_streamed_flask_body_failing_at_once_is_a_json_500(app, logged):
    """A streamed view that fails before yielding: Flask has answered, the Envelope makes the
    500, and the response's close callbacks still run."""
    closed = []

    @app.route("/stream")
    def stream():
        def chunks() -> Iterator[bytes]:
            raise RuntimeError("nothing to stream")
            yield b""  # pragma: no cover

        response = Response(stream_with_context(chunks()))
        response.call_on_close(lambda: closed.append(True))
        return response

    server, body = serve(app, path="/stream")
    assert server.status.startswith("500 ")
    assert json.loads(body) == {"error": "Internal Server Error", "status": 500}
    assert closed == [True]


def test_an_interrupted_request_is_logged_as_incomplete(logged):
    """A BaseException (a worker told to exit) still leaves an access line, then goes on."""

    def exiting(environ, start_response):
        raise SystemExit(1)

    with pytest.raises(SystemExit):
        serve(exiting, path="/x")
    [line] = access_lines(logged)
    assert (line["status"], line["incomplete"]) == ("500", "true")


def test_an_app_that_fails_after_its_first_byte_hears_from_the_server(logged):
    """start_response again, with exc_info, once the body began: the server's rules apply (it
    raises the app's error, which ends the body); the access line says `incomplete=true`."""

    def failing_late(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"one"
        try:
            raise LookupError("gone")
        except LookupError:
            start_response("500 Internal Server Error", [], sys.exc_info())

    with pytest.raises(LookupError, match="gone"):
        serve(failing_late)
    [line] = access_lines(logged)
    assert (line["status"], line["incomplete"]) == ("200", "true")


def test_an_app_that_never_calls_start_response_is_a_json_500(logged):
    """An app that returns without a status is a JSON 500, and the error line says why."""
    server, body = serve(lambda environ, start_response: [b"no status"], path="/mute")
    assert server.status.startswith("500 ")
    assert json.loads(body) == {"error": "Internal Server Error", "status": 500}
    [error] = [line for line in logged.getvalue().splitlines() if "[ERROR]" in line]
    assert "RuntimeError: the app returned without calling start_response" in error


def test_a_body_pushed_through_write_reaches_the_server(logged):
    """PEP 3333's write callable, for apps that push their body: the bytes get through."""

    def pushing(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"pushed")
        return []

    server, body = serve(pushing)
    assert (server.status, body) == ("200 OK", b"pushed")
    [line] = access_lines(logged)
    assert line["status"] == "200"


def test_a_request_without_path_info_logs_an_empty_path(logged):
    """PATH_INFO may be missing for the application's root (PEP 3333): the path is empty."""

    def root(environ, start_response):
        start_response("200 OK", [])
        return [b"root"]

    environ = EnvironBuilder().get_environ()
    del environ["PATH_INFO"]
    iterable = Envelope(root, Config(), None)(environ, StartResponse())
    assert b"".join(iterable) == b"root"
    iterable.close()
    [line] = access_lines(logged)
    assert line["path"] == ""


def plain(status: str):
    def app(environ, start_response):
        start_response(status, [("Content-Type", "text/plain")])
        return [b"body"]

    return app


@pytest.mark.parametrize(("status", "logged_lines"), [("200 OK", 0), ("399 X", 0), ("400 X", 1)])
def test_a_quiet_envelope_logs_only_failures(logged, status, logged_lines):
    """`quiet` (the metrics listener under LOG_QUIET_HEALTH): a line only from 400 on."""
    serve(plain(status), quiet=True, path="/metrics")
    assert len(access_lines(logged)) == logged_lines


def test_what_the_app_writes_to_wsgi_errors_is_logged(app, logged):
    """`wsgi.errors` becomes ERROR lines, one a line of text, blank lines left out."""

    @app.route("/complain")
    def complain():
        errors = request.environ["wsgi.errors"]
        assert errors.write("disk full\n\nretrying\n") == len("disk full\n\nretrying\n")
        errors.writelines(["gave up\n"])
        errors.flush()
        return "ok"

    fetch(app.test_client(), "/complain", headers={"X-Request-ID": "r-5"})
    lines = [line for line in logged.getvalue().splitlines() if "logger=wsgi.errors" in line]
    assert [line[20:].partition(" request_id=")[0] for line in lines] == [
        "[ERROR] disk full",
        "[ERROR] retrying",
        "[ERROR] gave up",
    ]
    assert all(fields(line)["request_id"] == "r-5" for line in lines)


# -- a body without a length -------------------------------------------------------------------


def test_a_chunked_body_over_max_body_size_is_413(app):
    """A body without Content-Length (chunked) is held to MAX_BODY_SIZE as it is read."""
    app = create_app(Config(max_body_size=10))

    @app.post("/upload")
    def upload():
        return {"size": len(request.get_data())}

    client = app.test_client()

    def post(body: bytes):
        return client.post(
            "/upload",
            input_stream=io.BytesIO(body),
            # as a server passes a chunked body: no length, the stream ends where the body does
            environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": ""},
        )

    assert post(b"x" * 10).json == {"size": 10}
    response = post(b"x" * 11)
    assert response.status_code == 413
    assert response.json == {"error": "Request Entity Too Large", "status": 413}


def test_a_declared_body_over_max_body_size_is_413_before_the_view_reads_it():
    """Content-Length over MAX_BODY_SIZE: a JSON 413 and the view never runs; exactly the
    limit is a body like any other."""
    app = create_app(Config(max_body_size=10))
    read: list[int] = []

    @app.post("/upload")
    def upload():
        read.append(len(request.get_data()))
        return {"size": read[-1]}

    client = app.test_client()
    assert client.post("/upload", data=b"x" * 10).json == {"size": 10}
    response = client.post("/upload", data=b"x" * 11)
    assert response.status_code == 413
    assert response.json == {"error": "Request Entity Too Large", "status": 413}
    assert read == [10]


class Body(io.BytesIO):
    """A request body that remembers how far it was read."""


@pytest.mark.parametrize("read", [lambda b: b.read(), lambda b: b.readline()])
def test_body_limit_reads_up_to_the_limit(read):
    """Exactly MAX_BODY_SIZE bytes is a body, not an error."""
    assert read(BodyLimit(Body(b"0123456789"), 10)) == b"0123456789"


@pytest.mark.parametrize(
    "read",
    [
        lambda b: b.read(),
        lambda b: b.read(1000),
        lambda b: b.read(12),  # two past the limit of 10: still only one taken
        lambda b: b.readline(),
        lambda b: b.readline(1000),
        lambda b: b.readlines(),
        lambda b: list(b),
    ],
)
def test_body_limit_refuses_one_byte_more_and_reads_no_further(read):
    """Past the limit is a 413, and no more than one byte past it was taken from the client."""
    stream = Body(b"x" * 1000)
    with pytest.raises(RequestEntityTooLarge):
        read(BodyLimit(stream, 10))
    assert stream.tell() == 11


def test_body_limit_reads_what_is_asked_within_the_limit():
    """A read of a size the limit allows reads that size, and the limit counts every read."""
    limited = BodyLimit(Body(b"x" * 20), 10)
    assert limited.read(0) == b""
    assert limited.read(3) == b"xxx"
    assert limited.read(7) == b"x" * 7
    with pytest.raises(RequestEntityTooLarge):
        limited.read(1)


def test_body_limit_reads_lines_as_a_file_does():
    """readline, readlines and iteration give the body's lines, as wsgi.input must."""
    body = b"one\ntwo\nthree"
    assert BodyLimit(Body(body), 100).readline() == b"one\n"
    assert BodyLimit(Body(body), 100).readlines() == [b"one\n", b"two\n", b"three"]
    assert list(BodyLimit(Body(body), 100)) == [b"one\n", b"two\n", b"three"]
    assert BodyLimit(Body(body), 100).readline(2) == b"on"


# -- what create_app wires ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/health/live"])  # Flask's, and the Envelope's own
@pytest.mark.parametrize(("hops", "remote"), [(0, "127.0.0.1"), (1, "203.0.113.9")])
def test_trusted_proxies_decide_whose_address_is_logged(capture_logs, hops, remote, path):
    """TRUSTED_PROXIES=1: the client a proxy names in X-Forwarded-For; 0: the peer itself."""
    stream = capture_logs(Config())
    client = create_app(Config(trusted_proxies=hops)).test_client()
    fetch(client, path, headers={"X-Forwarded-For": "203.0.113.9"})
    [line] = access_lines(stream)
    assert line["remote"] == remote


def test_two_trusted_proxies_give_the_clients_scheme_host_port_and_prefix(capture_logs):
    """TRUSTED_PROXIES=2: each X-Forwarded-* header is read two hops from the right."""
    stream = capture_logs(Config())
    app = create_app(Config(trusted_proxies=2))
    app.add_url_rule("/where", "where", lambda: request.url_root)
    headers = {
        "X-Forwarded-For": "198.51.100.1, 203.0.113.9",
        "X-Forwarded-Proto": "https, http",
        "X-Forwarded-Host": "public.example, inner.example",
        "X-Forwarded-Port": "8443, 8080",
        "X-Forwarded-Prefix": "/api, /inner",
    }
    response = fetch(app.test_client(), "/where", headers=headers)
    assert response.text == "https://public.example:8443/api/"
    [line] = access_lines(stream)
    assert line["remote"] == "198.51.100.1"


def test_an_async_view_meets_its_threads_one_event_loop_on_every_request(app):
    """A loop-bound client an async view keeps (a pool) still works on the next request on
    that thread: Flask's default would give each request a loop of its own."""
    loops = []

    @app.get("/loop")
    async def loop() -> str:
        loops.append(asyncio.get_running_loop())
        return "ok"

    client = app.test_client()
    assert [fetch(client, "/loop").text for _ in range(2)] == ["ok", "ok"]
    assert loops[0] is loops[1]
    assert not loops[0].is_closed()


def test_a_request_is_timed_in_the_metrics_from_when_it_was_taken(client):
    """http_request_duration_seconds observes the request from the server's STARTED reading."""

    def observed() -> float:
        labels = {"method": "GET", "route": "/"}
        return REGISTRY.get_sample_value("http_request_duration_seconds_sum", labels) or 0.0

    before = observed()
    started = time.perf_counter() - 100  # taken a hundred seconds ago
    fetch(client, "/", environ_overrides={STARTED: started})
    took = time.perf_counter() - started
    assert 100 <= observed() - before <= took


def test_a_failing_view_is_logged_by_the_apps_logger(client, logged):
    """Flask's own error line for a view's exception comes from the `application` logger."""
    fetch(client, "/fail")
    [error] = [line for line in logged.getvalue().splitlines() if "[ERROR]" in line]
    assert " [ERROR] Exception on /fail [GET] " in error
    assert fields(error)["logger"] == "application"


def test_a_check_within_health_cache_ttl_reuses_the_round():
    """HEALTH_CACHE_TTL: a second check soon after the first answers with the same round."""
    app = create_app(Config(datastores=(REFUSED,), health_cache_ttl=60))
    try:
        first, second = (app.test_client().get("/health?verbose=1") for _ in range(2))
    finally:
        app.extensions["health"].close()
    assert (first.status_code, second.status_code) == (500, 500)
    assert first.json["checks"]["db"]["error"] == "connection refused"
    assert second.json == first.json


def test_the_health_rounds_are_counted_in_the_metrics():
    """With metrics on, each probe round the health route runs is counted."""

    def rounds() -> float:
        return REGISTRY.get_sample_value("health_rounds_total") or 0.0

    app = create_app(Config(datastores=(REFUSED,), health_cache_ttl=0))
    before = rounds()
    try:
        assert app.test_client().get("/health").status_code == 500
    finally:
        app.extensions["health"].close()
    assert rounds() == before + 1
