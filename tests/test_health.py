"""Tests for application.health: rounds of real probes, one in flight, shared, cached, on time."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import asyncpg
import pytest
from prometheus_client import REGISTRY

from application.config import Config, Datastore
from application.health import WAIT_GRACE, HealthChecker, Report
from application.metrics import instruments
from application.probes import probe_for
from tests.conftest import proxy_to, runs_under, through
from tests.faultproxy import FaultProxy
from tests.pgcluster import free_port
from tests.servers import ROOT

TIMEOUT = 0.5
SLACK = 0.25  # what a deadline may overrun by: scheduling, not waiting
WAIT = 10  # how long a test waits for any round: a hung round fails, never hangs

MakeChecker = Callable[..., HealthChecker]


@pytest.fixture
def make_checker() -> Iterator[MakeChecker]:
    """Builds a HealthChecker of real probes for {name: url}; closes every one after the test."""
    made: list[HealthChecker] = []

    def make(urls: dict[str, str], timeout: float = TIMEOUT, cache_ttl: float = 0.0):
        probes = [probe_for(Datastore(name, url), timeout) for name, url in urls.items()]
        made.append(HealthChecker(probes, timeout, cache_ttl))
        return made[-1]

    yield make
    for checker in made:
        checker.close()


@pytest.fixture
def database(database_proxy: FaultProxy, database_url: str) -> dict[str, str]:
    """The real PostgreSQL, behind the fault proxy, as the datastore `database`."""
    return {"database": through(database_proxy, database_url)}


@pytest.fixture(params=["refused", "blackhole", "unresolvable", "wrong-password"])
def fault(request: pytest.FixtureRequest) -> tuple[str, set[str]]:
    """A database URL that fails one way, and the words the report may give for it."""
    timed_out = f"timed out after {TIMEOUT:g} s"
    if request.param == "refused":
        return f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", {"connection refused"}
    if request.param == "blackhole":
        proxy = request.getfixturevalue("database_proxy")
        proxy.set_mode("blackhole")
        return through(proxy, request.getfixturevalue("database_url")), {timed_out}
    if request.param == "unresolvable":  # some resolvers hang rather than fail
        return "postgresql://x@db.invalid/x", {"name not resolved", timed_out}
    wrong = request.getfixturevalue("pg_cluster").dsn(password="wrong")  # noqa: S106 - on purpose
    return wrong, {"authentication failed"}


def test_no_datastores_is_healthy_at_once(make_checker: MakeChecker):
    """With nothing to probe the report is ready before anyone waits, and healthy."""
    current = make_checker({}).report()
    assert current.done()
    assert current.result(WAIT).status == "Healthy"
    assert current.result(WAIT).http_status == 200


def test_no_datastores_is_a_round_cached_like_any(make_checker: MakeChecker):
    """The empty report is reused within cache_ttl, not made again for every request."""
    checker = make_checker({}, cache_ttl=60.0)
    assert checker.report() is checker.report()


def test_a_healthy_database_gives_the_seed_body(make_checker: MakeChecker, database):
    """A database that answers: 200 and exactly the seed's JSON."""
    report = make_checker(database).report().result(WAIT)
    assert report.http_status == 200
    assert report.body("c") == b'{"commit": "c", "status": "Healthy"}'


def test_a_failing_datastore_is_reported_by_the_deadline(make_checker: MakeChecker, fault):
    """Each kind of failure: a 500 within timeout + 0.25 s, naming datastore and failure."""
    url, reasons = fault
    with runs_under(TIMEOUT + SLACK):
        report = make_checker({"database": url}).report().result(WAIT)
    assert report.http_status == 500
    assert report.status in {f"database: {reason}" for reason in reasons}


@pytest.mark.parametrize("order", [("cache", "database"), ("database", "cache")])
def test_failures_are_joined_in_the_probes_order(
    make_checker: MakeChecker, database, database_proxy: FaultProxy, order
):
    """Every failed datastore is named, in the order of the probes, joined by '; '."""
    database_proxy.set_mode("blackhole")
    urls = {"cache": f"redis://127.0.0.1:{free_port()}", **database}
    reasons = {"cache": "connection refused", "database": "timed out after 0.5 s"}
    report = make_checker({name: urls[name] for name in order}).report().result(WAIT)
    assert report.status == "; ".join(f"{name}: {reasons[name]}" for name in order)


