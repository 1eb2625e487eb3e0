"""A real HAProxy in front of two instances: /health is what takes one out of rotation, and a
rolling restart of both costs the clients nothing.

Each instance has its own PostgreSQL path through its own fault proxy. Cutting one instance's
database must take that instance (and only that one) out of HAProxy's rotation within
fall * inter + HEALTH_TIMEOUT, bring it back once the database is back, and cost the
clients going through HAProxy nothing: every request answered 200.

The second case is the OPTIONS trap: `option httpchk /health` (the old form, still common in
configurations) sends `OPTIONS /health`, and an app that answers OPTIONS without running the
checks would stay UP with its database gone.

The third case is the rolling restart (tests/haproxy.py): behind a balancer that never
retries, SIGTERM one instance, start it again, wait until it is UP, then the other, under
hypercorn, scripts/serve with two processes, and gunicorn with two workers.

Needs the `haproxy` binary (the Debian package; .ci/run installs it). Without it the tests
skip, except under CI=true where they fail.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import haproxy, servers
from tests.conftest import proxy_to, through
from tests.faultproxy import FaultProxy

INTER = 0.3  # seconds between checks
FALL = 2  # failed checks before DOWN
RISE = 2  # passed checks before UP
HEALTH_TIMEOUT = 0.5
APP_ENV = {"HEALTH_TIMEOUT": str(HEALTH_TIMEOUT), "HEALTH_CACHE_TTL": "0.2"}
DOWN_WITHIN = FALL * INTER + HEALTH_TIMEOUT + 3  # the brief's slack: 3 s on top
UP_WITHIN = 5.0

# How the backend asks for /health: the current form, and the old one that sends OPTIONS.
CHECKS = {
    "GET": "option httpchk GET /health",
    "OPTIONS": "option httpchk /health",
}


@pytest.fixture(scope="session")
def haproxy_binary() -> str:
    """HAProxy, or a skip (a failure under CI=true) saying how to install it."""
    binary = haproxy.binary()
    if binary is None:
        reason = "haproxy is not installed (apt-get install -y haproxy; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: CI must run the HAProxy tests")
        pytest.skip(reason)
    return binary


@pytest.fixture
def database_proxy_b(database_url: str) -> Iterator[FaultProxy]:
    """A second fault proxy to the same PostgreSQL: instance B's own path."""
    with proxy_to(database_url) as proxy:
        yield proxy


@pytest.fixture
def instances(
    database_url: str, database_proxy: FaultProxy, database_proxy_b: FaultProxy
) -> Iterator[tuple[servers.Server, servers.Server]]:
    """Two hypercorn instances, A through `database_proxy`, B through `database_proxy_b`."""
    started: list[servers.Server] = []
    try:
        for proxy in (database_proxy, database_proxy_b):
            env = {**APP_ENV, "DATABASE_URL": through(proxy, database_url)}
            started.append(servers.start("hypercorn-asgi", env))
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def balancer(
    tmp_path: Path, haproxy_binary: str, instances: tuple[servers.Server, servers.Server]
) -> Iterator[Callable[[str], haproxy.HAProxy]]:
    """Start HAProxy in front of both instances with a check form, retrying as it likes to."""
    running: list[haproxy.HAProxy] = []

    def start(check: str) -> haproxy.HAProxy:
        backends = {"a": instances[0].port, "b": instances[1].port}
        running.append(
            haproxy.start(
                haproxy_binary,
                tmp_path,
                backends,
                check=check,
                inter=INTER,
                fall=FALL,
                rise=RISE,
                check_timeout=HEALTH_TIMEOUT + 0.5,
                retries=haproxy.RETRYING,
            )
        )
        return running[-1]

    try:
        yield start
    finally:
        for proxy in running:
            proxy.stop()


@pytest.mark.parametrize("form", list(CHECKS))
def test_a_lost_database_takes_only_that_instance_out_and_clients_see_nothing(
    form: str,
    balancer: Callable[[str], haproxy.HAProxy],
    instances: tuple[servers.Server, servers.Server],
    database_proxy: FaultProxy,
) -> None:
    """A DOWN within fall*inter + HEALTH_TIMEOUT + slack, B UP throughout, every request 200."""
    proxy = balancer(CHECKS[form])
    proxy.wait_for("a", "UP", 10)
    proxy.wait_for("b", "UP", 10)

    client = haproxy.Client(proxy.url)
    client.start()
    try:
        time.sleep(0.5)
        database_proxy.set_mode("refuse")
        cut_at = time.perf_counter()
        down_after = proxy.wait_for("a", "DOWN", DOWN_WITHIN)
        assert proxy.states()["b"] == "UP"
        b_states = []
        for _ in range(10):  # A out: B carries everything and stays UP
            b_states.append(proxy.states()["b"])
            time.sleep(INTER / 2)
        database_proxy.set_mode("pass")
        restored_at = time.perf_counter()
        up_after = proxy.wait_for("a", "UP", UP_WITHIN)
        time.sleep(0.5)
    finally:
        client.stop()

    print(
        f"\n[{form}] A DOWN {down_after:.3f} s after the cut (bound {DOWN_WITHIN:.1f} s), "
        f"UP {up_after:.3f} s after the restore; {len(client.outcomes)} client requests"
    )
    assert set(b_states) == {"UP"}
    failed = [outcome for outcome in client.outcomes if outcome[1] != 200]
    assert not failed, failed[:10]
    assert len(client.outcomes) > 20
    down_from = cut_at + down_after + 0.1  # a request in flight as A went DOWN may finish there
    out_of_rotation = [o for o in client.outcomes if down_from < o[0] < restored_at]
    assert out_of_rotation
    assert {served for _, _, served in out_of_rotation} == {"b"}
    served = {served for _, _, served in client.outcomes}
    assert served == {"a", "b"}

    method = "GET" if form == "GET" else "OPTIONS"
    checks = [line for line in instances[0].lines if "path=/health " in line]
    assert checks
    assert all(f"method={method} " in line for line in checks), checks[:3]
    assert any("status=500" in line for line in checks)


# SHUTDOWN_DELAY for the rolling restart: more than fall x inter + check timeout of the
# balancer (haproxy.ROLLING: 2 x 1 s + 1 s), the README's rule for choosing it.
ROLLING_DELAY = 3.5


@pytest.mark.parametrize(
    ("mode", "env"),
    [
        ("hypercorn-asgi", {}),
        ("serve", {"WEB_CONCURRENCY": "2"}),
        ("gunicorn", {"WEB_CONCURRENCY": "2"}),
    ],
    ids=["hypercorn-asgi", "serve-2", "gunicorn-2"],
)
def test_a_rolling_restart_loses_no_request(
    mode: str, env: dict[str, str], haproxy_binary: str, tmp_path: Path
) -> None:
    """Behind a balancer that never retries, restarting A then B fails no client request."""
    run = haproxy.rolling_run(
        haproxy_binary, tmp_path, mode, {**env, "SHUTDOWN_DELAY": str(ROLLING_DELAY)}
    )
    print(f"\n[{mode}] {run.requests} requests, {len(run.failed)} failed; {run.turns}")
    assert not run.failed, run.failed[:10]
    assert run.requests >= 500
    assert [turn.exit_code for turn in run.turns] == [0, 0]
