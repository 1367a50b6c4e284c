"""The site as the bench serves it under gunicorn: `gunicorn ... bench.app:app`.

Configuration comes from SELFSERVE_* environment variables exactly as in production
(wsgi.py), plus two settings the environment can't express, both needed because the bench
drives the site from one loopback address over plain http:

- the login rate limit (20 per minute per IP) is raised, since the bench signs in a few dozen
  sessions from 127.0.0.1 within seconds; every other limit stays as configured;
- the session cookie is not marked Secure (production sets Secure; the bench talks http on
  loopback, and an http client never sends a Secure cookie back).
"""

from selfserve import create_app

BENCH_SETTINGS = {
    "ACCOUNT_RATE_LIMITS": {"login": "100000 per minute"},
}

app = create_app(BENCH_SETTINGS)
app.config["SESSION_COOKIE_SECURE"] = False