def test_the_verbose_body_details_each_check(make_checker: MakeChecker, database):
    """Verbose adds every datastore's status, duration and error."""
    urls = {**database, "cache": f"redis://127.0.0.1:{free_port()}"}
    document = json.loads(make_checker(urls).report().result(WAIT).body("c", verbose=True))
    checks = document["checks"]
    assert {name: (check["status"], check["error"]) for name, check in checks.items()} == {
        "database": ("Healthy", None),
        "cache": ("Unhealthy", "connection refused"),
    }
    assert all(isinstance(check["duration_ms"], float) for check in checks.values())
    # Milliseconds to a tenth, as the README shows them.
    assert all(round(check["duration_ms"], 1) == check["duration_ms"] for check in checks.values())


def test_datastores_are_probed_concurrently(make_checker: MakeChecker, database_url: str):
    """Three datastores 0.5 s slow each answer in about 0.5 s together, not 1.5 s."""
    upstream = (urlsplit(database_url).hostname or "127.0.0.1", urlsplit(database_url).port or 5432)
    with contextlib.ExitStack() as stack:
        proxies = [
            stack.enter_context(FaultProxy(upstream, mode="delay", delay=0.5)) for _ in "abc"
        ]
        urls = {f"db{n}": through(proxy, database_url) for n, proxy in enumerate(proxies)}
        checker = make_checker(urls, timeout=3.0)
        with runs_under(1.0):  # half a second either side: for a busy machine, and for 1.5 s
            report = checker.report().result(WAIT)
    assert report.healthy
    assert all(check.duration_ms >= 500 for check in report.checks)


def test_concurrent_callers_share_one_round(
    make_checker: MakeChecker, database, database_proxy: FaultProxy
):
    """200 threads asking at once all get the same Report, from one connection."""
    database_proxy.set_mode("delay", delay=0.3)
    checker = make_checker(database, timeout=2.0)
    everyone = threading.Barrier(200, timeout=WAIT)

    def ask() -> Report:
        everyone.wait()
        return checker.report().result(WAIT)

    with ThreadPoolExecutor(200) as pool:
        reports = list(pool.map(lambda _: ask(), range(200)))
    assert all(report is reports[0] for report in reports)
    assert reports[0].healthy
    assert database_proxy.accepted <= 1


# The two ways to wait for a report: on an event loop, and in a thread without one (WSGI).
WAITS: dict[str, Callable[[HealthChecker], Report]] = {
    "on a loop": lambda checker: asyncio.run(checker.wait()),
    "in a thread": HealthChecker.wait_in_thread,
}


@pytest.mark.parametrize("wait", WAITS.values(), ids=WAITS.keys())
def test_a_draining_process_is_shutting_down_without_asking_a_datastore(
    make_checker: MakeChecker, database, database_proxy: FaultProxy, monkeypatch, wait
):
    """From SIGTERM on, a wait is a 503 "shutting down" at once, and no probe connects."""
    monkeypatch.setattr("application.health.draining", lambda: True)
    report = wait(make_checker(database))
    assert (report.http_status, report.healthy) == (503, False)
    assert report.body("c") == b'{"commit": "c", "status": "shutting down"}'
    assert database_proxy.accepted == 0


def test_a_finished_round_is_reused_within_cache_ttl(make_checker: MakeChecker, database):
    """Right after a round, report() hands back the same finished future."""
    checker = make_checker(database, cache_ttl=1.0)
    first = checker.report()
    first.result(WAIT)
    assert checker.report() is first


def test_without_a_cache_each_report_after_a_round_is_a_new_round(
    make_checker: MakeChecker, database, database_proxy: FaultProxy
):
    """With cache_ttl=0 a finished round is never reused; its connection is."""
    checker = make_checker(database, cache_ttl=0)
    first = checker.report()
    first.result(WAIT)
    second = checker.report()
    assert second is not first
    assert second.result(WAIT).healthy
    assert database_proxy.accepted == 1


