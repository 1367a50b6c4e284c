"""Bench: migrate devices already in the field to their owners, with Particle rate limits on.

    bench/migrate [--devices 1000] [--new-owners 100] [--rate 40] [--limit 1500/30] [--quick]

1. Starts the bundled Particle Cloud simulator in-process, an SMTP sink and a fresh SQLite
   database in a temporary folder. Adds N devices to the simulated product, each claimed to
   the company's own Particle account, and to our registry. N - new-owners owners already have
   a ready account (their Particle customers are created before the clock starts).
2. Turns the simulator's general rate limit down to --limit (requests/window seconds; Particle's
   real one is 10000/300) and runs the real `migrate-devices` command on a CSV of all N rows,
   pacing Particle calls at --rate per second. Owners with an account get their device now;
   the others are invited.
3. The invited owners verify their addresses (the verification link sign-up mails), which
   creates their Particle customers and claims their devices through the provisioning-ready
   callback; then the sweep runs until nothing is left to do.
4. Checks every device in our database and in the simulator, and prints the times, the
   Particle requests, the 429s met and the failures (the goal: zero).
"""

import argparse
import csv
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time

COMPANY_ACCOUNT = "company-fleet@maker.example"
PASSWORD_HASH_SOURCE = "bench-password-not-secret"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench/migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, help="devices to migrate (default 1000; 200 with --quick)")
    parser.add_argument("--new-owners", type=int, help="owners without an account yet (default 10%%)")
    parser.add_argument(
        "--rate", type=float, default=40.0, help="client-side pacing, Particle requests/s (default 40)"
    )
    parser.add_argument(
        "--limit", default="1500/30", help="simulator rate limit as requests/seconds (default 1500/30 = 50/s)"
    )
    parser.add_argument("--quick", action="store_true", help="200 devices")
    args = parser.parse_args(argv)
    args.devices = args.devices or (200 if args.quick else 1000)
    if args.new_owners is None:
        args.new_owners = args.devices // 10
    requests_, _, window = args.limit.partition("/")
    args.limit_requests, args.limit_window = int(requests_), float(window or 300)
    return args


class _Sink:
    def __init__(self):
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        return "250 OK"


class _Counter(logging.Handler):
    def __init__(self, needle):
        super().__init__()
        self.needle = needle
        self.count = 0

    def emit(self, record):
        if self.needle in record.getMessage():
            self.count += 1


