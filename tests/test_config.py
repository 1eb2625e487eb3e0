"""Tests for application.config: the environment read once, or one line saying why not."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from application.config import Config, ConfigError, Datastore, redact, usable_cores

ROOT = Path(__file__).resolve().parent.parent  # a directory that exists
CANARY = "s3cr3t-pw"  # a fake password, distinctive so that no leak can hide


def test_empty_environment_gives_the_embedded_default():
    """With nothing set the service runs with no datastores and the documented defaults."""
    config = Config.from_environ({})
    assert config.datastores == ()
    assert config.port == 5000
    assert config.health_timeout == 0.8
    assert config.health_cache_ttl == 1.0
    assert config.log_level == "INFO"
    assert config.log_format == "text"
    assert config.log_quiet_health is False
    assert config.web_concurrency == usable_cores()
    assert config.shutdown_delay == 10.0
    assert config.graceful_timeout == 15
    assert config.metrics_port == 9464
    assert config.multiprocess_dir is None
    assert config.google_cloud_project is None


@pytest.mark.parametrize(
    ("cpu_max", "cores"),
    [
        ("max 100000\n", 3),  # no quota: the affinity's cores
        ("200000 100000\n", 2),  # `--cpus 2`
        ("150000 100000\n", 2),  # 1.5 cores: two processes use them all
        ("50000 100000\n", 1),  # half a core: still one
        ("800000 100000\n", 3),  # a quota above the cores this process may run on
        (None, 3),  # no cgroup v2 file
    ],
)
def test_usable_cores_are_the_affinity_capped_by_the_cgroup_quota(
    tmp_path, monkeypatch, cpu_max, cores
):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    assert usable_cores(str(path)) == cores


def test_the_default_drain_fits_kubernetes_grace_period():
    """SHUTDOWN_DELAY + GRACEFUL_TIMEOUT leave time to exit within 30 s of SIGTERM."""
    config = Config.from_environ({})
    assert config.shutdown_delay + config.graceful_timeout <= 30 - 5


def test_commit_is_unknown_without_variables_or_git(monkeypatch, tmp_path):
    """No commit variable and no git on PATH is not an error: the commit is 'unknown'."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert Config.from_environ({}).commit == "unknown"


def test_commit_is_the_checkouts_head_without_variables():
    """Run from a git checkout with no commit variable, the commit is its HEAD."""
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert Config.from_environ({}).commit == head


