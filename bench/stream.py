"""The service with one streamed route, for scripts/bench's 100 MB response figure."""

from collections.abc import Iterator

from flask import Response

from application import app, asgi_app

__all__ = ["app", "asgi_app"]

CHUNK = b"x" * 65536


@app.get("/stream/<int:mebibytes>")
def _stream(mebibytes: int) -> Response:
    def chunks() -> Iterator[bytes]:
        for _ in range(mebibytes * 16):
            yield CHUNK

    return Response(chunks(), mimetype="application/octet-stream")
