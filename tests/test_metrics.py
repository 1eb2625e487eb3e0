"""Tests for application.metrics and application.exporter in-process: what each request and
probe round records, by which labels, and the /metrics listener with its access line.

The instruments are the process's one set in prometheus_client's default registry, shared by
every app a test makes: each test reads what changed while it ran."""

from __future__ import annotations

import asyncio
import io
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import structlog
from flask import Flask
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from application import exporter
from application.asgi import AsgiApp
from application.config import Config
from application.health import HealthChecker
from application.metrics import OTHER_METHOD, UNMATCHED, Metrics, instruments
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
        asgi.threads.shutdown()
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
        asgi.threads.shutdown()
    assert value("http_requests_total", **labels) == before + 3


def test_the_envelopes_own_answers_are_counted_by_route(app: Flask):
    """The health routes the Envelope answers without Flask, under a WSGI server, count as
    Flask's would."""
    labels = {"method": "GET", "route": "/health/live", "status": "200"}
    before = value("http_requests_total", **labels)
    client = app.test_client()
    for _ in range(3):
        assert client.get("/health/live", buffered=True).status_code == 200
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
    asgi.threads.shutdown()
    assert asgi._route(path, method) == route


def test_metrics_off_counts_nothing():
    """METRICS_PORT=0: no instruments for the app, its checker or asgi_app; nothing changes."""
    flask_app = create_app(Config(metrics_port=0))
    asgi = AsgiApp(flask_app)
    asgi.threads.shutdown()
    labels = {"method": "GET", "route": "/", "status": "200"}
    before = value("http_requests_total", **labels)
    assert flask_app.test_client().get("/", buffered=True).status_code == 200
    assert value("http_requests_total", **labels) == before
    assert flask_app.extensions["metrics"] is None
    assert flask_app.extensions["health"].metrics is None
    assert asgi.metrics is None


@pytest.fixture
def fresh_metrics() -> Iterator[Metrics]:
    """Instruments made in the test, in the default registry while it runs: the process's own
    are made once, on first use, by whichever test comes first. They are back after."""
    own = [value for value in vars(instruments()).values() if isinstance(value, MetricWrapperBase)]
    for collector in own:
        REGISTRY.unregister(collector)
    metrics = Metrics()
    yield metrics
    for collector in vars(metrics).values():
        if isinstance(collector, MetricWrapperBase):
            REGISTRY.unregister(collector)
    for collector in own:
        REGISTRY.register(collector)


# Each instrument as a scrape describes it: type, labels, help.
CATALOGUE = {
    "http_requests": (
        "counter",
        ["method", "route", "status"],
        "HTTP requests answered, by method, route template and status code.",
    ),
    "http_request_duration_seconds": (
        "histogram",
        ["method", "route"],
        "Time from the server taking the request to the end of its response.",
    ),
    "http_requests_in_flight": ("gauge", [], "HTTP requests taken and not yet answered."),
    "health_datastore_up": (
        "gauge",
        ["datastore"],
        "1 when the datastore answered in the last probe round, else 0.",
    ),
    "health_probe_duration_seconds": (
        "histogram",
        ["datastore"],
        "Time a datastore took to answer a probe, or to fail it.",
    ),
    "health_probe_failures": (
        "counter",
        ["datastore", "reason"],
        "Failed probes, by datastore and reason (the words of /health, without numbers).",
    ),
    "health_rounds": ("counter", [], "Probe rounds run to their end."),
    "health_rounds_shared": (
        "counter",
        [],
        "Health checks answered by a round already in flight instead of one of their own.",
    ),
}