def test_a_recovered_datastore_is_healthy_after_one_more_round(
    make_checker: MakeChecker, database, database_proxy: FaultProxy
):
    """Once the database is back, the first round after the cached failure is healthy."""
    database_proxy.set_mode("refuse")
    checker = make_checker(database, cache_ttl=0.3)
    failed = checker.report().result(WAIT)
    assert failed.status == "database: connection refused"
    database_proxy.set_mode("pass")
    with runs_under(0.3 + TIMEOUT + SLACK):
        while (report := checker.report().result(WAIT)) is failed:  # until the cache expires
            time.sleep(0.01)
    assert report.healthy


def test_rounds_from_fresh_event_loops_reuse_one_connection(
    make_checker: MakeChecker, database, database_proxy: FaultProxy
):
    """Five loops in turn, as Flask gives async views under WSGI: one pool, one connection."""
    checker = make_checker(database)
    reports = [asyncio.run(asyncio.wait_for(checker.wait(), WAIT)) for _ in range(5)]
    assert all(report.healthy for report in reports)
    assert len({id(report) for report in reports}) == 5
    assert database_proxy.accepted == 1


def test_close_closes_the_connection_and_can_be_repeated(
    make_checker: MakeChecker, database, database_proxy: FaultProxy
):
    """close() ends the server connection; a second close() does nothing and raises nothing."""
    checker = make_checker(database)
    assert checker.report().result(WAIT).healthy
    assert database_proxy.open == 1
    checker.close()
    assert database_proxy.wait_open(0, timeout=2)
    checker.close()


def test_close_stops_and_closes_the_probe_loop(make_checker: MakeChecker, database):
    """Once close() returns the probe loop is closed, its thread over: nothing is leaked."""
    checker = make_checker(database)
    assert checker.report().result(WAIT).healthy
    loop = checker._loop
    checker.close()
    assert loop is not None
    assert loop.is_closed()


def logged(stream: io.StringIO, *events: str) -> list[dict[str, object]]:
    """The JSON lines of `stream` whose event is one of `events`, in order."""
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if line["event"] in events]


def test_a_datastore_is_logged_once_when_it_fails_and_once_when_it_recovers(
    make_checker: MakeChecker, database, database_proxy: FaultProxy, capture_logs
):
    """A warning with the reason as it starts failing, an info as it answers again: a line per
    change of state, none for a round that changes nothing (healthy at start included)."""
    stream = capture_logs(Config(log_format="json"))
    checker = make_checker(database)
    assert checker.report().result(WAIT).healthy
    database_proxy.set_mode("refuse")
    for _ in range(2):
        assert not checker.report().result(WAIT).healthy
    database_proxy.set_mode("pass")
    for _ in range(2):
        assert checker.report().result(WAIT).healthy
    changes = logged(stream, "datastore unhealthy", "datastore recovered")
    assert [(line["level"], line["event"], line["datastore"]) for line in changes] == [
        ("WARNING", "datastore unhealthy", "database"),
        ("INFO", "datastore recovered", "database"),
    ]
    assert changes[0]["reason"] == "connection refused"
    assert "reason" not in changes[1]


@pytest.mark.parametrize("scheme", ["tcp", "redis", "postgresql"])
def test_an_unknown_failure_is_generic_in_the_report_and_detailed_in_the_debug_log(
    make_checker: MakeChecker, capture_logs, scheme: str
):
    """A connect to the broadcast address (ENETUNREACH, which describe() has no words for), by
    each probe: the report says where to look, the DEBUG line names datastore, target, error."""
    stream = capture_logs(Config(log_format="json", log_level="DEBUG"))
    target = f"{scheme}://255.255.255.255:9"
    report = make_checker({"store": target}).report().result(WAIT)
    assert report.status == "store: unexpected error (details in the debug log)"
    [detail] = logged(stream, "probe failed")
    assert detail["level"] == "DEBUG"
    assert (detail["datastore"], detail["target"]) == ("store", target)
    assert detail["error_type"] == "OSError"
    assert "Network is unreachable" in str(detail["error"])


