"""The ceiling for scripts/bench.py: the least an ASGI app can do to answer /health's JSON."""

import json
import os

BODY = json.dumps({"commit": os.environ.get("COMMIT_SHA", "unknown"), "status": "Healthy"}).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
    elif scope["type"] == "http":
        # The request's message, taken: with hypercorn.toml's max_app_queue_size = 1 hypercorn
        # otherwise waits for room for the next one, and a keep-alive connection stalls.
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
