"""Health: probe rounds run concurrently under one deadline, shared by every caller, briefly cached.

The rounds run on one event loop per process, in a thread of its own, so an asyncpg pool
outlives the request that made it whatever the server: hypercorn's loop, or the fresh loop
Flask gives each async view under a WSGI server. Callers from any thread or loop get a
`concurrent.futures.Future` and wait on it in their own way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import structlog

from .drain import draining
from .metrics import Metrics
from .probes import Probe, describe

log = structlog.get_logger()

WAIT_GRACE = 1.0  # seconds a waiter gives a round past its deadline before answering itself


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
    """Runs probe rounds: one in flight per process, a finished one reused for `cache_ttl` s.

    A round belongs to the process and the loop that started it. Whoever waits on it only
    reads it: a caller cancelled or timed out while waiting leaves it running for the others,
    `close()` answers everyone still waiting, and a forked child starts afresh.
    """

    _lock: threading.Lock
    _round: Future[Report] | None
    _finished_at: float
    _loop: asyncio.AbstractEventLoop | None
    _thread: threading.Thread | None
    _closed: bool

    def __init__(
        self,
        probes: Sequence[Probe],
        timeout: float,
        cache_ttl: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.probes = tuple(probes)
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.metrics = metrics
        self._healthy = {probe.name: True for probe in self.probes}
        self._start_afresh()
        _checkers.add(self)

    def report(self) -> Future[Report]:
        """The round in flight, a fresh enough finished one, or a new one (closed: the last)."""
        with self._lock:
            current = self._round  # never None once closed
            if current is None or (
                not self._closed
                and current.done()
                and time.monotonic() - self._finished_at >= self.cache_ttl
            ):
                current = self._round = self._start_round()
            elif self.metrics is not None and not current.done():
                self.metrics.rounds_shared.inc()
            return current

    async def wait(self) -> Report:
        """The current report, from any loop, by the round's deadline and a grace at most.

        The caller's cancellation stays the caller's: it never reaches the shared round.
        """
        if draining():  # drain: readiness fails at once, asking no datastore
            return Report(shutting_down=True)
        started = time.perf_counter()
        current = self.report()
        if not current.done():
            loop = asyncio.get_running_loop()
            answered = loop.create_future()
            current.add_done_callback(lambda _: _wake(loop, answered))
            try:
                async with asyncio.timeout(self.timeout + WAIT_GRACE):
                    await answered
            except TimeoutError:
                return self._timed_out(started)
        return current.result()

    def wait_in_thread(self) -> Report:
        """`wait()` for a thread with no event loop (a WSGI server's): a cached report costs
        no loop at all, a round in flight blocks this thread only."""
        if draining():
            return Report(shutting_down=True)
        started = time.perf_counter()
        try:
            return self.report().result(self.timeout + WAIT_GRACE)
        except TimeoutError:
            return self._timed_out(started)

    def close(self, timeout: float = 2.0) -> None:
        """Answer every waiter, end the round in flight, close the probes and stop the loop.

        Reports asked for afterwards say each datastore is shutting down, at once; safe to
        call more than once.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread, self._loop = self._loop, self._thread, None
            pending, self._round = self._round, _finished(self._unanswered("shutting down"))
        if pending is not None:
            _settle(pending, self._round.result())
        if loop is None:
            return
        closing = asyncio.run_coroutine_threadsafe(self._shut_down(), loop)
        # The loop stops once the shutdown is over, however late (a probe stuck in a blocking
        # call): stopped under it, its task would be destroyed pending, an error at exit.
        closing.add_done_callback(lambda _: loop.call_soon_threadsafe(loop.stop))
        with contextlib.suppress(TimeoutError):
            closing.result(timeout)
        if thread is not None:
            thread.join(timeout)

    def _start_afresh(self) -> None:
        """No round, loop or thread yet; also what a forked child starts from."""
        self._lock = threading.Lock()
        self._round = None
        self._finished_at = 0.0
        self._loop = None
        self._thread = None
        self._closed = False

    def _start_round(self) -> Future[Report]:
        if not self.probes:  # nothing to ask: finished at once, and cached like any round
            self._finished_at = time.monotonic()
            return _finished(Report())
        shared: Future[Report] = Future()
        asyncio.run_coroutine_threadsafe(self._run_round(shared), self._probe_loop())
        return shared

    def _probe_loop(self) -> asyncio.AbstractEventLoop:
        """This process's probe loop, started on first use (after any fork, never before)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=_serve, args=(self._loop,), name="health-probes", daemon=True
            )
            self._thread.start()
        return self._loop

    async def _run_round(self, shared: Future[Report]) -> None:
        deadline = asyncio.get_running_loop().time() + self.timeout
        checks = await asyncio.gather(*(self._check(probe, deadline) for probe in self.probes))
        self._log_transitions(checks)
        if self.metrics is not None:
            self.metrics.rounds.inc()
        self._finished_at = time.monotonic()
        _settle(shared, Report(tuple(checks)))

    async def _check(self, probe: Probe, deadline: float) -> Check:
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                await probe.ping()
        except Exception as error:
            reason = describe(error, self.timeout)
            # For metrics, the words without the seconds of a timeout: a label with few values.
            failure = "timed out" if isinstance(error, TimeoutError) else reason
            if reason is None:
                failure = "unexpected error"
                reason = f"{failure} (details in the debug log)"
                log.debug(
                    "probe failed",
                    datastore=probe.name,
                    target=probe.target,
                    error_type=type(error).__qualname__,
                    error=str(error),
                )
            check = Check(probe.name, False, _since(started), reason)
        else:
            check, failure = Check(probe.name, True, _since(started)), None
        if self.metrics is not None:
            self.metrics.probe_done(probe.name, check.duration_ms / 1000, failure)
        return check

    def _timed_out(self, started: float) -> Report:
        return self._unanswered(f"timed out after {self.timeout:g} s", started)

    def _unanswered(self, reason: str, started: float | None = None) -> Report:
        """Every datastore failed for `reason`: the answer when the round gave none."""
        duration_ms = 0.0 if started is None else _since(started)
        return Report(tuple(Check(p.name, False, duration_ms, reason) for p in self.probes))

    def _log_transitions(self, checks: Sequence[Check]) -> None:
        for check in checks:
            if check.ok != self._healthy[check.name]:
                self._healthy[check.name] = check.ok
                if check.ok:
                    log.info("datastore recovered", datastore=check.name)
                else:
                    log.warning("datastore unhealthy", datastore=check.name, reason=check.error)

    async def _shut_down(self) -> None:
        """What `asyncio.run` does before it closes its loop: nothing is left pending.

        A task destroyed pending at interpreter exit is logged while the codecs are gone.
        """
        others = asyncio.all_tasks() - {asyncio.current_task()}
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await asyncio.gather(*(probe.close() for probe in self.probes), return_exceptions=True)
        await asyncio.get_running_loop().shutdown_asyncgens()


_checkers: weakref.WeakSet[HealthChecker] = weakref.WeakSet()
_from_parents: list[object] = []


def _after_fork_in_child() -> None:
    """A forked child has the parent's rounds and loop but not the thread that ran them.

    They are kept, never touched: their sockets are the parent's. As `logging` does for
    its locks, every checker is reset through a weak set.
    """
    for checker in list(_checkers):
        _from_parents.append((checker._loop, checker._round))
        checker._start_afresh()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _finished(report: Report) -> Future[Report]:
    done: Future[Report] = Future()
    done.set_result(report)
    return done


def _settle(shared: Future[Report], report: Report) -> None:
    """The first answer wins: the round's, or the one `close()` gives."""
    with contextlib.suppress(InvalidStateError):
        shared.set_result(report)


def _wake(loop: asyncio.AbstractEventLoop, answered: asyncio.Future[None]) -> None:
    with contextlib.suppress(RuntimeError):  # the waiter's loop is closed: nobody waits
        loop.call_soon_threadsafe(_set_once, answered)


def _set_once(answered: asyncio.Future[None]) -> None:
    if not answered.done():  # a waiter cancelled meanwhile
        answered.set_result(None)


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_forever()
    finally:
        loop.close()


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