def test_commit_is_unknown_in_a_repository_without_commits(monkeypatch, tmp_path):
    """`git rev-parse HEAD` fails there (printing "HEAD"): not a commit."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    assert Config.from_environ({}).commit == "unknown"


def test_a_git_that_hangs_does_not_hold_start_up(monkeypatch, tmp_path):
    """A git that never answers is given 2 s; then the commit is 'unknown'."""
    git = tmp_path / "git"
    git.write_text(f"#!/bin/sh\nexec {shutil.which('sleep')} 60\n")
    git.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    started = time.monotonic()
    assert Config.from_environ({}).commit == "unknown"
    assert time.monotonic() - started < 30


COMMIT_ORDER = [
    "COMMIT_SHA",
    "GIT_COMMIT",
    "SOURCE_VERSION",
    "HEROKU_SLUG_COMMIT",
    "RENDER_GIT_COMMIT",
    "CI_COMMIT_SHA",
    "GITHUB_SHA",
]


@pytest.mark.parametrize("first", range(len(COMMIT_ORDER)), ids=COMMIT_ORDER)
def test_commit_variables_are_read_in_order(first):
    """The earliest commit variable that is set wins over every later one."""
    environ = {name: f"sha-of-{name}" for name in COMMIT_ORDER[first:]}
    assert Config.from_environ(environ).commit == f"sha-of-{COMMIT_ORDER[first]}"


def test_blank_commit_variable_is_skipped():
    """A variable set to whitespace counts as unset, and the value found is stripped."""
    environ = {"COMMIT_SHA": "  ", "GIT_COMMIT": " abc123\n"}
    assert Config.from_environ(environ).commit == "abc123"


def test_database_url_becomes_the_database_datastore():
    """DATABASE_URL is the datastore named 'database', listed before DATASTORE_URLS."""
    environ = {"DATABASE_URL": "postgres://db/app", "DATASTORE_URLS": "cache=redis://cache"}
    assert Config.from_environ(environ).datastores == (
        Datastore("database", "postgres://db/app"),
        Datastore("cache", "redis://cache"),
    )


@pytest.mark.parametrize("url", ["postgresql:///app", "postgres://", "postgresql:///app?host=/tmp"])
def test_a_postgres_url_without_a_host_is_libpqs_default(url):
    """No host and no credentials: the local socket, as libpq and asyncpg have it."""
    assert Config.from_environ({"DATABASE_URL": url}).datastores == (Datastore("database", url),)


SCHEMES = [
    "postgres://db/a",
    "postgresql://db:5433/a",
    "redis://c",
    "rediss://c:6380/1",
    "tcp://q:1",
]


@pytest.mark.parametrize("url", SCHEMES)
def test_datastore_urls_accepts_each_scheme(url):
    """Every supported scheme is accepted and the URL is kept as given."""
    assert Config.from_environ({"DATASTORE_URLS": f"store={url}"}).datastores == (
        Datastore("store", url),
    )


def test_datastore_urls_are_separated_by_any_whitespace():
    """Entries may be separated by spaces, tabs and newlines, and keep their order."""
    environ = {"DATASTORE_URLS": "\n  a=tcp://a:1\tb=tcp://b:2 \n c=tcp://c:3  "}
    names = [datastore.name for datastore in Config.from_environ(environ).datastores]
    assert names == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("environ", "config"),
    [
        ({"HEALTH_TIMEOUT": "2.5"}, Config(health_timeout=2.5)),
        ({"HEALTH_CACHE_TTL": "0"}, Config(health_cache_ttl=0.0)),
        ({"LOG_LEVEL": "debug"}, Config(log_level="DEBUG")),
        ({"LOG_FORMAT": "JSON"}, Config(log_format="json")),
        ({"PORT": "8080"}, Config(port=8080)),
        ({"PORT": "1"}, Config(port=1)),
        ({"PORT": "65535"}, Config(port=65535)),
        ({"LOG_QUIET_HEALTH": "yes"}, Config(log_quiet_health=True)),
        ({"LOG_QUIET_HEALTH": "Off"}, Config(log_quiet_health=False)),
        ({"WEB_CONCURRENCY": "4"}, Config(web_concurrency=4)),
        ({"SHUTDOWN_DELAY": "0"}, Config(shutdown_delay=0.0)),
        ({"SHUTDOWN_DELAY": "2.5"}, Config(shutdown_delay=2.5)),
        ({"GRACEFUL_TIMEOUT": "20"}, Config(graceful_timeout=20)),
        # each bound, accepted: one past it is refused (test_a_bad_setting_...)
        ({"WEB_CONCURRENCY": "1"}, Config(web_concurrency=1)),
        ({"GRACEFUL_TIMEOUT": "1"}, Config(graceful_timeout=1)),
        ({"GRACEFUL_TIMEOUT": "3600"}, Config(graceful_timeout=3600)),
        ({"WSGI_THREADS": "1"}, Config(wsgi_threads=1)),
        ({"WSGI_THREADS": "1024"}, Config(wsgi_threads=1024)),
        ({"MAX_BODY_SIZE": "0"}, Config(max_body_size=0)),
        ({"MAX_BODY_SIZE": str(1 << 40)}, Config(max_body_size=1 << 40)),
        ({"TRUSTED_PROXIES": "0"}, Config(trusted_proxies=0)),
        ({"TRUSTED_PROXIES": "16"}, Config(trusted_proxies=16)),
        ({"FLASK_DEBUG": "1"}, Config(debug=True)),
        ({"METRICS_PORT": "9100"}, Config(metrics_port=9100)),
        ({"METRICS_PORT": "0"}, Config(metrics_port=0)),
        ({"METRICS_PORT": "0", "PORT": "5000"}, Config(metrics_port=0)),
        ({"PROMETHEUS_MULTIPROC_DIR": str(ROOT)}, Config(multiprocess_dir=str(ROOT))),
        ({"GOOGLE_CLOUD_PROJECT": "my-project-1"}, Config(google_cloud_project="my-project-1")),
        (
            {"GOOGLE_CLOUD_PROJECT": "example.com:my-app"},
            Config(google_cloud_project="example.com:my-app"),
        ),
    ],
)
def test_valid_settings_are_read(environ, config):
    """Good values are parsed, case-insensitively where the value is a word."""
    assert Config.from_environ({"COMMIT_SHA": "x", **environ}) == replace(config, commit="x")


def bad(case, environ, *named):
    """One bad environment and the fragments its message must name."""
    return pytest.param(environ, named, id=case)


DB = f"postgres://app:{CANARY}@db:5432/app"
REDIS = f"redis://:{CANARY}@cache"

ERRORS = [
    bad("no-equals", {"DATASTORE_URLS": DB}, "DATASTORE_URLS", "postgres://db:5432/app"),
    bad("bad-name", {"DATASTORE_URLS": f"9db={DB}"}, "DATASTORE_URLS", "9db="),
    bad(
        "unknown-scheme",
        {"DATASTORE_URLS": f"cache=memcached://u:{CANARY}@c:11211"},
        *("DATASTORE_URLS", "'cache'", "memcached"),
    ),
    bad("database-not-postgres", {"DATABASE_URL": REDIS}, "DATABASE_URL", "redis"),
    bad("duplicate", {"DATASTORE_URLS": f"db={DB} db={REDIS}"}, "DATASTORE_URLS", "'db'"),
    bad(
        "clash-with-database",
        {"DATABASE_URL": DB, "DATASTORE_URLS": f"database={REDIS}"},
        *("DATASTORE_URLS", "'database'"),
    ),
    bad("tcp-no-port", {"DATASTORE_URLS": f"q=tcp://u:{CANARY}@q"}, "DATASTORE_URLS", "'q'"),
    bad("tcp-no-host", {"DATASTORE_URLS": "q=tcp://:5672"}, "DATASTORE_URLS", "'q'"),
    bad("bad-url", {"DATASTORE_URLS": f"db=postgres://u:{CANARY}@db:x/"}, "DATASTORE_URLS", "'db'"),
    bad(
        "bad-name-query-password",
        {"DATASTORE_URLS": f"9db=postgres://db/app?password={CANARY}"},
        *("DATASTORE_URLS", "9db="),
    ),
    *[
        bad(f"malformed-{case}", {"DATABASE_URL": url}, "DATABASE_URL", "malformed URL")
        for case, url in [
            ("one-slash", f"postgresql:/app:{CANARY}@db.internal:5432/app"),
            ("no-slash", f"postgresql:app:{CANARY}@db.internal/app"),
            ("no-host-after-credentials", f"postgresql://app:{CANARY}@/app"),
            ("no-host-before-port", f"postgresql://app:{CANARY}@:5432/app"),
            ("two-at-signs", f"postgresql://app:pa@{CANARY}@db/app"),
            ("at-in-query", f"postgresql://db/app?password=pa@{CANARY}"),
            ("space", f"postgresql://app:pa {CANARY}@db/app"),
            ("newline", f"postgresql://app:{CANARY}@db/app\nx"),
            ("nul", f"postgresql://app:{CANARY}\x00@db/app"),
        ]
    ],
    *[
        bad(f"malformed-{case}", {"DATASTORE_URLS": f"x={url}"}, "'x'", "malformed URL")
        for case, url in [
            ("redis-one-slash", f"redis:/:{CANARY}@cache"),
            ("rediss-no-slash", f"rediss::{CANARY}@cache:6380"),
            ("tcp-no-slash", f"tcp:u:{CANARY}@q:1"),
            ("redis-no-host", f"redis://:{CANARY}@:6379"),
            ("tcp-at-in-path", f"tcp://u:{CANARY}@q:1/x@y"),
        ]
    ],
    *[
        bad(f"timeout-{raw}", {"HEALTH_TIMEOUT": raw}, "HEALTH_TIMEOUT", repr(raw))
        for raw in ["abc", "0", "-1", "inf", "nan", "1e999", "1\n2"]
    ],
    bad("ttl-negative", {"HEALTH_CACHE_TTL": "-0.5"}, "HEALTH_CACHE_TTL", "'-0.5'"),
    bad("log-level", {"LOG_LEVEL": "LOUD"}, "LOG_LEVEL", "'LOUD'"),
    bad("log-format", {"LOG_FORMAT": "xml"}, "LOG_FORMAT", "'xml'"),
    *[bad(f"port-{raw}", {"PORT": raw}, "PORT", repr(raw)) for raw in ["http", "0", "65536", "-1"]],
    bad(
        "port-superscript",
        {"PORT": "²"},
        "PORT",
    ),
    bad("quiet-health", {"LOG_QUIET_HEALTH": "maybe"}, "LOG_QUIET_HEALTH", "'maybe'"),
    *[
        bad(f"web-concurrency-{raw}", {"WEB_CONCURRENCY": raw}, "WEB_CONCURRENCY", repr(raw))
        for raw in ["two", "0", "-1", "1.5", "257"]
    ],
    bad("shutdown-delay", {"SHUTDOWN_DELAY": "-1"}, "SHUTDOWN_DELAY", "'-1'"),
    *[
        bad(f"graceful-timeout-{raw}", {"GRACEFUL_TIMEOUT": raw}, "GRACEFUL_TIMEOUT", repr(raw))
        for raw in ["0", "soon", "2.5", "3601"]
    ],
    *[
        bad(f"{name.lower()}-{raw}", {name: raw}, name, repr(raw))
        for name, raws in [
            ("WSGI_THREADS", ["0", "1025"]),
            ("MAX_BODY_SIZE", ["-1", str((1 << 40) + 1)]),
            ("TRUSTED_PROXIES", ["-1", "17"]),
        ]
        for raw in raws
    ],
    *[
        bad(f"metrics-port-{raw}", {"METRICS_PORT": raw}, "METRICS_PORT", repr(raw))
        for raw in ["on", "-1", "65536"]
    ],
    bad("metrics-port-is-port", {"PORT": "8000", "METRICS_PORT": "8000"}, "METRICS_PORT", "8000"),
    bad("metrics-port-default-port", {"METRICS_PORT": "5000"}, "METRICS_PORT", "PORT"),
    bad(
        "multiprocess-dir",
        {"PROMETHEUS_MULTIPROC_DIR": "/nonexistent/dir"},
        *("PROMETHEUS_MULTIPROC_DIR", "/nonexistent/dir"),
    ),
    *[
        bad(f"google-project-{raw}", {"GOOGLE_CLOUD_PROJECT": raw}, "GOOGLE_CLOUD_PROJECT")
        for raw in ["My-Project", "proj/x", "abc", "a b c d e f", "1project"]
    ],
]


@pytest.mark.parametrize(("environ", "named"), ERRORS)
def test_bad_setting_is_one_safe_line_naming_it(environ, named):
    """A bad value raises ConfigError: one line naming the variable and entry, no password."""
    with pytest.raises(ConfigError) as raised:
        Config.from_environ(environ)
    message = str(raised.value)
    for fragment in named:
        assert fragment in message
    assert CANARY not in message
    assert len(message.splitlines()) == 1


TARGETS = [
    (f"postgres://app:{CANARY}@db:5432/app", "postgres://db:5432/app"),
    (f"postgresql://app:{CANARY}@db/app?sslmode=require&password={CANARY}", "postgresql://db/app"),
    (f"redis://:{CANARY}@cache:6379/0", "redis://cache:6379/0"),
    (f"rediss://default:{CANARY}@cache", "rediss://cache"),
    (f"tcp://u:{CANARY}@queue:5672", "tcp://queue:5672"),
    (f"postgres://app:{CANARY}@[::1]:5433/app", "postgres://[::1]:5433/app"),
]


@pytest.mark.parametrize(("url", "target"), TARGETS)
def test_datastore_target_is_the_url_without_credentials(url, target):
    """`target` keeps scheme, host, port and path, and drops user, password and query."""
    assert Datastore("store", url).target == target


@pytest.mark.parametrize(
    "url",
    [
        *(url for url, _ in TARGETS),
        f"postgres://app:1234/{CANARY}@db/app",
        f"postgresql:/app:{CANARY}@db.internal:5432/app",
        f"postgresql://app:pa@{CANARY}@db/app",
    ],
)
def test_datastore_never_shows_the_password(url):
    """A Datastore's repr and target, and a Config holding it, never show the password."""
    datastore = Datastore("store", url)
    assert CANARY not in repr(datastore)
    assert CANARY not in repr(Config(datastores=(datastore,)))
    assert CANARY not in datastore.target


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgres://u:pw@db.internal:5432/app?sslmode=require", "postgres://db.internal:5432/app"),
        ("redis://:pw@cache", "redis://cache"),
        ("tcp://queue:5672", "tcp://queue:5672"),
        ("postgres://u:pw@[::1]/app#frag", "postgres://[::1]/app"),
        ("postgres://u:pw@db:port/app", "<malformed URL>"),
        ("postgres://u:pw@[::1/app", "<malformed URL>"),
        ("postgres://u:p@ss@db/app", "<malformed URL>"),  # an unencoded @ in the password
        ("postgresql:///app?host=/run/postgresql", "postgresql:///app"),  # a Unix socket
    ],
)
def test_redact(url, redacted):
    """redact() leaves `scheme://host:port/path`, or a placeholder for a URL it cannot parse."""
    assert redact(url) == redacted


