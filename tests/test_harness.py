"""A fixture the account tests share (imported by tests/test_accounts_*.py).

The `app` fixture: the conftest app, whose test clients give every request its own app context. The
  conftest `app` fixture keeps one app context pushed for the whole test, and Flask reuses a
  pushed context for requests, so `g` would be shared by all requests of a test: Flask-Login
  caches the signed-in user in `g` (no user_loader call, so no timeout or logout check on later
  requests) and Flask-WTF caches the CSRF token in `g` (stale after the session rotates).
"""
import pytest
from flask.testing import FlaskClient


class IsolatedContextClient(FlaskClient):
    """A test client that runs every request (redirects included) in a fresh app context,
    as a real server does."""

    def run_wsgi_app(self, environ, buffered=False):
        with self.application.app_context():
            return super().run_wsgi_app(environ, buffered=buffered)


@pytest.fixture
def app(app):
    app.test_client_class = IsolatedContextClient
    return app


def test_each_request_gets_its_own_g(app):
    from flask import g

    @app.get("/_test_g")
    def _probe():
        seen = getattr(g, "probe", None)
        g.probe = "set"
        return {"seen": seen}

    app.view_functions["_probe"].is_public = True
    client = app.test_client()
    assert client.get("/_test_g").json == {"seen": None}
    assert client.get("/_test_g").json == {"seen": None}