def test_the_instruments_are_the_documented_catalogue(fresh_metrics: Metrics):
    """Each instrument's name, type, labels and help as Prometheus reads them (README,
    "Metrics"), once each has recorded something."""
    fresh_metrics.request_done("GET", "/", 200, 0.01)
    fresh_metrics.in_flight.inc()
    fresh_metrics.probe_done("database", 0.01, "timed out")
    fresh_metrics.rounds.inc()
    fresh_metrics.rounds_shared.inc()
    described = {
        family.name: (
            family.type,
            sorted({label for sample in family.samples for label in sample.labels} - {"le"}),
            family.documentation,
        )
        for family in REGISTRY.collect()
        if family.name.startswith(("http_", "health_"))
    }
    assert described == CATALOGUE


def buckets(exposition: str, histogram: str) -> list[str]:
    """The upper bounds of a histogram's buckets, as a scrape shows them."""
    bounds = re.findall(rf'^{histogram}_bucket{{.*le="([^"]+)"', exposition, re.M)
    return list(dict.fromkeys(bounds))


def test_each_histogram_has_the_documented_buckets(fresh_metrics: Metrics):
    """Requests 5 ms to 10 s with 0.75 and 1 s either side of HEALTH_TIMEOUT's 0.8 s; probes
    1 ms to 5 s (README, "Metrics")."""
    fresh_metrics.request_done("GET", "/buckets", 200, 0.01)
    fresh_metrics.probe_done("buckets", 0.01, None)
    exposition = generate_latest(REGISTRY).decode()
    assert buckets(exposition, "http_request_duration_seconds") == [
        "0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25", "0.5", "0.75", "1.0", "2.5",
        "5.0", "7.5", "10.0", "+Inf",
    ]  # fmt: skip
    assert buckets(exposition, "health_probe_duration_seconds") == [
        "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5",
        "5.0", "+Inf",
    ]  # fmt: skip


def test_each_method_route_and_status_is_a_series_of_its_own():
    """Requests that differ in method or in status alone are counted apart; the duration by
    method and route."""
    metrics = instruments()
    route = f"/test-{uuid.uuid4().hex}"
    for method, status in [("GET", 200), ("POST", 200), ("GET", 500), ("GET", 200)]:
        metrics.request_done(method, route, status, 0.3)
    for method, status, count in [("GET", "200", 2), ("POST", "200", 1), ("GET", "500", 1)]:
        assert value("http_requests_total", method=method, route=route, status=status) == count
    for method, count in [("GET", 3), ("POST", 1)]:
        labels = {"method": method, "route": route}
        assert value("http_request_duration_seconds_count", **labels) == count
        assert value("http_request_duration_seconds_bucket", **labels, le="0.25") == 0
        assert value("http_request_duration_seconds_bucket", **labels, le="0.5") == count


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


def scrape_directory(directory: Path) -> httpx.Response:
    """A scrape of a listener adding up the multiprocess files in `directory`, stopped after."""
    metrics = exporter.Exporter(Config(metrics_port=servers.free_port()), str(directory))
    try:
        return scrape(metrics)
    finally:
        metrics.stop()


def test_a_file_a_process_has_only_just_created_fails_no_scrape(tmp_path, capture_logs):
    """A new multiprocess file is empty until its process sizes it; one left empty by a process
    killed in that moment stays so. The scrape of the others' files goes on."""
    (tmp_path / "counter_4242.db").touch()
    (tmp_path / "gauge_livesum_4242.db").touch()
    capture_logs(Config())
    answer = scrape_directory(tmp_path)
    assert answer.status_code == 200
    assert "python_info" in answer.text


def test_the_listener_started_answers_until_stopped():
    """`start` returns the listener serving; once stopped, its port is closed."""
    metrics = exporter.start(Config(metrics_port=servers.free_port()), None)
    try:
        assert scrape(metrics).status_code == 200
    finally:
        metrics.stop()
    with pytest.raises(httpx.ConnectError):
        scrape(metrics)