def main(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    from aiosmtpd.controller import Controller

    from selfserve import config as config_module
    from selfserve.simulator.server import SimulatorServer

    folder = tempfile.mkdtemp(prefix="selfserve-bench-migrate-")
    simulator = SimulatorServer(port=0).start()
    sink = _Sink()
    mail_port = _free_port()
    smtp = Controller(sink, hostname="127.0.0.1", port=mail_port)
    smtp.start()
    migration_log = logging.getLogger("selfserve.services.migration")
    rate_waits = _Counter("Particle rate limit: waiting")
    migration_log.addHandler(rate_waits)
    level = migration_log.level
    migration_log.setLevel(logging.INFO)
    try:
        return _run(args, folder, simulator, sink, mail_port, config_module, rate_waits)
    finally:
        migration_log.removeHandler(rate_waits)
        migration_log.setLevel(level)
        smtp.stop()
        simulator.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _run(args, folder, simulator, sink, mail_port, config_module, rate_waits):
    from selfserve import create_app
    from selfserve import models
    from selfserve import passwords
    from selfserve import schema
    from selfserve import sweep
    from selfserve import tokens
    from selfserve.models import Device
    from selfserve.models import MigrationRow
    from selfserve.models import User
    from selfserve.services import accounts

    logging.basicConfig(level=logging.ERROR)

    schema.upgrade_url(f"sqlite:///{folder}/bench.db")
    app = create_app(
        {
            "TESTING": True,
            "SECRET_KEY": secrets.token_hex(32),
            "DATABASE_URL": f"sqlite:///{folder}/bench.db",
            "BASE_URL": "http://127.0.0.1",
            "PARTICLE_API_URL": simulator.url,
            **config_module.demo_particle_settings(),
            "MAIL_SERVER": "127.0.0.1",
            "MAIL_PORT": mail_port,
            "SWEEP_SECONDS": 0,
            "MIGRATION_REQUESTS_PER_SECOND": args.rate,
            "MIGRATION_MAX_INLINE_RATE_WAITS": 8,
        }
    )
    client = app.extensions["particle"]
    rows = []
    print(
        f"Setting up {args.devices} devices ({args.new_owners} owners without an account)...", file=sys.stderr
    )
    with app.app_context(), models.db.connection_context():
        setup_hash = passwords.hash_password(secrets.token_hex(8))
        password_hash = passwords.hash_password(PASSWORD_HASH_SOURCE)
        devices = []
        for index in range(args.devices):
            device_id = secrets.token_hex(12)
            model = "window" if index % 2 == 0 else "pump"
            serial = f"MIGR-{index:05d}"
            simulator.add_device(
                device_id, model=model, serial_number=serial, setup_code="UNUSED00", online=True
            )
            simulator.set_device(device_id, in_product=True, owner=COMPANY_ACCOUNT)
            devices.append(
                {
                    "device_id": device_id,
                    "serial_number": serial,
                    "setup_code_hash": setup_hash,
                    "model": model,
                    "in_product": True,
                }
            )
        with models.db.atomic():
            for start in range(0, len(devices), 200):
                Device.insert_many(devices[start : start + 200]).execute()
        for index, device in enumerate(devices):
            email = f"owner{index:05d}@field.example"
            rows.append((device["device_id"], email))
            if index >= args.new_owners:
                customer_id = "c" + secrets.token_hex(12)
                client.create_customer(customer_id)
                User.create(
                    email=email,
                    password_hash=password_hash,
                    email_verified_at=models.utcnow(),
                    particle_customer_id=customer_id,
                    provisioning_state="ready",
                )
    csv_path = os.path.join(folder, "owners.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["device_id", "email"])
        writer.writerows(rows)

    simulator.configure(rate_limit={"requests": args.limit_requests, "window": args.limit_window})
    simulator.reset_counters()

    # Phase 1: the operator's command.
    started = time.monotonic()
    result = app.test_cli_runner().invoke(args=["migrate-devices", csv_path])
    command_seconds = time.monotonic() - started
    summary_line = [line for line in result.output.splitlines() if line and not line.startswith("line ")][-1:]

    # Phase 2: the invited owners verify their addresses.
    started = time.monotonic()
    with app.app_context(), models.db.connection_context():
        for _device_id, email in rows[: args.new_owners]:
            # What accounts.sign_up saves (its verification email is not needed here).
            user = User.create(email=email, password_hash=password_hash)
            link = tokens.make("verify_email", {"u": user.id, "e": tokens.fingerprint(email)})
            accounts.verify_email(link, password=PASSWORD_HASH_SOURCE)  # the sign-in that finishes it
    verify_seconds = time.monotonic() - started

    # Phase 3: the sweep finishes anything postponed (rate limits, provisioning retries).
    started = time.monotonic()
    deadline = started + 600
    while time.monotonic() < deadline:
        with app.app_context(), models.db.connection_context():
            pending = MigrationRow.select().where(MigrationRow.state.in_(["invited", "claiming"])).count()
            pending_accounts = User.select().where(User.provisioning_state == "pending").count()
            # Backoff waits are real; move due times forward so the bench doesn't idle.
            MigrationRow.update(next_attempt_at=None).where(MigrationRow.state == "claiming").execute()
            User.update(provisioning_next_at=None).where(User.provisioning_state == "pending").execute()
        if not pending and not pending_accounts:
            break
        sweep.run_once(app)
        time.sleep(0.2)
    sweep_seconds = time.monotonic() - started

    failures = []
    with app.app_context(), models.db.connection_context():
        users = {u.email: u for u in User.select()}
        state = {d["id"]: d for d in simulator.state()["devices"]}
        for device_id, email in rows:
            row = MigrationRow.get_or_none(MigrationRow.device_id == device_id)
            device = Device.get_by_id(device_id)
            user = users.get(email)
            if row is None or row.state != "claimed":
                failures.append(
                    (device_id, f"row {row.state if row else 'missing'}: {row.last_error if row else ''}")
                )
            elif user is None or device.owner_id != user.id or device.claim_state is not None:
                failures.append((device_id, "database owner wrong"))
            elif state[device_id]["owner"] != user.particle_customer_id:
                failures.append((device_id, f"Particle owner {state[device_id]['owner']}"))
    counters = simulator.counters()

    total = command_seconds + verify_seconds + sweep_seconds
    print()
    print("Migration bench (selfserve migrate-devices against the Particle Cloud simulator)")
    print(f"  devices                         {args.devices}")
    print(f"  owners with an account / invited {args.devices - args.new_owners} / {args.new_owners}")
    print(
        f"  simulator rate limit            {args.limit_requests} requests / {args.limit_window:g} s"
        f" ({args.limit_requests / args.limit_window:.0f}/s)"
    )
    print(f"  client pacing                   {args.rate:g} requests/s")
    print(
        f"  command                         {command_seconds:8.1f} s   {summary_line[0] if summary_line else ''}"
    )
    print(f"  invited owners verify           {verify_seconds:8.1f} s")
    print(f"  sweep until done                {sweep_seconds:8.1f} s")
    print(f"  total                           {total:8.1f} s")
    print(f"  Particle requests               {counters['total']}  ({counters['total'] / total:.1f}/s)")
    print(f"  429s met (waited, retried)      {rate_waits.count}")
    print(f"  emails sent                     {sink.count}")
    print(f"  failures                        {len(failures)}")
    for device_id, reason in failures[:10]:
        print(f"    {device_id}: {reason}")
    return 1 if failures else 0


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
