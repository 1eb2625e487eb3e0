"""Settings: the environment read once into one immutable value, or one line saying why not."""

from __future__ import annotations

import math
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from .tls import tls_context, tls_parameters

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
SCHEMES = ("postgres", "postgresql", "redis", "rediss", "tcp")
COMMIT_VARIABLES = (
    "COMMIT_SHA",
    "GIT_COMMIT",
    "SOURCE_VERSION",
    "HEROKU_SLUG_COMMIT",
    "RENDER_GIT_COMMIT",
    "CI_COMMIT_SHA",
    "GITHUB_SHA",
)
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")

# Serving processes when WEB_CONCURRENCY is unset: one per core this process may use
# (`usable_cores`), for both servers. A process serves Python on one core at a time, so fewer
# leave cores idle (two processes on two cores served 1.8 times one: README, "Processes"), and
# more only take turns. A container given one core, the common case, runs one process.
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "<quota> <period>", or "max <period>"

# The drain on SIGTERM (application/drain.py): readiness fails at once and serving goes on for
# SHUTDOWN_DELAY s, longer than the README's balancers take to notice (HAProxy inter 2 s x
# fall 2 + check timeout 1 s = 5 s; a Kubernetes readiness probe period 3 s x 2 + 1 s = 7 s;
# endpoint removal a few seconds); then in-flight requests get GRACEFUL_TIMEOUT s (whole
# seconds, as gunicorn takes them). Together 25 s: under Kubernetes' default 30 s grace period,
# with 5 s to close the probe pools and exit.
SHUTDOWN_DELAY = 10.0
GRACEFUL_TIMEOUT = 15
# /metrics on a port of its own (application/exporter.py), 9464 as OpenTelemetry's Prometheus
# exporter uses: a Service, an Ingress or a load balancer publishes only the app's port, so the
# numbers stay inside the cluster, and a scrape never queues behind the app's requests.
METRICS_PORT = 9464
# A Google Cloud project id (6-30 of a-z 0-9 -, a letter first), or a legacy domain-scoped one.
_GOOGLE_PROJECT = re.compile(r"([a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable and never a password."""


def usable_cores(cpu_max: str = CGROUP_CPU_MAX) -> int:
    """The cores this process may run on (its CPU affinity: `taskset`, a cpuset), fewer where
    a cgroup's CPU quota allows less (a container's `--cpus`, a Kubernetes CPU limit)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path(cpu_max).read_text().split()
        return max(1, min(cores, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or "max": no quota
        return cores


@dataclass(frozen=True, slots=True)
class Datastore:
    """A datastore /health probes: its name and URL; the URL's password never leaves this value."""

    name: str
    url: str = field(repr=False)

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def target(self) -> str:
        """The URL without its credentials, safe to log."""
        return redact(self.url)


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the service reads from its environment."""

    commit: str = "unknown"
    port: int = 5000
    datastores: tuple[Datastore, ...] = ()
    health_timeout: float = 0.8
    health_cache_ttl: float = 1.0
    log_level: str = "INFO"
    log_format: str = "text"
    log_quiet_health: bool = False
    wsgi_threads: int = 32
    max_body_size: int = 16 * 1024 * 1024
    trusted_proxies: int = 0
    web_concurrency: int = field(default_factory=usable_cores)
    shutdown_delay: float = SHUTDOWN_DELAY
    graceful_timeout: int = GRACEFUL_TIMEOUT
    metrics_port: int = METRICS_PORT  # 0: no metrics at all, neither listener nor counting
    # Set by the process that supervises several serving processes (gunicorn.conf.py,
    # application/serve.py), which then serves /metrics from the files its children write.
    multiprocess_dir: str | None = None
    google_cloud_project: str | None = None
    debug: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Config:
        return cls(
            commit=_commit(environ),
            port=_integer(environ, "PORT", 5000, 1, 65535),
            datastores=_datastores(environ),
            health_timeout=_seconds(environ, "HEALTH_TIMEOUT", 0.8, allow_zero=False),
            health_cache_ttl=_seconds(environ, "HEALTH_CACHE_TTL", 1.0, allow_zero=True),
            log_level=_choice(environ, "LOG_LEVEL", LOG_LEVELS, "INFO"),
            log_format=_choice(environ, "LOG_FORMAT", LOG_FORMATS, "text"),
            log_quiet_health=_boolean(environ, "LOG_QUIET_HEALTH"),
            wsgi_threads=_integer(environ, "WSGI_THREADS", 32, 1, 1024),
            max_body_size=_integer(environ, "MAX_BODY_SIZE", 16 * 1024 * 1024, 0, 1 << 40),
            trusted_proxies=_integer(environ, "TRUSTED_PROXIES", 0, 0, 16),
            web_concurrency=_integer(environ, "WEB_CONCURRENCY", usable_cores(), 1, 256),
            shutdown_delay=_seconds(environ, "SHUTDOWN_DELAY", SHUTDOWN_DELAY, allow_zero=True),
            graceful_timeout=_integer(environ, "GRACEFUL_TIMEOUT", GRACEFUL_TIMEOUT, 1, 3600),
            metrics_port=_metrics_port(environ),
            multiprocess_dir=_multiprocess_dir(environ),
            google_cloud_project=_google_project(environ),
            debug=_boolean(environ, "FLASK_DEBUG"),
        )


def redact(url: str) -> str:
    """`scheme://host:port/path` with user, password and query left out."""
    try:
        parts = urlsplit(url)
        if _misplaced_credentials(url, parts):
            return "<malformed URL>"
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
    except ValueError:
        return "<malformed URL>"
    return f"{parts.scheme}://{netloc}{parts.path}"


def _commit(environ: Mapping[str, str]) -> str:
    for name in COMMIT_VARIABLES:
        if value := environ.get(name, "").strip():
            return value
    return _git_head() or "unknown"


def _git_head() -> str | None:
    """The checkout's commit, asked once at start-up; a missing git or repo is not an error."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607 - git from PATH, as a developer runs it
            capture_output=True,
            text=True,
            timeout=2,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _seconds(environ: Mapping[str, str], name: str, default: float, *, allow_zero: bool) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    expected = "seconds >= 0" if allow_zero else "seconds > 0"
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected {expected}, got {raw!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}: expected {expected}, got {raw!r}")
    return value


def _integer(environ: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ConfigError(f"{name}: expected a whole number from {low} to {high}, got {raw!r}")
    return int(raw)


def _metrics_port(environ: Mapping[str, str]) -> int:
    port = _integer(environ, "METRICS_PORT", METRICS_PORT, 0, 65535)
    if port and port == _integer(environ, "PORT", 5000, 1, 65535):
        raise ConfigError(f"METRICS_PORT: expected a port other than PORT's, got {port}")
    return port


def _multiprocess_dir(environ: Mapping[str, str]) -> str | None:
    """prometheus_client's multiprocess directory, which it reads itself when first imported."""
    path = environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if path and not os.path.isdir(path):
        raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR: not a directory: {path!r}")
    return path or None


def _google_project(environ: Mapping[str, str]) -> str | None:
    raw = environ.get("GOOGLE_CLOUD_PROJECT", "").strip()
    if raw and not _GOOGLE_PROJECT.fullmatch(raw):
        raise ConfigError(f"GOOGLE_CLOUD_PROJECT: expected a Google Cloud project id, got {raw!r}")
    return raw or None


def _choice(environ: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    for choice in choices:
        if choice.lower() == raw.lower():
            return choice
    raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {raw!r}")


def _boolean(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name}: expected 1/0, true/false, yes/no or on/off, got {raw!r}")


def _datastores(environ: Mapping[str, str]) -> tuple[Datastore, ...]:
    entries: list[tuple[str, str, str]] = []  # (variable, name, url)
    if database_url := environ.get("DATABASE_URL", "").strip():
        entries.append(("DATABASE_URL", "database", database_url))
    for entry in environ.get("DATASTORE_URLS", "").split():
        name, equals, url = entry.partition("=")
        if not equals or not _NAME.fullmatch(name):
            raise ConfigError(
                f"DATASTORE_URLS: entry {_redact_entry(entry)!r} is not name=url "
                "(a name is a letter then letters, digits, - or _)"
            )
        entries.append(("DATASTORE_URLS", name, url))

    seen: set[str] = set()
    datastores = []
    for variable, name, url in entries:
        where = variable if variable == "DATABASE_URL" else f"{variable}: entry {name!r}"
        if name in seen:
            raise ConfigError(f"{where}: the name {name!r} is used twice")
        seen.add(name)
        _check_url(where, url, postgres_only=variable == "DATABASE_URL")
        datastores.append(Datastore(name, url))
    return tuple(datastores)


def _check_url(where: str, url: str, *, postgres_only: bool) -> None:
    """Refuse any URL whose credentials might not land in its user-info part.

    asyncpg splits user-info at the first `@`, urllib at the last, and a URL without `//`
    has none: a password could then reach a server as a database or host name, and its
    error message a log line.
    """
    allowed = ("postgres", "postgresql") if postgres_only else SCHEMES
    if not url.isprintable() or any(character.isspace() for character in url):
        raise ConfigError(f"{where}: malformed URL (whitespace or control characters)")
    try:
        parts: SplitResult = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{where}: not a valid URL ({redact(url)})") from None
    if parts.scheme not in allowed:
        raise ConfigError(
            f"{where}: unknown scheme {parts.scheme!r} (expected {', '.join(allowed)})"
        )
    if not url.partition(":")[2].startswith("//"):
        raise ConfigError(
            f"{where}: malformed URL (expected {parts.scheme}://[user[:password]@]host[:port]...)"
        )
    if _misplaced_credentials(url, parts):
        raise ConfigError(f"{where}: malformed URL (percent-encode / ? # @ in the password)")
    if ("@" in parts.netloc or port is not None) and not parts.hostname:
        raise ConfigError(f"{where}: malformed URL (no host before the port or after the @)")
    if parts.scheme == "tcp" and (not parts.hostname or port is None):
        raise ConfigError(f"{where}: expected tcp://host:port")
    if parts.scheme.startswith("redis") and not parts.hostname:
        raise ConfigError(f"{where}: expected {parts.scheme}://host[:port]")
    if parts.scheme.startswith("redis"):
        try:
            if parts.scheme == "rediss":
                tls_context(url)
            elif tls_parameters(url):
                raise ValueError("ssl_* parameters need rediss://")
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None


def _misplaced_credentials(url: str, parts: SplitResult) -> bool:
    """An `@` outside the user-info part, or two: an unencoded / ? # or @ in the password."""
    return url.count("@") > 1 or ("@" in url and "@" not in parts.netloc)


def _redact_entry(entry: str) -> str:
    """A DATASTORE_URLS entry as it may be echoed: anything URL-like loses its credentials."""
    name, _, url = entry.partition("=")
    if not url:
        name, url = "", name
    shown = redact(url) if "://" in url else url.split("@")[-1]
    return f"{name}={shown}" if name else shown
