"""A real HAProxy in front of two hypercorn instances: /health is what takes one out of rotation.

Each instance has its own PostgreSQL path through its own fault proxy. Cutting one instance's
database must take that instance (and only that one) out of HAProxy's rotation within
fall * inter + HEALTH_TIMEOUT, bring it back once the database is back, and cost the
clients going through HAProxy nothing: every request answered 200.

The second case is the OPTIONS trap: `option httpchk /health` (the old form, still common in
configurations) sends `OPTIONS /health`, and an app that answers OPTIONS without running the
checks would stay UP with its database gone.

Needs the `haproxy` binary (the Debian package; .ci/run installs it). Without it the tests
skip, except under CI=true where they fail.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests import servers
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

CONFIG = """\
global
    stats socket {socket} level admin
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
    option redispatch
    retries 2
    timeout connect 1s
    timeout client 5s
    timeout server 5s

frontend web
    bind 127.0.0.1:{port}
    default_backend app

backend app
    balance roundrobin
    {check}
    http-check expect status 200
    http-response set-header X-Served-By %s
    default-server inter {inter}ms fall {fall} rise {rise}
    server a 127.0.0.1:{port_a} check
    server b 127.0.0.1:{port_b} check
"""


@dataclass
class HAProxy:
    process: subprocess.Popen[str]
    port: int
    socket: Path
    lines: list[str] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def states(self) -> dict[str, str]:
        """`show stat` from the admin socket: each backend server's status, UP or DOWN ..."""
        return {
            row["svname"]: row["status"]
            for row in _show_stat(self.socket)
            if row["pxname"] == "app" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_for(self, server: str, status: str, timeout: float) -> float:
        """Seconds until `server` shows `status`, polled every 20 ms; fails after `timeout`."""
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < timeout:
            if self.states().get(server, "").startswith(status):
                return elapsed
            time.sleep(0.02)
        log = "\n".join(self.lines[-30:])
        raise AssertionError(
            f"{server} not {status} after {timeout} s: {self.states()}\nhaproxy:\n{log}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for reader in self.readers:
            reader.join(5)


def _show_stat(path: Path) -> list[dict[str, str]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(str(path))
        sock.sendall(b"show stat\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    text = b"".join(chunks).decode()
    return list(csv.DictReader(io.StringIO(text.removeprefix("# "))))


def _haproxy_binary() -> str:
    binary = shutil.which("haproxy") or next(
        (str(p) for p in (Path("/usr/sbin/haproxy"), Path("/sbin/haproxy")) if p.exists()), None
    )
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
def haproxy(
    tmp_path: Path, instances: tuple[servers.Server, servers.Server]
) -> Iterator[Callable[[str], HAProxy]]:
    """Start HAProxy in the foreground (-db) in front of both instances with a check form."""
    binary = _haproxy_binary()
    running: list[HAProxy] = []

    def start(check: str) -> HAProxy:
        port = servers.free_port()
        admin = tmp_path / "admin.sock"
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            CONFIG.format(
                socket=admin,
                port=port,
                check=check,
                inter=int(INTER * 1000),
                fall=FALL,
                rise=RISE,
                port_a=instances[0].port,
                port_b=instances[1].port,
            )
        )
        checked = subprocess.run(
            [binary, "-c", "-f", str(config)], capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        process = subprocess.Popen(
            [binary, "-f", str(config), "-db"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        proxy = HAProxy(process, port, admin)
        proxy.readers = [servers._drain(process.stdout, proxy.lines)]
        running.append(proxy)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert process.poll() is None, "haproxy exited:\n" + "\n".join(proxy.lines)
            try:
                proxy.states()
                return proxy
            except OSError:
                time.sleep(0.05)
        raise AssertionError("haproxy's stats socket did not open:\n" + "\n".join(proxy.lines))

    try:
        yield start
    finally:
        for proxy in running:
            proxy.stop()


@dataclass
class Client:
    """Steady GET / through HAProxy every 20 ms in a thread, every outcome kept."""

    url: str
    outcomes: list[tuple[float, int | str, str]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self.stopping.is_set():
                at = time.perf_counter()
                try:
                    answer = client.get(self.url + "/")
                    self.outcomes.append(
                        (at, answer.status_code, answer.headers.get("X-Served-By", ""))
                    )
                except httpx.HTTPError as error:
                    self.outcomes.append((at, f"{type(error).__name__}: {error}", ""))
                time.sleep(0.02)

    def stop(self) -> None:
        self.stopping.set()
        assert self.thread is not None
        self.thread.join(10)


@pytest.mark.parametrize("form", list(CHECKS))
def test_a_lost_database_takes_only_that_instance_out_and_clients_see_nothing(
    form: str,
    haproxy: Callable[[str], HAProxy],
    instances: tuple[servers.Server, servers.Server],
    database_proxy: FaultProxy,
) -> None:
    """A DOWN within fall*inter + HEALTH_TIMEOUT + slack, B UP throughout, every request 200."""
    balancer = haproxy(CHECKS[form])
    balancer.wait_for("a", "UP", 10)
    balancer.wait_for("b", "UP", 10)

    client = Client(balancer.url)
    client.start()
    try:
        time.sleep(0.5)
        database_proxy.set_mode("refuse")
        cut_at = time.perf_counter()
        down_after = balancer.wait_for("a", "DOWN", DOWN_WITHIN)
        assert balancer.states()["b"] == "UP"
        b_states = []
        for _ in range(10):  # A out: B carries everything and stays UP
            b_states.append(balancer.states()["b"])
            time.sleep(INTER / 2)
        database_proxy.set_mode("pass")
        restored_at = time.perf_counter()
        up_after = balancer.wait_for("a", "UP", UP_WITHIN)
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
