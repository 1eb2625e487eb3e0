"""WEB_CONCURRENCY under real servers: serving processes under scripts/serve (application/serve.py)
and gunicorn, each with its own probe pool, and a failing one failing the whole."""

from __future__ import annotations

import asyncio
import http.client
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from application.config import usable_cores
from tests import servers
from tests.conftest import through
from tests.faultproxy import FaultProxy

TWO = {"WEB_CONCURRENCY": "2"}


@pytest.mark.parametrize("mode", ["serve", "gunicorn"])
def test_web_concurrency_sets_the_number_of_serving_processes(mode: str) -> None:
    """WEB_CONCURRENCY=2: two processes serve under the one that was started."""
    server = servers.start(mode, TWO)
    try:
        children = server.children(2)
        time.sleep(0.5)  # a third would have been started by now
        children = server.children()
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children]
    finally:
        server.stop()
    assert len(children) == 2
    expected = b"hypercorn" if mode == "serve" else b"gunicorn"
    assert all(expected in command for command in commands), commands


def test_one_process_is_hypercorn_itself() -> None:
    """WEB_CONCURRENCY=1: scripts/serve becomes hypercorn, no launcher stays behind."""
    server = servers.start("serve", {"WEB_CONCURRENCY": "1"})
    try:
        command = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().split(b"\0")
        children = server.children()
    finally:
        server.stop()
    assert command[1:3] == [b"-m", b"hypercorn"]
    assert children == []


@pytest.mark.parametrize("mode", ["serve", "gunicorn"])
def test_without_web_concurrency_one_process_serves_per_usable_core(mode: str) -> None:
    """Unset, WEB_CONCURRENCY is the cores this machine lets the process use."""
    cores = usable_cores()
    expected = 0 if mode == "serve" and cores == 1 else cores  # one hypercorn: the process
    server = servers.start(mode, {"WEB_CONCURRENCY": None})  # unset
    try:
        serving = server.children(expected)
    finally:
        server.stop()
    assert len(serving) == expected


def test_a_burst_of_keep_alive_connections_is_spread_over_the_hypercorns() -> None:
    """50 connections opened at once, a request on each: both hypercorns hold a share. The
    kernel picks the socket for each connection; on one shared socket asyncio's accept loop
    took 49 or all 50 into one process. (gunicorn's workers share one socket and split by
    who wakes first: a matter of scheduling, not pinned here.)"""
    server = servers.start("serve", TWO)
    try:
        children = server.children(2)
        clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(50)]
        try:
            for client in clients:
                client.sendall(b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n")
            for client in clients:
                answer = http.client.HTTPResponse(client)
                answer.begin()
                answer.read()
            shares = [servers.connections(pid, server.port, local=True) for pid in children]
        finally:
            for client in clients:
                client.close()
    finally:
        server.stop()
    assert sum(shares) == 50
    assert min(shares) >= 5, shares  # an even hash misses this once in 10^9


async def _burst(url: str, count: int) -> list[int]:
    """`count` GETs at once, each on a connection of its own: the statuses."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=count), timeout=30) as client:
        answers = await asyncio.gather(*(client.get(url) for _ in range(count)))
    return [answer.status_code for answer in answers]


@pytest.mark.parametrize("mode", ["serve", "gunicorn"])
def test_each_serving_process_keeps_one_probe_connection(
    mode: str, database_proxy: FaultProxy, database_url: str
) -> None:
    """Bursts of uncached /health until both processes have probed: one database connection
    each, two in all, never a pool shared across a fork or one per request."""
    database_proxy.set_mode("delay", delay=0.2)
    env = {**TWO, "DATABASE_URL": through(database_proxy, database_url), "HEALTH_CACHE_TTL": "0"}
    server = servers.start(mode, env)
    statuses = []
    try:
        children = server.children(2)
        deadline = time.monotonic() + 20
        while not all(servers.connections(pid, database_proxy.port) for pid in children):
            assert time.monotonic() < deadline, "the kernel never gave both processes a request"
            statuses += asyncio.run(_burst(server.url + "/health", 50))
        held = [servers.connections(pid, database_proxy.port) for pid in children]
    finally:
        server.stop()
    assert set(statuses) == {200}
    assert held == [1, 1]
    assert database_proxy.accepted == 2


def test_a_serving_process_that_fails_at_start_fails_scripts_serve() -> None:
    """One hypercorn failing at start-up (here on an unknown option) stops the others and
    scripts/serve exits non-zero, where hypercorn's own workers would exit 0 (upstream #269)."""
    done = subprocess.run(
        ["scripts/serve", "--no-such-option"],
        cwd=servers.ROOT,
        env={**servers.script_env(), **TWO},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "a serving process failed; stopping the others" in done.stdout


@pytest.mark.parametrize(
    "command",
    [["scripts/serve"], [str(servers.BIN / "gunicorn"), "application:app"]],
    ids=["scripts/serve", "gunicorn"],
)
def test_a_web_concurrency_that_is_no_number_stops_start_up(command: list[str]) -> None:
    """A non-zero exit naming WEB_CONCURRENCY: our one line under scripts/serve; gunicorn's own
    traceback under gunicorn, which reads the variable before any configuration file."""
    done = subprocess.run(
        command,
        cwd=servers.ROOT,
        env={**servers.script_env(), "WEB_CONCURRENCY": "two"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "WEB_CONCURRENCY" in done.stdout + done.stderr
