"""A TCP proxy that makes a real datastore slow, refused, hung or cut, on demand, for tests."""

from __future__ import annotations

import asyncio
import socket
import threading
from types import TracebackType
from typing import Any, Literal, Self

Mode = Literal["pass", "delay", "refuse", "blackhole"]
MODES: frozenset[str] = frozenset({"pass", "delay", "refuse", "blackhole"})

_CALL_TIMEOUT = 10.0


class FaultProxy:
    """A proxy on 127.0.0.1:<port> in front of `upstream`, with faults switched at run time.

    It runs its own event loop in its own thread, so sync tests and async tests on any
    loop can use it alike, and a test's loop being blocked never stalls the proxy.

    Modes:
      "pass"      forward bytes both ways;
      "delay"     wait `delay` seconds after accepting before connecting upstream;
      "refuse"    nothing listens on the port (connect gets ECONNREFUSED);
      "blackhole" accept, never answer, never connect upstream (a hung server).
    Switching to any mode other than "pass" also cuts every existing connection.
    Either side's EOF closes both sides: no half-closed connections.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        mode: Mode = "pass",
        delay: float = 0.0,
    ) -> None:
        _check_mode(mode, delay)
        self.upstream = upstream
        self.host = host
        self.port = 0
        self._mode: Mode = mode
        self._delay = delay
        self._cond = threading.Condition()
        self._accepted = 0
        self._open = 0
        self._links: set[_Link] = set()
        self._listener: socket.socket | None = None
        self._adopting: set[asyncio.Task[None]] = set()
        self._stopped = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"FaultProxy{upstream}", daemon=True)
        self._thread.start()
        try:
            self._call(self._listen)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_CALL_TIMEOUT)
            raise
        if mode == "refuse":
            self._call(self._apply)

    # -- public API -------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        """The current mode."""
        with self._cond:
            return self._mode

    @property
    def accepted(self) -> int:
        """Connections accepted since start, so a test can tell a client really tried."""
        with self._cond:
            return self._accepted

    @property
    def open(self) -> int:
        """Client-side connections open right now, so a test can see pooling and leaks."""
        with self._cond:
            return self._open

    def set_mode(self, mode: Mode, delay: float = 0.0) -> None:
        """Switch mode; returns once the listener and the cut are in effect."""
        _check_mode(mode, delay)
        with self._cond:
            self._mode = mode
            self._delay = delay
        self._call(self._apply)

    def cut(self) -> None:
        """Close every proxied connection now, as a network cut or a server crash would."""
        self._call(self._cut)

    def wait_open(self, n: int, timeout: float) -> bool:
        """Block until at most `n` client connections are open; False on timeout.

        From an async test prefer `wait_open_async`: blocking the test's own loop would
        stop the very client whose close is awaited.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._open <= n, timeout)

    def wait_accepted(self, n: int, timeout: float) -> bool:
        """Block until at least `n` connections were accepted; False on timeout.

        A client's connect() returns once the kernel has the connection, a moment before
        the proxy counts it, so wait for this before asserting on `open`.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._accepted >= n, timeout)

    async def wait_open_async(self, n: int, timeout: float) -> bool:  # noqa: ASYNC109
        """`wait_open` without blocking the caller's event loop; False on timeout, no raise."""
        return await asyncio.to_thread(self.wait_open, n, timeout)

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop and join the thread."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            try:
                future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
                future.result(_CALL_TIMEOUT)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(_CALL_TIMEOUT)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<FaultProxy {self.host}:{self.port} -> {self.upstream} mode={self.mode}>"

    # -- proxy thread -----------------------------------------------------------------

    def _run(self) -> None:
        """Thread body: run the private loop until stopped, then close it cleanly."""
        loop = self._loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(_quiet_exception_handler)
        try:
            loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _call(self, fn: Any) -> None:
        """Run coroutine function `fn` on the proxy loop and wait for it."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("FaultProxy methods must not be called from the proxy thread")
        if self._stopped:
            raise RuntimeError("FaultProxy is stopped")
        asyncio.run_coroutine_threadsafe(fn(), self._loop).result(_CALL_TIMEOUT)

    async def _apply(self) -> None:
        """Make the listener and the existing connections match the current mode."""
        with self._cond:
            mode = self._mode
        if mode == "refuse":
            await self._unlisten()
        else:
            await self._listen()
        if mode != "pass":
            await self._cut()

    async def _listen(self) -> None:
        """Listen on the same port every time, so clients keep the address they were given."""
        if self._listener is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._accept_ready, sock)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._listener = sock

    async def _unlisten(self) -> None:
        """Close the listening socket so connects are refused by the kernel.

        Accepting by hand rather than with loop.create_server: closing an asyncio Server
        while an accept is in flight leaks that accepted socket on Python 3.11.
        """
        sock, self._listener = self._listener, None
        if sock is not None:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        await asyncio.gather(*self._adopting, return_exceptions=True)

    def _accept_ready(self, sock: socket.socket) -> None:
        """Accept every queued connection and hand each to a transport."""
        for _ in range(128):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError:
                return  # e.g. EMFILE: the connection stays queued until the next readiness
            conn.setblocking(False)
            task = self._loop.create_task(self._adopt(conn))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    async def _adopt(self, conn: socket.socket) -> None:
        """Wrap an accepted socket in a transport; never let it leak on the way."""
        try:
            await self._loop.connect_accepted_socket(lambda: _ClientSide(self), conn)
        except OSError:
            conn.close()
        except asyncio.CancelledError:
            conn.close()
            raise

    async def _cut(self) -> None:
        """Abort every connection and wait until their sockets are gone."""
        await asyncio.gather(*self._adopting, return_exceptions=True)
        links = list(self._links)
        for link in links:
            link.close(abort=True)
        tasks = [link.task for link in links if link.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(500):  # connection_lost runs on the next loop turns
            if not any(link.alive() for link in links):
                break
            await asyncio.sleep(0.002)

    async def _shutdown(self) -> None:
        await self._unlisten()
        await self._cut()

    def _accept(self, link: _Link) -> tuple[Mode, float]:
        with self._cond:
            self._accepted += 1
            self._open += 1
            self._links.add(link)
            self._cond.notify_all()
            return self._mode, self._delay

    def _client_closed(self, link: _Link) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def _forget(self, link: _Link) -> None:
        self._links.discard(link)


class _Link:
    """One client connection and, once connected, its upstream connection."""

    def __init__(self, proxy: FaultProxy, client: asyncio.Transport) -> None:
        self.proxy = proxy
        self.client: asyncio.Transport | None = client
        self.upstream: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.pending: list[bytes] = []
        self.closed = False

    def start(self, mode: Mode, delay: float) -> None:
        if mode == "blackhole":
            return  # read and drop whatever comes; EOF from the client closes the link
        self.task = asyncio.get_running_loop().create_task(self._connect(delay))

    async def _connect(self, delay: float) -> None:
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            host, port = self.proxy.upstream
            await asyncio.get_running_loop().create_connection(
                lambda: _UpstreamSide(self), host, port
            )
        except OSError:
            self.close()  # upstream down: the client sees its connection closed

    def upstream_made(self, transport: asyncio.Transport) -> None:
        if self.closed:
            transport.abort()
            return
        self.upstream = transport
        for data in self.pending:
            transport.write(data)
        self.pending.clear()

    def from_client(self, data: bytes) -> None:
        if self.closed or self.task is None:
            return  # blackhole
        if self.upstream is None:
            self.pending.append(data)
        elif not self.upstream.is_closing():
            self.upstream.write(data)

    def from_upstream(self, data: bytes) -> None:
        if not self.closed and self.client is not None and not self.client.is_closing():
            self.client.write(data)

    def close(self, abort: bool = False) -> None:
        """Close both sides; `abort` drops unsent data, as a cut would."""
        if self.closed:
            return
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
        for transport in (self.client, self.upstream):
            if transport is not None:
                if abort:
                    transport.abort()
                else:
                    transport.close()

    def client_lost(self) -> None:
        self.client = None
        self.close()
        self.proxy._client_closed(self)
        self._maybe_forget()

    def upstream_lost(self) -> None:
        self.upstream = None
        self.close()
        self._maybe_forget()

    def alive(self) -> bool:
        return self.client is not None or self.upstream is not None

    def _maybe_forget(self) -> None:
        if not self.alive():
            self.proxy._forget(self)


class _ClientSide(asyncio.Protocol):
    """The accepted connection from the client under test."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.link: _Link | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.link = _Link(self.proxy, transport)
        mode, delay = self.proxy._accept(self.link)
        self.link.start(mode, delay)

    def data_received(self, data: bytes) -> None:
        if self.link is not None:
            self.link.from_client(data)

    def eof_received(self) -> bool:
        if self.link is not None:
            self.link.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link is not None:
            self.link.client_lost()

    def pause_writing(self) -> None:
        if self.link is not None and self.link.upstream is not None:
            self.link.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.link is not None and self.link.upstream is not None:
            self.link.upstream.resume_reading()


class _UpstreamSide(asyncio.Protocol):
    """The proxy's own connection to the real datastore."""

    def __init__(self, link: _Link) -> None:
        self.link = link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.link.upstream_made(transport)

    def data_received(self, data: bytes) -> None:
        self.link.from_upstream(data)

    def eof_received(self) -> bool:
        self.link.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link.upstream is not None:
            self.link.upstream_lost()

    def pause_writing(self) -> None:
        if self.link.client is not None:
            self.link.client.pause_reading()

    def resume_writing(self) -> None:
        if self.link.client is not None:
            self.link.client.resume_reading()


def _check_mode(mode: str, delay: float) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown FaultProxy mode {mode!r}; expected one of {sorted(MODES)}")
    if delay < 0:
        raise ValueError("delay must be >= 0")


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Peers resetting connections is what this proxy is for; report anything else."""
    if isinstance(context.get("exception"), ConnectionError | TimeoutError):
        return
    loop.default_exception_handler(context)
