"""History and alerts, measured on SQLite and PostgreSQL side by side in one run.

    bench/history [--quick] [--postgres URL] [--devices N] [--flap-devices N] [--flap-minutes M]

For each database (a fresh SQLite file; a PostgreSQL database of our own, emptied first):

1. Storage: one simulated day of a pump (a state event a minute: pressure, flow and run time
   change) and of a window covering (four moves a day, battery every 5 minutes) through
   history.record, rolled up; bytes per device per day of raw changes and of rollups (tables
   and their indexes), and what 7 days of raw plus 13 months of rollups come to.
2. Fault -> alert email: a pump's state event with a fault goes through the one ingest function
   (as the webhook and the stream deliver it); the alert sender thread mails it over SMTP to a
   local sink; median and p95 from the event to the mail in the sink.
3. Flapping: devices (10 per person) go offline and online every minute (spark/status), pumps
   also fault and clear, for M minutes of simulated time with the alert timer every minute;
   then an outage of every device past its grace. Episodes, alerts per episode per person,
   mails per person; half the people take the daily digest (one digest each, listing all
   their devices).
4. Chart query: hourly rollups for 13 months for N devices (the measured ones with a row every
   hour, the rest one a day), then a 30-day chart of one device: queries and median time.

No timing is judged here or in tests; this prints numbers.
"""

import argparse
import datetime
import json
import logging
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time

