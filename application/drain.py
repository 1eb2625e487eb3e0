"""Draining on SIGTERM: readiness fails at once, serving goes on for a while, then it stops.

A server that stops listening the moment SIGTERM arrives refuses the requests its load
balancer keeps sending until the balancer's next failed checks; one that closes idle keep-alive
connections without warning races the client's next request on them. Here readiness answers
"shutting down" and the process keeps serving for `shutdown_delay` seconds, every response
asking its client to reconnect (`Connection: close`); then the server stops listening and
in-flight requests get `graceful_timeout` seconds. SIGINT (Ctrl-C) stops at once, as the
servers do by themselves.

The state is one byte of shared memory made at import. gunicorn's master imports this module
(gunicorn.conf.py imports the app), handles SIGTERM, and its forked workers read the same byte.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import structlog

from .config import Config

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]

# After the graceful timeout has cut the last requests, this long to close the probe pools
# and exit before the process ends itself (inside Kubernetes' 30 s with the default settings).
EXIT_GRACE = 3.0

log = structlog.get_logger()

_state = mmap.mmap(-1, 1)  # MAP_SHARED | MAP_ANONYMOUS: shared with processes forked later
_in_flight: set[asyncio.Task[Any]] = set()


def draining() -> bool:
    """True from SIGTERM on: readiness answers 503 and responses close their connections."""
    return _state[0] == 1


def _start(config: Config, server: str) -> None:
    _state[0] = 1
    log.info(
        "SIGTERM: draining; readiness fails, serving goes on until the listener closes",
        server=server,
        shutdown_delay=config.shutdown_delay,
        graceful_timeout=config.graceful_timeout,
    )


# -- hypercorn (and any ASGI server): the app's lifespan runs on the serving loop -------------


def on_lifespan_startup(config: Config) -> None:
    """Take over SIGTERM from the server, from the ASGI lifespan startup on its serving loop.

    hypercorn (workers = 0) has installed its SIGINT and SIGTERM handlers by then, both
    "stop now". SIGTERM is replaced; after the delay this raises SIGINT, which hypercorn still
    handles itself: it closes the listener and waits for in-flight requests.
    """
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, _on_sigterm, loop, config)


def track(scope: dict[str, Any], send: Send) -> Send:
    """Count this HTTP request in flight until it ends, and return its `send`, which adds
    `Connection: close` to a response started while draining (HTTP/1 only: HTTP/2 forbids it).

    Called from the request's own task: past the graceful timeout that task is cancelled, so
    the server can close the connection and exit. hypercorn on Python 3.12+ would otherwise
    wait for it without limit (upstream #308: `Server.wait_closed()` waits for every
    connection there, before hypercorn's own `graceful_timeout` applies).
    """
    task = asyncio.current_task()
    if task is not None:
        _in_flight.add(task)
        task.add_done_callback(_in_flight.discard)
    if scope.get("http_version") not in ("1.0", "1.1"):
        return send

    async def send_closing(message: Message) -> None:
        if message["type"] == "http.response.start" and draining():
            headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return send_closing


def _on_sigterm(loop: asyncio.AbstractEventLoop, config: Config) -> None:
    if draining():
        return  # a second SIGTERM changes nothing: the drain is already on its way
    _start(config, "hypercorn")
    stop_at = config.shutdown_delay
    cut_at = stop_at + config.graceful_timeout
    loop.call_later(stop_at, signal.raise_signal, signal.SIGINT)
    loop.call_later(cut_at, _cut_in_flight)
    threading.Thread(target=_exit_after, args=(cut_at + EXIT_GRACE,), daemon=True).start()


def _cut_in_flight() -> None:
    if _in_flight:
        log.warning("graceful timeout: cutting requests still in flight", requests=len(_in_flight))
    for task in list(_in_flight):
        task.cancel()


def _exit_after(seconds: float) -> None:
    """The last resort: a sync view stuck in a thread would keep the interpreter from exiting
    (it joins every thread pool's threads at exit) past the platform's SIGKILL."""
    time.sleep(seconds)
    log.warning("exiting with threads still busy past the graceful timeout")
    sys.stdout.flush()
    os._exit(0)


# -- gunicorn: the master handles SIGTERM, the workers serve -----------------------------------


def hold_gunicorn_stop(arbiter: Any, config: Config) -> None:
    """Delay what gunicorn's master does on SIGTERM (close the listeners, stop the workers
    gracefully) by the drain delay; called from gunicorn's `when_ready(arbiter)` hook.

    SIGTERM marks the drain; a timer sends SIGTERM again after the delay, and that one goes to
    gunicorn's own handler. SIGINT and SIGQUIT keep gunicorn's immediate stop.
    """
    stop = arbiter.handle_term
    delay_over = threading.Event()

    def handle_term() -> None:
        if delay_over.is_set():
            stop()  # raises StopIteration: gunicorn's graceful stop
        elif not draining():
            _start(config, "gunicorn")
            timer = threading.Timer(config.shutdown_delay, _send_sigterm, args=(delay_over,))
            timer.daemon = True
            timer.start()

    arbiter.handle_term = handle_term


def _send_sigterm(delay_over: threading.Event) -> None:
    delay_over.set()
    os.kill(os.getpid(), signal.SIGTERM)


def close_gunicorn_listener(worker: Any) -> None:
    """gunicorn's `post_worker_init(worker)` hook: a gthread worker told to stop closes its
    copy of the listening socket as soon as it stops accepting.

    gunicorn 27's gthread worker keeps it open until it exits, so once the master has closed
    its own, connections still queue in the kernel for up to the graceful timeout and are then
    reset; closed, they are refused at once and a client can go elsewhere.
    """
    stop_accepting = getattr(worker, "set_accept_enabled", None)
    if stop_accepting is None:  # other worker classes close their listeners when they stop
        return

    def set_accept_enabled(enabled: bool) -> None:
        stop_accepting(enabled)
        if not enabled and not worker.alive:
            for listener in worker.sockets:
                listener.close()

    worker.set_accept_enabled = set_accept_enabled


def gthread_worker() -> type:
    """gunicorn's gthread worker, which SIGINT and SIGQUIT stop at once every time:
    gunicorn.conf.py's `worker_class` (gunicorn calls a function given there for the class).

    gunicorn 27's shuts its thread pool down inside the signal handler. A signal that lands
    while the main thread is inside that pool's `submit` (which holds the pool's lock while it
    starts a thread: a worker's first requests) left the handler waiting on that lock for ever
    (CPython #121649), and the master killed the worker only after GRACEFUL_TIMEOUT: Ctrl-C
    took 15 s instead of 1, one time in a few under load. Here the handler only stops the
    worker; at exit Python stops the pool's threads as it stops every pool's.

    Made when gunicorn asks: importing gunicorn's workers loads setproctitle, which rewrites
    the command line of the process, and hypercorn's processes import this module too.
    """
    from gunicorn.workers.base import Worker
    from gunicorn.workers.gthread import ThreadWorker

    class GthreadWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn has no types
        def handle_quit(self, sig: int, frame: FrameType | None) -> None:
            Worker.handle_quit(self, sig, frame)  # gunicorn's own, less the pool's shutdown

    return GthreadWorker


def close_gunicorn_connection(worker: Any, request: Any) -> None:
    """gunicorn's `pre_request(worker, req)` hook: while draining, gunicorn itself answers
    with `Connection: close` and closes (it drops a `Connection` header set by an app)."""
    if draining():
        request.force_close()
