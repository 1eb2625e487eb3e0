"""Probes: one async ping per kind of datastore, and a few safe words for why one failed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from typing import Protocol
from urllib.parse import unquote, urlsplit

import asyncpg

from .config import Datastore
from .tls import tls_context

_REPLY_LIMIT = 512  # bytes: far more than any reply to AUTH or PING

# A Redis reply's first bytes, and our words for it. Each one was seen from redis-server 7
# (tests/test_probes.py makes them), but the two Redis 5 wordings, taken from its source.
_REDIS_REPLIES: tuple[tuple[bytes, str], ...] = (
    (b"-WRONGPASS", "authentication failed"),
    (b"-NOAUTH", "authentication failed"),  # no password given where one is required
    (b"-ERR AUTH <password> called without", "authentication failed"),  # none is set
    (b"-ERR invalid password", "authentication failed"),  # Redis 5
    (b"-ERR Client sent AUTH, but no password is set", "authentication failed"),  # Redis 5
    (b"-NOPERM", "permission denied"),  # an ACL user who may not PING
    (b"-ERR unknown command", "unknown command"),  # AUTH or PING renamed away
    (b"-ERR max number of clients reached", "too many connections"),
    (b"-LOADING", "loading"),  # the dataset is still being read from disk
    (b"-MASTERDOWN", "master down"),  # a replica cut off from its master, no stale reads
    (b"-BUSY", "busy"),  # a script has run past busy-reply-threshold
    (b"-MISCONF", "persistence failing"),  # snapshots fail: writes and PING are refused
)
_RESP_TYPES = frozenset(b"+-:$*_,#!=(%~>|")  # the first byte of every RESP2 or RESP3 reply

# Pools a forked child inherited: kept so that nothing of the parent's is finalized here.
_from_parents: list[asyncpg.Pool] = []


class BadReply(Exception):
    """The datastore answered, but not with success; `reason` is our words, never its reply."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PoolExhausted(Exception):
    """Every connection of the pool is checked out: a probe would only wait."""


class Probe(Protocol):
    """A datastore's ping: returns when it answered, raises when it did not."""

    name: str
    target: str

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def probe_for(datastore: Datastore, timeout: float) -> Probe:
    if datastore.scheme in ("postgres", "postgresql"):
        return PostgresProbe(datastore, timeout)
    if datastore.scheme in ("redis", "rediss"):
        return RedisProbe(datastore)
    return TcpProbe(datastore)


class PostgresProbe:
    """`SELECT 1` on a connection from a pool of one, made on first use and kept.

    The pool belongs to the process that made it: a forked child makes its own and never
    touches its parent's (a closed socket would be harmless there; a Terminate message not).
    """

    def __init__(self, datastore: Datastore, timeout: float) -> None:
        self.name = datastore.name
        self.target = datastore.target
        self._url = datastore.url
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._pool_pid = 0

    async def ping(self) -> None:
        pool = self._pool if self._pool_pid == os.getpid() else None
        pool = pool or await self._create_pool()
        if pool.get_idle_size() == 0 and pool.get_size() >= pool.get_max_size():
            raise PoolExhausted
        connection = await pool.acquire()
        try:
            await connection.fetchval("SELECT 1")
        except BaseException:
            # Cancelled or broken mid-query: never reuse it. A connection asyncpg already
            # took back (lost mid-query) cannot be terminated again, and needs not be.
            with contextlib.suppress(asyncpg.InterfaceError):
                connection.terminate()
            raise
        finally:
            await pool.release(connection)

    async def close(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=self._timeout)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                pool.terminate()

    async def _create_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            _from_parents.append(self._pool)
        self._pool_pid = os.getpid()
        self._pool = await asyncpg.create_pool(
            self._url,
            min_size=0,  # lazy: no connection until the first probe
            max_size=1,  # one round in flight per process needs one connection
            timeout=self._timeout,  # connect timeout
            max_inactive_connection_lifetime=300,
            reset=_nothing_to_reset,  # a probe leaves no session state behind
            server_settings={"application_name": "health-probe"},
        )
        return self._pool