def test_a_connection_that_fails_is_one_line_in_the_log(
    listener: exporter.Exporter, capture_logs, monkeypatch: pytest.MonkeyPatch
):
    """A client resetting its connection before its request line: an ERROR line naming the
    client, in the log rather than a traceback on stderr; the listener goes on serving."""
    stream = capture_logs(Config())
    monkeypatch.setattr(exporter, "log", structlog.get_logger())
    with socket.create_connection(("127.0.0.1", listener.port)) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    deadline = time.monotonic() + 10
    while "connection failed" not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)  # the connection's own thread writes the line
    [line] = [line for line in stream.getvalue().splitlines() if "connection failed" in line]
    assert "[ERROR] metrics listener: a connection failed client=127.0.0.1" in line
    assert scrape(listener).status_code == 200


# -- several processes: the supervisor's scrape of their files ---------------------------------

# A serving process, as gunicorn's workers and scripts/serve's hypercorns record: its requests,
# one still in flight when it ends, and a probe round.
SERVING = """
from application.metrics import instruments
metrics = instruments()
metrics.request_done("GET", "/", 200, 0.01)
metrics.in_flight.inc()
metrics.probe_done("database", 0.01, None)
"""


def serving_processes(directory: Path, count: int) -> list[int]:
    """`count` processes that record into `directory` and end; their pids."""
    env = {
        "PATH": os.environ["PATH"],
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "COMMIT_SHA": "test",
    }
    processes = [
        subprocess.Popen([sys.executable, "-c", SERVING], cwd=servers.ROOT, env=env)
        for _ in range(count)
    ]
    assert [process.wait(timeout=60) for process in processes] == [0] * count
    return [process.pid for process in processes]


def sample(text: str, series: str) -> float | None:
    """A series' value in an exposition, or None when it has none."""
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(found[1]) if found else None


def test_a_scrape_of_several_processes_adds_up_their_files(tmp_path: Path):
    """Each counter summed over the processes; `python_info`, the same in each, and none of the
    process metrics, which would describe the supervisor."""
    serving_processes(tmp_path, 2)
    text = scrape_directory(tmp_path).text
    assert sample(text, 'http_requests_total{method="GET",route="/",status="200"}') == 2
    assert sample(text, 'http_request_duration_seconds_count{method="GET",route="/"}') == 2
    assert sample(text, "http_requests_in_flight") == 2
    assert sample(text, 'health_datastore_up{datastore="database"}') == 1
    assert "\npython_info{" in text
    assert "process_cpu_seconds_total" not in text
    assert "python_gc_collections_total" not in text


def test_a_process_marked_exited_leaves_the_live_gauges_and_keeps_its_counts(tmp_path: Path):
    """Its request still in flight no longer counts; the requests it answered still do."""
    first, _ = serving_processes(tmp_path, 2)
    exporter.process_exited(first, str(tmp_path))
    text = scrape_directory(tmp_path).text
    assert sample(text, "http_requests_in_flight") == 1
    assert sample(text, 'http_requests_total{method="GET",route="/",status="200"}') == 2


def test_a_file_gone_while_a_scrape_lists_them_fails_no_scrape(tmp_path: Path):
    """A process's live gauge file removed (it was marked dead) between the listing and the
    reading: here a name that leads nowhere. The scrape of the others goes on."""
    serving_processes(tmp_path, 1)
    (tmp_path / "gauge_livesum_4242.db").symlink_to(tmp_path / "removed.db")
    answer = scrape_directory(tmp_path)
    assert answer.status_code == 200
    assert sample(answer.text, "http_requests_in_flight") == 1


def test_the_multiprocess_directory_is_made_under_tmpdir_and_removed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """A fresh directory each time, under TMPDIR; removing it takes its files, and removing it
    twice is no error."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first, second = exporter.make_multiprocess_dir(), exporter.make_multiprocess_dir()
    assert first != second
    assert {Path(first).parent, Path(second).parent} == {tmp_path}
    assert Path(first).name.startswith("prometheus-")
    (Path(first) / "counter_1.db").touch()
    exporter.remove_multiprocess_dir(first)
    exporter.remove_multiprocess_dir(first)
    assert list(tmp_path.iterdir()) == [Path(second)]
