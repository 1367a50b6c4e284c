"""gunicorn settings for production: `gunicorn -c gunicorn.conf.py wsgi:app` (README, "Running in
production"). The gevent worker holds every open page's server-sent-events connection as a
greenlet (a few KB each) instead of a thread, so one worker keeps thousands of pages live."""

import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
worker_class = "gevent"
# Open connections per worker: pages with pushed values plus ordinary requests.
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "4000"))
# An open push stream is not a hung worker; streams end by themselves after
# PUSH_STREAM_MAX_SECONDS and browsers reconnect.
timeout = 60
graceful_timeout = 10


def post_fork(server, worker):
    # psycopg2 is a C extension gevent can't patch: psycogreen installs its wait callback so a
    # query waiting on PostgreSQL lets the worker's other greenlets run.
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()
