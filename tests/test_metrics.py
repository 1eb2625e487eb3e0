"""Tests for application.metrics and application.exporter in-process: what each request and
probe round records, by which labels, and the /metrics listener with its access line.

The instruments are the process's one set in prometheus_client's default registry, shared by
every app a test makes: each test reads what changed while it ran."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest
from flask import Flask
from prometheus_client import REGISTRY

from application import exporter
from application.asgi import AsgiApp
from application.config import Config
from application.health import HealthChecker
from application.metrics import OTHER_METHOD, UNMATCHED, instruments
from application.web import create_app
from tests import servers
from tests.test_asgi import Exchange, scope


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def routes() -> set[str]:
    """Every route label value the request counter has."""
    return {
        sample.labels["route"]
        for metric in REGISTRY.collect()
        if metric.name == "http_requests"
        for sample in metric.samples
    }


def counted() -> float:
    """Every request counted so far."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "http_requests"
        for sample in metric.samples
        if sample.name == "http_requests_total"
    )


@pytest.fixture
def app() -> Iterator[Flask]:
    """The service with a route that has a variable part, and one that reports in flight."""
    flask_app = create_app(Config(commit="c"))

    @flask_app.get("/items/<int:item>")
    def item(item: int) -> dict[str, int]:
        return {"item": item}

    @flask_app.get("/in-flight")
    def in_flight() -> dict[str, float]:
        return {"in_flight": value("http_requests_in_flight")}

    yield flask_app
    flask_app.extensions["health"].close()


def test_a_request_is_counted_by_its_route_template(app: Flask):
    """Two items, one series: the rule `/items/<int:item>`, not the paths."""
    labels = {"method": "GET", "route": "/items/<int:item>"}
    before = value("http_requests_total", **labels, status="200")
    observed = value("http_request_duration_seconds_count", **labels)
    client = app.test_client()
    assert client.get("/items/1", buffered=True).status_code == 200
    assert client.get("/items/2", buffered=True).status_code == 200
    assert value("http_requests_total", **labels, status="200") == before + 2
    assert value("http_request_duration_seconds_count", **labels) == observed + 2


def test_unknown_paths_share_one_route(app: Flask):
    """Fifty paths no rule matches (and a method no rule takes) add one series at most."""
    known = routes()
    labels = {"method": "GET", "route": UNMATCHED, "status": "404"}
    before = value("http_requests_total", **labels)
    client = app.test_client()
    for _ in range(50):
        assert client.get(f"/{uuid.uuid4().hex}", buffered=True).status_code == 404
    assert client.delete("/items/1", buffered=True).status_code == 405
    assert value("http_requests_total", **labels) == before + 50
    assert routes() - known <= {UNMATCHED}


def test_a_method_outside_http_is_counted_as_other(app: Flask):
    """Invented methods share one label value."""
    labels = {"method": OTHER_METHOD, "route": UNMATCHED, "status": "405"}
    before = value("http_requests_total", **labels)
    client = app.test_client()
    for method in ("FOO", "BAR", "PROPFIND"):
        assert client.open("/", method=method, buffered=True).status_code == 405
    assert value("http_requests_total", **labels) == before + 3


def test_a_request_is_in_flight_until_it_ends(app: Flask):
    """Through the Envelope alone (gunicorn's path): one in flight while the view runs."""
    before = value("http_requests_in_flight")
    answer = app.test_client().get("/in-flight")
    assert answer.json == {"in_flight": before + 1}
    answer.close()
    assert value("http_requests_in_flight") == before


def test_asgi_app_counts_in_flight_once(app: Flask):
    """Through asgi_app and then the Envelope: still one, counted from when the server took it."""
    asgi = AsgiApp(app)
    before = value("http_requests_in_flight")
    exchange = Exchange()
    try:
        asyncio.run(asgi(scope("/in-flight"), exchange.receive, exchange.send))
    finally:
        asgi.threads.executor.shutdown()
    assert exchange.status == 200
    assert exchange.body == b'{"in_flight":%d.0}\n' % (before + 1)
    assert value("http_requests_in_flight") == before


