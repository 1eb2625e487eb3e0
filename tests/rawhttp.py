"""HTTP/1.1 over a bare socket: the exact bytes a test writes go out, and the answer comes back
as the server framed it (chunked, Content-Length or close), with nothing normalised away."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in the order sent
    body: bytes
    complete: bool = True  # False when the connection ended before the framing said it would
    interim: list[int] = field(default_factory=list)  # 1xx statuses before the final one

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


def request(
    port: int, raw: bytes, *, head: bool = False, timeout: float = 15, host: str = "127.0.0.1"
) -> Answer:
    """Send `raw` as is and read one answer; `head`: the answer has no body (a HEAD request).

    A server may answer before the request's body is all sent and close (a 413, a 405): the
    answer is read all the same, as curl does."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_answer(_Reader(sock), head=head)


def read_answer(reader: _Reader, *, head: bool = False) -> Answer:
    interim: list[int] = []
    while True:
        status, headers = _head(reader)
        if status >= 200:
            break
        interim.append(status)
    answer = Answer(status, headers, b"", interim=interim)
    if head or status in (204, 304):
        return answer
    lengths = answer.all("content-length")
    try:
        if "chunked" in (answer.header("transfer-encoding") or "").lower():
            answer.body = _chunked(reader)
        elif lengths:
            answer.body = reader.exactly(int(lengths[0]))
        else:
            answer.body = reader.rest()
    except EOFError as cut:
        answer.body, answer.complete = cut.args[0], False
    return answer


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _more(self) -> bytes:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        self.buffer += data
        return data

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._more():
                raise EOFError(self.buffer)
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._more():
                raise EOFError(self.buffer)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def rest(self) -> bytes:
        while self._more():
            pass
        data, self.buffer = self.buffer, b""
        return data


def _head(reader: _Reader) -> tuple[int, list[tuple[str, str]]]:
    status_line = reader.line().decode("latin-1")
    status = int(status_line.split(" ", 2)[1])
    headers = []
    while line := reader.line():
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return status, headers


def _chunked(reader: _Reader) -> bytes:
    body = b""
    while True:
        try:
            size = int(reader.line().split(b";")[0], 16)
            if size == 0:
                while reader.line():  # trailers
                    pass
                return body
            body += reader.exactly(size)
            reader.line()
        except EOFError:
            raise EOFError(body) from None
