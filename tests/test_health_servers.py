"""End to end: /health under real servers, with real datastores and real faults in front of them."""

from __future__ import annotations

import asyncio
import re
import time

import asyncpg
import httpx
import pytest

from tests import servers
from tests.conftest import through
from tests.faultproxy import FaultProxy
from tests.pgcluster import PgCluster

FAST = {"HEALTH_TIMEOUT": "0.5", "HEALTH_CACHE_TTL": "0"}
DURATION = re.compile(r"\bduration_ms=([0-9.]+)")


@pytest.fixture
def behind_proxy(database_proxy: FaultProxy, database_url: str) -> dict[str, str]:
    """Settings whose database is the real PostgreSQL behind the fault proxy."""
    return {**FAST, "DATABASE_URL": through(database_proxy, database_url)}


async def _burst(url: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        return await asyncio.gather(*(client.get(url) for _ in range(count)))


@pytest.mark.parametrize("mode", list(servers.MODES))
def test_the_probe_pool_is_reused_across_requests(
    mode: str, database_proxy: FaultProxy, behind_proxy: dict[str, str]
) -> None:
    """30 uncached rounds, one database connection: no pool tied to a dead request loop."""
    server = servers.start(mode, behind_proxy)
    try:
        answers = [server.get("/health") for _ in range(30)]
    finally:
        server.stop()
    assert [answer.status_code for answer in answers] == [200] * 30
    assert database_proxy.accepted == 1
    assert not [line for line in server.lines if "[ERROR]" in line or "loop" in line]


@pytest.mark.parametrize("mode", ["hypercorn-asgi", "gunicorn-gthread"])
def test_200_concurrent_requests_share_one_probe_round(
    mode: str, database_proxy: FaultProxy, behind_proxy: dict[str, str]
) -> None:
    """A burst of /health is one probe at a time, one connection, and 200 answers of 200."""
    database_proxy.set_mode("delay", delay=0.3)
    server = servers.start(mode, {**behind_proxy, "HEALTH_TIMEOUT": "2"})  # sharing, not deadline
    try:
        answers = asyncio.run(_burst(server.url + "/health", 200))
    finally:
        server.stop()
    assert [answer.status_code for answer in answers] == [200] * 200
    assert database_proxy.accepted == 1


@pytest.mark.parametrize("mode", ["hypercorn-asgi", "gunicorn-gthread"])
@pytest.mark.parametrize(
    ("fault", "reasons"),
    [
        ("refuse", ["connection refused"]),
        ("blackhole", ["timed out after 0.5 s"]),
        ("unresolvable", ["name not resolved", "timed out after 0.5 s"]),
    ],
)
def test_health_answers_within_its_deadline_whatever_the_fault(
    mode: str,
    fault: str,
    reasons: list[str],
    database_proxy: FaultProxy,
    behind_proxy: dict[str, str],
) -> None:
    """HEALTH_TIMEOUT + 0.25 s at most, with a 500 naming the datastore and the failure."""
    env = dict(behind_proxy)
    if fault == "unresolvable":
        env["DATABASE_URL"] = "postgresql://app:hunter2@db.invalid/app"
    else:
        database_proxy.set_mode(fault)  # type: ignore[arg-type]
    server = servers.start(mode, env)
    try:
        answer = server.get("/health")
        line = server.wait_for_line("path=/health ")
    finally:
        server.stop()
    assert answer.status_code == 500
    assert answer.json()["status"] in [f"database: {reason}" for reason in reasons]
    # The server's own measure (its access line): a busy client or machine cannot inflate it.
    assert float(DURATION.search(line).group(1)) < (0.5 + 0.25) * 1000  # type: ignore[union-attr]
    assert "hunter2" not in answer.text + "\n".join(server.lines)


def test_an_outage_logs_one_warning_and_the_recovery_one_info(
    database_proxy: FaultProxy, behind_proxy: dict[str, str]
) -> None:
    """Transitions are logged once each, with the reason and the request that saw them."""
    server = servers.start("hypercorn-asgi", behind_proxy)
    try:
        assert server.get("/health").status_code == 200
        database_proxy.set_mode("refuse")
        failing = [server.get("/health", headers={"X-Request-ID": f"r{i}"}) for i in range(5)]
        database_proxy.set_mode("pass")
        recovered = server.get("/health")
    finally:
        server.stop()
    assert [answer.status_code for answer in failing] == [500] * 5
    assert recovered.status_code == 200
    warnings = [line for line in server.lines if "[WARNING]" in line]
    assert len(warnings) == 1
    assert 'datastore unhealthy datastore=database reason="connection refused"' in warnings[0]
    assert "request_id=r0" in warnings[0]
    assert len([line for line in server.lines if "datastore recovered" in line]) == 1


def test_other_routes_answer_while_200_health_requests_wait(
    database_proxy: FaultProxy, behind_proxy: dict[str, str]
) -> None:
    """Under asgi_app a hung datastore holds no thread: /health/live and / stay fast."""
    database_proxy.set_mode("blackhole")
    server = servers.start("hypercorn-asgi", {**behind_proxy, "HEALTH_TIMEOUT": "3"})

    async def meanwhile() -> tuple[list[httpx.Response], list[float]]:
        burst = asyncio.ensure_future(_burst(server.url + "/health", 200))
        # The burst's round is waiting on the hung datastore.
        assert await asyncio.to_thread(database_proxy.wait_accepted, 1, 10)
        seconds = []
        async with httpx.AsyncClient(timeout=10) as client:
            for path in ["/health/live", "/", "/health/live", "/"]:
                started = time.perf_counter()
                assert (await client.get(server.url + path)).status_code == 200
                seconds.append(time.perf_counter() - started)
        return await burst, seconds

    try:
        answers, seconds = asyncio.run(meanwhile())
    finally:
        server.stop()
    assert [answer.status_code for answer in answers] == [500] * 200
    # A starved thread pool would make them wait out the 3 s deadline; a busy machine, far
    # less than half of it.
    assert max(seconds) < 1.5, seconds


def test_a_database_restart_leaves_connections_bounded(pg_cluster: PgCluster) -> None:
    """Thousands of uncached rounds and a restart in the middle: at most one probe connection."""
    server = servers.start("hypercorn-asgi", {**FAST, "DATABASE_URL": pg_cluster.dsn()})
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            first = [client.get("/health").status_code for _ in range(1000)]
            pg_cluster.restart()
            during = [client.get("/health").status_code for _ in range(1000)]
        connections = asyncio.run(_probe_connections(pg_cluster))
    finally:
        server.stop()
    assert set(first) == {200}
    assert during[-1] == 200
    assert connections <= 1


def test_a_wrong_password_is_named_and_never_shown(pg_cluster: PgCluster) -> None:
    """authentication failed, and the password appears in no answer and no log line."""
    wrong = pg_cluster.dsn(password="wrong-pw-1234")  # noqa: S106 - the point of the test
    env = {**FAST, "DATABASE_URL": wrong, "LOG_LEVEL": "DEBUG"}
    server = servers.start("hypercorn-asgi", env)
    try:
        answer = server.get("/health?verbose=1")
    finally:
        server.stop()
    assert answer.status_code == 500
    assert answer.json()["status"] == "database: authentication failed"
    assert "wrong-pw-1234" not in answer.text + "\n".join(server.lines)


def test_every_datastore_is_probed_and_reported(database_url: str, redis_url: str) -> None:
    """DATABASE_URL and DATASTORE_URLS together; ?verbose=1 shows each one's result."""
    port = servers.free_port()
    env = {
        **FAST,
        "DATABASE_URL": database_url,
        "DATASTORE_URLS": f"cache={redis_url} search=tcp://127.0.0.1:{port}",
    }
    server = servers.start("hypercorn-asgi", env)
    try:
        answer = server.get("/health?verbose=1")
    finally:
        server.stop()
    assert answer.status_code == 500
    document = answer.json()
    assert document["status"] == "search: connection refused"
    assert {name: check["status"] for name, check in document["checks"].items()} == {
        "database": "Healthy",
        "cache": "Healthy",
        "search": "Unhealthy",
    }


async def _probe_connections(cluster: PgCluster) -> int:
    connection = await asyncpg.connect(cluster.superuser_dsn())
    try:
        count = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'health-probe'"
        )
    finally:
        await connection.close()
    return int(count)
