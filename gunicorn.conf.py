"""gunicorn's settings, which gunicorn reads by itself from ./gunicorn.conf.py.

Importing the application here checks the settings in the master (a bad one stops gunicorn
instead of crash-looping its workers) and puts the master's own lines in the app's format.
"""

from application import config as service
from application import logs

# (No bare `config` here: gunicorn would read it as its own `config` setting.)
bind = f"0.0.0.0:{service.port}"

# gthread: a worker serves `wsgi_threads` requests at once. Async views (/health) hold a
# thread while they wait, so sync workers would serve one request per process.
worker_class = "gthread"
workers = 2
threads = service.wsgi_threads

# A worker silent this long is restarted; in-flight requests get `graceful_timeout` after
# SIGTERM (under Kubernetes' 30 s grace period); keep-alive outlasts an ALB's 60 s.
timeout = 30
graceful_timeout = 25
keepalive = 75

# Trust no proxy's X-Forwarded-* here: the app applies TRUSTED_PROXIES itself (werkzeug's
# ProxyFix), the same way under every server. gunicorn's default trusts them from 127.0.0.1.
forwarded_allow_ips = ""

# gunicorn 27's control socket (~/.gunicorn/gunicorn.ctl) would be shared by every gunicorn
# of the user; nothing here uses it.
control_socket_disable = True

# The app writes the one access line per request; gunicorn's records go to the root logger.
accesslog = None
logconfig_dict = logs.dict_config(service)