def test_asgi_apps_own_answers_are_counted_by_route(app: Flask):
    """The health routes asgi_app answers without Flask count as Flask's would."""
    asgi = AsgiApp(app)
    labels = {"method": "GET", "route": "/health/live", "status": "200"}
    before = value("http_requests_total", **labels)
    try:
        for _ in range(3):
            exchange = Exchange()
            asyncio.run(asgi(scope("/health/live"), exchange.receive, exchange.send))
    finally:
        asgi.threads.executor.shutdown()
    assert value("http_requests_total", **labels) == before + 3


@pytest.mark.parametrize(
    ("path", "method", "route"),
    [
        ("/", "GET", "/"),
        ("/items/7", "GET", "/items/<int:item>"),
        ("/items/x", "GET", UNMATCHED),
        ("/", "POST", UNMATCHED),
        ("/nowhere", "GET", UNMATCHED),
    ],
)
def test_a_refused_request_is_counted_by_the_route_flask_would_match(
    app: Flask, path: str, method: str, route: str
):
    """A 503 or 499 made before Flask runs names the route Flask would have named."""
    asgi = AsgiApp(app)
    asgi.threads.executor.shutdown()
    assert asgi._route(path, method) == route


def test_metrics_off_counts_nothing():
    """METRICS_PORT=0: no instruments for the app, its checker or asgi_app; nothing changes."""
    flask_app = create_app(Config(metrics_port=0))
    asgi = AsgiApp(flask_app)
    asgi.threads.executor.shutdown()
    labels = {"method": "GET", "route": "/", "status": "200"}
    before = value("http_requests_total", **labels)
    assert flask_app.test_client().get("/", buffered=True).status_code == 200
    assert value("http_requests_total", **labels) == before
    assert flask_app.extensions["metrics"] is None
    assert flask_app.extensions["health"].metrics is None
    assert asgi.metrics is None


# -- health rounds ---------------------------------------------------------------------------


class FakeProbe:
    """A datastore that answers after `delay` s, or fails with `error`."""

    target = "fake://"

    def __init__(self, name: str, error: Exception | None = None, delay: float = 0.0) -> None:
        self.name = name
        self.error = error
        self.delay = delay

    async def ping(self) -> None:
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error

    async def close(self) -> None:
        """Nothing to close."""


def checker(*probes: FakeProbe, timeout: float = 0.5) -> HealthChecker:
    return HealthChecker(probes, timeout=timeout, cache_ttl=0, metrics=instruments())


@pytest.mark.parametrize(
    ("probe", "reason"),
    [
        (FakeProbe("refusing", ConnectionRefusedError()), "connection refused"),
        (FakeProbe("hanging", delay=5), "timed out"),  # no seconds: "timed out after 0.5 s"
        (FakeProbe("odd", ValueError("x")), "unexpected error"),
    ],
)
def test_a_failed_probe_is_down_and_counted_by_reason(probe: FakeProbe, reason: str):
    """up 0, one failure under the words of /health without numbers, one more round."""
    failures = value("health_probe_failures_total", datastore=probe.name, reason=reason)
    rounds = value("health_rounds_total")
    health = checker(probe)
    try:
        assert not asyncio.run(health.wait()).healthy
    finally:
        health.close()
    assert value("health_datastore_up", datastore=probe.name) == 0
    assert value("health_probe_failures_total", datastore=probe.name, reason=reason) == failures + 1
    assert value("health_rounds_total") == rounds + 1


def test_an_answering_datastore_is_up_and_its_probe_timed():
    """up 1 and one more probe in the duration histogram, in the bucket of its 50 ms."""
    name = "answering"
    count = value("health_probe_duration_seconds_count", datastore=name)
    fast = value("health_probe_duration_seconds_bucket", datastore=name, le="0.025")
    health = checker(FakeProbe(name, delay=0.05))
    try:
        assert asyncio.run(health.wait()).healthy
    finally:
        health.close()
    assert value("health_datastore_up", datastore=name) == 1
    assert value("health_probe_duration_seconds_count", datastore=name) == count + 1
    assert value("health_probe_duration_seconds_bucket", datastore=name, le="0.025") == fast


