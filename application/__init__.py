"""The entry points: `application:app` (WSGI, the seed's) and `application:asgi_app` (ASGI).

Only wiring: settings from the environment, logging before anything logs, then the app.
"""

from __future__ import annotations

import atexit
import os

from . import logs
from .asgi import AsgiApp
from .config import Config, ConfigError
from .web import create_app

try:
    config = Config.from_environ(os.environ)
except ConfigError as error:
    # One log line naming the variable, then a non-zero exit under every server.
    logs.configure(Config())
    logs.log.critical(f"configuration error: {error}")
    raise SystemExit(1) from None

logs.configure(config)
app = create_app(config)
asgi_app = AsgiApp(app)
atexit.register(app.extensions["health"].close)

__all__ = ["app", "asgi_app", "config"]