class BlockingProbe:
    """A datastore whose ping blocks the probe loop itself, so no deadline can end the round."""

    name = "stuck"
    target = "tcp://stuck.invalid:1"

    async def ping(self) -> None:
        time.sleep(3)  # noqa: ASYNC251 - the point: a round that overruns its deadline

    async def close(self) -> None:
        """Nothing to close."""


async def test_a_cancelled_waiter_leaves_the_round_to_the_others(
    make_checker: MakeChecker, database, database_proxy: FaultProxy
):
    """A waiter timed out by its caller after 0.1 s; the patient one still gets the report."""
    database_proxy.set_mode("delay", delay=0.3)
    checker = make_checker(database, timeout=2.0)
    impatient = asyncio.wait_for(checker.wait(), 0.1)
    results = await asyncio.gather(impatient, checker.wait(), return_exceptions=True)
    assert isinstance(results[0], TimeoutError)
    assert isinstance(results[1], Report)
    assert results[1].healthy


async def test_close_answers_the_waiters_of_the_round_in_flight(
    make_checker: MakeChecker, database, database_proxy: FaultProxy
):
    """close() during a round: a future holder and an awaiting caller both get a report, now."""
    database_proxy.set_mode("blackhole")
    checker = make_checker(database, timeout=5.0)
    pending = checker.report()
    waiter = asyncio.create_task(checker.wait())
    await asyncio.sleep(0)  # the waiter is now waiting on the round
    with runs_under(2.0):
        await asyncio.to_thread(checker.close)
        report = await asyncio.wait_for(waiter, WAIT)
    assert report.status == "database: shutting down"
    assert pending.result(0).status == "database: shutting down"


def test_reports_after_close_are_answered_at_once(
    make_checker: MakeChecker, database, database_proxy: FaultProxy
):
    """Once closed, report() is a finished future saying so, never a round that cannot end."""
    database_proxy.set_mode("blackhole")
    checker = make_checker(database, timeout=5.0)
    checker.report()
    checker.close()
    later = checker.report()
    assert later.done()
    assert later.result(0).status == "database: shutting down"
    assert later.result(0).checks[0].duration_ms == 0.0  # no datastore was asked
    assert asyncio.run(asyncio.wait_for(checker.wait(), WAIT)).http_status == 500


def test_close_opens_no_connection_afterwards(
    make_checker: MakeChecker, database, database_proxy: FaultProxy
):
    """A closed checker never starts a round again, so it never reconnects (cache or no cache)."""
    checker = make_checker(database, cache_ttl=0)
    assert checker.report().result(WAIT).healthy
    checker.close()
    for _ in range(3):
        checker.report().result(WAIT)
    assert database_proxy.accepted == 1
    assert database_proxy.wait_open(0, timeout=2)


@pytest.mark.parametrize("wait", WAITS.values(), ids=WAITS.keys())
def test_a_wait_answers_by_its_own_bound_when_the_round_overruns(wait):
    """A round stuck past its deadline: a wait answers by timeout + WAIT_GRACE, not after it."""
    checker = HealthChecker([BlockingProbe()], timeout=TIMEOUT, cache_ttl=0)
    try:
        with runs_under(TIMEOUT + WAIT_GRACE + SLACK):
            report = wait(checker)
        assert report.status == f"stuck: timed out after {TIMEOUT:g} s"
        # The datastore's duration is how long this caller waited for it (1 ms: clock rounding).
        assert report.checks[0].duration_ms >= 1000 * (TIMEOUT + WAIT_GRACE) - 1
    finally:
        checker.close(5)


class StuckClosingProbe:
    """A datastore whose close() blocks the probe loop itself: a driver stuck in a sync call."""

    name = "stuck"
    target = "tcp://stuck.invalid:1"

    async def ping(self) -> None:
        """Always there."""

    async def close(self) -> None:
        time.sleep(3)  # noqa: ASYNC251 - the point: a loop that cannot stop in time


