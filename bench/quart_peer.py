"""The Quart peer for scripts/bench.py: Flask's API on asyncio, the same three routes, no
access line. Served as `hypercorn --config hypercorn.toml quart_peer:app`."""

import os

from quart import Quart

COMMIT = os.environ.get("COMMIT_SHA", "unknown")
app = Quart(__name__)


@app.get("/health")
@app.get("/health/live")
async def health() -> dict[str, str]:
    return {"commit": COMMIT, "status": "Healthy"}


@app.get("/")
async def index() -> dict[str, object]:
    return {"service": "peer", "commit": COMMIT, "links": {"health": "/health"}}
