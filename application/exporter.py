"""/metrics on a port of its own (METRICS_PORT), from a thread of the process that owns the numbers.

Where one process supervises the serving ones (gunicorn's master, scripts/serve's launcher), it
serves the sum of their multiprocess files; a single hypercorn serves its own registry. Not on
the app's port: a Service, an Ingress or a load balancer publishes that one, so the numbers
stay inside the cluster, and a scrape never queues behind the app's requests or waits on a
datastore (it reads memory or files, nothing else). prometheus_client's own pieces serve it:
`make_wsgi_app` in its `ThreadingWSGIServer`, inside the Envelope that gives every request
its access line; a scrape is not counted in the request metrics.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, PlatformCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from .config import Config
from .web import Envelope, Environ, StartResponse, WsgiApp

log = structlog.get_logger()

# Held while a scrape is answered, and by every fork of this process until it is done. A
# gunicorn master forks its workers while this thread may be writing a scrape's access line: a
# worker forked then would inherit structlog's write lock held, and hang on its first line.
_answering = threading.Lock()
os.register_at_fork(
    before=_answering.acquire,
    after_in_parent=_answering.release,
    after_in_child=_answering.release,
)


class Exporter:
    """The listener, serving from a daemon thread until `stop()`."""

    def __init__(self, config: Config, multiprocess_dir: str | None) -> None:
        """Listen on METRICS_PORT (raises OSError when it cannot) and serve.

        `multiprocess_dir`: the serving processes' files to add up; None for this process's own
        registry (the default one, with prometheus_client's process and Python collectors).
        """
        registry = REGISTRY if multiprocess_dir is None else gathering(multiprocess_dir)
        app = Envelope(make_wsgi_app(registry), config, None, quiet=config.log_quiet_health)
        self.port = config.metrics_port
        self._server = make_server(
            "0.0.0.0", self.port, _one_at_a_time(app), _Server, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start(config: Config, multiprocess_dir: str | None) -> Exporter:
    """The listener, or the process stopped with one line saying why (the port is taken)."""
    try:
        return Exporter(config, multiprocess_dir)
    except OSError as error:
        log.critical(cannot_listen(config, error))
        raise SystemExit(1) from None


def cannot_listen(config: Config, error: OSError) -> str:
    return f"metrics: cannot listen on METRICS_PORT {config.metrics_port}: {error.strerror}"


def gathering(directory: str) -> CollectorRegistry:
    """A scrape of several processes, as prometheus_client's multiprocess docs advise: a
    registry of its own (nothing else registers in it) adding up the processes' files.

    Its process and Python collectors would describe this process, not the ones serving, so
    they are left out; `python_info` is the same for every process and stays.
    """
    registry = CollectorRegistry()
    registry.register(_Files(directory))
    PlatformCollector(registry=registry)
    return registry


class _Files:
    """prometheus_client's MultiProcessCollector, but for the files a process has only just
    created: a new file is empty until its process sizes it, and reading one fails the whole
    scrape (client_python #1199, open; a process killed in that moment leaves it for good).
    An empty file has recorded nothing, so it is left out."""

    def __init__(self, directory: str) -> None:
        self._directory = Path(directory)

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in self._directory.glob("*.db"):
            with contextlib.suppress(FileNotFoundError):  # a dead process's live gauges
                if path.stat().st_size:
                    files.append(str(path))
        return MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-any-return]


def make_multiprocess_dir() -> str:
    """A fresh directory for the serving processes' files (under TMPDIR)."""
    return tempfile.mkdtemp(prefix="prometheus-")


def process_exited(pid: int, directory: str) -> None:
    """A serving process ended: its live gauges (in flight, datastore up) no longer count."""
    mark_process_dead(pid, directory)


def remove_multiprocess_dir(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _one_at_a_time(app: WsgiApp) -> WsgiApp:
    """The whole answer, access line included, under `_answering`; the body is in memory."""

    def answer(environ: Environ, start_response: StartResponse) -> list[bytes]:
        with _answering:
            body = app(environ, start_response)
            try:
                return list(body)
            finally:
                if close := getattr(body, "close", None):
                    close()

    return answer


class _Server(ThreadingWSGIServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """What the handler could not deal with, in the log rather than on stderr."""
        log.exception("metrics listener: a connection failed", client=client_address[0])


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """The Envelope writes the access line."""
