"""The Flask peer for scripts/bench.py: a plain Flask app answering the same three routes with
sync views and no access line, as a team would write it before adding anything.
Served as `gunicorn --worker-class gthread --workers 1 --threads 8 flask_peer:app`."""

import os

from flask import Flask

COMMIT = os.environ.get("COMMIT_SHA", "unknown")
app = Flask(__name__)


@app.get("/health")
@app.get("/health/live")
def health() -> dict[str, str]:
    return {"commit": COMMIT, "status": "Healthy"}


@app.get("/")
def index() -> dict[str, object]:
    return {"service": "peer", "commit": COMMIT, "links": {"health": "/health"}}
