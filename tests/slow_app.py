"""The service plus two routes the end-to-end tests need: a slow async view and a failing one."""

from __future__ import annotations

import asyncio

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


@app.get("/boom")
def boom() -> str:
    """Fails with a message that tries to start a log line of its own."""
    raise RuntimeError("boom\r\n2015-01-01 00:00:00 [INFO] forged by an exception")