PUMP_NAMES = ("pressure_kpa", "flow_lpm", "runtime_h", "online")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench/history", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (~1 minute)")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/bench_history",
        help="PostgreSQL database to use (emptied first; created when missing); '' skips PostgreSQL",
    )
    parser.add_argument("--devices", type=int, help="devices with 13 months of rollups (default 5000)")
    parser.add_argument("--flap-devices", type=int, help="devices flapping (default 1000)")
    parser.add_argument("--flap-minutes", type=int, help="minutes of flapping (default 10)")
    parser.add_argument("--faults", type=int, help="faults timed for latency (default 40)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.devices = args.devices or (500 if quick else 5000)
    args.flap_devices = args.flap_devices or (100 if quick else 1000)
    args.flap_minutes = args.flap_minutes or (3 if quick else 10)
    args.faults = args.faults or (10 if quick else 40)
    args.months = 13
    return args


class Sink:
    """The SMTP sink: when each mail arrived, per recipient."""

    def __init__(self):
        self.arrivals = []  # (recipient, monotonic time, subject, body)
        self.changed = threading.Condition()

    async def handle_DATA(self, server, session, envelope):
        import email

        message = email.message_from_bytes(envelope.content)
        body = message.get_payload(decode=True).decode() if not message.is_multipart() else ""
        with self.changed:
            for recipient in envelope.rcpt_tos:
                self.arrivals.append((recipient.lower(), time.monotonic(), message["Subject"], body))
            self.changed.notify_all()
        return "250 OK"

    def clear(self):
        with self.changed:
            self.arrivals.clear()

    def wait_for(self, address, timeout=30.0):
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for recipient, at, _, _ in self.arrivals:
                    if recipient == address:
                        return at
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(left)

    def per_recipient(self):
        counts = {}
        with self.changed:
            for recipient, _, _, body in self.arrivals:
                counts.setdefault(recipient, []).append(body)
        return counts


class QueryCounter(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.count = 0

    def emit(self, record):
        self.count += 1


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prepare_postgres(url):
    """Create the bench database when missing and empty it (it is the bench's own)."""
    import psycopg2
    from psycopg2 import sql

    base, _, name = url.rpartition("/")
    admin = psycopg2.connect(base + "/postgres")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cursor.fetchone() is None:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    admin.close()
    connection = psycopg2.connect(url)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    connection.close()


def main(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    from aiosmtpd.controller import Controller

    logging.basicConfig(level=logging.ERROR)
    folder = tempfile.mkdtemp(prefix="selfserve-bench-history-")
    sink = Sink()
    port = _free_port()
    smtp = Controller(sink, hostname="127.0.0.1", port=port)
    smtp.start()
    databases = [("SQLite", f"sqlite:///{folder}/bench.db")]
    if args.postgres:
        databases.append(("PostgreSQL", args.postgres))
    results = {}
    try:
        for label, url in databases:
            print(f"[{label}] ...", file=sys.stderr)
            if url.startswith("postgresql"):
                _prepare_postgres(url)
            results[label] = run_on(url, label, args, sink, port)
    finally:
        smtp.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print_table(args, results)
    return 0


def run_on(url, label, args, sink, port):
    from selfserve import config as config_module
    from selfserve import create_app
    from selfserve import models
    from selfserve import schema
    from selfserve.services import alerts
    from selfserve.services import outbox

    schema.upgrade_url(url)
    app = create_app(
        {
            "TESTING": True,
            "SECRET_KEY": secrets.token_hex(32),
            "DATABASE_URL": url,
            "BASE_URL": "http://127.0.0.1",
            "PARTICLE_API_URL": "http://127.0.0.1:9",  # never called: nothing here reads Particle
            **config_module.demo_particle_settings(),
            "MAIL_SERVER": "127.0.0.1",
            "MAIL_PORT": port,
            "SWEEP_SECONDS": 0,
            "EVENT_STREAM": False,
        }
    )
    out = {}
    with app.app_context(), models.db.connection_context():
        out.update(storage(url, 2 if args.quick else 5))
        # Alerts are decided, queued in the outbox and mailed by its sender, as on the site.
        sender = alerts.start_sender(app, interval=30.0)
        mailer = outbox.start_sender(app, interval=30.0)
        out.update(fault_latency(args, sink))
        sender.stop.set()
        alerts.wake()
        sender.join(5)
        mailer.stop.set()
        outbox.wake(app)
        mailer.join(5)
        out.update(flapping(args, sink))
        out.update(chart_query(args, url))
    return out


# --- helpers -----------------------------------------------------------------------------------


def _owner(email):
    from selfserve.models import User
    from selfserve.models import utcnow

    return User.create(
        email=email, password_hash="not-used", email_verified_at=utcnow(), provisioning_state="ready"
    )


def _device(device_id, owner, model, claimed_at):
    from selfserve.models import Device

    return Device.create(
        device_id=device_id,
        serial_number="B-" + device_id.upper(),
        setup_code_hash="not-used",
        model=model,
        in_product=True,
        owner=owner,
        claimed_at=claimed_at,
    )


def _table_bytes(url, tables):
    from selfserve.models import db

    if url.startswith("postgresql"):
        return sum(
            db.execute_sql("SELECT pg_total_relation_size(%s)", (table,)).fetchone()[0] for table in tables
        )
    names = [table for table in tables]
    names += [
        row[0]
        for row in db.execute_sql(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name IN ({})".format(
                ",".join("?" * len(tables))
            ),
            tables,
        ).fetchall()
    ]
    return db.execute_sql(
        "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name IN ({})".format(",".join("?" * len(names))),
        names,
    ).fetchone()[0]


# --- 1. storage -------------------------------------------------------------------------------------


def storage(url, count):
    import math
    import random

    from selfserve.models import db
    from selfserve.services import history

    random.seed(7)
    day = datetime.datetime(2026, 1, 5)
    owner = _owner("storage@bench.example")
    result = {}
    for model in ("pump", "window"):
        before_raw = _table_bytes(url, ["valuesample"])
        before_rollup = _table_bytes(url, ["valuerollup"])
        rows = 0
        for number in range(count):
            device_id = f"{'a' if model == 'pump' else 'b'}{number:023x}"
            _device(device_id, owner, model, day - datetime.timedelta(days=1))
            transaction = db.atomic()  # one commit per device-day: this phase measures bytes
            transaction.__enter__()
            if model == "pump":
                pressure, runtime = 200.0, 100.0
                for minute in range(24 * 60):
                    at = day + datetime.timedelta(minutes=minute)
                    pressure = max(50.0, min(370.0, pressure + random.uniform(-6, 6)))
                    runtime += 1 / 60
                    values = {
                        "pressure_kpa": round(pressure),
                        "flow_lpm": round(pressure / 20 + random.uniform(-0.3, 0.3), 1),
                        "runtime_h": round(runtime, 2),
                        "running": True,
                        "fault": "",
                    }
                    rows += len(history.record(device_id, values, at=at, online=True))
            else:
                position = 0
                for minute in range(0, 24 * 60, 5):
                    at = day + datetime.timedelta(minutes=minute)
                    values = {"battery_v": round(3.7 + 0.05 * math.sin(minute / 10 + number), 3)}
                    rows += len(history.record(device_id, values, at=at, online=True))
                for hour in (7, 9, 18, 22):  # four moves a day, 10 % a second
                    target = 100 if position == 0 else 0
                    for second in range(11):
                        at = day + datetime.timedelta(hours=hour, seconds=second)
                        step = position + (target - position) * second // 10
                        values = {"position": step, "target": target, "moving": second < 10}
                        rows += len(history.record(device_id, values, at=at))
                    position = target
            transaction.__exit__(None, None, None)
        history.roll_up(now=day + datetime.timedelta(days=1, hours=1))
        raw = (_table_bytes(url, ["valuesample"]) - before_raw) / count
        rollup = (_table_bytes(url, ["valuerollup"]) - before_rollup) / count
        result[f"{model}_raw_rows"] = rows / count
        result[f"{model}_raw_bytes"] = raw
        result[f"{model}_rollup_bytes"] = rollup
        result[f"{model}_kept_bytes"] = raw * 7 + rollup * 396
    return result


# --- 2. fault -> alert mail -----------------------------------------------------------------------


def fault_latency(args, sink):
    from selfserve.models import utcnow
    from selfserve.services import device_events

    claimed = utcnow() - datetime.timedelta(days=1)
    latencies = []
    missing = 0
    for number in range(args.faults):
        email = f"fault{number}@bench.example"
        owner = _owner(email)
        device_id = f"c{number:023x}"
        _device(device_id, owner, "pump", claimed)
        state = json.dumps({"v": 1, "pressure_kpa": 385, "running": False, "fault": "overpressure"})
        started = time.monotonic()
        device_events.ingest("selfserve/state", state, device_id, utcnow())
        arrived = sink.wait_for(email, timeout=30)
        if arrived is None:
            missing += 1
        else:
            latencies.append(arrived - started)
    latencies.sort()
    return {
        "fault_count": args.faults,
        "fault_missing": missing,
        "fault_median_ms": statistics.median(latencies) * 1000 if latencies else None,
        "fault_p95_ms": latencies[max(0, int(len(latencies) * 0.95) - 1)] * 1000 if latencies else None,
    }


# --- 3. flapping and an outage ------------------------------------------------------------------------


def _mail_queued():
    """Send everything the outbox holds now (its sender thread is not running here)."""
    from selfserve.services import outbox

    while outbox.send_due(limit=1000):
        pass


def flapping(args, sink):
    from selfserve.models import AlertEpisode
    from selfserve.models import AlertNotice
    from selfserve.models import db
    from selfserve.models import utcnow
    from selfserve.services import alerts
    from selfserve.services import device_events

    sink.clear()
    start = (utcnow() + datetime.timedelta(days=3)).replace(second=0, microsecond=0)
    claimed = start - datetime.timedelta(days=1)
    people = []
    devices = []
    for number in range(args.flap_devices):
        if number % 10 == 0:
            email = f"flap{number // 10}@bench.example"
            people.append((email, _owner(email)))
        model = "pump" if number % 2 == 0 else "window"
        device_id = f"d{number:023x}"
        _device(device_id, people[-1][1], model, claimed)
        devices.append((device_id, model))
    # Half the people take everything in the daily digest.
    for index, (_, owner) in enumerate(people):
        if index % 2:
            alerts.save_settings(owner, {kind: "digest" for kind in alerts.KINDS})
    fault_state = json.dumps({"v": 1, "fault": "overpressure", "pressure_kpa": 385})
    clear_state = json.dumps({"v": 1, "fault": "", "pressure_kpa": 200})
    ingested = 0
    began = time.monotonic()
    for minute in range(args.flap_minutes):
        at = start + datetime.timedelta(minutes=minute)
        with db.atomic():  # one minute of events per transaction: a busy webhook's batches
            for device_id, model in devices:
                device_events.ingest("spark/status", "offline", device_id, at)
                device_events.ingest("spark/status", "online", device_id, at + datetime.timedelta(seconds=30))
                ingested += 2
                if model == "pump":
                    device_events.ingest(
                        "selfserve/state", fault_state, device_id, at + datetime.timedelta(seconds=10)
                    )
                    device_events.ingest(
                        "selfserve/state", clear_state, device_id, at + datetime.timedelta(seconds=40)
                    )
                    ingested += 2
        alerts.run_timers(now=at + datetime.timedelta(seconds=59))
    ingest_seconds = time.monotonic() - began
    after = start + datetime.timedelta(minutes=args.flap_minutes)
    alerts.send_due(after + datetime.timedelta(minutes=11))  # past the reopen window: "resolved"
    _mail_queued()
    fault_episodes = AlertEpisode.select().where(AlertEpisode.kind == "fault").count()
    started = (
        AlertNotice.select().where((AlertNotice.kind == "fault") & (AlertNotice.event == "started")).count()
    )
    pumps_per_person = 5
    flap_mails = sink.per_recipient()
    flap_max = max((len(bodies) for bodies in flap_mails.values()), default=0)
    # The outage: every device offline, past every grace.
    sink.clear()
    outage = after + datetime.timedelta(minutes=30)
    with db.atomic():
        for device_id, _ in devices:
            device_events.ingest("spark/status", "offline", device_id, outage)
    alerts.run_timers(now=outage + datetime.timedelta(minutes=61))
    _mail_queued()
    at_once = sink.per_recipient()
    alerts.send_due(outage + datetime.timedelta(days=1, hours=1))  # past everyone's digest hour
    _mail_queued()
    every = sink.per_recipient()
    digests = {email: bodies for email, bodies in every.items() if email not in at_once}
    offline_episodes = AlertEpisode.select().where(AlertEpisode.kind == "offline").count()
    return {
        "flap_devices": args.flap_devices,
        "flap_people": len(people),
        "flap_minutes": args.flap_minutes,
        "flap_events": ingested,
        "flap_events_per_s": ingested / ingest_seconds if ingest_seconds else None,
        "flap_fault_episodes": fault_episodes,
        "flap_fault_started_per_episode_person": started / max(1, fault_episodes),
        "flap_expected_episodes": args.flap_devices // 2,
        "flap_max_mails_per_person": flap_max,
        "flap_pumps_per_person": pumps_per_person,
        "outage_offline_episodes": offline_episodes,
        "outage_mails_max": max((len(bodies) for bodies in at_once.values()), default=0),
        "outage_people_mailed": len(at_once),
        "digest_people": len(digests),
        "digest_mails_max": max((len(bodies) for bodies in digests.values()), default=0),
        "digest_lines_min": min(
            (sum(body.count("offline since") for body in bodies) for bodies in digests.values()), default=0
        ),
    }


# --- 4. 30-day chart over 13 months of rollups ----------------------------------------------------------


def chart_query(args, url):
    from selfserve.models import Device
    from selfserve.models import db
    from selfserve.models import utcnow
    from selfserve.services import history

    end = utcnow().replace(minute=0, second=0, microsecond=0)
    first = end - datetime.timedelta(days=30 * args.months)
    owner = _owner("charts@bench.example")
    measured = 10
    days = (end - first).days
    hours = days * 24
    background = max(0, args.devices - measured)
    began = time.monotonic()
    names_sql = " UNION ALL ".join(f"SELECT '{name}' AS name" for name in PUMP_NAMES)
    with db.atomic():
        for number in range(measured):
            _device(f"e{number:023x}", owner, "pump", first - datetime.timedelta(days=1))
        if url.startswith("postgresql"):
            db.execute_sql(
                "INSERT INTO valuerollup (device_id, owner_id, name, hour, minimum, maximum, mean, last) "
                "SELECT 'e' || lpad(to_hex(d), 23, '0'), %s, n.name, %s::timestamp + make_interval(hours => h), "
                "100 + h %% 50, 150 + h %% 50, 125 + h %% 50, 140 + h %% 50 "
                f"FROM generate_series(0, {measured - 1}) d, generate_series(0, {hours - 1}) h, ({names_sql}) n",
                (owner.id, first),
            )
            if background:
                db.execute_sql(
                    "INSERT INTO valuerollup (device_id, owner_id, name, hour, minimum, maximum, mean, last) "
                    "SELECT 'f' || lpad(to_hex(d), 23, '0'), %s, n.name, %s::timestamp + make_interval(days => h, hours => 12), "
                    "1, 2, 1.5, 2 "
                    f"FROM generate_series(0, {background - 1}) d, generate_series(0, {days - 1}) h, ({names_sql}) n",
                    (owner.id, first),
                )
        else:
            db.execute_sql(
                "WITH RECURSIVE d(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM d WHERE i < ?), "
                "h(j) AS (SELECT 0 UNION ALL SELECT j + 1 FROM h WHERE j < ?) "
                "INSERT INTO valuerollup (device_id, owner_id, name, hour, minimum, maximum, mean, last) "
                "SELECT printf('e%023x', i), ?, n.name, datetime(?, '+' || j || ' hours'), "
                "100 + j % 50, 150 + j % 50, 125 + j % 50, 140 + j % 50 "
                f"FROM d, h, ({names_sql}) n",
                (measured - 1, hours - 1, owner.id, first.strftime("%Y-%m-%d %H:%M:%S")),
            )
            if background:
                db.execute_sql(
                    "WITH RECURSIVE d(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM d WHERE i < ?), "
                    "h(j) AS (SELECT 0 UNION ALL SELECT j + 1 FROM h WHERE j < ?) "
                    "INSERT INTO valuerollup (device_id, owner_id, name, hour, minimum, maximum, mean, last) "
                    "SELECT printf('f%023x', i), ?, n.name, datetime(?, '+' || j || ' days', '+12 hours'), "
                    "1, 2, 1.5, 2 "
                    f"FROM d, h, ({names_sql}) n",
                    (background - 1, days - 1, owner.id, first.strftime("%Y-%m-%d %H:%M:%S")),
                )
    if url.startswith("postgresql"):
        db.execute_sql("ANALYZE valuerollup")
    else:
        db.execute_sql("ANALYZE")
    fill_seconds = time.monotonic() - began
    rows = db.execute_sql("SELECT COUNT(*) FROM valuerollup").fetchone()[0]
    counter = QueryCounter()
    peewee_log = logging.getLogger("peewee")
    timings = []
    queries = []
    old_level, old_propagate = peewee_log.level, peewee_log.propagate
    peewee_log.setLevel(logging.DEBUG)
    peewee_log.propagate = False  # count the statements, don't print them
    peewee_log.addHandler(counter)
    try:
        for _ in range(5):
            for number in range(measured):
                device = Device.get_by_id(f"e{number:023x}")
                counter.count = 0
                began = time.perf_counter()
                chart = history.chart(device, "30d", now=end)
                timings.append(time.perf_counter() - began)
                queries.append(counter.count)
                assert not chart.series[0].empty
    finally:
        peewee_log.removeHandler(counter)
        peewee_log.setLevel(old_level)
        peewee_log.propagate = old_propagate
    return {
        "chart_rows": rows,
        "chart_fill_s": fill_seconds,
        "chart_median_ms": statistics.median(timings) * 1000,
        "chart_p95_ms": sorted(timings)[int(len(timings) * 0.95) - 1] * 1000,
        "chart_queries": max(queries),
    }


# --- the table ----------------------------------------------------------------------------------------


def print_table(args, results):
    labels = list(results)

    def row(title, key, fmt="{:.0f}"):
        cells = []
        for label in labels:
            value = results[label].get(key)
            cells.append("—" if value is None else fmt.format(value))
        print(f"  {title:<58}" + "".join(f"{cell:>14}" for cell in cells))

    print()
    print("History and alerts (bench/history" + (" --quick" if args.quick else "") + ")")
    print(f"  {'':<58}" + "".join(f"{label:>14}" for label in labels))
    print("  Storage, per device per day")
    row("pump: raw changes stored (rows)", "pump_raw_rows")
    row("pump: raw bytes (table + indexes)", "pump_raw_bytes")
    row("pump: rollup bytes", "pump_rollup_bytes")
    row("pump: kept (7 days raw + 396 days rollups), bytes", "pump_kept_bytes")
    row("window: raw changes stored (rows)", "window_raw_rows")
    row("window: raw bytes (table + indexes)", "window_raw_bytes")
    row("window: rollup bytes", "window_rollup_bytes")
    row("window: kept (7 days raw + 396 days rollups), bytes", "window_kept_bytes")
    print(f"  Fault event -> alert mail in the SMTP sink ({args.faults} faults)")
    row("median, ms (goal < 5000)", "fault_median_ms", "{:.1f}")
    row("p95, ms (goal < 15000)", "fault_p95_ms", "{:.1f}")
    row("faults with no mail within 30 s", "fault_missing")
    print(
        f"  Flapping: {args.flap_devices} devices (10 per person, half pumps), offline/online "
        f"and fault/clear every minute for {args.flap_minutes} min"
    )
    row("events taken in", "flap_events")
    row("events per second (ingest + history + alerts)", "flap_events_per_s")
    row("fault episodes (one per pump, incl. the latency phase's)", "flap_fault_episodes")
    row("pumps", "flap_expected_episodes")
    row(
        "'started' alerts per episode per person (must be <= 1)",
        "flap_fault_started_per_episode_person",
        "{:.2f}",
    )
    row("most mails to one person (5 pumps each)", "flap_max_mails_per_person")
    print("  Outage: every device offline past its grace")
    row("offline episodes", "outage_offline_episodes")
    row("people mailed at once", "outage_people_mailed")
    row("most mails to one person", "outage_mails_max")
    row("people on the daily digest", "digest_people")
    row("most digests to one person", "digest_mails_max")
    row("fewest devices listed in one person's digest (10 expected)", "digest_lines_min")
    print(f"  30-day chart of one pump, 13 months of hourly rollups for {args.devices} devices")
    row("rollup rows stored", "chart_rows")
    row("seconds to fill them", "chart_fill_s", "{:.1f}")
    row("queries per chart", "chart_queries")
    row("median, ms", "chart_median_ms", "{:.1f}")
    row("p95, ms", "chart_p95_ms", "{:.1f}")
    print("  (measured devices: a rollup every hour for 13 months on 4 values; the others one a day)")


if __name__ == "__main__":
    sys.exit(main())
