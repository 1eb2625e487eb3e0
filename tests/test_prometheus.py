"""A real Prometheus scrapes the service in each serving mode, and PromQL sees true numbers.

Under one hypercorn (its own registry), gunicorn with two workers (the master adds up their
multiprocess files) and scripts/serve with two hypercorns (the launcher does): the request
counters match the requests sent, summed over the processes; the datastore's up gauge falls
to 0 when its database is cut through the fault proxy and comes back to 1; a thousand random
404 paths are one series.

Needs the `prometheus` binary (the Debian package; .ci/run installs it). Without it the tests
skip, except under CI=true where they fail.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests import prometheus, servers
from tests.conftest import through
from tests.faultproxy import FaultProxy

# id -> (tests/servers.py mode, settings)
SUBJECTS = {
    "hypercorn-asgi": ("hypercorn-asgi", {}),
    "gunicorn-2": ("gunicorn", {"WEB_CONCURRENCY": "2"}),
    "serve-2": ("serve", {"WEB_CONCURRENCY": "2"}),
}
Scraped = tuple[servers.Server, prometheus.Prometheus]


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """Prometheus, or a skip (a failure under CI=true) saying how to install it."""
    binary = prometheus.binary()
    if binary is None:
        reason = "prometheus is not installed (apt-get install -y prometheus; .ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: CI must run the Prometheus tests")
        pytest.skip(reason)
    return binary


@pytest.fixture
def scraped(
    request: pytest.FixtureRequest,
    prometheus_binary: str,
    tmp_path: Path,
    database_proxy: FaultProxy,
    database_url: str,
) -> Iterator[Scraped]:
    """The subject `request.param` with its database behind the fault proxy, and a Prometheus
    that has scraped it once."""
    mode, env = SUBJECTS[request.param]
    settings = {
        **env,
        "DATABASE_URL": through(database_proxy, database_url),
        "HEALTH_CACHE_TTL": "0.2",
        "HEALTH_TIMEOUT": "0.5",
        "LOG_QUIET_HEALTH": "1",  # the scrapes and checks of this test: a quiet stdout
    }
    server = servers.start(mode, settings)
    scraper = None
    try:
        scraper = prometheus.start(prometheus_binary, tmp_path, server.metrics_port)
        scraper.wait_for('up{job="app"}', lambda result: _value(result) == 1)
        yield server, scraper
    finally:
        if scraper is not None:
            scraper.stop()
        server.stop()


def _value(result: prometheus.Result) -> float | None:
    """The value of a one-sample result; None when there is no sample yet."""
    return float(result[0]["value"][1]) if result else None


async def _send(
    url: str, requests: list[tuple[str, str]], connections: int = 20, *, fresh: bool = True
) -> list[int]:
    """`(method, path)` requests, `connections` at a time; `fresh`: each on a new connection,
    so that every serving process gets some."""
    kept = 0 if fresh else connections
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=kept)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        answers = await asyncio.gather(*(client.request(m, p) for m, p in requests))
    return [answer.status_code for answer in answers]


SUBJECT_IDS = list(SUBJECTS)


@pytest.mark.parametrize("scraped", SUBJECT_IDS, indirect=True)
def test_the_request_counters_match_the_requests_sent(scraped: Scraped) -> None:
    """30 GET /, 20 GET /health and 10 POST / (a 405): exactly those, whatever the process
    that answered each one; and no scrape among them."""
    server, scraper = scraped
    sent = [("GET", "/")] * 30 + [("GET", "/health")] * 20 + [("POST", "/")] * 10
    statuses = asyncio.run(_send(server.url, sent))
    assert sorted(statuses) == [200] * 50 + [405] * 10
    expected = {("GET", "/", "200"): 30, ("GET", "/health", "200"): 20,
                ("POST", "unmatched", "405"): 10}  # fmt: skip
    query = 'sum by (method, route, status) (http_requests_total{route!="/health/live"})'

    def counted(result: prometheus.Result) -> dict[tuple[str, str, str], float]:
        return {
            (s["metric"]["method"], s["metric"]["route"], s["metric"]["status"]): float(
                s["value"][1]
            )
            for s in result
        }

    result = scraper.wait_for(query, lambda result: counted(result) == expected)
    assert counted(result) == expected
    durations = scraper.query('sum(http_request_duration_seconds_count{route="/"})')
    assert _value(durations) == 30


@pytest.mark.parametrize("scraped", SUBJECT_IDS, indirect=True)
def test_the_up_gauge_follows_the_database(scraped: Scraped, database_proxy: FaultProxy) -> None:
    """Health checks keep coming; cut: up 0 (failures counted as refused); restored: up 1."""
    server, scraper = scraped
    up = 'health_datastore_up{datastore="database"}'
    checking = threading.Event()

    def check_health() -> None:  # a load balancer's checks, spread over the processes
        while not checking.wait(0.1):
            asyncio.run(_send(server.url, [("GET", "/health")] * 4, connections=4))

    checker = threading.Thread(target=check_health, daemon=True)
    checker.start()
    try:
        assert len(scraper.wait_for(up, lambda result: _value(result) == 1)) == 1
        database_proxy.set_mode("refuse")
        scraper.wait_for(up, lambda result: _value(result) == 0)
        refused = scraper.query(
            'sum(health_probe_failures_total{datastore="database",reason="connection refused"})'
        )
        assert (_value(refused) or 0) >= 1
        database_proxy.set_mode("pass")
        scraper.wait_for(up, lambda result: _value(result) == 1)
    finally:
        checking.set()
        checker.join(10)


@pytest.mark.parametrize("scraped", SUBJECT_IDS, indirect=True)
def test_a_thousand_random_404_paths_are_one_series(scraped: Scraped) -> None:
    """A scanner's paths share the route `unmatched`: one series, counting all 1,000."""
    server, scraper = scraped
    paths = [("GET", f"/{uuid.uuid4().hex}/{uuid.uuid4().hex[:8]}") for _ in range(1000)]
    assert set(asyncio.run(_send(server.url, paths, fresh=False))) == {404}
    query = 'http_requests_total{status="404"}'
    result = scraper.wait_for(query, _counting(1000))
    assert len(result) == 1
    assert result[0]["metric"]["route"] == "unmatched"
    routes = scraper.query("count by (route) (http_requests_total)")
    assert {sample["metric"]["route"] for sample in routes} <= {"unmatched", "/health/live"}


def _counting(total: float) -> Callable[[prometheus.Result], bool]:
    return lambda result: sum(float(sample["value"][1]) for sample in result) >= total
