"""gunicorn's settings, which gunicorn reads by itself from ./gunicorn.conf.py.

Importing the application here checks the settings in the master (a bad one stops gunicorn
instead of crash-looping its workers) and puts the master's own lines in the app's format.
"""

import os
import sys
import tempfile
from typing import Any

from gunicorn import glogging

# Several workers: prometheus_client keeps each one's numbers in files of this directory, and
# this master serves their sum on METRICS_PORT. The client reads the variable when it is first
# imported, so it is set before `application` (which imports it) is; the workers, forked from
# here, inherit it. One set outside is replaced: the directory must start empty, and it is
# removed at exit. A HUP reload runs this file again, and the first directory stays.
if "application" not in sys.modules:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prometheus-")

try:
    from application import config as service
    from application import drain, exporter, logs
except SystemExit:  # a bad setting: the one line is out; nothing will use the directory
    os.rmdir(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    raise

# (No bare `config` here: gunicorn would read it as its own `config` setting.)
bind = f"0.0.0.0:{service.port}"

# gthread: a worker serves `wsgi_threads` requests at once. Async views (/health) hold a
# thread while they wait, so sync workers would serve one request per process.
# WEB_CONCURRENCY (gunicorn's own default for `workers`) is read and checked with the rest.
worker_class = drain.gthread_worker  # gthread, which SIGINT stops at once every time
workers = service.web_concurrency
threads = service.wsgi_threads

# A worker silent this long is restarted; keep-alive outlasts an ALB's 60 s.
timeout = 30
keepalive = 75

# Trust no proxy's X-Forwarded-* here: the app applies TRUSTED_PROXIES itself (werkzeug's
# ProxyFix), the same way under every server. gunicorn's default trusts them from 127.0.0.1.
forwarded_allow_ips = ""

# SIGTERM drains (application/drain.py): the master keeps its listeners open for
# SHUTDOWN_DELAY while readiness fails and every response says `Connection: close`, then stops
# the workers, which get GRACEFUL_TIMEOUT for their in-flight requests. SIGINT stops at once.
graceful_timeout = service.graceful_timeout


def when_ready(arbiter: object) -> None:
    drain.hold_gunicorn_stop(arbiter, service)
    if service.metrics_port:  # from this master, which outlives its workers; never at import
        exporter.start(service, service.multiprocess_dir)


def child_exit(arbiter: object, worker: Any) -> None:
    """A worker's live gauges (in flight, datastore up) leave the sum with it."""
    exporter.process_exited(worker.pid, service.multiprocess_dir)


def on_exit(arbiter: object) -> None:
    exporter.remove_multiprocess_dir(service.multiprocess_dir)


post_worker_init = drain.close_gunicorn_listener
pre_request = drain.close_gunicorn_connection

# gunicorn 27's control socket (~/.gunicorn/gunicorn.ctl) would be shared by every gunicorn
# of the user; nothing here uses it.
control_socket_disable = True

# The app writes the one access line per request; gunicorn's records go to the root logger.
accesslog = None
logconfig_dict = logs.dict_config(service)


class Logger(glogging.Logger):
    """gunicorn's logger without its access log, which a `logconfig_dict` turns on: gunicorn
    would build its atoms for every request (headers, environ) for a line nobody writes."""

    access_log_enabled = False  # gunicorn 27 asks this before it builds anything

    def access(self, *args: object, **kwargs: object) -> None:
        """The app's access line is the one (application/web.py)."""


logger_class = Logger
