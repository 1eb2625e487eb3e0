"""Tests for application.probes: each probe alone against the real datastores and real faults."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import pytest

from application.config import Datastore
from application.probes import PostgresProbe, Probe, describe, probe_for
from tests.conftest import runs_under, through
from tests.faultproxy import FaultProxy
from tests.pgcluster import PgCluster, free_port

TIMEOUT = 0.3  # the deadline a caller puts around a ping, as a health round does
SLACK = 0.25  # what a deadline may overrun by: scheduling, not waiting


async def failure(probe: Probe) -> BaseException:
    """The error a ping under a TIMEOUT deadline ends with, asserting it ends by then."""

    async def ping() -> None:
        async with asyncio.timeout(TIMEOUT):
            await probe.ping()

    with runs_under(TIMEOUT + SLACK):
        try:
            await asyncio.wait_for(ping(), TIMEOUT + 5)  # past its deadline: fail, never hang
        except Exception as error:
            return error
    pytest.fail("the ping succeeded")


@pytest.fixture
async def database(database_proxy: FaultProxy, database_url: str) -> AsyncIterator[PostgresProbe]:
    """A PostgresProbe on the real database through the fault proxy, closed after."""
    probe = PostgresProbe(Datastore("database", through(database_proxy, database_url)), 2.0)
    yield probe
    await probe.close()


@pytest.fixture(params=["refused", "blackhole", "unresolvable", "wrong-password"])
async def postgres_fault(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Probe, set[str]]]:
    """A PostgresProbe facing one kind of failure, and the words describe() may give it."""
    timed_out = f"timed out after {TIMEOUT:g} s"
    if request.param == "refused":
        url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
        reasons = {"connection refused"}
    elif request.param == "blackhole":
        proxy = request.getfixturevalue("database_proxy")
        proxy.set_mode("blackhole")
        url = through(proxy, request.getfixturevalue("database_url"))
        reasons = {timed_out}
    elif request.param == "unresolvable":
        url = "postgresql://x@db.invalid/x"
        reasons = {"name not resolved", timed_out}  # some resolvers hang rather than fail
    else:
        url = request.getfixturevalue("pg_cluster").dsn(password="wrong")  # noqa: S106 - on purpose
        reasons = {"authentication failed"}
    probe = probe_for(Datastore("database", url), 2.0)
    yield probe, reasons
    await probe.close()


@pytest.fixture
def redis_with_password(tmp_path) -> Iterator[int]:
    """A throwaway redis-server requiring password `pw`; yields its port, kills it after."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "pw"]
    command += ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as server:
        try:
            assert server.stdout is not None
            for line in server.stdout:  # EOF (the server died) ends the loop too
                if "Ready to accept connections" in line:
                    break
            assert server.poll() is None, "redis-server exited during start-up"
            yield port
        finally:
            server.kill()


async def test_postgres_probe_pings_the_real_database(database_url: str):
    """`SELECT 1` on the real PostgreSQL succeeds."""
    probe = probe_for(Datastore("database", database_url), 2.0)
    try:
        await probe.ping()
    finally:
        await probe.close()


async def test_postgres_probe_reuses_one_server_connection(
    database: PostgresProbe, database_proxy: FaultProxy
):
    """Twenty pings, one connection accepted: the pool keeps it between pings."""
    for _ in range(20):
        await database.ping()
    assert database_proxy.accepted == 1


async def test_postgres_probe_reconnects_after_a_cut(
    database: PostgresProbe, database_proxy: FaultProxy
):
    """After the server went away and came back, the next ping after the failure succeeds."""
    await database.ping()
    database_proxy.set_mode("refuse")
    await failure(database)
    database_proxy.set_mode("pass")
    await database.ping()
    assert database_proxy.accepted == 2


async def test_a_ping_timed_out_mid_query_drops_its_connection(pg_cluster: PgCluster):
    """A server hung during `SELECT 1`: its connection is closed, never pooled again."""
    with FaultProxy((pg_cluster.host, pg_cluster.port)) as proxy:
        probe = PostgresProbe(Datastore("database", through(proxy, pg_cluster.dsn())), 2.0)
        try:
            await probe.ping()
            assert probe._pool is not None
            async with probe._pool.acquire() as connection:
                backend = connection.get_server_pid()
            os.kill(backend, signal.SIGSTOP)  # our own cluster's backend: a hang mid-session
            try:
                assert isinstance(await failure(probe), TimeoutError)
                assert await proxy.wait_open_async(0, 2)
            finally:
                os.kill(backend, signal.SIGCONT)
            await probe.ping()
            assert proxy.accepted == 2
        finally:
            await probe.close()