def test_waiters_on_a_round_in_flight_are_counted_as_shared():
    """Ten callers at once: one round run, nine served by it."""
    rounds, shared = value("health_rounds_total"), value("health_rounds_shared_total")
    health = checker(FakeProbe("slow", delay=0.2))

    async def ten() -> None:
        await asyncio.gather(*(health.wait() for _ in range(10)))

    try:
        asyncio.run(ten())
    finally:
        health.close()
    assert value("health_rounds_total") == rounds + 1
    assert value("health_rounds_shared_total") == shared + 9


# -- the listener ------------------------------------------------------------------------------


@pytest.fixture
def listener(request: pytest.FixtureRequest) -> Iterator[exporter.Exporter]:
    """/metrics of this process on a free port; `request.param`: settings for it."""
    settings = getattr(request, "param", {})
    metrics = exporter.Exporter(Config(metrics_port=servers.free_port(), **settings), None)
    yield metrics
    metrics.stop()


def access_lines(stream: io.StringIO) -> list[str]:
    """The app's access lines (httpx, the test's client, logs its requests too)."""
    return [line for line in stream.getvalue().splitlines() if "request finished" in line]


def scrape(listener: exporter.Exporter, method: str = "GET") -> httpx.Response:
    return httpx.request(method, f"http://127.0.0.1:{listener.port}/metrics", timeout=10)


def test_a_scrape_gets_the_registry_in_prometheus_text(listener: exporter.Exporter):
    """The default registry: the service's instruments and the client's process metrics."""
    instruments()
    answer = scrape(listener)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    for name in ("http_requests_total", "health_rounds_total", "process_cpu_seconds_total",
                 "python_info", "python_gc_collections_total"):  # fmt: skip
        assert f"\n{name}" in answer.text, name


def test_a_scrape_has_an_access_line_and_no_count(listener: exporter.Exporter, capture_logs):
    """Its own line, like any request; the request metrics stay as they were."""
    stream = capture_logs(Config())
    before = counted()
    assert scrape(listener).status_code == 200
    assert counted() == before
    [line] = access_lines(stream)
    assert "request finished method=GET path=/metrics status=200" in line
    servers.check_log_line(line)


@pytest.mark.parametrize("listener", [{"log_quiet_health": True}], indirect=True)
def test_log_quiet_health_quiets_successful_scrapes(listener: exporter.Exporter, capture_logs):
    """LOG_QUIET_HEALTH=1: no line for a scrape that worked; one for one that did not."""
    stream = capture_logs(Config())
    assert scrape(listener).status_code == 200
    assert scrape(listener, "POST").status_code == 405
    [line] = access_lines(stream)
    assert "method=POST path=/metrics status=405" in line


def test_a_taken_metrics_port_stops_start_up_with_one_line(capture_logs):
    """Another process on METRICS_PORT: exit 1 and a line naming the setting and the port."""
    stream = capture_logs(Config())
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exited:
            exporter.start(Config(metrics_port=port), None)
    assert exited.value.code == 1
    [line] = stream.getvalue().splitlines()
    assert f"[CRITICAL] metrics: cannot listen on METRICS_PORT {port}: " in line


def test_a_scrape_waits_for_no_datastore(listener: exporter.Exporter):
    """While a probe round hangs, a scrape answers at once: it reads memory, nothing else."""
    health = checker(FakeProbe("hung", delay=30), timeout=20)
    waiting = threading.Thread(target=lambda: asyncio.run(health.wait()), daemon=True)
    waiting.start()
    try:
        answer = scrape(listener)
    finally:
        health.close()
        waiting.join(5)
    assert answer.status_code == 200
    assert answer.elapsed.total_seconds() < 2


def test_a_file_a_process_has_only_just_created_fails_no_scrape(tmp_path, capture_logs):
    """A new multiprocess file is empty until its process sizes it; one left empty by a process
    killed in that moment stays so. The scrape of the others' files goes on."""
    (tmp_path / "counter_4242.db").touch()
    (tmp_path / "gauge_livesum_4242.db").touch()
    capture_logs(Config())
    metrics = exporter.Exporter(Config(metrics_port=servers.free_port()), str(tmp_path))
    try:
        answer = scrape(metrics)
    finally:
        metrics.stop()
    assert answer.status_code == 200
    assert "python_info" in answer.text
