"""Fixtures: the real datastores scripts/test found or started, and faults in front of them."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import structlog
import trustme

import application
from application import health, logs
from application.config import Config
from tests.faultproxy import FaultProxy
from tests.pgcluster import PgCluster


def _required(variable: str, default: str) -> str:
    """A datastore URL; scripts/test exports it after finding or starting the datastore."""
    return os.environ.get(variable) or default


@pytest.fixture(autouse=True)
def _fresh_log_context() -> Iterator[None]:
    """Every test starts and ends with nothing bound to its log lines: Flask's test client
    never closes a response it has read, so a request id bound for one would outlive it."""
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()


@pytest.fixture(scope="session")
def database_url() -> str:
    return _required("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _required("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def proxy_to(url: str) -> FaultProxy:
    """A fault proxy in front of the server `url` names."""
    parts = urlsplit(url)
    return FaultProxy((parts.hostname or "127.0.0.1", parts.port or 5432))


@pytest.fixture
def database_proxy(database_url: str) -> Iterator[FaultProxy]:
    """A fault proxy in front of the real PostgreSQL."""
    with proxy_to(database_url) as proxy:
        yield proxy


@contextlib.contextmanager
def runs_under(seconds: float) -> Iterator[None]:
    """Fail when the block takes `seconds` or more (asyncpg's `assertRunUnder`)."""
    started = time.perf_counter()
    yield
    elapsed = time.perf_counter() - started
    assert elapsed < seconds, f"took {elapsed:.3f} s, expected under {seconds} s"


def through(proxy: FaultProxy, url: str) -> str:
    """`url` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{proxy.port}" if credentials else f"127.0.0.1:{proxy.port}"
    return parts._replace(netloc=netloc).geturl()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL the tests own: password authentication, and restartable."""
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA certificate in PEM, as a private CA's bundle would be."""
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def capture_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Config], io.StringIO]]:
    """Logging set up for a config, to a StringIO; the service's own set-up comes back after.

    The modules whose lines the tests read get fresh loggers: structlog caches a logger, with
    the stream of its day, on first use.
    """
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    stream = io.StringIO()

    def configure(config: Config) -> io.StringIO:
        logs.configure(config, stream)
        for module in (logs, health):
            monkeypatch.setattr(module, "log", structlog.get_logger())
        return stream

    yield configure
    logs.configure(application.config)