async def _nothing_to_reset(connection: asyncpg.Connection) -> None:
    """Skip asyncpg's reset round trip on release: `SELECT 1` changes nothing."""


class RedisProbe:
    """`AUTH` (when the URL has credentials) and `PING` on a fresh connection.

    Healthy means Redis's own success: `+OK` to AUTH, `+PONG` to PING. Anything else is
    named from `_REDIS_REPLIES`, never quoted: a reply can echo what was sent (a renamed
    AUTH answers `-ERR unknown command 'AUTH', with args beginning with: '<password>'`).
    """

    def __init__(self, datastore: Datastore) -> None:
        self.name = datastore.name
        self.target = datastore.target
        parts = urlsplit(datastore.url)
        self._host = parts.hostname  # config.py refuses a redis:// URL without one
        self._port = parts.port or 6379
        # Built once: loading the CA bundle takes tens of ms, too long for every ping.
        self._tls = tls_context(datastore.url) if parts.scheme == "rediss" else None
        credentials = [unquote(part) for part in (parts.username, parts.password) if part]
        auth = _resp([b"AUTH", *(part.encode() for part in credentials)]) if credentials else b""
        self._commands = auth + _resp([b"PING"])
        self._expected = [b"+OK\r\n"] * bool(credentials) + [b"+PONG\r\n"]

    async def ping(self) -> None:
        reader, writer = await asyncio.open_connection(
            self._host, self._port, ssl=self._tls, limit=_REPLY_LIMIT
        )
        try:
            writer.write(self._commands)
            for expected in self._expected:
                try:
                    reply = await reader.readline()
                except ValueError:  # a line longer than any reply to AUTH or PING
                    raise BadReply("not a Redis server") from None
                if not reply:
                    raise ConnectionResetError("the server closed the connection")
                if reply != expected:
                    raise BadReply(_redis_words(reply))
        finally:
            writer.transport.abort()

    async def close(self) -> None:
        """Nothing is kept between rounds."""


class TcpProbe:
    """A TCP connect, for datastores this service has no protocol for."""

    def __init__(self, datastore: Datastore) -> None:
        self.name = datastore.name
        self.target = datastore.target
        parts = urlsplit(datastore.url)
        self._host, self._port = parts.hostname, parts.port  # config.py requires both

    async def ping(self) -> None:
        _, writer = await asyncio.open_connection(self._host, self._port)
        writer.transport.abort()

    async def close(self) -> None:
        """Nothing is kept between rounds."""


def _resp(words: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


def _redis_words(reply: bytes) -> str:
    for prefix, words in _REDIS_REPLIES:
        if reply.startswith(prefix):
            return words
    return "unexpected reply" if reply[0] in _RESP_TYPES else "not a Redis server"


# An exception's kind, and our words for it: the first match wins. The same failure gets
# the same words from every probe.
_FAILURES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (PoolExhausted, "pool exhausted"),
    (asyncpg.InvalidAuthorizationSpecificationError, "authentication failed"),
    (asyncpg.TooManyConnectionsError, "too many connections"),
    (asyncpg.CannotConnectNowError, "not accepting connections"),
    (socket.gaierror, "name not resolved"),
    (ConnectionRefusedError, "connection refused"),
    (ssl.SSLCertVerificationError, "TLS certificate rejected"),
    (ssl.SSLError, "TLS handshake failed"),
    ((ConnectionError, EOFError, asyncpg.ConnectionDoesNotExistError), "connection lost"),
)


def describe(error: BaseException, timeout: float) -> str | None:
    """Short, safe words for a failed probe; None when the failure is not one we know."""
    if isinstance(error, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(error, BadReply):
        return error.reason
    if isinstance(error, ConnectionError) and "rejected SSL upgrade" in str(error):
        return "TLS handshake failed"  # asyncpg's words for a server without TLS
    for kinds, words in _FAILURES:
        if isinstance(error, kinds):
            return words
    if isinstance(error, OSError) and "Connection refused" in str(error):
        return "connection refused"  # every address of a name refused: "Multiple exceptions"
    return None