def test_rediss_tls_parameters_are_accepted(ca_file: Path):
    """redis-py's TLS parameters, and any other parameter left to the app's client."""
    url = (
        f"rediss://:{CANARY}@cache:6380/0?ssl_ca_certs={ca_file}&ssl_cert_reqs=required"
        f"&ssl_check_hostname=false&ssl_ca_path={ca_file.parent}&socket_timeout=5"
    )
    assert Config.from_environ({"DATASTORE_URLS": f"cache={url}"}).datastores[0].url == url


def bad_tls(case: str, query: str, named: str, scheme: str = "rediss") -> object:
    """A rediss:// URL whose TLS parameters are wrong, and the parameter its message names."""
    url = f"{scheme}://:{CANARY}@cache:6380/0?{query}"
    return pytest.param({"DATASTORE_URLS": f"cache={url}"}, named, id=case)


TLS_ERRORS = [
    bad_tls("unknown", "ssl_ca_cert=/x.pem", "'ssl_ca_cert'"),
    bad_tls("cert-reqs", f"ssl_cert_reqs={CANARY}", "ssl_cert_reqs"),
    bad_tls("check-hostname", f"ssl_check_hostname={CANARY}", "ssl_check_hostname"),
    bad_tls("contradiction", "ssl_cert_reqs=none&ssl_check_hostname=true", "ssl_check_hostname"),
    bad_tls("missing-ca", f"ssl_ca_certs=/nonexistent/{CANARY}.pem", "ssl_ca_certs"),
    bad_tls("not-pem", "ssl_ca_certs=/etc/hostname", "ssl_ca_certs"),
    bad_tls("ca-path", f"ssl_ca_path=/nonexistent/{CANARY}", "ssl_ca_path"),
    bad_tls("missing-cert", f"ssl_certfile=/nonexistent/{CANARY}.pem", "ssl_certfile"),
    bad_tls("key-alone", "ssl_keyfile=/etc/hostname", "ssl_keyfile"),
    bad_tls("twice", "ssl_cert_reqs=none&ssl_cert_reqs=required", "ssl_cert_reqs"),
    bad_tls("without-tls", "ssl_cert_reqs=none", "rediss://", scheme="redis"),
]


