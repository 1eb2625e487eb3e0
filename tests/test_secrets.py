"""A planted password, in every kind of datastore URL, failing every way we can make it fail:
it appears in no log line (DEBUG, text and JSON), no /health answer and no start-up error."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
import structlog

import application
from application import health, logs
from application.config import Config, ConfigError
from application.web import create_app
from tests import servers
from tests.conftest import proxy_to, through
from tests.faultproxy import FaultProxy
from tests.pgcluster import PgCluster, free_port
from tests.redisserver import LineServer, redis_server, tls_files

SECRET = "s3cret-planted"  # noqa: S105 - the planted password every output is searched for
HTTP_LINE = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n"
TIMED_OUT = "timed out after 0.5 s"


@pytest.fixture(scope="module")
def planted_role(pg_cluster: PgCluster) -> str:
    """A role of our own cluster whose password is the secret; returns its URL."""

    async def create() -> None:
        connection = await asyncpg.connect(pg_cluster.superuser_dsn())
        try:
            await connection.execute("DROP ROLE IF EXISTS planted")
            await connection.execute(f"CREATE ROLE planted LOGIN PASSWORD '{SECRET}'")
        finally:
            await connection.close()

    asyncio.run(create())
    return pg_cluster.dsn("planted", SECRET, "app")


@pytest.fixture
def stores(
    tmp_path: Path, planted_role: str, pg_cluster: PgCluster, redis_url: str
) -> Iterator[tuple[dict[str, str], dict[str, str], FaultProxy]]:
    """{name: url} of every kind and failure, each URL with the secret as its password; the
    words /health must give each one on its first round; and the proxy to cut the database."""
    tls = tls_files(tmp_path, "127.0.0.1")
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(redis_server(tmp_path, "--requirepass", SECRET))
        other = stack.enter_context(redis_server(tmp_path, "--requirepass", "other"))
        renamed = stack.enter_context(
            redis_server(tmp_path, "--requirepass", SECRET, "--rename-command", "AUTH", "")
        )
        no_password = stack.enter_context(redis_server(tmp_path))
        tls_redis = stack.enter_context(
            redis_server(tmp_path, *tls.server_options(), "--requirepass", SECRET)
        )
        http = stack.enter_context(LineServer(HTTP_LINE))
        reset = stack.enter_context(LineServer("reset"))
        blackhole = stack.enter_context(proxy_to(redis_url))
        blackhole.set_mode("blackhole")
        database = stack.enter_context(FaultProxy((pg_cluster.host, pg_cluster.port)))
        refused = free_port()
        hole = blackhole.port
        ca = f"ssl_ca_certs={tls.ca}"
        expected = {
            "database": (through(database, planted_role), "Healthy"),
            "pgwrong": (pg_cluster.dsn(password=SECRET), "authentication failed"),
            "pgnodb": (
                pg_cluster.dsn("planted", SECRET, "nosuchdb"),
                "unexpected error (details in the debug log)",
            ),
            "pgtls": (planted_role + "?sslmode=require", "TLS handshake failed"),
            "pgrefused": (f"postgresql://u:{SECRET}@127.0.0.1:{refused}/x", "connection refused"),
            "pghung": (f"postgresql://u:{SECRET}@127.0.0.1:{hole}/x", TIMED_OUT),
            "redis": (f"redis://:{SECRET}@127.0.0.1:{redis.port}", "Healthy"),
            "redisuser": (f"redis://default:{SECRET}@127.0.0.1:{redis.port}", "Healthy"),
            "rediswrong": (f"redis://:{SECRET}@127.0.0.1:{other.port}", "authentication failed"),
            "redisrenamed": (f"redis://:{SECRET}@127.0.0.1:{renamed.port}", "unknown command"),
            "redisnopw": (
                f"redis://:{SECRET}@127.0.0.1:{no_password.port}",
                "authentication failed",
            ),
            "redishttp": (f"redis://:{SECRET}@127.0.0.1:{http.port}", "not a Redis server"),
            "redisreset": (f"redis://:{SECRET}@127.0.0.1:{reset.port}", "connection lost"),
            "redisrefused": (f"redis://:{SECRET}@127.0.0.1:{refused}", "connection refused"),
            "redishung": (f"redis://:{SECRET}@127.0.0.1:{hole}", TIMED_OUT),
            "rediss": (f"rediss://:{SECRET}@127.0.0.1:{tls_redis.port}?{ca}", "Healthy"),
            "rediss-wrong": (
                f"rediss://u:{SECRET}@127.0.0.1:{tls_redis.port}?{ca}",
                "authentication failed",
            ),
            "rediss-untrusted": (
                f"rediss://:{SECRET}@127.0.0.1:{tls_redis.port}",
                "TLS certificate rejected",
            ),
            "rediss-plain": (f"rediss://:{SECRET}@127.0.0.1:{http.port}", "TLS handshake failed"),
            "tcp": (f"tcp://u:{SECRET}@127.0.0.1:{redis.port}", "Healthy"),
            "tcprefused": (f"tcp://u:{SECRET}@127.0.0.1:{refused}", "connection refused"),
            "tcpunresolved": (f"tcp://u:{SECRET}@host.invalid:1", "name not resolved"),
            "redisunresolved": (f"redis://:{SECRET}@host.invalid", "name not resolved"),
        }
        urls = {name: url for name, (url, _) in expected.items()}
        yield urls, {name: words for name, (_, words) in expected.items()}, database


def environ(urls: dict[str, str], log_format: str) -> dict[str, str]:
    entries = " ".join(f"{name}={url}" for name, url in urls.items() if name != "database")
    return {
        "DATABASE_URL": urls["database"],
        "DATASTORE_URLS": entries,
        "HEALTH_TIMEOUT": "0.5",
        "HEALTH_CACHE_TTL": "0",
        "LOG_LEVEL": "DEBUG",
        "LOG_FORMAT": log_format,
        "COMMIT_SHA": "c",
    }


@pytest.fixture
def configure(monkeypatch) -> Iterator[Callable[[Config], io.StringIO]]:
    """Logging as `config` says, into a StringIO; the service's own configuration after."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)

    def configure_(config: Config) -> io.StringIO:
        stream = io.StringIO()
        logs.configure(config, stream)
        # structlog caches a module's logger on first use: the checker's must be this one.
        monkeypatch.setattr(health, "log", structlog.get_logger())
        return stream

    yield configure_
    logs.configure(application.config)


