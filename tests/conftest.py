"""Shared fixtures: a live Particle Cloud simulator, a real SMTP sink, the app, a DB per test.

Set SELFSERVE_TEST_DATABASE_URL=postgresql://... to run everything against PostgreSQL
(bin/test does this as a second pass when SELFSERVE_TEST_POSTGRES_URL is set).
"""

import email
import ipaddress
import os
import re
import shutil
import socket
import threading
import time

import pytest
from aiosmtpd.controller import Controller
from flask.testing import FlaskClient
from helpers import POSTGRES_MIGRATED
from helpers import free_port
from helpers import seed_registry

from selfserve import config as config_module

TEST_DATABASE_URL = os.environ.get("SELFSERVE_TEST_DATABASE_URL", "")


# --- Guard: no test may reach past loopback -------------------------------------------------

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check_address(sock, address):
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    host = address[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host == "localhost":
            return
        raise AssertionError(f"test tried to reach {host!r}: only loopback is allowed")
    if not ip.is_loopback:
        raise AssertionError(f"test tried to reach {host}: only loopback is allowed")


def _guarded_connect(sock, address):
    _check_address(sock, address)
    return _real_connect(sock, address)


def _guarded_connect_ex(sock, address):
    _check_address(sock, address)
    return _real_connect_ex(sock, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex


# --- The Particle Cloud simulator -----------------------------------------------------------


@pytest.fixture(scope="session")
def sim_server():
    """One simulator for the whole run, on an ephemeral port, with the demo fixtures."""
    from selfserve.simulator.server import SimulatorServer

    server = SimulatorServer(
        host="127.0.0.1",
        port=0,
        product=config_module.DEMO_PARTICLE_PRODUCT,
        client_id=config_module.DEMO_PARTICLE_CLIENT_ID,
        client_secret=config_module.DEMO_PARTICLE_CLIENT_SECRET,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sim(sim_server):
    """The simulator, reset to its fixtures (devices, no customers, no faults, counters 0)."""
    sim_server.reset()
    return sim_server


# --- A real SMTP sink -------------------------------------------------------------------------


class Mailbox:
    """Messages received by the SMTP sink, parsed.

    Every email goes through the outbox (services/outbox.py) and tests run no sender thread:
    reading the mailbox (`to`, `wait_for`) first runs the test app's outbox sender once
    (`flush`, set by the `app` fixture), as the sweep would, so what a request queued has
    arrived when the test looks."""

    def __init__(self):
        self._messages = []
        self._lock = threading.Lock()
        self.flush = None
        # {address: SMTP answer} the sink gives at RCPT TO, e.g. "550 5.1.1 No such user".
        self.refusals = {}

    @property
    def messages(self):
        """Every message received (after sending what the outbox holds)."""
        if self.flush is not None:
            self.flush()
        return self._messages

    def receive(self, content):
        message = email.message_from_bytes(content)
        with self._lock:
            self._messages.append(message)

    def received(self, address):
        """Messages to `address` received so far, without running the outbox first."""
        with self._lock:
            return [m for m in self._messages if address.lower() in m["To"].lower()]

    def clear(self):
        """Forget every message so far (what the outbox holds is sent first, and forgotten)."""
        if self.flush is not None:
            self.flush()
        with self._lock:
            self._messages.clear()

    def to(self, address):
        if self.flush is not None:
            self.flush()
        with self._lock:
            return [m for m in self._messages if address.lower() in m["To"].lower()]

    def wait_for(self, address, count=1, timeout=5.0):
        """Wait until `address` has at least `count` messages; return the newest."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.to(address)
            if len(found) >= count:
                return found[-1]
            time.sleep(0.02)
        raise AssertionError(f"no mail #{count} for {address} within {timeout}s")

    @staticmethod
    def body(message):
        if message.is_multipart():
            for part in message.walk():
                if part.get_content_type() == "text/plain":
                    return part.get_payload(decode=True).decode()
        return message.get_payload(decode=True).decode()

    @classmethod
    def links(cls, message):
        return re.findall(r"https?://\S+", cls.body(message))


class _SinkHandler:
    """aiosmtpd's handler: hands each message to the Mailbox. (Not the Mailbox itself:
    aiosmtpd reads every attribute of its handler, and `messages` would flush the outbox
    from the sink's own thread.)"""

    def __init__(self, mailbox):
        self.mailbox = mailbox

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        # A test may make the sink refuse an address, for good (5xx) or for now (4xx).
        answer = self.mailbox.refusals.get(address.lower())
        if answer:
            return answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.mailbox.receive(envelope.content)
        return "250 Message accepted for delivery"


@pytest.fixture(scope="session")
def smtp_server():
    handler = Mailbox()
    handler.port = free_port()
    # aiosmtpd probes its own port once started, so it can't be given port 0.
    controller = Controller(_SinkHandler(handler), hostname="127.0.0.1", port=handler.port)
    controller.start()
    yield handler
    controller.stop()


@pytest.fixture
def mailbox(smtp_server):
    smtp_server.clear()
    smtp_server.refusals.clear()
    return smtp_server


# --- The app ----------------------------------------------------------------------------------


def _reset_postgres(url):
    """Bind and empty the shared PostgreSQL test database.

    The first time in a run, drop every table (a database that outlived another branch's run
    may hold anything) and build the schema through the migrations, as `flask db upgrade` does;
    after that, empty our tables."""
    from selfserve import models
    from selfserve import schema

    database = models.init_db(url)
    with database.connection_context():
        if url not in POSTGRES_MIGRATED:
            for table in database.get_tables():
                database.execute_sql(f'DROP TABLE IF EXISTS "{table}" CASCADE')
            schema.upgrade(database)
            POSTGRES_MIGRATED.add(url)
        for model in reversed(models.ALL_MODELS):
            model.delete().execute()


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory):
    """A SQLite database built by the migrations once per run; each test gets a copy."""
    from selfserve import models
    from selfserve import schema

    path = tmp_path_factory.mktemp("schema") / "migrated.db"
    database = models.init_db(f"sqlite:///{path}")
    schema.upgrade(database)
    database.close_all()  # the pool's connections too: the file is complete once they are closed
    return path


@pytest.fixture
def db_url(request, tmp_path):
    """A database with the schema the migrations make and no rows (SQLite: a fresh copy)."""
    if TEST_DATABASE_URL:
        _reset_postgres(TEST_DATABASE_URL)
        return TEST_DATABASE_URL
    path = tmp_path / "test.db"
    shutil.copyfile(request.getfixturevalue("migrated_sqlite"), path)
    return f"sqlite:///{path}"


@pytest.fixture
def app_config(sim, mailbox, db_url):
    """The test config; tests may change it before asking for `app`."""
    return {
        "TESTING": True,
        "SECRET_KEY": "test-secret-key-that-is-long-enough-0123456789",
        "DATABASE_URL": db_url,
        "BASE_URL": "http://localhost",
        "PARTICLE_API_URL": sim.url,
        **config_module.demo_particle_settings(),
        "PARTICLE_READ_TIMEOUT": 5.0,
        "MAIL_SERVER": "127.0.0.1",
        "MAIL_PORT": mailbox.port,
        "RATELIMIT_STORAGE_URI": "memory://",
        "SESSION_COOKIE_SECURE": False,  # the test client speaks http
        # Argon2id at its cheapest: the suite spent half its time hashing (tests alone may).
        "PASSWORD_HASH_MEMORY_KIB": 8,
        "PASSWORD_HASH_TIME_COST": 1,
        "SWEEP_SECONDS": 0,  # no background sweep thread in tests; tests call the sweep
        "EVENT_STREAM": False,  # no event-stream listener either; tests start their own
        "PUSH_STREAM_MAX_SECONDS": 1.0,  # pushed pages' streams end soon (crawls read them whole)
    }


class IsolatedContextClient(FlaskClient):
    """A test client that runs every request (redirects included) in a fresh app context, as a
    real server does. The `app` fixture keeps an app context pushed for the test body, and
    Flask would otherwise reuse it for requests: `g` would then be shared by all requests of a
    test, so Flask-Login would skip its user_loader (no timeout or logout check) and Flask-WTF
    would keep a CSRF token that went stale when the session rotated."""

    def run_wsgi_app(self, environ, buffered=False):
        with self.application.app_context():
            return super().run_wsgi_app(environ, buffered=buffered)


@pytest.fixture
def app(app_config, mailbox):
    from selfserve import create_app
    from selfserve import models

    application = create_app(app_config)
    application.test_client_class = IsolatedContextClient
    with application.app_context():
        models.db.connect(reuse_if_open=True)
        mailbox.flush = lambda: _flush_outbox(application)
        try:
            yield application
        finally:
            mailbox.flush = None
            if not models.db.is_closed():
                models.db.close()


def _flush_outbox(application):
    """Run the outbox sender once, in this thread (the test's app context and connection)."""
    from selfserve.services import outbox

    with application.app_context():
        outbox.send_due()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def particle(app):
    """The app's own ParticleClient (talks HTTP to the simulator)."""
    return app.extensions["particle"]


@pytest.fixture
def labels(app, sim):
    """{device id: its label (serial number, setup code, model...)} for the demo devices,
    imported into our registry and the simulated product."""
    return {device["id"]: device for device in seed_registry()}
