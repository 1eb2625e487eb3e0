"""Tests for application.web through Flask's test client."""

from __future__ import annotations

import errno
import re

import flask
import pytest
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import MethodNotAllowed, ServiceUnavailable, Unauthorized

from application.config import Config
from application.health import HealthChecker
from application.web import create_app

COMMIT = "abc123"
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
    assert response.headers["Content-Type"] == "application/json"
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
