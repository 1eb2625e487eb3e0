"""Instructions per request, counted by valgrind's callgrind: a figure that, unlike time, the
rest of a shared machine does not move. Each case runs in a fresh interpreter under callgrind
twice, 200 and 2,200 times; the difference over 2,000 is one request, start-up excluded.

    .venv/bin/python -m bench.instructions      # about 5 minutes; prints a markdown table

In-process, no server and no socket: the app's own cost, what a server adds comes on top.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SETUP = """
import asyncio, io, os, sys
sys.path[:0] = [{root!r}, {bench!r}]
os.environ.update(COMMIT_SHA="bench", METRICS_PORT="9464")
sys.stdout = open(os.devnull, "w")  # the access lines
N = int(os.environ["N"])

def environ(path):
    return {{"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
        "wsgi.run_once": False, "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "5555",
        "HTTP_HOST": "localhost", "HTTP_USER_AGENT": "wrk", "HTTP_ACCEPT": "*/*"}}

def wsgi(app, path):
    for _ in range(N):
        body = app(environ(path), lambda status, headers, exc_info=None: None)
        for _ in body:
            pass
        getattr(body, "close", lambda: None)()

def asgi(app, path):
    scope = {{"type": "http", "asgi": {{"version": "3.0"}}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5555),
        "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"localhost"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]}}

    async def one():
        messages = [{{"type": "http.request", "body": b"", "more_body": False}}]

        async def receive():
            if messages:
                return messages.pop()
            await asyncio.Event().wait()

        async def send(message):
            pass

        await app(dict(scope), receive, send)

    async def every():
        for _ in range(N):
            await one()

    import uvloop
    uvloop.run(every())
"""

CASES = {
    "Flask peer `/`, WSGI": "from flask_peer import app; wsgi(app, '/')",
    "`app` `/` (Flask, the envelope, the access line), WSGI": (
        "from application import app; wsgi(app, '/')"
    ),
    "`app` `/health`, WSGI": "from application import app; wsgi(app, '/health')",
    "`asgi_app` `/`": "from application import asgi_app; asgi(asgi_app, '/')",
    "`asgi_app` `/health`": "from application import asgi_app; asgi(asgi_app, '/health')",
    "a round trip to a thread: `ThreadPoolExecutor` + `asyncio.wrap_future`": """
from concurrent.futures import ThreadPoolExecutor
async def every():
    pool = ThreadPoolExecutor(4)
    for _ in range(N):
        await asyncio.wrap_future(pool.submit(int))
    pool.shutdown()
asyncio.run(every())
""",
    "a round trip to a thread: `asgi_app`'s `Threads`": """
from application.asgi import Threads
async def every():
    threads = Threads(4, max_waiting=1)
    for _ in range(N):
        await threads.take(None)
        await threads.run(int)
    threads.shutdown()
asyncio.run(every())
""",
}


def instructions(code: str, times: int) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        script = Path(scratch, "case.py")
        script.write_text(SETUP.format(root=str(ROOT), bench=str(ROOT / "bench")) + code)
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={scratch}/out"]
        done = subprocess.run(
            [*command, sys.executable, str(script)],
            env={**os.environ, "N": str(times)},
            capture_output=True,
            text=True,
            check=True,
        )
    return int(re.search(r"Collected : (\d+)", done.stderr).group(1))  # type: ignore[union-attr]


def main() -> None:
    print("| case | instructions per request |\n|---|---|")
    for name, code in CASES.items():
        per_request = (instructions(code, 2200) - instructions(code, 200)) / 2000
        print(f"| {name} | {per_request / 1000:,.0f}k |", flush=True)


if __name__ == "__main__":
    main()
