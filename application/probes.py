"""Probes: one async ping per kind of datastore, and a few safe words for why one failed."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
from typing import Protocol
from urllib.parse import unquote, urlsplit

import asyncpg

from .config import Datastore

_RESP_AUTH_ERRORS = (b"-WRONGPASS", b"-NOAUTH", b"-ERR invalid password", b"-ERR AUTH")


_from_parents: list[asyncpg.Pool] = []


class AuthenticationFailed(Exception):
    """The datastore answered and refused our credentials."""


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
    """`SELECT 1` on a connection from a pool of one, made on first use and kept."""

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
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=self._timeout)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                pool.terminate()

    async def _create_pool(self) -> asyncpg.Pool:
        """A pool for this process: one made before a fork is the parent's, its sockets too.

        The parent's stays referenced, never used or closed, so that nothing of it is
        finalized here (a closed socket is harmless; a Terminate message is not).
        """
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
    """`AUTH` (when the URL has credentials) and `PING` on a fresh connection."""

    def __init__(self, datastore: Datastore) -> None:
        self.name = datastore.name
        self.target = datastore.target
        parts = urlsplit(datastore.url)
        self._host = parts.hostname or "localhost"
        self._port = parts.port or 6379
        self._tls = parts.scheme == "rediss"
        credentials = [unquote(part) for part in (parts.username, parts.password) if part]
        auth = _resp([b"AUTH", *(part.encode() for part in credentials)]) if credentials else b""
        self._commands = auth + _resp([b"PING"])
        self._replies = 2 if credentials else 1

    async def ping(self) -> None:
        context = ssl.create_default_context() if self._tls else None
        reader, writer = await asyncio.open_connection(self._host, self._port, ssl=context)
        try:
            writer.write(self._commands)
            for _ in range(self._replies):
                reply = await reader.readline()
                if not reply:
                    raise ConnectionResetError("the server closed the connection")
                if reply.startswith(_RESP_AUTH_ERRORS):
                    raise AuthenticationFailed
                if reply.startswith(b"-"):
                    raise RuntimeError(f"error reply: {reply[:80]!r}")
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
        self._host = parts.hostname or ""
        self._port = parts.port or 0

    async def ping(self) -> None:
        _, writer = await asyncio.open_connection(self._host, self._port)
        writer.transport.abort()

    async def close(self) -> None:
        """Nothing is kept between rounds."""


def _resp(words: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


def describe(error: BaseException, timeout: float) -> str | None:
    """Short, safe words for a failed probe; None when the failure is not one we know."""
    if isinstance(error, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(error, PoolExhausted):
        return "pool exhausted"
    if isinstance(error, AuthenticationFailed | asyncpg.InvalidAuthorizationSpecificationError):
        return "authentication failed"
    if isinstance(error, asyncpg.TooManyConnectionsError):
        return "too many connections"
    if isinstance(error, asyncpg.CannotConnectNowError):
        return "not accepting connections"
    if isinstance(error, socket.gaierror):
        return "name not resolved"
    refused = (
        isinstance(error, ConnectionRefusedError)
        or getattr(error, "errno", 0) == errno.ECONNREFUSED
    )
    if refused or (isinstance(error, OSError) and "Connection refused" in str(error)):
        return "connection refused"
    if isinstance(error, ConnectionError | EOFError | asyncpg.ConnectionDoesNotExistError):
        return "connection lost"
    if isinstance(error, ssl.SSLError):
        return "TLS handshake failed"
    return None