def resolved(words: dict[str, str]) -> dict[str, set[str]]:
    """The words each datastore may get: some resolvers hang on `.invalid` rather than fail."""
    return {
        name: {expected, TIMED_OUT} if expected == "name not resolved" else {expected}
        for name, expected in words.items()
    }


def as_expected(got: dict[str, str], words: dict[str, str]) -> bool:
    allowed = resolved(words)
    return got.keys() == allowed.keys() and all(got[name] in allowed[name] for name in got)


def checks(body: bytes) -> dict[str, str]:
    """Each datastore's words in a verbose /health body ("Healthy" for a healthy one)."""
    document = json.loads(body)
    return {
        name: "Healthy" if check["status"] == "Healthy" else check["error"]
        for name, check in document["checks"].items()
    }


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_output_carries_a_planted_password(stores, configure, log_format: str):
    """Every kind and failure, two rounds, a cut, close(): the secret is in no line and no body."""
    urls, words, database = stores
    config = Config.from_environ(environ(urls, log_format))
    stream = configure(config)
    app = create_app(config)
    client = app.test_client()
    try:
        first = client.get("/health?verbose=1")
        database.cut()  # the next round finds its pooled connection gone
        second = client.get("/health?verbose=1")
        plain = client.get("/health")
    finally:
        app.extensions["health"].close()
    assert as_expected(checks(first.data), words), checks(first.data)  # each really happened
    assert checks(second.data)["database"] in {"Healthy", "connection lost"}
    output = stream.getvalue()
    assert "probe failed" in output  # the DEBUG detail of the unknown error was logged
    assert "datastore unhealthy" in output
    for text in (output, first.text, second.text, plain.text):
        assert SECRET not in text


@pytest.mark.parametrize(
    ("mode", "log_format"), [("hypercorn-asgi", "text"), ("gunicorn-gthread", "json")]
)
def test_no_server_output_carries_a_planted_password(stores, mode: str, log_format: str):
    """The same datastores under a real server: its stdout, stderr and answers lack the secret."""
    urls, words, _ = stores
    server = servers.start(mode, environ(urls, log_format))
    try:
        answers = [server.get("/health?verbose=1") for _ in range(2)]
    finally:
        server.stop()
    assert as_expected(checks(answers[0].content), words), checks(answers[0].content)
    printed = "\n".join(server.lines + server.stderr)
    assert "probe failed" in printed
    for text in (printed, *(answer.text for answer in answers)):
        assert SECRET not in text


BAD_URLS = [
    f"postgresql:/app:{SECRET}@db:5432/app",
    f"postgresql:app:{SECRET}@db/app",
    f"postgresql://app:pa@{SECRET}@db/app",
    f"postgresql://app:{SECRET}@:5432/app",
    f"postgresql://app:{SECRET}@db:port/app",
    f"postgresql://app:{SECRET}/x@db/app",
    f"memcached://u:{SECRET}@cache:11211",
]


@pytest.mark.parametrize("url", BAD_URLS)
@pytest.mark.parametrize("variable", ["DATABASE_URL", "DATASTORE_URLS"])
def test_no_configuration_error_carries_a_planted_password(url: str, variable: str):
    """A malformed URL stops start-up with a message that never shows its password."""
    value = url if variable == "DATABASE_URL" else f"db={url}"
    with pytest.raises(ConfigError) as raised:
        Config.from_environ({variable: value})
    assert SECRET not in str(raised.value)


@pytest.mark.parametrize("url", BAD_URLS[:4])
def test_a_server_refusing_a_bad_url_never_prints_its_password(url: str):
    """hypercorn exits at start-up naming DATABASE_URL, and prints no password anywhere."""
    command = [str(servers.BIN / "hypercorn"), "--config", "hypercorn.toml", "application:asgi_app"]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(servers.ROOT), "DATABASE_URL": url}
    done = subprocess.run(
        command, cwd=servers.ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode != 0
    assert "DATABASE_URL: malformed URL" in done.stdout
    assert SECRET not in done.stdout + done.stderr