def test_close_gives_up_on_a_probe_loop_that_does_not_stop():
    """close() waits its timeout for the probes to close, then as long for the loop's thread
    to end, and returns: a worker's shutdown never hangs on a stuck driver."""
    checker = HealthChecker([StuckClosingProbe()], timeout=1.0, cache_ttl=0)
    assert checker.wait_in_thread().healthy  # the probe loop runs
    [loop_thread] = [t for t in threading.enumerate() if t.name == "health-probes"]
    with runs_under(2.0):  # 2 x 0.5 s; the probe holds the loop 3 s
        checker.close(0.5)
    assert loop_thread.is_alive()
    loop_thread.join(10)  # what it left behind ends here, not in another test


def test_threads_waiting_without_a_loop_share_the_round_in_flight(
    make_checker: MakeChecker, database, database_proxy: FaultProxy
):
    """50 WSGI threads asking during one slow round: one connection, one report for all."""
    database_proxy.set_mode("delay", delay=0.3)
    checker = make_checker(database, timeout=2.0, cache_ttl=5.0)
    with ThreadPoolExecutor(50) as pool:
        reports = list(pool.map(lambda _: checker.wait_in_thread(), range(50)))
    assert all(report is reports[0] for report in reports)
    assert reports[0].healthy
    assert database_proxy.accepted == 1


def test_one_daemon_thread_runs_every_round(make_checker: MakeChecker, database):
    """Three rounds, one more thread: `health-probes`, a daemon, so that a checker nobody
    closed never keeps the process from exiting."""

    def probe_threads() -> list[threading.Thread]:
        return [thread for thread in threading.enumerate() if thread.name == "health-probes"]

    before = probe_threads()
    checker = make_checker(database)
    for _ in range(3):
        assert checker.report().result(WAIT).healthy
    [thread] = [thread for thread in probe_threads() if thread not in before]
    assert thread.daemon


def test_a_waiter_whose_loop_has_closed_troubles_nobody_when_the_round_ends(
    make_checker: MakeChecker, database, database_proxy: FaultProxy, capture_logs
):
    """A caller gave up and its event loop is gone before the round ends: the round still
    ends for everyone else, and waking the gone caller logs no error."""
    stream = capture_logs(Config(log_format="json"))
    database_proxy.set_mode("delay", delay=0.3)
    checker = make_checker(database, timeout=2.0)
    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(checker.wait(), 0.05))
    in_flight = checker.report()
    woken = threading.Event()
    in_flight.add_done_callback(lambda _: woken.set())  # runs after the gone caller's callback
    assert woken.wait(WAIT)
    assert in_flight.result(0).healthy
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line for line in lines if line["level"] in {"ERROR", "CRITICAL"}] == []


def test_a_probe_is_timed_in_seconds_as_the_report_times_it_in_milliseconds(database):
    """The probe histogram observes the very duration the report shows, in seconds."""
    labels = {"datastore": "database"}
    before = REGISTRY.get_sample_value("health_probe_duration_seconds_sum", labels) or 0.0
    probes = [probe_for(Datastore("database", database["database"]), TIMEOUT)]
    checker = HealthChecker(probes, TIMEOUT, 0, metrics=instruments())
    try:
        report = checker.report().result(WAIT)
    finally:
        checker.close()
    observed = REGISTRY.get_sample_value("health_probe_duration_seconds_sum", labels)
    assert observed is not None
    assert observed - before == pytest.approx(report.checks[0].duration_ms / 1000)