async def test_a_connection_lost_mid_query_is_described_as_lost(
    database: PostgresProbe, database_proxy: FaultProxy
):
    """The server going away during `SELECT 1` is "connection lost", not an unknown error."""
    await database.ping()
    database_proxy.cut()  # blocks this loop, so the probe finds out only mid-query
    assert describe(await failure(database), TIMEOUT) == "connection lost"


async def test_a_timed_out_ping_closes_its_connection(
    database: PostgresProbe, database_proxy: FaultProxy
):
    """A ping cancelled by its caller's deadline leaves no connection open behind it."""
    database_proxy.set_mode("blackhole")
    assert isinstance(await failure(database), TimeoutError)
    assert database_proxy.accepted == 1
    assert await database_proxy.wait_open_async(0, 2)


async def test_postgres_failures_are_described(postgres_fault: tuple[Probe, set[str]]):
    """Refused, hung, unresolvable and bad credentials each get their own short words."""
    probe, reasons = postgres_fault
    assert describe(await failure(probe), TIMEOUT) in reasons


async def test_a_pool_with_its_connection_checked_out_is_exhausted(database: PostgresProbe):
    """A ping that could only wait for the pool's one connection fails at once instead."""
    await database.ping()
    assert database._pool is not None
    async with database._pool.acquire():
        assert describe(await failure(database), TIMEOUT) == "pool exhausted"


def test_an_unknown_error_is_not_described():
    """An error describe() does not know gets None, for the caller to log in detail."""
    assert describe(ValueError("something else"), TIMEOUT) is None


async def test_redis_probe_pings_the_real_redis(redis_url: str):
    """PING on the real Redis succeeds."""
    await probe_for(Datastore("cache", redis_url), TIMEOUT).ping()


async def test_redis_probe_on_a_closed_port_is_refused():
    """Nothing listening: connection refused."""
    probe = probe_for(Datastore("cache", f"redis://127.0.0.1:{free_port()}"), TIMEOUT)
    assert describe(await failure(probe), TIMEOUT) == "connection refused"


async def test_redis_probe_on_a_hung_server_times_out(redis_url: str):
    """A server that accepts and never answers holds the ping until the caller's deadline."""
    upstream = (urlsplit(redis_url).hostname or "127.0.0.1", urlsplit(redis_url).port or 6379)
    with FaultProxy(upstream, mode="blackhole") as proxy:
        probe = probe_for(Datastore("cache", f"redis://127.0.0.1:{proxy.port}"), TIMEOUT)
        assert describe(await failure(probe), TIMEOUT) == f"timed out after {TIMEOUT:g} s"
        assert await proxy.wait_open_async(0, 2)


@pytest.mark.parametrize("credentials", [":pw@", "default:pw@"])
async def test_redis_probe_authenticates_with_the_right_password(
    redis_with_password: int, credentials: str
):
    """AUTH with the URL's password (and user, when given), then PING, succeeds."""
    url = f"redis://{credentials}127.0.0.1:{redis_with_password}"
    await probe_for(Datastore("cache", url), TIMEOUT).ping()


@pytest.mark.parametrize("credentials", [":wrong@", "default:wrong@", ""])
async def test_redis_probe_with_a_wrong_or_no_password_fails_authentication(
    redis_with_password: int, credentials: str
):
    """A wrong password, or none where one is required: authentication failed."""
    url = f"redis://{credentials}127.0.0.1:{redis_with_password}"
    probe = probe_for(Datastore("cache", url), TIMEOUT)
    assert describe(await failure(probe), TIMEOUT) == "authentication failed"


async def test_tcp_probe_connects_to_an_open_port(redis_url: str):
    """A TCP connect to a listening port (Redis's) succeeds."""
    parts = urlsplit(redis_url)
    url = f"tcp://{parts.hostname}:{parts.port or 6379}"
    await probe_for(Datastore("queue", url), TIMEOUT).ping()


async def test_tcp_probe_on_a_closed_port_is_refused():
    """Nothing listening: connection refused."""
    probe = probe_for(Datastore("queue", f"tcp://127.0.0.1:{free_port()}"), TIMEOUT)
    assert describe(await failure(probe), TIMEOUT) == "connection refused"


async def test_closing_a_postgres_probe_closes_its_connection(
    database: PostgresProbe, database_proxy: FaultProxy
):
    """close() ends the pool's server connection."""
    await database.ping()
    assert database_proxy.open == 1
    await database.close()
    assert await database_proxy.wait_open_async(0, 2)
