"""`scripts/serve`: hypercorn serving `asgi_app` in WEB_CONCURRENCY processes on one socket.

With one process (the default) this process becomes hypercorn itself. With more, it opens one
listening socket for each, on the same port (SO_REUSEPORT), starts that many ordinary
single-process hypercorns on them (`--bind fd://N`, `workers = 0` from hypercorn.toml),
forwards SIGTERM and SIGINT to them, and exits with the first failure among them, stopping the
others. Each one drains on SIGTERM as a single hypercorn does (application/drain.py) and keeps
its own probe pools.

With several processes and metrics on, the launcher serves /metrics (METRICS_PORT): it makes a
directory for prometheus_client's multiprocess files, passes it to every hypercorn
(PROMETHEUS_MULTIPROC_DIR, read by the client when first imported), serves their sum, marks
a process that ended as dead, and removes the directory when it exits.

Not hypercorn's own `workers = N`: its supervisor exits 0 when a worker fails at import
(upstream #269), and on SIGTERM it stops every worker's listener at once, with no drain.

Importing `application` first checks the settings here: a bad one stops start-up with its one
line and exit status 1 before any hypercorn starts.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from types import FrameType

import structlog

import application
from application import exporter
from application.config import Config

FORWARDED = (signal.SIGTERM, signal.SIGINT)
log = structlog.get_logger()


def main(arguments: list[str]) -> int:
    """Serve; `arguments` go to every hypercorn before the app's name."""
    settings = application.config  # the settings the package read at import
    hypercorn = [sys.executable, "-m", "hypercorn", "--config", "hypercorn.toml", *arguments]
    if settings.web_concurrency == 1:
        sys.stdout.flush()
        bind = f"0.0.0.0:{settings.port}"
        os.execv(sys.executable, [*hypercorn, "--bind", bind, "application:asgi_app"])  # noqa: S606
    directory = exporter.make_multiprocess_dir() if settings.metrics_port else None
    metrics = None
    try:
        if directory is not None:
            metrics = exporter.start(settings, directory)
        return _supervise(settings, hypercorn, directory)
    finally:
        if metrics is not None:
            metrics.stop()
        if directory is not None:
            exporter.remove_multiprocess_dir(directory)


def _supervise(settings: Config, hypercorn: list[str], directory: str | None) -> int:
    """Start the hypercorns and wait for them all; the first failure's exit status."""
    environ = dict(os.environ)
    if directory is not None:
        environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    children: set[int] = set()
    stopped_by = 0  # the signal passed on to the children, once there is one

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopped_by
        stopped_by = signum
        for pid in children:
            os.kill(pid, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)  # until every child is known
    try:
        for _ in range(settings.web_concurrency):
            # A socket of its own, in one SO_REUSEPORT group: the kernel spreads connections
            # evenly. On one shared socket the first hypercorn to wake accepts every queued
            # connection at once (asyncio accepts up to `backlog` a time), and a burst of
            # keep-alive connections all land on one process.
            with socket.create_server(("0.0.0.0", settings.port), reuse_port=True) as listener:
                listener.set_inheritable(True)
                bind = f"fd://{listener.fileno()}"
                command = [*hypercorn, "--bind", bind, "application:asgi_app"]
                children.add(os.posix_spawn(sys.executable, command, environ, setsigmask=()))
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    log.info("serving", processes=settings.web_concurrency, pids=sorted(children))

    status = 0
    while children:
        pid, wait_status = os.wait()
        children.discard(pid)
        if directory is not None:
            exporter.process_exited(pid, directory)
        code = os.waitstatus_to_exitcode(wait_status)
        if code in (0, -stopped_by) or status:  # -signal: stopped by it before its handlers
            continue
        status = code if code > 0 else 1
        if not stopped_by:
            log.error("a serving process failed; stopping the others", pid=pid, code=code)
            forward(signal.SIGTERM, None)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
