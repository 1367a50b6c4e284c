"""Fixtures the account tests share (imported by tests/test_accounts_*.py).

- `app`: the conftest app, whose test clients give every request its own app context. The
  conftest `app` fixture keeps one app context pushed for the whole test, and Flask reuses a
  pushed context for requests, so `g` would be shared by all requests of a test: Flask-Login
  caches the signed-in user in `g` (no user_loader call, so no timeout or logout check on later
  requests) and Flask-WTF caches the CSRF token in `g` (stale after the session rotates).
- `smtp_server`: the SMTP sink on a free port; conftest's asks aiosmtpd 1.4 for port 0, and
  aiosmtpd's start-up self-check then connects to port 0 and fails.
"""
import socket

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


@pytest.fixture(scope="session")
def smtp_server():
    from aiosmtpd.controller import Controller
    from conftest import Mailbox

    handler = Mailbox()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    handler.port = port
    yield handler
    controller.stop()


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
