"""gunicorn's settings, which gunicorn reads by itself from ./gunicorn.conf.py.

Importing the application here checks the settings in the master (a bad one stops gunicorn
instead of crash-looping its workers) and puts the master's own lines in the app's format.
"""

from application import config, logs

bind = f"0.0.0.0:{config.port}"

# gthread: a worker serves `wsgi_threads` requests at once. Async views (/health) hold a
# thread while they wait, so sync workers would serve one request per process.
worker_class = "gthread"
workers = 2
threads = config.wsgi_threads

# A worker silent this long is restarted; in-flight requests get `graceful_timeout` after
# SIGTERM (under Kubernetes' 30 s grace period); keep-alive outlasts an ALB's 60 s.
timeout = 30
graceful_timeout = 25
keepalive = 75

# The app writes the one access line per request; gunicorn's records go to the root logger.
accesslog = None
logconfig_dict = logs.dict_config(config)
