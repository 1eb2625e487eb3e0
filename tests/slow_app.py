"""The service plus the routes the end-to-end tests need: a slow async view, a view that leaves
a thread running, and a failing one."""

from __future__ import annotations

import asyncio
import threading
import time

import structlog
from flask import request

from application import app, asgi_app

__all__ = ["app", "asgi_app"]


@app.get("/slow")
async def slow() -> dict[str, float]:
    """Waits without blocking, as a view awaiting a datastore would."""
    seconds = float(request.args.get("seconds", "1"))
    structlog.get_logger().info("slow view started", seconds=seconds)
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@app.get("/linger")
def linger() -> dict[str, float]:
    """Answers at once, leaving behind a thread the interpreter waits for at exit (not a
    daemon, as a thread pool's workers are not)."""
    seconds = float(request.args.get("seconds", "1"))
    threading.Thread(target=time.sleep, args=(seconds,), daemon=False).start()
    structlog.get_logger().info("thread left running", seconds=seconds)
    return {"lingers": seconds}


@app.get("/boom")
def boom() -> str:
    """Fails with a message that tries to start a log line of its own."""
    raise RuntimeError("boom\r\n2015-01-01 00:00:00 [INFO] forged by an exception")
