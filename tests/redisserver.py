"""Real redis-server processes for the tests (passwords, renamed commands, TLS, bad states),
and a TCP server that answers a line, resets or hangs up, for what is not Redis at all."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.pgcluster import free_port


@dataclass
class RedisServer:
    """A running redis-server: its port (the TLS port when it serves TLS) and process."""

    port: int
    process: subprocess.Popen[str]

    def ask(self, *words: str, timeout: float = 5) -> bytes:
        """One command on a fresh plain connection, and the first line of its reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout) as sock:
            sock.sendall(command(*words))
            return sock.makefile("rb").readline()


def command(*words: str) -> bytes:
    """A command as RESP, as redis-cli sends it."""
    encoded = [word.encode() for word in words]
    return b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in encoded)


@contextlib.contextmanager
def redis_server(
    directory: Path, *options: str, ready: str = "Ready to accept connections"
) -> Iterator[RedisServer]:
    """redis-server with `options` on a free port, once it printed `ready`; killed after."""
    port = free_port()
    tls = "--tls-cert-file" in options
    listen = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
    argv = ["redis-server", *listen, "--bind", "127.0.0.1", "--dir", str(directory)]
    argv += ["--save", "", "--appendonly", "no", *options]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            for line in process.stdout:  # EOF (the server died) ends the loop too
                if ready in line:
                    break
            assert process.poll() is None, f"redis-server {' '.join(options)} exited at start"
            yield RedisServer(port, process)
        finally:
            process.kill()


@dataclass(frozen=True)
class TlsFiles:
    """A private CA and a server certificate for 127.0.0.1 and localhost, as PEM files."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    def server_options(self, *, auth_clients: bool = False) -> tuple[str, ...]:
        return (
            *("--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)),
            *("--tls-ca-cert-file", str(self.ca)),
            *("--tls-auth-clients", "yes" if auth_clients else "no"),
        )


def tls_files(directory: Path, *names: str) -> TlsFiles:
    """A fresh CA, a server certificate for `names` and a client certificate, in `directory`."""
    ca = trustme.CA()
    server = ca.issue_cert(*names)
    client = ca.issue_cert("client@example.com")
    files = TlsFiles(*(directory / name for name in ("ca", "cert", "key", "ccert", "ckey")))
    ca.cert_pem.write_to_path(str(files.ca))
    server.cert_chain_pems[0].write_to_path(str(files.cert))
    server.private_key_pem.write_to_path(str(files.key))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    return files


class LineServer:
    """A TCP server on 127.0.0.1 that reads what a client sends, then does one thing to it.

    `reply`: writes those bytes and keeps the connection open; `reset`: a TCP reset
    (SO_LINGER 0), as a crashed middlebox gives; `hang-up`: closes at once without reading.
    """

    def __init__(self, action: bytes | str, address: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.action = action
        self._listener = socket.create_server(address)
        self.port = int(self._listener.getsockname()[1])
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, name="LineServer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed: we are done
                return
            if self.action == "hang-up":
                conn.close()
                continue
            conn.recv(4096)
            if self.action == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            else:
                assert isinstance(self.action, bytes)
                conn.sendall(self.action)
                self._open.append(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        self._thread.join(5)
        for conn in self._open:
            conn.close()

    def __enter__(self) -> LineServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