@pytest.mark.parametrize(("environ", "named"), TLS_ERRORS)
def test_bad_tls_parameter_is_one_safe_line_naming_it(environ, named):
    """A bad TLS parameter stops start-up: variable, entry and parameter named, no value."""
    with pytest.raises(ConfigError) as raised:
        Config.from_environ(environ)
    message = str(raised.value)
    assert message.startswith("DATASTORE_URLS: entry 'cache': ")
    assert named in message
    assert CANARY not in message
    assert "/nonexistent" not in message
    assert len(message.splitlines()) == 1


NOT_NAME_URL = "is not name=url (a name is a letter then letters, digits, - or _)"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"HEALTH_TIMEOUT": "0"}, "HEALTH_TIMEOUT: expected seconds > 0, got '0'"),
        ({"HEALTH_TIMEOUT": "x"}, "HEALTH_TIMEOUT: expected seconds > 0, got 'x'"),
        ({"HEALTH_CACHE_TTL": "-1"}, "HEALTH_CACHE_TTL: expected seconds >= 0, got '-1'"),
        ({"SHUTDOWN_DELAY": "x"}, "SHUTDOWN_DELAY: expected seconds >= 0, got 'x'"),
        (
            {"LOG_LEVEL": "LOUD"},
            "LOG_LEVEL: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'",
        ),
        ({"DATASTORE_URLS": DB}, f"DATASTORE_URLS: entry 'postgres://db:5432/app' {NOT_NAME_URL}"),
        ({"DATASTORE_URLS": f"u:{CANARY}@cache"}, f"DATASTORE_URLS: entry 'cache' {NOT_NAME_URL}"),
        (
            {"DATASTORE_URLS": f"9db=u:pa@{CANARY}@db"},
            f"DATASTORE_URLS: entry '9db=db' {NOT_NAME_URL}",
        ),
        (
            {"DATASTORE_URLS": "cache=memcached://c:11211"},
            "DATASTORE_URLS: entry 'cache': unknown scheme 'memcached' "
            "(expected postgres, postgresql, redis, rediss, tcp)",
        ),
        (
            {"DATABASE_URL": REDIS},
            "DATABASE_URL: unknown scheme 'redis' (expected postgres, postgresql)",
        ),
        (
            {"DATABASE_URL": f"postgresql://app:{CANARY}@/app"},
            "DATABASE_URL: malformed URL (no host before the port or after the @)",
        ),
        (
            {"DATASTORE_URLS": "c=redis:///0"},
            "DATASTORE_URLS: entry 'c': expected redis://host[:port]",
        ),
        (
            {"DATASTORE_URLS": "c=rediss://"},
            "DATASTORE_URLS: entry 'c': expected rediss://host[:port]",
        ),
        (
            {"DATASTORE_URLS": "c=redis://cache?ssl_cert_reqs=none"},
            "DATASTORE_URLS: entry 'c': ssl_* parameters need rediss://",
        ),
    ],
)
def test_a_bad_settings_line_says_what_was_expected(environ, message):
    """The whole line: the variable (and entry), what it takes, and what it got, if safe."""
    with pytest.raises(ConfigError) as raised:
        Config.from_environ(environ)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    "url", ["postgresql://app@db.internal:5432/app", "postgres://db", "postgresql://[::1]/app"]
)
def test_database_url_takes_both_postgres_schemes(url):
    """DATABASE_URL is a PostgreSQL URL under either of its two schemes."""
    assert Config.from_environ({"DATABASE_URL": url}).datastores == (Datastore("database", url),)
