"""gunicorn's floor for scripts/bench.py: the least a WSGI app can do to answer /health's JSON,
as bench/raw_asgi.py is hypercorn's. Their difference is the servers' own, before any app."""

import json
import os

BODY = json.dumps({"commit": os.environ.get("COMMIT_SHA", "unknown"), "status": "Healthy"}).encode()
HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))]


def app(environ, start_response):  # type: ignore[no-untyped-def]
    start_response("200 OK", HEADERS)
    return [BODY]
