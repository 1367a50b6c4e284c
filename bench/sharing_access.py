"""Bench: the cost of the access model on the pages that read it.

    bench/sharing [--devices 5000] [--members 300] [--groups 40] [--requests 30] [--quick]

An organisation with --devices devices, --members members and --groups overlapping groups
(each holding a random tenth of the devices; every member holds grants on three groups, a few
also through a client organisation), beside a homeowner with 3 devices, in one fresh SQLite
database (rows written directly: no Particle call is needed for these pages, and none is
made). Signed in through the real login form, it requests, for both:

- the dashboard (`GET /devices`, the member's list of every device they reach, page 1);
- a device page (`GET /devices/<id>`) and its values fragment (`GET /devices/<id>/values`,
  served from the stored snapshot).

and prints the SQL queries per request (no N+1: the numbers must not grow with the fleet) and
the median time, side by side. Not a test: nothing is asserted; numbers vary with the machine.
"""

import argparse
import logging
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time

PASSWORD = "bench-password-not-secret"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench/sharing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--members", type=int, default=300)
    parser.add_argument("--groups", type=int, default=40)
    parser.add_argument("--requests", type=int, default=30, help="requests per page and person")
    parser.add_argument("--quick", action="store_true", help="500 devices, 30 members, 8 groups, 10 requests")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.members, args.groups, args.requests = 500, 30, 8, 10
    return args


class QueryCounter:
    """Counts the SQL statements the database runs (peewee's execute_sql)."""

    def __init__(self, database):
        self.count = 0
        original = database.execute_sql

        def counting(sql, params=None, *rest, **kwargs):
            self.count += 1
            return original(sql, params, *rest, **kwargs)

        database.execute_sql = counting


