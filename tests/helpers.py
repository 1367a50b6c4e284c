"""Helpers and constants the tests share (import them as `from helpers import ...`)."""

import contextlib
import logging
import re
import socket
import threading

PASSWORD = "correct horse battery"  # make_user's and login's default

# The demo devices (selfserve/simulator/fixtures/demo.json) the tests use by role.
WINDOW = "e00fce68a1b2c3d4e5f60701"  # living_room_blind: online, starts closed (position 0)
OTHER_WINDOW = "e00fce68a1b2c3d4e5f60702"  # bedroom_blind
OFFLINE_WINDOW = "e00fce68a1b2c3d4e5f60703"  # office_blind: offline
PUMP = "e00fce68a1b2c3d4e5f60801"  # garden_pump: running
STOPPED_PUMP = "e00fce68a1b2c3d4e5f60802"  # pool_pump
SLOW_PUMP = "e00fce68a1b2c3d4e5f60803"  # basement_sump_pump: answers after 3 s


def csrf_token(client, path="/"):
    """The CSRF token of `client`'s current session, read from a rendered page."""
    page = client.get(path).get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', page) or re.search(
        r'"X-CSRFToken": "([^"]+)"', page
    )
    assert match, f"no CSRF token on {path}"
    return match.group(1)


def make_user(email="home@example.com", password=PASSWORD, verified=True, provisioned=True):
    """Create an account directly in the database (verified and with a Particle customer by
    default: the customer is created in the simulator through the app's real client)."""
    import secrets

    from flask import current_app

    from selfserve import passwords
    from selfserve.models import User
    from selfserve.models import utcnow

    user = User.create(email=email.lower(), password_hash=passwords.hash_password(password))
    if verified:
        user.email_verified_at = utcnow()
        user.provisioning_state = "pending"
        user.save()
    if verified and provisioned:
        customer_id = "c" + secrets.token_hex(12)
        current_app.extensions["particle"].create_customer(customer_id)
        user.particle_customer_id = customer_id
        user.provisioning_state = "ready"
        user.save()
    return user


def owner_of(labels, device_id, email, name=None, password=PASSWORD):
    """A new account (make_user) that claimed `device_id` from its label (`labels`: the
    conftest fixture), renamed `name` when given."""
    from selfserve.services import devices

    user = make_user(email, password)
    devices.claim(user, labels[device_id]["serial_number"], labels[device_id]["setup_code"])
    if name:
        devices.rename(user, devices.device_for(user, device_id), name)
    return user


def login(client, email="home@example.com", password=PASSWORD):
    """Sign in through the real login form; returns the response (follows redirects)."""
    token = csrf_token(client, "/login")
    return client.post(
        "/login",
        data={"email": email, "password": password, "csrf_token": token},
        follow_redirects=True,
    )


def signed_in(app, who, password=PASSWORD):
    """A new test client of `app`, signed in through the real login form as `who` (a user or
    an email address)."""
    client = app.test_client()
    assert login(client, getattr(who, "email", who), password).status_code == 200
    return client


def demo_fixtures_path():
    """The simulator's demo fixtures (selfserve/simulator/fixtures/demo.json)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "selfserve", "simulator", "fixtures", "demo.json")


def demo_devices():
    """The demo devices as their labels say: dicts with id, serial_number, setup_code, model..."""
    import json

    with open(demo_fixtures_path(), encoding="utf-8") as handle:
        return json.load(handle)["devices"]


_seeded_hashes = {}


def seed_registry():
    """Import the demo devices into the registry and the simulated product; return them.

    The first call runs the real import; later ones reuse its setup-code hashes (Argon2 is
    slow on purpose) and add the devices to the product through the real client.
    """
    from flask import current_app

    from selfserve.models import Device
    from selfserve.services import registry

    fixtures = demo_devices()
    if not _seeded_hashes:
        registry.seed_from_fixtures(demo_fixtures_path())
        _seeded_hashes.update({device.device_id: device.setup_code_hash for device in Device.select()})
        return fixtures
    client = current_app.extensions["particle"]
    for fixture in fixtures:
        client.add_device_to_product(fixture["id"])
        Device.create(
            device_id=fixture["id"],
            serial_number=fixture["serial_number"],
            setup_code_hash=_seeded_hashes[fixture["id"]],
            model=fixture["model"],
            sold_through=fixture.get("dealer"),
            in_product=True,
        )
    return fixtures


def free_port():
    """A currently free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _QueryLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.queries = []
        self.thread = threading.get_ident()

    def emit(self, record):
        # Statements of this thread only (the request, in the test client), not the pool's
        # check-in/out messages nor a background thread's work.
        if record.name == "peewee" and record.thread == self.thread:
            self.queries.append(record.getMessage())


@contextlib.contextmanager
def count_queries():
    """Collect the SQL statements peewee runs inside the block (in a list of their texts)."""
    logger = logging.getLogger("peewee")
    handler, level = _QueryLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.queries
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# PostgreSQL test databases whose schema this run has built through the migrations (conftest's
# db_url rebuilds one the first time; a test that replaced the tables takes it out again). Here
# rather than in conftest: `import conftest` may find tests/e2e/conftest.py instead.
POSTGRES_MIGRATED = set()
