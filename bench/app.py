"""The site as the bench serves it under gunicorn: `gunicorn ... bench.app:app`.

Configuration comes from SELFSERVE_* environment variables exactly as in production (wsgi.py);
bench/main.py sets two of them because the bench drives the site from one loopback address
over plain http: SELFSERVE_RATE_LIMIT_LOGIN is raised (it signs in a few dozen sessions from
127.0.0.1 within seconds) and SELFSERVE_SESSION_COOKIE_SECURE is off (an http client never
sends a Secure cookie back). Every other setting stays as configured.
"""

from selfserve import create_app

app = create_app()
