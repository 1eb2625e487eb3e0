"""One HTTP contract for both entry points: the same raw bytes sent to `asgi_app` under
hypercorn and to `app` under gunicorn get the same status, headers and body.

gunicorn is the reference: every expected answer here comes from running it, side by side,
not from memory. Where the answer alone could hide a shared loss (both servers dropping a
chunked body), a case also says what the answer must hold.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests import rawhttp, servers
from tests.contract_app import FILE

HOST = "service.test"  # a fixed Host, so absolute URLs do not depend on the test's ports
MAX_BODY = 4_000_000
ENV = {"MAX_BODY_SIZE": str(MAX_BODY)}
# A mode's setup: settings for both servers, and how each is told about a root path.
SETUPS: dict[str, tuple[dict[str, str], dict[str, str], list[str]]] = {
    "plain": (ENV, {}, []),
    "prefix": (ENV, {"SCRIPT_NAME": "/prefix"}, ["--root-path", "/prefix"]),
    "proxied": ({**ENV, "TRUSTED_PROXIES": "1"}, {}, []),
}
IGNORED_HEADERS = {"date", "server", "connection", "transfer-encoding", "keep-alive"}


def build(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    chunked: bool = False,
    length: int | None = None,
    request_id: str = "contract",
) -> bytes:
    """A request as raw bytes, with a fixed Host and X-Request-ID, and `Connection: close`."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}", f"X-Request-ID: {request_id}"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        pieces = [body[i : i + 4096] for i in range(0, len(body), 4096)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    elif body or length is not None:
        lines.append(f"Content-Length: {len(body) if length is None else length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[str, bytes]:
    boundary = "contract-boundary-7d1e"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts += [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.bin"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files.items()
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


def digest(data: bytes) -> list[object]:
    return [len(data), hashlib.sha256(data).hexdigest()[:16]]


def echoed(answer: rawhttp.Answer) -> dict[str, object]:
    return json.loads(answer.body)  # type: ignore[no-any-return]


BLOB = bytes(range(256)) * 51  # 13,056 bytes
FORM = b"a=1&b=two+words&a=3&empty="
FORM_TYPE = ("Content-Type", "application/x-www-form-urlencoded")
MULTIPART_TYPE, MULTIPART = multipart({"title": "report"}, {"upload": bytes(3_000_000)})


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    setup: str = "plain"
    head: bool = False
    check: Callable[[rawhttp.Answer], object] | None = None  # what the answers must also hold
    # "all"; "status" where the server itself answers (a request it cannot parse); "ours"
    # where gunicorn is wrong and only asgi_app's answer is checked (README: the differences)
    compare: str = "all"


CASES = [
    Case("index", build("GET", "/")),
    Case("environ", build("GET", "/raw/environ?x=1&x=2", [("X-Multi", "a"), ("X-Multi", "b")])),
    Case("environ of a chunked body", build("POST", "/raw/environ", body=BLOB, chunked=True),
         check=lambda a: echoed(a)["body"] == digest(BLOB)),
    Case("environ: underscore header dropped",
         build("GET", "/raw/environ", [("X-Custom", "real"), ("X_Custom", "smuggled")]),
         check=lambda a: echoed(a)["HTTP_X_CUSTOM"] == "real"),
    Case("repeated query keys", build("GET", "/echo?a=1&a=2&b=%20x&c")),
    Case("percent-encoded path", build("GET", "/echo/%E2%82%AC/a%2Fb%20c")),
    Case("percent-encoded non-UTF-8 path", build("GET", "/raw/environ/%FF%FE")),
    Case("non-ASCII bytes in the request line", build("GET", "/echo/caf\u00e9"), compare="status",
         check=lambda a: a.status == 400),
    Case("repeated headers are joined",
         build("GET", "/echo", [("X-Multi", "a"), ("X-Multi", "b")])),
    Case("X_Custom cannot join X-Custom",
         build("GET", "/echo", [("X-Custom", "real"), ("X_Custom", "smuggled")]),
         check=lambda a: echoed(a)["headers"]["X-Custom"] == "real"),  # type: ignore[index]
    Case("form body", build("POST", "/echo", [FORM_TYPE], FORM),
         check=lambda a: echoed(a)["form"] == {"a": ["1", "3"], "b": ["two words"], "empty": [""]}),
    Case("JSON body",
         build("POST", "/echo", [("Content-Type", "application/json")], b'{"k": [1, "\\u00e9"]}'),
         check=lambda a: echoed(a)["json"] == {"k": [1, "\u00e9"]}),
    Case("multipart of 3 MB",
         build("POST", "/echo", [("Content-Type", MULTIPART_TYPE)], MULTIPART),
         check=lambda a: echoed(a)["files"] == {"upload": digest(bytes(3_000_000))}),
    Case("chunked body",
         build("POST", "/echo", [("Content-Type", "application/octet-stream")], BLOB, chunked=True),
         check=lambda a: echoed(a)["body"] == digest(BLOB)),
    Case("chunked form", build("POST", "/echo", [FORM_TYPE], FORM, chunked=True),
         check=lambda a: echoed(a)["form"]["a"] == ["1", "3"]),  # type: ignore[index]
    Case("Expect: 100-continue", build("POST", "/echo", [("Expect", "100-continue")], BLOB),
         check=lambda a: echoed(a)["body"] == digest(BLOB)),
    Case("two cookies and a session", build("GET", "/cookies"),
         check=lambda a: len(a.all("set-cookie")) == 3),
    Case("redirect", build("GET", "/redirect"), check=lambda a: a.header("location") == "/echo"),
    Case("redirect to an absolute URL", build("GET", "/redirect?external=1"),
         check=lambda a: a.header("location") == f"http://{HOST}/echo"),
    Case("forged X-Forwarded-* from an untrusted client",
         build("GET", "/echo", [("X-Forwarded-Proto", "https"), ("X-Forwarded-For", "203.0.113.9"),
                                ("X-Forwarded-Host", "evil.test")]),
         check=lambda a: (echoed(a)["scheme"], echoed(a)["remote_addr"], echoed(a)["host"])
         == ("http", "127.0.0.1", HOST)),
    Case("send_file", build("GET", "/file"), check=lambda a: a.body == FILE.read_bytes()),
    Case("send_file, conditional: 304",
         build("GET", "/file", [("If-Modified-Since", "Fri, 01 Jan 2100 00:00:00 GMT")]),
         check=lambda a: a.status == 304),
    Case("send_file, range: 206", build("GET", "/file", [("Range", "bytes=5-14")]),
         check=lambda a: a.status == 206 and a.body == FILE.read_bytes()[5:15]),
    *(Case(f"HEAD {path}", build("HEAD", path), head=True)
      for path in ("/", "/echo", "/health", "/health/ready", "/health/live", "/file", "/stream",
                   "/cookies", "/missing")),
    Case("404", build("GET", "/missing"), check=lambda a: a.status == 404),
    Case("405 with Allow", build("DELETE", "/"), check=lambda a: a.status == 405),
    Case("405 on a health route", build("POST", "/health"), check=lambda a: a.status == 405),
    Case("OPTIONS /", build("OPTIONS", "/")),
    Case("a view that raises", build("GET", "/boom"), check=lambda a: a.status == 500),
    Case("a streamed body", build("GET", "/stream?n=5")),
    Case("a stream that fails before its first chunk", build("GET", "/boom-first"),
         check=lambda a: a.status == 500),
    Case("a stream that fails after its first chunk", build("GET", "/boom-stream"),
         check=lambda a: a.status == 200 and not a.complete),
    Case("wsgi.errors", build("GET", "/errors")),
    Case("start_response again with exc_info, before the body",
         build("GET", "/raw/replaces-status"),
         compare="ours",  # gunicorn keeps the first call's headers too: two Content-Types
         check=lambda a: (a.status, a.all("content-type"), a.body)
         == (503, ["text/plain"], b"replaced")),
    Case("an app that never calls start_response", build("GET", "/raw/never-starts"),
         compare="ours",  # gunicorn 27 writes "HTTP/1.1 None"
         check=lambda a: a.status == 500),
    Case("a declared body over MAX_BODY_SIZE", build("POST", "/echo", length=MAX_BODY + 1),
         check=lambda a: a.status == 413),
    Case("a declared 300 MB body to a GET-only route", build("POST", "/", length=300_000_000),
         check=lambda a: a.status == 413),
    Case("a chunked body over MAX_BODY_SIZE",
         build("POST", "/echo", body=bytes(MAX_BODY + 4096), chunked=True),
         check=lambda a: a.status == 413),
    Case("root path: a route", build("GET", "/prefix/echo?x=1"), setup="prefix",
         check=lambda a: echoed(a)["url_for"] == f"http://{HOST}/prefix/echo"),
    Case("root path: the environ", build("GET", "/prefix/raw/environ"), setup="prefix"),
    Case("root path: a health route", build("GET", "/prefix/health/live"), setup="prefix",
         check=lambda a: a.status == 200),
    Case("root path: readiness", build("GET", "/prefix/health"), setup="prefix",
         check=lambda a: a.status == 200),
    Case("root path: a redirect", build("GET", "/prefix/redirect"), setup="prefix",
         check=lambda a: a.header("location") == "/prefix/echo"),
    Case("root path: a path outside it", build("GET", "/elsewhere"), setup="prefix",
         compare="ours",  # gunicorn answers 500 (a ConfigurationProblem): a 5xx for a scanner
         check=lambda a: a.status == 404),
    Case("trusted proxy: scheme, host and client",
         build("GET", "/echo", [("X-Forwarded-Proto", "https"), ("X-Forwarded-For", "203.0.113.9"),
                                ("X-Forwarded-Host", "public.test")]), setup="proxied",
         check=lambda a: (echoed(a)["scheme"], echoed(a)["remote_addr"], echoed(a)["url_for"])
         == ("https", "203.0.113.9", "https://public.test/echo")),
    Case("trusted proxy: a redirect keeps https",
         build("GET", "/redirect?external=1", [("X-Forwarded-Proto", "https")]), setup="proxied",
         check=lambda a: a.header("location") == f"https://{HOST}/echo"),
]  # fmt: skip


Pair = tuple[servers.Server, servers.Server]


@pytest.fixture(scope="module")
def pair() -> Iterator[Callable[[str], Pair]]:
    """For a setup: `asgi_app` under hypercorn and `app` under gunicorn, started once, on demand."""
    started: dict[str, Pair] = {}

    def get(setup: str) -> Pair:
        if setup not in started:
            env, gunicorn_env, hypercorn_args = SETUPS[setup]
            ready = gunicorn_env.get("SCRIPT_NAME", "") + "/health/live"
            started[setup] = (
                servers.start("hypercorn-asgi", env, module="tests.contract_app",
                              args=hypercorn_args, ready=ready),
                servers.start("gunicorn-gthread", {**env, **gunicorn_env},
                              module="tests.contract_app", ready=ready),
            )  # fmt: skip
        return started[setup]

    yield get
    for hypercorn, gunicorn in started.values():
        hypercorn.stop()
        gunicorn.stop()


def comparable(answer: rawhttp.Answer) -> dict[str, object]:
    """An answer without what legitimately differs between two servers: Date, Server, the
    framing, and the timestamp and signature in the session cookie."""
    headers = sorted(
        (name, _unsigned(value) if name == "set-cookie" else _unordered(name, value))
        for name, value in answer.headers
        if name not in IGNORED_HEADERS
    )
    body: object = answer.body
    if answer.header("content-type") == "application/json" and answer.complete and body:
        body = json.loads(answer.body)  # a diff of keys and values reads better than of bytes
    return {
        "status": answer.status,
        "headers": headers,
        "body": body,
        "complete": answer.complete,
        "interim": answer.interim,
    }


def _unordered(name: str, value: str) -> str:
    """Allow's methods in a fixed order: Flask lists them from a set, in each process's order."""
    return ", ".join(sorted(value.split(", "))) if name == "allow" else value


def _unsigned(cookie: str) -> str:
    """`session=<payload>.<time>.<signature>; ...` without the time and signature."""
    value, _, attributes = cookie.partition(";")
    if value.startswith("session="):
        value = value.split(".", 1)[0]
    return f"{value};{attributes}"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_asgi_app_answers_as_gunicorn_does(case: Case, pair: Callable[[str], Pair]) -> None:
    """The same bytes, the same answer; and the answer holds what the case says it must."""
    hypercorn, gunicorn = pair(case.setup)
    ours = rawhttp.request(hypercorn.port, case.raw, head=case.head)
    if case.compare != "ours":
        reference = rawhttp.request(gunicorn.port, case.raw, head=case.head)
        if case.compare == "status":
            assert ours.status == reference.status
        else:
            assert comparable(ours) == comparable(reference)
        if case.check is not None:
            assert case.check(reference), f"gunicorn's answer: {reference}"
    if case.check is not None:
        assert case.check(ours), f"asgi_app's answer: {ours}"
