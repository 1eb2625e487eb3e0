"""Tests for application.probes: each probe alone against the real datastores and real faults."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import errno
import os
import random
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from application.config import Datastore
from application.probes import BadReply, PostgresProbe, Probe, describe, probe_for
from tests import servers
from tests.conftest import runs_under, through
from tests.faultproxy import FaultProxy
from tests.pgcluster import PgCluster, free_port
from tests.redisserver import (
    LineServer,
    RedisServer,
    TlsFiles,
    command,
    redis_server,
    tls_files,
)

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
    with redis_server(tmp_path, "--requirepass", "pw") as server:
        yield server.port


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


async def test_a_postgres_scheme_is_probed_as_postgresql(pg_cluster: PgCluster):
    """`postgres://`, libpq's other spelling, gets SELECT 1 too: bad credentials are found out,
    where a bare TCP connect would have passed."""
    url = pg_cluster.dsn(password="wrong").replace("postgresql://", "postgres://", 1)  # noqa: S106
    assert url.startswith("postgres://")
    probe = probe_for(Datastore("database", url), TIMEOUT)
    try:
        assert describe(await failure(probe), TIMEOUT) == "authentication failed"
    finally:
        await probe.close()


async def test_a_ping_costs_one_statement_and_no_reset(pg_cluster: PgCluster):
    """SELECT 1 is the last statement the server saw from the probe's connection: its release
    to the pool sends no reset (asyncpg's default would be a second round trip)."""
    probe = PostgresProbe(Datastore("database", pg_cluster.dsn()), 2.0)
    inspector = await asyncpg.connect(pg_cluster.superuser_dsn())
    try:
        await probe.ping()
        statements = await inspector.fetch(
            "SELECT query FROM pg_stat_activity WHERE application_name = 'health-probe'"
        )
    finally:
        await inspector.close()
        await probe.close()
    assert [row["query"] for row in statements] == ["SELECT 1"]


async def test_closing_gives_up_on_a_checked_out_connection_after_the_timeout(
    database_proxy: FaultProxy, database_url: str
):
    """close() waits for the pool's connection by the timeout given to probe_for at most, then
    ends it."""
    probe = probe_for(Datastore("database", through(database_proxy, database_url)), TIMEOUT)
    assert isinstance(probe, PostgresProbe)
    await probe.ping()
    assert probe._pool is not None
    await probe._pool.acquire()  # never released: as a ping stuck past every deadline
    with runs_under(TIMEOUT + 2):
        await asyncio.wait_for(probe.close(), TIMEOUT + 5)  # past its deadline: fail, not hang
    assert await database_proxy.wait_open_async(0, 2)


def test_an_unknown_error_is_not_described():
    """An error describe() does not know gets None, for the caller to log in detail."""
    assert describe(ValueError("something else"), TIMEOUT) is None


def test_every_address_of_a_name_refused_is_connection_refused():
    """A name with several addresses, each refused: asyncio joins the errors in one OSError
    (Linux refuses a loopback connect at once, so each reads "Connection refused")."""
    refused = [ConnectionRefusedError(111, "Connection refused") for _ in range(2)]
    joined = OSError(f"Multiple exceptions: {', '.join(str(error) for error in refused)}")
    assert describe(joined, TIMEOUT) == "connection refused"


async def test_an_unreachable_network_is_not_described():
    """A TCP connect to the broadcast address fails at once with ENETUNREACH: an OSError with no
    words of ours, so the caller logs it in detail."""
    probe = probe_for(Datastore("queue", "tcp://255.255.255.255:9"), TIMEOUT)
    error = await failure(probe)
    assert (type(error), error.errno) == (OSError, errno.ENETUNREACH)
    assert describe(error, TIMEOUT) is None


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


async def test_redis_probe_without_a_port_asks_6379_of_that_host():
    """`redis://host` means Redis's port on that host: here a server still loading, on 6379 of
    a loopback address of its own (not the local Redis, which would answer PONG)."""
    host = f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
    with LineServer(b"-LOADING Redis is loading the dataset in memory\r\n", address=(host, 6379)):
        probe = probe_for(Datastore("cache", f"redis://{host}"), TIMEOUT)
        assert describe(await failure(probe), TIMEOUT) == "loading"


async def test_redis_probe_decodes_percent_encoded_credentials(tmp_path: Path):
    """A user and password with / : @ percent-encoded in the URL reach Redis decoded."""
    acl = ("--user", "pro:be", "on", ">p@ss/w:rd", "~*", "+@all")
    with redis_server(tmp_path, *acl) as server:
        url = f"redis://pro%3Abe:p%40ss%2Fw%3Ard@127.0.0.1:{server.port}"
        await probe_for(Datastore("cache", url), TIMEOUT).ping()


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


@contextlib.contextmanager
def loading_redis(directory: Path) -> Iterator[RedisServer]:
    """A redis-server still loading its dataset (slowed down by key-load-delay)."""
    with redis_server(directory, "--enable-debug-command", "yes") as writer:
        assert writer.ask("DEBUG", "POPULATE", "20000") == b"+OK\r\n"
        assert writer.ask("SAVE") == b"+OK\r\n"
    slow = ("--key-load-delay", "1000", "--loading-process-events-interval-bytes", "1024")
    with redis_server(directory, *slow, ready="Loading RDB produced by") as server:
        yield server


@contextlib.contextmanager
def busy_redis(directory: Path) -> Iterator[RedisServer]:
    """A redis-server running a script past busy-reply-threshold."""
    with redis_server(directory, "--busy-reply-threshold", "100") as server:
        with socket.create_connection(("127.0.0.1", server.port)) as scripting:
            scripting.sendall(command("EVAL", "while true do end", "0"))
            until(lambda: server.ask("PING").startswith(b"-BUSY"))
            yield server


@contextlib.contextmanager
def misconfigured_redis(directory: Path) -> Iterator[RedisServer]:
    """A redis-server whose last snapshot failed (its saving child was killed)."""
    with redis_server(directory, "--save", "3600 1") as server:
        server.ask("SET", "key", "value")
        server.ask("CONFIG", "SET", "rdb-key-save-delay", "100000000")
        server.ask("BGSAVE")
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
        until(lambda: bool(children.read_text().split()))
        os.kill(int(children.read_text().split()[0]), signal.SIGKILL)
        until(lambda: server.ask("PING").startswith(b"-MISCONF"))
        yield server


@contextlib.contextmanager
def crowded_redis(directory: Path) -> Iterator[RedisServer]:
    """A redis-server at maxclients 1, with that one client connected."""
    with redis_server(directory, "--maxclients", "1") as server:
        with socket.create_connection(("127.0.0.1", server.port)) as client:
            client.sendall(command("PING"))
            assert client.recv(100) == b"+PONG\r\n"
            yield server


def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Poll `condition` until it holds; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


# Each bad state of a real redis-server: the server's options (or a builder), the URL's
# credentials, and the words for it.
REDIS_STATES = {
    "password-where-none-is-set": ((), ":pw@", "authentication failed"),
    "renamed-auth": (
        ("--requirepass", "pw", "--rename-command", "AUTH", ""), ":pw@", "unknown command"
    ),
    "acl-user-without-ping": (
        ("--user", "probe", "on", ">pw", "~*", "-@all", "+auth"), "probe:pw@", "permission denied"
    ),
    "master-down": (
        ("--replicaof", "127.0.0.1", "1", "--replica-serve-stale-data", "no"), "", "master down"
    ),
    "max-clients": (crowded_redis, "", "too many connections"),
    "loading": (loading_redis, "", "loading"),
    "busy": (busy_redis, "", "busy"),
    "misconf": (misconfigured_redis, "", "persistence failing"),
}  # fmt: skip


@pytest.mark.parametrize("state", list(REDIS_STATES))
async def test_redis_error_replies_are_described(tmp_path: Path, state: str):
    """Each error reply a real redis-server gives to AUTH or PING gets its own short words."""
    server_setup, credentials, words = REDIS_STATES[state]
    with contextlib.ExitStack() as stack:
        if callable(server_setup):
            server = stack.enter_context(server_setup(tmp_path))
        else:
            server = stack.enter_context(redis_server(tmp_path, *server_setup))
        url = f"redis://{credentials}127.0.0.1:{server.port}"
        probe = probe_for(Datastore("cache", url), TIMEOUT)
        error = await failure(probe)
    assert (type(error), describe(error, TIMEOUT), str(error)) == (BadReply, words, words)


async def test_a_renamed_auth_never_shows_the_password(tmp_path: Path):
    """The server echoes the password in its error reply; the probe's error never carries it."""
    secret = "s3cret-planted"  # noqa: S105 - a planted password
    with redis_server(tmp_path, "--requirepass", secret, "--rename-command", "AUTH", "") as server:
        assert secret.encode() in server.ask("AUTH", secret)  # what the server really answers
        probe = probe_for(Datastore("cache", f"redis://:{secret}@127.0.0.1:{server.port}"), 1)
        error = await failure(probe)
    assert secret not in f"{error} {error!r} {error.args} {describe(error, TIMEOUT)}"


@pytest.fixture(scope="module")
def http_server() -> Iterator[servers.Server]:
    """A real gunicorn, serving this app: an HTTP server where a Redis was expected."""
    server = servers.start("gunicorn-sync")
    yield server
    server.stop()


@pytest.mark.parametrize("credentials", ["", ":pw@", "user:pw@"])
async def test_redis_probe_on_an_http_server_is_not_a_redis_server(
    http_server: servers.Server, credentials: str
):
    """gunicorn answers `HTTP/1.1 400 Bad Request` to AUTH or PING: not a Redis server."""
    url = f"redis://{credentials}127.0.0.1:{http_server.port}"
    probe = probe_for(Datastore("cache", url), TIMEOUT)
    assert describe(await failure(probe), TIMEOUT) == "not a Redis server"


async def test_redis_probe_wants_pong_to_ping():
    """A RESP server answering PING with anything but +PONG (here +OK): unexpected reply."""
    with LineServer(b"+OK\r\n") as server:
        probe = probe_for(Datastore("cache", f"redis://127.0.0.1:{server.port}"), TIMEOUT)
        assert describe(await failure(probe), TIMEOUT) == "unexpected reply"


async def test_redis_probe_on_a_long_line_is_not_a_redis_server():
    """A line longer than any reply to PING is refused unread: not a Redis server."""
    with LineServer(b"+" + b"x" * 10_000 + b"\r\n") as server:
        probe = probe_for(Datastore("cache", f"redis://127.0.0.1:{server.port}"), TIMEOUT)
        assert describe(await failure(probe), TIMEOUT) == "not a Redis server"


async def test_a_reset_connection_is_lost_not_refused():
    """A real TCP reset after the server read PING: ConnectionResetError, connection lost."""
    with LineServer("reset") as server:
        probe = probe_for(Datastore("cache", f"redis://127.0.0.1:{server.port}"), TIMEOUT)
        error = await failure(probe)
    assert isinstance(error, ConnectionResetError)
    assert describe(error, TIMEOUT) == "connection lost"


def test_a_broken_pipe_is_lost_not_refused():
    """Writing on after the server hung up draws the kernel's EPIPE: connection lost."""
    with LineServer("hang-up") as server:
        with socket.create_connection(("127.0.0.1", server.port), 5) as sock:
            assert sock.recv(1) == b""  # the server hung up
            with pytest.raises(BrokenPipeError) as raised:
                for _ in range(200):  # the first write draws a reset, the next one EPIPE
                    sock.send(command("PING"))
                    time.sleep(0.01)
    assert describe(raised.value, TIMEOUT) == "connection lost"


async def test_tls_to_a_plain_text_server_is_a_failed_handshake(http_server: servers.Server):
    """rediss:// to a server answering in plain text (gunicorn): TLS handshake failed."""
    probe = probe_for(Datastore("cache", f"rediss://127.0.0.1:{http_server.port}"), TIMEOUT)
    error = await failure(probe)
    assert isinstance(error, ssl.SSLError)
    assert describe(error, TIMEOUT) == "TLS handshake failed"


async def test_postgres_tls_to_a_server_without_it_is_a_failed_handshake(pg_cluster: PgCluster):
    """sslmode=require to a PostgreSQL without TLS: the same words as for Redis."""
    probe = probe_for(Datastore("database", pg_cluster.dsn() + "?sslmode=require"), TIMEOUT)
    try:
        assert describe(await failure(probe), TIMEOUT) == "TLS handshake failed"
    finally:
        await probe.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A private CA, with a server certificate for 127.0.0.1 and localhost."""
    return tls_files(tmp_path_factory.mktemp("tls"), "127.0.0.1", "localhost")


@pytest.fixture
def tls_redis(tmp_path: Path, tls: TlsFiles) -> Iterator[int]:
    """A redis-server speaking only TLS, with password `pw`; yields its port."""
    with redis_server(tmp_path, *tls.server_options(), "--requirepass", "pw") as server:
        yield server.port


async def test_rediss_probe_trusts_the_private_ca_given_in_ssl_ca_certs(tls_redis, tls):
    """AUTH and PING over TLS to a server whose certificate a private CA signed."""
    url = f"rediss://:pw@127.0.0.1:{tls_redis}?ssl_ca_certs={tls.ca}"
    await probe_for(Datastore("cache", url), TIMEOUT).ping()


async def test_rediss_probe_rejects_a_certificate_from_an_unknown_ca(tls_redis):
    """Without the private CA the certificate is not trusted: TLS certificate rejected."""
    probe = probe_for(Datastore("cache", f"rediss://:pw@127.0.0.1:{tls_redis}"), TIMEOUT)
    assert describe(await failure(probe), TIMEOUT) == "TLS certificate rejected"


async def test_rediss_probe_with_cert_reqs_none_skips_verification(tls_redis):
    """ssl_cert_reqs=none: encrypted, unverified, as redis-py does with the same parameter."""
    url = f"rediss://:pw@127.0.0.1:{tls_redis}?ssl_cert_reqs=none"
    await probe_for(Datastore("cache", url), TIMEOUT).ping()


@pytest.mark.parametrize(("check", "healthy"), [("", False), ("&ssl_check_hostname=false", True)])
async def test_rediss_probe_checks_the_host_name_unless_told_not_to(
    tmp_path: Path, check: str, healthy: bool
):
    """A certificate for `localhost` reached as 127.0.0.1 is rejected, unless the check is off."""
    only_localhost = tls_files(tmp_path, "localhost")
    with redis_server(tmp_path, *only_localhost.server_options()) as server:
        url = f"rediss://127.0.0.1:{server.port}?ssl_ca_certs={only_localhost.ca}{check}"
        probe = probe_for(Datastore("cache", url), TIMEOUT)
        if healthy:
            await probe.ping()
        else:
            assert describe(await failure(probe), TIMEOUT) == "TLS certificate rejected"


async def test_rediss_probe_presents_the_client_certificate_it_is_given(tmp_path: Path, tls):
    """A server that wants client certificates accepts ssl_certfile and ssl_keyfile."""
    with redis_server(tmp_path, *tls.server_options(auth_clients=True)) as server:
        url = (
            f"rediss://127.0.0.1:{server.port}?ssl_ca_certs={tls.ca}"
            f"&ssl_certfile={tls.client_cert}&ssl_keyfile={tls.client_key}"
        )
        await probe_for(Datastore("cache", url), TIMEOUT).ping()
        anonymous = probe_for(Datastore("cache", url.partition("&")[0]), TIMEOUT)
        # TLS 1.3: the server's refusal comes after the handshake, as an alert or a reset.
        words = describe(await failure(anonymous), TIMEOUT)
        assert words in {"TLS handshake failed", "connection lost"}


async def test_rediss_probe_builds_its_tls_context_once(tls_redis, tls, monkeypatch):
    """Made when the probe is, never per ping: five pings build no context."""
    url = f"rediss://:pw@127.0.0.1:{tls_redis}?ssl_ca_certs={tls.ca}"
    probe = probe_for(Datastore("cache", url), TIMEOUT)
    built: list[object] = []
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: built.append(a))
    monkeypatch.setattr(ssl, "SSLContext", lambda *a, **k: built.append(a))
    for _ in range(5):
        await probe.ping()
    assert built == []


@pytest.mark.parametrize("module", ["probes", "health", "tls", "config"])
def test_probe_code_imports_no_flask(module: str):
    """The probes, the rounds and their settings know nothing of Flask (the blueprint renders)."""
    tree = ast.parse((servers.ROOT / "application" / f"{module}.py").read_text())
    nodes = list(ast.walk(tree))
    imported = {a.name for node in nodes if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module or "" for node in nodes if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.split(".")[0] == "flask"}
