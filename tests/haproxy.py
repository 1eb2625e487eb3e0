"""A real HAProxy in front of real servers, clients through it, and a rolling restart.

For the tests and scripts/bench alike: HAProxy runs in the foreground on a free port, its view
of each backend server is read from its admin socket, and every client request's outcome is
kept, so a restart can be judged by what clients saw rather than by what the servers think.
"""

from __future__ import annotations

import csv
import io
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests import servers

CONFIG = """\
global
    stats socket {socket} level admin
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
{retries}
    timeout connect 1s
    timeout client 5s
    timeout server 5s
    timeout check {check_timeout}ms

frontend web
    bind 127.0.0.1:{port}
    default_backend app

backend app
    balance roundrobin
    {check}
    http-check expect status 200
    http-response set-header X-Served-By %s
    default-server inter {inter}ms fall {fall} rise {rise}
{servers}
"""

# A balancer that retries elsewhere hides a server's faults; one that does not (Kubernetes
# Services, ALB target groups, Caddy's defaults) shows each of them to a client.
RETRYING = "    option redispatch\n    retries 2"
NOT_RETRYING = "    retries 0"


def binary() -> str | None:
    """The haproxy executable, wherever Debian's package put it; None when not installed."""
    places = (Path("/usr/sbin/haproxy"), Path("/sbin/haproxy"))
    return shutil.which("haproxy") or next((str(p) for p in places if p.exists()), None)


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


def start(
    executable: str,
    directory: Path,
    backends: Mapping[str, int],
    *,
    check: str,
    inter: float,
    fall: int,
    rise: int,
    check_timeout: float,
    retries: str,
) -> HAProxy:
    """HAProxy in the foreground (-db) in front of `backends` (name -> port on 127.0.0.1)."""
    port = servers.free_port()
    admin = directory / "admin.sock"
    config = directory / "haproxy.cfg"
    config.write_text(
        CONFIG.format(
            socket=admin,
            port=port,
            retries=retries,
            check=check,
            check_timeout=int(check_timeout * 1000),
            inter=int(inter * 1000),
            fall=fall,
            rise=rise,
            servers="\n".join(
                f"    server {name} 127.0.0.1:{backend} check" for name, backend in backends.items()
            ),
        )
    )
    checked = subprocess.run(
        [executable, "-c", "-f", str(config)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    process = subprocess.Popen(
        [executable, "-f", str(config), "-db"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    proxy = HAProxy(process, port, admin)
    proxy.readers = [servers._drain(process.stdout, proxy.lines)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            proxy.stop()
            raise AssertionError("haproxy exited:\n" + "\n".join(proxy.lines))
        try:
            proxy.states()
            return proxy
        except OSError:
            time.sleep(0.05)
    proxy.stop()
    raise AssertionError("haproxy's stats socket did not open:\n" + "\n".join(proxy.lines))


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


Outcome = tuple[float, int | str, str]  # (sent at, status or error, X-Served-By)


@dataclass
class Client:
    """GET / in a thread, one request every `interval` s, every outcome kept.

    `keep_alive`: every request on one connection, as a browser or a service's pooled client
    does; otherwise a fresh connection for each request (`Connection: close`).
    """

    url: str
    keep_alive: bool = True
    interval: float = 0.02
    outcomes: list[Outcome] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        headers = {} if self.keep_alive else {"Connection": "close"}
        with httpx.Client(timeout=10, headers=headers) as client:
            while not self.stopping.is_set():
                at = time.perf_counter()
                try:
                    answer = client.get(self.url + "/")
                    self.outcomes.append(
                        (at, answer.status_code, answer.headers.get("X-Served-By", ""))
                    )
                except httpx.HTTPError as error:
                    self.outcomes.append((at, f"{type(error).__name__}: {error}", ""))
                time.sleep(self.interval)

    def stop(self) -> None:
        self.stopping.set()
        assert self.thread is not None
        self.thread.join(15)

    @property
    def failed(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome[1] != 200]


@dataclass
class Instance:
    """One backend: how to start it on its fixed port, and the running server."""

    name: str
    mode: str
    env: dict[str, str]
    port: int = field(default_factory=servers.free_port)
    server: servers.Server | None = None

    def start(self) -> servers.Server:
        self.server = servers.start(self.mode, self.env, port=self.port)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@dataclass
class Restarted:
    """One instance's turn in a rolling restart, in seconds from its SIGTERM."""

    name: str
    down_after: float  # HAProxy marked it DOWN
    exited_after: float  # the process exited ...
    exit_code: int  # ... with this code
    up_after: float  # the new process was UP in HAProxy again


def rolling_restart(
    balancer: HAProxy, instances: list[Instance], *, timeout: float = 40
) -> list[Restarted]:
    """SIGTERM each instance in turn, start it again on its port, wait until HAProxy has it UP."""
    turns = []
    for instance in instances:
        assert instance.server is not None
        process = instance.server.process
        process.send_signal(signal.SIGTERM)
        started = time.perf_counter()
        down_after = exited_after = None
        while down_after is None or exited_after is None:
            elapsed = time.perf_counter() - started
            assert elapsed < timeout, f"{instance.name}: not DOWN and exited in {timeout} s"
            if exited_after is None and process.poll() is not None:
                exited_after = elapsed
            if down_after is None and balancer.states()[instance.name].startswith("DOWN"):
                down_after = elapsed
            time.sleep(0.02)
        instance.server.stop()  # joins its output readers
        exit_code = process.returncode
        instance.start()
        balancer.wait_for(instance.name, "UP", timeout)
        up_after = time.perf_counter() - started
        turns.append(Restarted(instance.name, down_after, exited_after, exit_code, up_after))
    return turns


# The balancer: checks readiness every second, out after two failures, and never
# retries a request elsewhere, as Kubernetes Services and ALB target groups behave.
ROLLING = {
    "check": "option httpchk GET /health/ready",
    "inter": 1.0,
    "fall": 2,
    "rise": 2,
    "check_timeout": 1.0,
    "retries": NOT_RETRYING,
}


@dataclass
class RollingRun:
    """What the clients saw during a rolling restart of two instances, and each one's turn."""

    clients: list[Client]
    turns: list[Restarted]

    @property
    def requests(self) -> int:
        return sum(len(client.outcomes) for client in self.clients)

    @property
    def failed(self) -> list[Outcome]:
        return [outcome for client in self.clients for outcome in client.failed]


def rolling_run(executable: str, directory: Path, mode: str, env: dict[str, str]) -> RollingRun:
    """Two instances of `mode` behind HAProxy (ROLLING), a keep-alive client and a client on
    fresh connections each sending a request every 10 ms, while A then B is restarted."""
    instances = [Instance(name, mode, env) for name in ("a", "b")]
    try:
        for instance in instances:
            instance.start()
        backends = {instance.name: instance.port for instance in instances}
        balancer = start(executable, directory, backends, **ROLLING)  # type: ignore[arg-type]
        try:
            for instance in instances:
                balancer.wait_for(instance.name, "UP", 10)
            clients = [
                Client(balancer.url, keep_alive=True, interval=0.01),
                Client(balancer.url, keep_alive=False, interval=0.01),
            ]
            for client in clients:
                client.start()
            try:
                time.sleep(0.5)  # traffic on both instances before the first SIGTERM
                turns = rolling_restart(balancer, instances)
                time.sleep(0.5)  # and on both again after the last one is back
            finally:
                for client in clients:
                    client.stop()
        finally:
            balancer.stop()
    finally:
        for instance in instances:
            instance.stop()
    return RollingRun(clients, turns)
