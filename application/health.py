"""Health: probe rounds run concurrently under one deadline, shared by every caller, briefly cached.

The rounds run on one event loop per process, in a thread of its own, so an asyncpg pool
outlives the request that made it whatever the server: hypercorn's loop, or the fresh loop
Flask gives each async view under a WSGI server. Callers from any thread or loop get a
`concurrent.futures.Future` and wait on it in their own way.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import structlog

from .drain import draining
from .probes import Probe, describe

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Check:
    """One datastore's answer in one round."""

    name: str
    ok: bool
    duration_ms: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Report:
    """A finished round: the seed's status line, and the detail behind it."""

    checks: tuple[Check, ...] = ()
    shutting_down: bool = False  # draining after SIGTERM: not ready, whatever the datastores say

    @property
    def healthy(self) -> bool:
        return not self.shutting_down and all(check.ok for check in self.checks)

    @property
    def http_status(self) -> int:
        """The seed's codes: 200, or 500 for a load balancer to act on; 503 while draining."""
        if self.shutting_down:
            return 503
        return 200 if self.healthy else 500

    @property
    def status(self) -> str:
        if self.shutting_down:
            return "shutting down"
        failed = [f"{check.name}: {check.error}" for check in self.checks if not check.ok]
        return "; ".join(failed) or "Healthy"

    def body(self, commit: str, *, verbose: bool = False) -> bytes:
        """The seed's JSON, plus each datastore's result when asked for."""
        document: dict[str, object] = {"commit": commit, "status": self.status}
        if verbose:
            document["checks"] = {
                check.name: {
                    "status": "Healthy" if check.ok else "Unhealthy",
                    "duration_ms": check.duration_ms,
                    "error": check.error,
                }
                for check in self.checks
            }
        return json.dumps(document).encode()


class HealthChecker:
    """Runs probe rounds: one in flight per process, a finished one reused for `cache_ttl` s."""

    def __init__(self, probes: Sequence[Probe], timeout: float, cache_ttl: float) -> None:
        self.probes = tuple(probes)
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self._lock = threading.Lock()
        self._round: Future[Report] | None = None
        self._finished_at = 0.0
        self._healthy = {probe.name: True for probe in self.probes}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_pid = 0
        self._thread: threading.Thread | None = None

    def report(self) -> Future[Report]:
        """The round in flight, a fresh enough finished one, or a new one."""
        with self._lock:
            current = self._round
            if current is None or (
                current.done() and time.monotonic() - self._finished_at >= self.cache_ttl
            ):
                current = self._round = self._start_round()
            return current

    async def wait(self) -> Report:
        """The current report, awaited from whichever event loop the caller runs on."""
        if draining():  # drain: readiness fails at once, asking no datastore
            return Report(shutting_down=True)
        current = self.report()
        return current.result() if current.done() else await asyncio.wrap_future(current)

    def close(self, timeout: float = 2.0) -> None:
        """Close the probes' connections and stop the loop; safe to call more than once."""
        with self._lock:
            loop, self._loop = self._loop, None
            if loop is None or self._loop_pid != os.getpid():
                return
        closing = asyncio.run_coroutine_threadsafe(self._close_probes(), loop)
        try:
            closing.result(timeout)
        except TimeoutError:
            closing.cancel()
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)

    def _start_round(self) -> Future[Report]:
        if not self.probes:
            done: Future[Report] = Future()
            done.set_result(Report())
            return done
        return asyncio.run_coroutine_threadsafe(self._run_round(), self._probe_loop())

    def _probe_loop(self) -> asyncio.AbstractEventLoop:
        """This process's probe loop, started on first use (after any fork, never before)."""
        if self._loop is None or self._loop_pid != os.getpid():
            self._loop = asyncio.new_event_loop()
            self._loop_pid = os.getpid()
            self._thread = threading.Thread(
                target=_serve, args=(self._loop,), name="health-probes", daemon=True
            )
            self._thread.start()
        return self._loop

    async def _run_round(self) -> Report:
        deadline = asyncio.get_running_loop().time() + self.timeout
        checks = await asyncio.gather(*(self._check(probe, deadline) for probe in self.probes))
        self._log_transitions(checks)
        report = Report(tuple(checks))
        self._finished_at = time.monotonic()
        return report

    async def _check(self, probe: Probe, deadline: float) -> Check:
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                await probe.ping()
        except Exception as error:
            reason = describe(error, self.timeout)
            if reason is None:
                reason = "unexpected error (details in the debug log)"
                log.debug(
                    "probe failed",
                    datastore=probe.name,
                    target=probe.target,
                    error_type=type(error).__qualname__,
                    error=str(error),
                )
            return Check(probe.name, False, _since(started), reason)
        return Check(probe.name, True, _since(started))

    def _log_transitions(self, checks: Sequence[Check]) -> None:
        for check in checks:
            if check.ok != self._healthy[check.name]:
                self._healthy[check.name] = check.ok
                if check.ok:
                    log.info("datastore recovered", datastore=check.name)
                else:
                    log.warning("datastore unhealthy", datastore=check.name, reason=check.error)

    async def _close_probes(self) -> None:
        await asyncio.gather(*(probe.close() for probe in self.probes), return_exceptions=True)


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_forever()
    finally:
        loop.close()


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
