"""The maintained WSGI-to-ASGI adapters `asgi_app` was measured against, serving the contract
app (tests/contract_app.py) under hypercorn, and how many of the contract's cases each passes.

    hypercorn bench.adapters:asgiref_app    # asgiref's WsgiToAsgi, a fresh
                                            # ThreadSensitiveContext per request
    hypercorn bench.adapters:a2wsgi_app     # a2wsgi's WSGIMiddleware, 32 threads

`python -m bench.adapters` scores each against gunicorn, case by case, and prints the table
the README's "Why our own bridge" comes from.
"""

from __future__ import annotations

import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

from a2wsgi import WSGIMiddleware
from asgiref.sync import ThreadSensitiveContext
from asgiref.wsgi import WsgiToAsgi

from tests.contract_app import app

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_asgiref = WsgiToAsgi(app)


async def asgiref_app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """WsgiToAsgi, each request in a ThreadSensitiveContext of its own: a thread each,
    instead of one thread for every request."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    async with ThreadSensitiveContext():
        await _asgiref(scope, receive, send)


a2wsgi_app = WSGIMiddleware(app, workers=32)


def score() -> None:
    """Each adapter (and asgi_app) against gunicorn on every contract case: pass or why not."""
    from tests import rawhttp, servers
    from tests.test_contract import CASES, comparable

    subjects = {
        "asgiref WsgiToAsgi + ThreadSensitiveContext": "bench.adapters",
        "a2wsgi WSGIMiddleware": "bench.adapters",
    }
    entry = {"asgiref WsgiToAsgi + ThreadSensitiveContext": "asgiref_app",
             "a2wsgi WSGIMiddleware": "a2wsgi_app"}  # fmt: skip
    plain = [case for case in CASES if case.setup == "plain" and case.compare == "all"]
    reference = servers.start("gunicorn-gthread", {"MAX_BODY_SIZE": "4000000"},
                              module="tests.contract_app")  # fmt: skip
    try:
        expected = {case.name: rawhttp.request(reference.port, case.raw, head=case.head)
                    for case in plain}  # fmt: skip
    finally:
        reference.stop()
    for subject, module in subjects.items():
        servers.MODES["subject"] = [
            "hypercorn", "--config", "hypercorn.toml", "--bind", "127.0.0.1:{port}",
            f"{{module}}:{entry[subject]}",
        ]  # fmt: skip
        server = servers.start("subject", {"MAX_BODY_SIZE": "4000000"}, module=module,
                               ready="/")  # fmt: skip
        failed = []
        try:
            for case in plain:
                try:
                    answer = rawhttp.request(server.port, case.raw, head=case.head, timeout=5)
                    same = comparable(answer) == comparable(expected[case.name])
                    ok = same and (case.check is None or bool(case.check(answer)))
                except Exception as error:  # a hang or a broken answer fails the case
                    ok = False
                    print(f"  {subject}: {case.name}: {type(error).__name__}")
                if not ok:
                    failed.append(case.name)
        finally:
            try:
                server.stop(timeout=10)
            except subprocess.TimeoutExpired:
                print(f"  {subject}: did not stop within 10 s of SIGTERM (killed)")
        print(f"{subject}: {len(plain) - len(failed)}/{len(plain)} cases as gunicorn")
        for name in failed:
            print(f"    differs: {name}")


if __name__ == "__main__":
    score()