def main(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    folder = tempfile.mkdtemp(prefix="selfserve-bench-sharing-")
    try:
        return _run(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(args, folder):
    from selfserve import config as config_module
    from selfserve import create_app
    from selfserve import models
    from selfserve import passwords
    from selfserve import schema
    from selfserve.models import Device
    from selfserve.models import DeviceGroup
    from selfserve.models import DeviceSnapshot
    from selfserve.models import Grant
    from selfserve.models import GroupDevice
    from selfserve.models import Membership
    from selfserve.models import Organisation
    from selfserve.models import User
    from selfserve.models import utcnow
    from selfserve.services import access

    logging.basicConfig(level=logging.ERROR)
    url = f"sqlite:///{folder}/bench.db"
    schema.upgrade_url(url)
    app = create_app(
        {
            "TESTING": True,
            "SECRET_KEY": secrets.token_hex(32),
            "DATABASE_URL": url,
            "BASE_URL": "http://127.0.0.1",
            # Nothing here calls Particle; an unroutable loopback port proves it.
            "PARTICLE_API_URL": "http://127.0.0.1:9",
            **config_module.demo_particle_settings(),
            "SWEEP_SECONDS": 0,
            # The stored snapshots stay fresh for the whole run: the fragment is served from them.
            "VALUES_CACHE_SECONDS": 24 * 3600,
            "RATELIMIT_ENABLED": False,
            "WTF_CSRF_ENABLED": False,
        }
    )
    rng = random.Random(7)
    now = utcnow()
    print(
        f"Setting up {args.devices} devices, {args.members} members, {args.groups} groups...", file=sys.stderr
    )
    with app.app_context(), models.db.connection_context(), models.db.atomic():
        password_hash = passwords.hash_password(PASSWORD)

        def person(email, customer=None):
            return User.create(
                email=email,
                password_hash=password_hash,
                email_verified_at=now,
                provisioning_state="ready",
                particle_customer_id=customer or ("c" + secrets.token_hex(12)),
            )

        def device(number, owner):
            return {
                "device_id": f"{number:024x}",
                "serial_number": f"BENCH-{number:07d}",
                "setup_code_hash": "!",
                "model": "pump" if number % 3 else "window",
                "in_product": True,
                "owner": owner.id,
                "claimed_at": now,
                "name": f"Pump {number}",
            }

        homeowner = person("home@bench.example")
        Device.insert_many([device(1_000_000 + n, homeowner) for n in range(3)]).execute()
        admin = person("admin@company.example")
        account = User.create(
            email="org@organisations.invalid",
            password_hash="!",
            role="organisation",
            email_verified_at=now,
            provisioning_state="ready",
            particle_customer_id="c" + secrets.token_hex(12),
        )
        company = Organisation.create(name="Pumps Inc", account=account, created_by=admin.id)
        client_admin = person("boss@client.example")
        client_account = User.create(
            email="client@organisations.invalid",
            password_hash="!",
            role="organisation",
            email_verified_at=now,
        )
        client_org = Organisation.create(
            name="Client Ltd", account=client_account, created_by=client_admin.id
        )
        Membership.create(organisation=company, user=admin, role="admin")
        Membership.create(organisation=client_org, user=client_admin, role="admin")
        ids = []
        for start in range(0, args.devices, 500):
            rows = [device(n, account) for n in range(start, min(start + 500, args.devices))]
            Device.insert_many(rows).execute()
            ids += [row["device_id"] for row in rows]
        groups = [DeviceGroup.create(organisation=company, name=f"Site {g:02d}") for g in range(args.groups)]
        per_group = max(1, args.devices // 10)
        for group in groups:
            chosen = rng.sample(ids, per_group)
            for start in range(0, len(chosen), 500):
                GroupDevice.insert_many(
                    [{"group": group.id, "device": d} for d in chosen[start : start + 500]]
                ).execute()
        members = []
        for m in range(args.members):
            member = person(f"member{m}@company.example")
            Membership.create(organisation=company, user=member, role="member")
            members.append(member)
            for group in rng.sample(groups, 3):
                Grant.create(
                    group=group.id,
                    grantee=member.id,
                    role=rng.choice(access.GRANTABLE),
                    granted_by=admin.id,
                    active_key=access.active_key(group_id=group.id, user_id=member.id),
                )
            if m % 10 == 0:
                Membership.create(organisation=client_org, user=member, role="member")
        Grant.create(
            group=groups[0].id,
            grantee_org=client_org.id,
            role="viewer",
            granted_by=admin.id,
            active_key=access.active_key(group_id=groups[0].id, org_id=client_org.id),
        )
        snapshots = [
            {"device_id": d, "values": {}, "fetched_at": now, "checked_at": now, "online": True}
            for d in ids + [f"{1_000_000 + n:024x}" for n in range(3)]
        ]
        for start in range(0, len(snapshots), 500):
            DeviceSnapshot.insert_many(snapshots[start : start + 500]).execute()
        member = members[0]
        member_email = member.email
        member_device = next(
            row.device_id
            for row in GroupDevice.select().where(
                GroupDevice.group.in_(
                    [g.group_id for g in Grant.select(Grant.group).where(Grant.grantee == member.id)]
                )
            )
        )
        home_device = f"{1_000_000:024x}"

    counter = QueryCounter(models.db.obj)
    results = {}
    for who, email, device_id in (
        ("homeowner, 3 devices", "home@bench.example", home_device),
        (f"member, {args.devices} devices", member_email, member_device),
    ):
        client = app.test_client()
        response = client.post("/login", data={"email": email, "password": PASSWORD})
        assert response.status_code == 302, (who, response.status_code)
        pages = {
            "dashboard GET /devices": ("/devices", {}),
            "device page GET /devices/<id>": (f"/devices/{device_id}", {}),
            "values fragment (htmx)": (f"/devices/{device_id}/values", {"HX-Request": "true"}),
        }
        for label, (path, headers) in pages.items():
            timings, queries = [], []
            for _ in range(args.requests):
                before = counter.count
                started = time.perf_counter()
                response = client.get(path, headers=headers)
                timings.append((time.perf_counter() - started) * 1000)
                queries.append(counter.count - before)
                assert response.status_code == 200, (who, path, response.status_code)
            results[(label, who)] = (statistics.median(queries), statistics.median(timings), max(queries))
    whos = ["homeowner, 3 devices", f"member, {args.devices} devices"]
    print()
    print(
        f"Access model cost ({args.devices} org devices, {args.members} members, {args.groups} overlapping "
        f"groups of {per_group}; {args.requests} requests each, SQLite)"
    )
    print(f"{'':40}{whos[0]:>28}{whos[1]:>28}")
    for label in ("dashboard GET /devices", "device page GET /devices/<id>", "values fragment (htmx)"):
        cells = []
        for who in whos:
            queries, median_ms, most = results[(label, who)]
            cells.append(f"{queries:.0f} q (max {most}) / {median_ms:.1f} ms")
        print(f"{label:40}{cells[0]:>28}{cells[1]:>28}")
    print("\nqueries per request (median, max over the run) / median time per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
