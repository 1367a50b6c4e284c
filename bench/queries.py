"""Database work per request: SQL statements and new database connections for the pages a
homeowner loads most, in-process through the Flask test client (no gunicorn), against the
bundled simulator and a fresh SQLite database.

    .venv/bin/python -m bench.queries [--rows 20] [--requests 200]

Counts don't depend on the machine; the milliseconds (median of --requests) do. The homeowner
owns 3 devices and has --rows activity events recorded by a support person (the activity page
shows "Support" for each).

Then "forgot password" for an address with an account and one without (issue 9, finding 6:
the time told them apart), --requests of each interleaved: statements and median / p95 ms.
"""

import argparse
import logging
import os
import re
import sqlite3
import statistics
import sys
import tempfile
import time


class _Count(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record):
        if record.name == "peewee":  # not "peewee.pool"'s check-in/out messages
            self.count += 1


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20, help="activity events (default 20)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per page (default 200)")
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from selfserve import config as config_module
    from selfserve.simulator.server import SimulatorServer

    folder = tempfile.mkdtemp(prefix="bench-queries-")
    url = f"sqlite:///{folder}/bench.db"
    simulator = SimulatorServer(
        host="127.0.0.1",
        port=0,
        product=config_module.DEMO_PARTICLE_PRODUCT,
        client_id=config_module.DEMO_PARTICLE_CLIENT_ID,
        client_secret=config_module.DEMO_PARTICLE_CLIENT_SECRET,
    )
    simulator.start()
    try:
        _run(args, url, simulator)
    finally:
        simulator.stop()


def _run(args, url, simulator):
    from selfserve import config as config_module
    from selfserve import create_app

    try:  # the schema as production makes it (releases before migrations made it in create_app)
        from selfserve import schema

        schema.upgrade_url(url)
    except ImportError:
        pass
    app = create_app(
        {
            "TESTING": True,
            "SECRET_KEY": "bench-queries-secret-key-0123456789abcdef",
            "DATABASE_URL": url,
            "BASE_URL": "http://localhost",
            "PARTICLE_API_URL": simulator.url,
            **config_module.demo_particle_settings(),
            "SWEEP_SECONDS": 0,
            "SESSION_COOKIE_SECURE": False,
            "VALUES_CACHE_SECONDS": 0.0,  # every values fragment refreshes from Particle
            "RATELIMIT_ENABLED": False,  # "forgot password" is limited per address
        }
    )
    device_ids = _setup(app, args.rows)
    client = app.test_client()
    page = client.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    signed_in = client.post(
        "/login", data={"email": "home@example.com", "password": "correct horse battery", "csrf_token": token}
    )
    assert signed_in.status_code in (200, 302), signed_in.status_code

    pages = [
        ("dashboard", "/devices", {}),
        ("device page", f"/devices/{device_ids[0]}", {}),
        ("values fragment (a refresh)", f"/devices/{device_ids[0]}/values", {"HX-Request": "true"}),
        (f"activity ({args.rows} rows)", "/account/activity", {}),
    ]
    print(f"{'page':36} {'queries':>8} {'new connections':>16} {'ms median':>10}")
    for name, path, headers in pages:
        client.get(path, headers=headers)  # warm up: threads, pools, caches as in a running site
        queries, connections = _count(lambda p=path, h=headers: client.get(p, headers=h))
        timings = []
        for _ in range(args.requests if "values" not in name else max(10, args.requests // 10)):
            started = time.perf_counter()
            response = client.get(path, headers=headers)
            timings.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, (path, response.status_code)
        print(f"{name:36} {queries:>8} {connections:>16} {statistics.median(timings):>10.2f}")
    _forgot_password(app, args.requests)


def _forgot_password(app, requests):
    """POST /forgot for a known and an unknown address, interleaved (same client, same
    conditions): the statements of one of each, and the median and p95 of the times."""
    client = app.test_client()
    page = client.get("/forgot").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    addresses = {"known address": "home@example.com", "unknown address": "nobody.here@example.com"}

    def ask(address):
        return client.post("/forgot", data={"email": address, "csrf_token": token})

    for address in addresses.values():
        ask(address)  # warm up
    counts = {name: _count(lambda a=address: ask(a))[0] for name, address in addresses.items()}
    timings = {name: [] for name in addresses}
    for _ in range(requests):
        for name, address in addresses.items():
            started = time.perf_counter()
            response = ask(address)
            timings[name].append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.status_code
    print(f"\n{'forgot password':36} {'queries':>8} {'ms median':>10} {'ms p95':>8}")
    for name in addresses:
        ordered = sorted(timings[name])
        p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
        print(f"{name:36} {counts[name]:>8} {statistics.median(ordered):>10.2f} {p95:>8.2f}")


def _count(request):
    logger = logging.getLogger("peewee")
    handler, level = _Count(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    real_connect, opened = sqlite3.connect, [0]

    def counting_connect(*args, **kwargs):
        opened[0] += 1
        return real_connect(*args, **kwargs)

    sqlite3.connect = counting_connect
    try:
        response = request()
        assert response.status_code == 200, response.status_code
    finally:
        sqlite3.connect = real_connect
        logger.removeHandler(handler)
        logger.setLevel(level)
    return handler.count, opened[0]


def _setup(app, rows):
    """A verified homeowner owning three demo devices, and `rows` events by a staff member."""
    import secrets

    from selfserve import models
    from selfserve import passwords
    from selfserve.models import Device
    from selfserve.models import User
    from selfserve.models import utcnow
    from selfserve.services import audit
    from selfserve.services import devices
    from selfserve.services import registry

    fixtures = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "selfserve", "simulator"
    )
    fixtures = os.path.join(fixtures, "fixtures", "demo.json")
    with app.app_context(), models.db.connection_context():
        registry.seed_from_fixtures(fixtures)
        import json

        with open(fixtures, encoding="utf-8") as handle:
            labels = {d["id"]: d for d in json.load(handle)["devices"]}
        customer_id = "c" + secrets.token_hex(12)
        app.extensions["particle"].create_customer(customer_id)
        user = User.create(
            email="home@example.com",
            password_hash=passwords.hash_password("correct horse battery"),
            email_verified_at=utcnow(),
            particle_customer_id=customer_id,
            provisioning_state="ready",
        )
        helper = User.create(email="helper@support.example", password_hash="x", role="staff")
        online = [d for d in labels.values() if d.get("online", True)][:3]
        for label in online:
            devices.claim(user, label["serial_number"], label["setup_code"])
        for n in range(rows):
            audit.record("support.console_viewed" if n % 2 else "account.signed_in", user=user, actor=helper)
        return [
            d.device_id for d in Device.select().where(Device.owner == user.id).order_by(Device.device_id)
        ]


if __name__ == "__main__":
    main()