def in_a_forked_child(check: Callable[[], str]) -> str:
    """What `check` returns when run in a child forked from here (its error, if it raised)."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            answer = check()
        except BaseException as error:
            answer = f"{type(error).__name__}: {error}"
        os.write(write_end, answer.encode())
        os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            return pipe.read().decode()
    finally:
        os.waitpid(child, 0)


FORK_IN_THREADS = "ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning"


@pytest.mark.filterwarnings(FORK_IN_THREADS)
def test_a_child_forked_during_a_round_runs_its_own(
    make_checker: MakeChecker, database, database_proxy: FaultProxy
):
    """The parent's round is in flight at fork: the child's report() is its own, and answers."""
    database_proxy.set_mode("delay", delay=0.5)
    checker = make_checker(database, timeout=3.0)
    in_flight = checker.report()

    def child() -> str:
        mine = checker.report()
        return f"{mine is not in_flight} {mine.result(5).status}"

    assert in_a_forked_child(child) == "True Healthy"
    assert in_flight.result(WAIT).healthy


@pytest.mark.filterwarnings(FORK_IN_THREADS)
def test_a_child_forked_after_a_round_probes_on_its_own_connection(
    make_checker: MakeChecker, database, database_proxy: FaultProxy
):
    """The child neither reuses the parent's cached round nor its pooled connection."""
    checker = make_checker(database, cache_ttl=60)
    finished = checker.report()
    assert finished.result(WAIT).healthy

    def child() -> str:
        mine = checker.report()
        return f"{mine is not finished} {mine.result(5).status}"

    assert in_a_forked_child(child) == "True Healthy"
    assert database_proxy.accepted == 2
    assert database_proxy.wait_open(1, timeout=2)
    assert database_proxy.open == 1  # the parent's connection is still the parent's


EXIT_SCRIPTS = {
    "closed-mid-round": (
        "import application\n"
        "checker = application.app.extensions['health']\n"
        "pending = checker.report()\n"
        "checker.close()\n"
        "print(pending.result(5).status)\n"
    ),
    "a-driver-stuck-in-close": (  # close() gives up; the loop finishes the shutdown later
        "import time\n"
        "from application.health import HealthChecker\n"
        "class Stuck:\n"
        "    name, target = 'database', 'tcp://stuck.invalid:1'\n"
        "    async def ping(self): pass\n"
        "    async def close(self): time.sleep(1)\n"
        "checker = HealthChecker([Stuck()], timeout=1.0, cache_ttl=0)\n"
        "checker.wait_in_thread()\n"
        "checker.close(0.2)\n"
        "time.sleep(2)\n"
        "print(checker.report().result(5).status)\n"
    ),
    "exit-mid-round": (  # the atexit hook closes it
        "import application\n"
        "application.app.extensions['health'].report()\n"
        "print('database: shutting down')\n"
    ),
}


@pytest.mark.parametrize("script", list(EXIT_SCRIPTS))
def test_the_interpreter_exits_cleanly_after_a_round_is_closed(
    script: str, database, database_proxy: FaultProxy, tmp_path
):
    """No "Logging error", no task destroyed pending, nothing on stderr, at exit after close()."""
    database_proxy.set_mode("blackhole")
    environ = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database["database"],
        "HEALTH_TIMEOUT": "5",
        "LOG_LEVEL": "DEBUG",
        "COMMIT_SHA": "c",
    }
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPTS[script]],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[-1] == "database: shutting down"
    assert "Task was destroyed" not in done.stdout


def test_the_round_deadline_ends_a_redis_probe_that_has_none(make_checker: MakeChecker, redis_url):
    """A Redis behind a blackhole through HealthChecker(timeout=0.5): timed out in < 0.75 s."""
    with proxy_to(redis_url) as proxy:
        proxy.set_mode("blackhole")
        checker = make_checker({"cache": f"redis://127.0.0.1:{proxy.port}"}, timeout=0.5)
        with runs_under(0.75):
            report = checker.report().result(WAIT)
    assert report.status == "cache: timed out after 0.5 s"


def test_the_round_deadline_ends_a_query_already_running(make_checker: MakeChecker, pg_cluster):
    """A server hung mid-session (its backend stopped): past connect, only the round ends it."""
    checker = make_checker({"database": pg_cluster.dsn()}, timeout=0.5)
    assert checker.report().result(WAIT).healthy
    backend = asyncio.run(_probe_backend(pg_cluster))
    os.kill(backend, signal.SIGSTOP)
    try:
        with runs_under(0.75):
            report = checker.report().result(WAIT)
    finally:
        os.kill(backend, signal.SIGCONT)
    assert report.status == "database: timed out after 0.5 s"


async def _probe_backend(cluster) -> int:
    """The server pid of the probe's pooled connection, found by its application_name."""
    connection = await asyncpg.connect(cluster.superuser_dsn())
    try:
        pids = await connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'health-probe'"
        )
    finally:
        await connection.close()
    assert len(pids) == 1
    return int(pids[0]["pid"])
