"""bench/events: the measures of "Live by events", polling (today) and events side by side.

    bench/events [--quick] [--seconds S] [--pages N] [--postgres URL]

Starts the Particle Cloud simulator in-process and a fresh SQLite database, sets homeowners up
through the real services, then runs the site under gunicorn twice on loopback:

- "polling (today)": gthread workers, no event-stream listener, no pushes (pages poll);
- "events": gevent workers (gunicorn.conf.py's worker class), the product event-stream listener
  (one per deployment, by lease), pushes over server-sent events, the product webhook.

and measures, in each: Particle calls per watched online device per minute; publish -> value on
the open pages (median / p95) with N open pages; Particle calls for one view of a 50-device
dashboard; webhook events taken in per second (SQLite, and PostgreSQL with --postgres); memory
per 1000 open push connections. Devices kept live under Particle's limit (10,000 requests / 5
min / IP): with events, measured in a fleet phase (--fleet publishing devices, a tenth of them
on open pages, the simulator's real rate limit on: how many the site holds fresh from events,
what the pages received, and the Particle requests it cost); with polling, derived from the
calls per watched device. Prints one table.
"""

import argparse
import datetime
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time

import requests

from bench import fleet
from bench import load
from bench.servers import REPO_ROOT
from bench.servers import BenchError
from bench.servers import Gunicorn
from bench.servers import loopback_site_env

PARTICLE_PER_MINUTE = 10000 / 5
WEBHOOK_SECRET = "bench-webhook-secret-" + secrets.token_hex(8)
FLEET = 5000


def say(message):
    print(f"[events bench] {message}", file=sys.stderr, flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench/events", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases, few pages (~1 minute)")
    parser.add_argument("--seconds", type=float, help="seconds of each watching phase (default 60; 8 quick)")
    parser.add_argument("--pages", type=int, help="open pages in the latency phase (default 200; 20 quick)")
    parser.add_argument("--dashboard", type=int, help="devices on the big dashboard (default 50; 8 quick)")
    parser.add_argument(
        "--postgres", help="also measure webhook intake on this PostgreSQL database (emptied!)"
    )
    parser.add_argument(
        "--webhook-only", action="store_true", help="only webhook intake, SQLite and --postgres (~1 minute)"
    )
    parser.add_argument(
        "--fleet", type=int, help="publishing devices in the fleet phase (default 5000; 500 quick)"
    )
    parser.add_argument("--fleet-watched", type=int, help="of them on open pages (default a tenth)")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (8.0 if args.quick else 60.0)
    args.pages = args.pages or (20 if args.quick else 200)
    args.dashboard = args.dashboard or (8 if args.quick else 50)
    args.watched = 3 if args.quick else 5
    args.connections = 100 if args.quick else 1000
    args.rounds = 2 if args.quick else 5
    args.webhook_seconds = 3.0 if args.quick else 10.0
    args.fleet = args.fleet or (500 if args.quick else FLEET)
    args.fleet_watched = args.fleet_watched or max(1, args.fleet // 10)
    args.fleet_seconds = 20.0 if args.quick else 90.0
    args.redis = os.environ.get("SELFSERVE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
    return args


# --- the site under gunicorn ---------------------------------------------------------------------


class Site(Gunicorn):
    """The site with a worker class of our choice (gunicorn.conf.py for the events mode)."""

    def __init__(self, name, env, log_dir, gevent):
        super().__init__(name, "bench.app:app", env, log_dir)
        self.gevent = gevent

    @property
    def command(self):
        if self.gevent:
            worker = ["-c", os.path.join(REPO_ROOT, "gunicorn.conf.py"), "-w", "2"]
        else:
            worker = ["-k", "gthread", "-w", "2", "--threads", "8"]
        return [
            sys.executable,
            "-m",
            "gunicorn",
            *worker,
            "-b",
            f"127.0.0.1:{self.port}",
            "--chdir",
            REPO_ROOT,
            "--graceful-timeout",
            "3",
            "--log-level",
            "warning",
            self.app_path,
        ]

    def worker_pids(self):
        master = self.process.pid
        pids = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as handle:
                        if int(handle.read().rsplit(")", 1)[1].split()[1]) == master:
                            pids.append(int(name))
                except (OSError, ValueError, IndexError):
                    continue
        return pids

    def workers_rss_kib(self):
        total = 0
        for pid in self.worker_pids():
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total


# --- clients -------------------------------------------------------------------------------------


class Pusher(threading.Thread):
    """One open page's push stream: records when each text first appears in it."""

    def __init__(self, session, url, watch_for):
        super().__init__(daemon=True)
        self.session = session
        self.url = url
        self.watch_for = watch_for  # list of texts to time
        self.seen = {}
        self.opened = threading.Event()
        self.stop = threading.Event()

    def run(self):
        try:
            with self.session.get(self.url, stream=True, timeout=(5, 120)) as response:
                self.opened.set()
                buffer = ""
                for chunk in response.iter_content(chunk_size=None):
                    if self.stop.is_set() or load.STOP.is_set():
                        return
                    now = time.monotonic()
                    buffer = (buffer + chunk.decode("utf-8", "replace").lower())[-20000:]
                    for text in self.watch_for:
                        if text not in self.seen and text.lower() in buffer:
                            self.seen[text] = now
        except requests.RequestException:
            self.opened.set()


def clone_session(session):
    clone = requests.Session()
    clone.cookies.update(session.cookies)
    return clone


def device_calls(routes):
    return sum(count for route, count in routes.items() if "/devices/:id" in route)


def counters(sim):
    return sim.counters()["routes"]


# --- phases ----------------------------------------------------------------------------------


def watch_cost(site, sim, session, device_ids, seconds, events_mode):
    """Particle calls per watched device per minute: each device has one open page."""
    sim.reset_counters()
    started = time.monotonic()
    if events_mode:
        streams = [Pusher(clone_session(session), f"{site.url}/devices/{d}/live", []) for d in device_ids]
        for stream in streams:
            stream.start()
        time.sleep(seconds)
        for stream in streams:
            stream.stop.set()
    else:
        plans = [[(f"{site.url}/devices/{d}/values", load.HTMX_HEADERS)] for d in device_ids]
        sessions = [clone_session(session) for _ in device_ids]
        threads = [
            threading.Thread(target=_poll_loop, args=(s, plan[0][0], seconds), daemon=True)
            for s, plan in zip(sessions, plans, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    elapsed = time.monotonic() - started
    calls = device_calls(counters(sim))
    return calls / len(device_ids) / (elapsed / 60)


def _poll_loop(session, url, seconds, every=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not load.STOP.is_set():
        try:
            session.get(url, headers=load.HTMX_HEADERS, timeout=load.REQUEST_TIMEOUT)
        except requests.RequestException:
            pass
        time.sleep(every)


def latency(site, sim, session, pump, pages, rounds, events_mode):
    """Publish -> value on every open page: the pump trips a fault (its firmware publishes it
    at once); every open page of the pump records when "overpressure" shows up."""
    results = []
    for round_number in range(rounds):
        sim.set_device(pump, fault="")
        time.sleep(1.5)
        marker = "overpressure"
        if events_mode:
            viewers = [
                Pusher(clone_session(session), f"{site.url}/devices/{pump}/live", [marker])
                for _ in range(pages)
            ]
            for viewer in viewers:
                viewer.start()
            for viewer in viewers:
                viewer.opened.wait(10)
            time.sleep(1.0)
            published = time.monotonic()
            sim.set_device(pump, fault="overpressure")
            deadline = published + 20
            while time.monotonic() < deadline and any(marker not in v.seen for v in viewers):
                time.sleep(0.05)
            for viewer in viewers:
                viewer.stop.set()
            results += [v.seen[marker] - published for v in viewers if marker in v.seen]
        else:
            seen = []
            published = [None]

            def poller(local_session, offset, seen=seen, published=published):
                time.sleep(offset)
                deadline = time.monotonic() + 25
                while time.monotonic() < deadline and not load.STOP.is_set():
                    try:
                        text = local_session.get(
                            f"{site.url}/devices/{pump}/values",
                            headers=load.HTMX_HEADERS,
                            timeout=load.REQUEST_TIMEOUT,
                        ).text
                    except requests.RequestException:
                        text = ""
                    if published[0] is not None and "overpressure" in text.lower():
                        seen.append(time.monotonic() - published[0])
                        return
                    time.sleep(5.0)

            count = min(pages, 40)  # threads polling like pages do (5 s, spread)
            threads = [
                threading.Thread(target=poller, args=(clone_session(session), 5.0 * i / count), daemon=True)
                for i in range(count)
            ]
            for thread in threads:
                thread.start()
            time.sleep(6.0)
            published[0] = time.monotonic()
            sim.set_device(pump, fault="overpressure")
            for thread in threads:
                thread.join()
            results += seen
        say(f"  round {round_number + 1}: {len(results)} arrivals so far")
    sim.set_device(pump, fault="")
    if not results:
        return None
    results.sort()
    return statistics.median(results), results[int(0.95 * (len(results) - 1))], len(results)


def dashboard_cost(site, sim, session, device_ids, events_mode):
    """Particle calls for one view of the big dashboard (as a browser makes it)."""
    time.sleep(1.0)
    sim.reset_counters()
    page = session.get(f"{site.url}/devices", timeout=load.REQUEST_TIMEOUT)
    if page.status_code != 200:
        raise BenchError(f"dashboard answered {page.status_code}")
    if events_mode:
        pusher = Pusher(
            clone_session(session), f"{site.url}/devices/live", [f"summary-{d}" for d in device_ids]
        )
        pusher.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(pusher.seen) < len(device_ids):
            time.sleep(0.05)
        pusher.stop.set()
    else:
        for device_id in device_ids:  # each card's summary fragment, loaded with the page
            session.get(
                f"{site.url}/devices/{device_id}/summary",
                headers=load.HTMX_HEADERS,
                timeout=load.REQUEST_TIMEOUT,
            )
    return sum(counters(sim).values())


class FleetPage(threading.Thread):
    """One open device page's push stream in the fleet phase: counts the values pushed."""

    def __init__(self, session, url):
        super().__init__(daemon=True)
        self.session = session
        self.url = url
        self.pushes = 0
        self.opened = threading.Event()
        self.stop = threading.Event()

    def run(self):
        try:
            with self.session.get(self.url, stream=True, timeout=(10, 300)) as response:
                self.opened.set()
                for line in response.iter_lines(decode_unicode=True):
                    if self.stop.is_set() or load.STOP.is_set():
                        return
                    if line == "event: values":
                        self.pushes += 1
        except requests.RequestException:
            self.opened.set()


def seed_fleet(app, sim, count, per_owner):
    """`count` publishing devices of current firmware, in the product and owned by
    count/per_owner customers: in the simulator, and as rows in our database (what claims
    would leave; claiming 5,000 devices through the site is not what is measured here).
    Returns [(owner email, [device ids])]."""
    from selfserve import models
    from selfserve import passwords
    from selfserve.models import Device
    from selfserve.models import User
    from selfserve.models import utcnow

    owners = []
    now = utcnow()
    with app.app_context(), models.db.connection_context(), models.db.atomic():
        password_hash = passwords.hash_password(fleet.PASSWORD)
        rows = []
        for first in range(0, count, per_owner):
            customer = "c" + secrets.token_hex(12)
            email = f"fleet{first // per_owner:04d}@bench.example"
            user = User.create(
                email=email,
                password_hash=password_hash,
                email_verified_at=now,
                provisioning_state="ready",
                particle_customer_id=customer,
            )
            ids = []
            for number in range(first, min(first + per_owner, count)):
                device_id = f"{0xF1EE7000000000000000 + number:024x}"
                model = "window" if number % 2 else "pump"
                sim.add_device(device_id, model=model, serial_number=f"FLEET-{number:05d}", in_product=True)
                sim.set_device(device_id, owner=customer)
                rows.append(
                    {
                        "device_id": device_id,
                        "serial_number": f"FLEET-{number:05d}",
                        "setup_code_hash": "!",
                        "model": model,
                        "in_product": True,
                        "owner": user.id,
                        "claimed_at": datetime.datetime(2020, 1, 1),
                    }
                )
                ids.append(device_id)
            owners.append((email, ids))
        for start in range(0, len(rows), 500):
            Device.insert_many(rows[start : start + 500]).execute()
    return owners


def fresh_devices(app, device_ids):
    """How many of `device_ids` hold values the site shows without asking Particle (an event
    arrived within the device's heartbeat plus the grace)."""
    from selfserve import models
    from selfserve.models import DeviceSnapshot
    from selfserve.models import utcnow

    with app.app_context(), models.db.connection_context():
        now = utcnow()
        fresh = 0
        for start in range(0, len(device_ids), 500):
            fresh += (
                DeviceSnapshot.select()
                .where(
                    DeviceSnapshot.device_id.in_(device_ids[start : start + 500])
                    & (DeviceSnapshot.fresh_until > now)
                )
                .count()
            )
        return fresh


def fleet_live(app, site, sim, args):
    """A fleet of publishing devices under Particle's real rate limit, a tenth of them on open
    pages: what the pages get and what it costs at Particle, measured rather than derived."""
    per_owner = 10
    heartbeat = 60.0
    say(f"fleet: {args.fleet} publishing devices, {args.fleet_watched} on open pages...")
    owners = seed_fleet(app, sim, args.fleet, per_owner)
    sim.configure(heartbeat_seconds=heartbeat, rate_limit={"requests": 10000, "window": 300})
    all_ids = [device_id for _, ids in owners for device_id in ids]
    watched = [(email, device_id) for email, ids in owners for device_id in ids][: args.fleet_watched]
    watched_ids = [device_id for _, device_id in watched]
    # Every device publishes within two heartbeats of joining (the simulator spreads them).
    deadline = time.monotonic() + 2 * heartbeat + 30
    while time.monotonic() < deadline and fresh_devices(app, watched_ids) < len(watched_ids):
        time.sleep(5)
    warmed = fresh_devices(app, watched_ids)
    say(f"fleet: {warmed}/{len(watched_ids)} watched devices event-fed; opening their pages...")
    emails = sorted({email for email, _ in watched})
    sessions = dict(
        zip(emails, load.login_many(site.url, emails, fleet.PASSWORD, site.url + "/devices"), strict=True)
    )
    sim.reset_counters()
    started = time.monotonic()
    pages = [
        FleetPage(clone_session(sessions[email]), f"{site.url}/devices/{d}/live") for email, d in watched
    ]
    for page in pages:
        page.start()
    for page in pages:
        page.opened.wait(30)
    time.sleep(max(0.0, args.fleet_seconds - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    routes = counters(sim)
    for page in pages:
        page.stop.set()
    sim.configure(heartbeat_seconds=120.0, rate_limit={"requests": 10**9, "window": 300})
    return {
        "devices": len(all_ids),
        "pages": len(pages),
        "opened": sum(1 for page in pages if page.opened.is_set()),
        "pages_pushed": sum(1 for page in pages if page.pushes > 0),
        "pushes": sum(page.pushes for page in pages),
        "watched_fresh": fresh_devices(app, watched_ids),
        "fleet_fresh": fresh_devices(app, all_ids),
        "particle_calls": sum(routes.values()),
        "seconds": elapsed,
        "heartbeat": heartbeat,
    }


def webhook_rate(site, device_ids, seconds, database_url=None, clients=8):
    """State events POSTed to the webhook as Particle would, for `seconds`: {"rate": taken in
    per second, "cpu_ms": CPU milliseconds per event of the site's workers plus, on PostgreSQL,
    every backend of the database (the pool's, the LISTEN connection's, any autovacuum worker's;
    one that exits during the run is left out)}. The CPU figure doesn't depend on what else
    the machine runs.

    The clients are plain keep-alive http.client connections: the load generator shares the
    2 cores with the site and the database, and requests' own work per POST (about 1 ms) would
    be taken from them (Particle sends from its own machines)."""
    taken = [0]
    lock = threading.Lock()
    counter = iter(range(10**9))
    headers = {"Authorization": f"Bearer {WEBHOOK_SECRET}", "Content-Type": "application/json"}

    def worker():
        connection = http.client.HTTPConnection("127.0.0.1", site.port, timeout=20)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not load.STOP.is_set():
            with lock:
                n = next(counter)
            device_id = device_ids[n % len(device_ids)]
            published = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) + datetime.timedelta(
                microseconds=n % 1000
            )
            body = {
                "event": "selfserve/state",
                "data": json.dumps(
                    {"v": 1, "hb": 120, "position": n % 100, "target": n % 100, "moving": False}
                ),
                "coreid": device_id,
                "published_at": published.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            }
            try:
                connection.request("POST", "/hooks/particle", json.dumps(body), headers)
                answer = connection.getresponse()
                answer.read()
                if answer.status == 200:  # taken in: stored, or recognised as a repeat / older
                    with lock:
                        taken[0] += 1
            except (OSError, http.client.HTTPException):
                connection.close()  # reconnects on the next request

    pids = site.worker_pids() + _database_backend_pids(database_url)
    cpu_before = _cpu_seconds(pids)
    started = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    # Backends opened during the run (the pool grows) count from zero.
    pids_after = site.worker_pids() + _database_backend_pids(database_url)
    cpu_after = _cpu_seconds(pids_after)
    cpu = sum(seconds - cpu_before.get(pid, 0.0) for pid, seconds in cpu_after.items())
    return {"rate": taken[0] / elapsed, "cpu_ms": cpu * 1000 / max(taken[0], 1)}


def _cpu_seconds(pids):
    """{pid: user + system CPU seconds} of the processes still running."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[pid] = (int(fields[11]) + int(fields[12])) / tick
    return seconds


def _database_backend_pids(url):
    """PostgreSQL's server processes for the database at `url` (on this machine), else []."""
    if not url or not url.startswith("postgres"):
        return []
    import psycopg2

    connection = psycopg2.connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            return [row[0] for row in cursor.fetchall()]
    finally:
        connection.close()


def push_memory(site, session, device_id, connections):
    """Workers' RSS before and after `connections` idle push connections (raw sockets that
    send the request and then just stay open)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < connections + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, connections + 500), hard))
    cookie = "; ".join(f"{c.name}={c.value}" for c in session.cookies)
    before = site.workers_rss_kib()
    sockets = []
    request = (
        f"GET /devices/{device_id}/live HTTP/1.1\r\nHost: 127.0.0.1:{site.port}\r\nCookie: {cookie}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()
    try:
        for _ in range(connections):
            sock = socket.create_connection(("127.0.0.1", site.port), timeout=10)
            sock.sendall(request)
            sockets.append(sock)
        time.sleep(5.0)  # every stream has started and rendered its first event
        opened = 0
        for sock in sockets:
            try:
                sock.settimeout(5)
                opened += b"200 OK" in sock.recv(200)
            except OSError:
                pass
        after = site.workers_rss_kib()
    finally:
        for sock in sockets:
            sock.close()
    return before, after, opened


# --- the run ---------------------------------------------------------------------------------------


def run(args, workdir, cleanup):
    from selfserve import schema

    say("starting the Particle Cloud simulator and setting up homeowners...")
    from selfserve.simulator.server import SimulatorServer

    sim = SimulatorServer(host="127.0.0.1", port=0).start()
    cleanup.append(sim.stop)
    sim.configure(rate_limit={"requests": 10**9, "window": 300})  # we count; we don't limit here
    db_url = f"sqlite:///{os.path.join(workdir, 'events.db')}"
    env = loopback_site_env(
        db_url,
        sim.url,
        secrets.token_hex(32),
        SWEEP_SECONDS=30,  # the sweep keeps each worker's event-stream listener running (events mode)
        # The fleet phase signs in dozens of owners from one loopback address.
        RATE_LIMIT_LOGIN="100000 per minute",
        PARTICLE_WEBHOOK_SECRET=WEBHOOK_SECRET,
    )
    os.environ.update(env)
    schema.upgrade_url(db_url)
    from selfserve import create_app
    from selfserve import models
    from selfserve.models import Device
    from selfserve.models import User
    from selfserve.services import devices as device_service
    from selfserve.services import registry

    app = create_app({"SWEEP_SECONDS": 0, "EVENT_STREAM": False})
    users = max(args.watched, 2)
    homeowners, _offline = fleet.create(app, sim, users)
    watched_ids = [h.device_ids[0] for h in homeowners[: args.watched]]
    # One homeowner with the big dashboard: args.dashboard devices (windows and pumps).
    big = homeowners[0]
    labels = [fleet._label(1000 + i) for i in range(args.dashboard - 1)]
    for label in labels:
        sim.add_device(
            label["device_id"],
            model=label["model"],
            serial_number=label["serial_number"],
            setup_code=label["setup_code"],
        )
    with app.app_context(), models.db.connection_context():
        registry.import_rows(labels)
        owner = User.get(User.email == big.email)
        for label in labels:
            device_service.claim(owner, label["serial_number"], label["setup_code"])
        Device.update(claimed_at=datetime.datetime(2020, 1, 1)).execute()
        pump = next(d.device_id for d in Device.select() if d.model == "pump" and d.owner_id == owner.id)
    dashboard_ids = [big.device_ids[0]] + [label["device_id"] for label in labels]

    results = {}
    for mode in ("polling (today)", "events"):
        events_mode = mode == "events"
        say(f"--- {mode} ---")
        mode_env = dict(env)
        mode_env["SELFSERVE_EVENT_STREAM"] = "true" if events_mode else "false"
        mode_env["SELFSERVE_PUSH_ENABLED"] = "true" if events_mode else "false"
        # Two workers on SQLite: pushes fan out between them through Redis pub/sub.
        mode_env["SELFSERVE_PUSH_BROKER_URL"] = args.redis
        site = Site("events" if events_mode else "polling", mode_env, workdir, gevent=events_mode)
        cleanup.append(site.stop)
        site.launch()
        site.wait_ready("/login")
        session = load.login_many(site.url, [big.email], fleet.PASSWORD, site.url + "/devices")[0]
        watcher_sessions = load.login_many(
            site.url, [h.email for h in homeowners[: args.watched]], fleet.PASSWORD, site.url + "/devices"
        )
        if events_mode:
            # The first request started each worker's listener; one holds the stream. Let every
            # device publish once (as they do on connecting) so the cache is event-fed.
            time.sleep(3.0)
            for device_id in set(watched_ids + dashboard_ids):
                sim.set_device(device_id, online=False)
                sim.set_device(device_id, online=True)
            time.sleep(3.0)
        row = {}
        say("watching devices...")
        costs = []
        for watcher, device_id in zip(watcher_sessions, watched_ids, strict=True):
            costs.append((watcher, device_id))
        sim.reset_counters()
        started = time.monotonic()
        threads = []
        for watcher, device_id in costs:
            thread = threading.Thread(
                target=watch_cost,
                args=(site, _NoReset(sim), watcher, [device_id], args.seconds, events_mode),
                daemon=True,
            )
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
        minutes = (time.monotonic() - started) / 60
        row["calls_per_device_minute"] = device_calls(counters(sim)) / len(costs) / minutes
        say("dashboard view...")
        row["dashboard_calls"] = dashboard_cost(site, sim, session, dashboard_ids, events_mode)
        say(f"publish -> page with {args.pages} open pages...")
        row["latency"] = latency(site, sim, session, pump, args.pages, args.rounds, events_mode)
        if events_mode:
            row["fleet"] = fleet_live(app, site, sim, args)
            say("webhook intake (SQLite)...")
            row["webhook_sqlite"] = webhook_rate(site, dashboard_ids, args.webhook_seconds)
            say(f"memory of {args.connections} open push connections...")
            row["memory"] = push_memory(site, session, dashboard_ids[0], args.connections)
        site.stop()
        results[mode] = row

    if args.postgres:
        say("webhook intake (PostgreSQL)...")
        results["events"]["webhook_postgres"] = postgres_webhook_rate(
            args, env, workdir, cleanup, dashboard_ids
        )
    report(args, results)


class _NoReset:
    """The simulator's counters for a phase that counts across threads (reset once outside)."""

    def __init__(self, sim):
        self.sim = sim

    def reset_counters(self):
        pass

    def counters(self):
        return self.sim.counters()


def postgres_webhook_rate(args, env, workdir, cleanup, device_ids):
    return database_webhook_rate(args.postgres, args, env, workdir, cleanup, device_ids)


def database_webhook_rate(url, args, env, workdir, cleanup, device_ids):
    """Webhook intake on the database at `url` (emptied first), one owner holding
    `device_ids`: the site under gevent workers, no listener, state events POSTed."""
    from playhouse.db_url import connect

    from selfserve import models
    from selfserve import schema

    if url.startswith("postgres"):
        models.db.initialize(connect(url))
        with models.db.connection_context():
            models.db.drop_tables(models.ALL_MODELS, safe=True, cascade=True)
            models.db.execute_sql("DROP TABLE IF EXISTS migratehistory")
    schema.upgrade_url(url)
    with models.db.connection_context():
        user = models.User.create(
            email="webhook@bench.example", password_hash="x", provisioning_state="ready"
        )
        for index, device_id in enumerate(device_ids):
            models.Device.create(
                device_id=device_id,
                serial_number=f"HOOK-{index:05d}",
                setup_code_hash="x",
                model="window",
                in_product=True,
                owner=user,
                claimed_at=datetime.datetime(2020, 1, 1),
            )
    site_env = dict(env)
    site_env.update({"SELFSERVE_DATABASE_URL": url, "SELFSERVE_EVENT_STREAM": "false"})
    site = Site("webhook-" + url.split(":")[0], site_env, workdir, gevent=True)
    cleanup.append(site.stop)
    site.launch()
    site.wait_ready("/login")
    try:
        return webhook_rate(site, device_ids, args.webhook_seconds, database_url=url)
    finally:
        site.stop()


def webhook_only(args, workdir, cleanup):
    """--webhook-only: the intake measure alone, on SQLite and (with --postgres) PostgreSQL."""
    from selfserve.simulator.server import SimulatorServer

    sim = SimulatorServer(host="127.0.0.1", port=0).start()
    cleanup.append(sim.stop)
    sqlite_url = f"sqlite:///{os.path.join(workdir, 'webhook.db')}"
    env = loopback_site_env(
        sqlite_url, sim.url, secrets.token_hex(32), SWEEP_SECONDS=30, PARTICLE_WEBHOOK_SECRET=WEBHOOK_SECRET
    )
    os.environ.update(env)
    device_ids = [f"{0xB00C000000000000 + n:024x}" for n in range(50)]
    say("webhook intake (SQLite)...")
    rates = [database_webhook_rate(sqlite_url, args, env, workdir, cleanup, device_ids)]
    if args.postgres:
        say("webhook intake (PostgreSQL)...")
        rates.append(database_webhook_rate(args.postgres, args, env, workdir, cleanup, device_ids))
    print(
        f"webhook events taken in per second ({args.webhook_seconds:g} s, 8 clients, 2 gevent workers): "
        + ", ".join(
            f"{name} {intake_text(rate)}" for name, rate in zip(("SQLite", "PostgreSQL"), rates, strict=False)
        )
        + " (goal >= 500)",
        flush=True,
    )


def intake_text(measured):
    """ "540 (1.9 ms CPU per event)": the rate and what each event cost the site and database."""
    return f"{measured['rate']:.0f} ({measured['cpu_ms']:.1f} ms CPU per event)"


def report(args, results):
    today, events = results["polling (today)"], results["events"]
    rule = object()  # a rule as wide as the table, drawn at the end
    lines = [rule, "selfserve bench/events: Live by events (polling today vs events)"]
    lines.append(
        f"  {os.cpu_count()} CPUs shared with the load generator and the simulator; SQLite (WAL); "
        f"{args.seconds:g} s watching phases; heartbeat 120 s"
    )
    lines.append(
        "  polling: gunicorn -k gthread -w 2 --threads 8; events: gunicorn -c gunicorn.conf.py (gevent, -w 2)"
    )
    lines.append("")
    # Rows are kept as tuples and laid out at the end, each column as wide as its widest cell.
    lines.append(("measure", "polling (today)", "events", "must reach"))

    def row(label, old, new, goal):
        lines.append((label, old, new, goal))

    row(
        "Particle calls per watched online device per minute",
        f"{today['calls_per_device_minute']:.1f}",
        f"{events['calls_per_device_minute']:.2f}",
        "<= 0.5",
    )

    def live(calls):
        if calls <= 0:
            return f">= {FLEET}"
        return f"{min(FLEET, PARTICLE_PER_MINUTE / calls):.0f}"

    fleet_row = events["fleet"]
    # Kept live, measured: every device of the fleet whose values the site holds fresh from
    # events (none asked of Particle) while a tenth of them are on open pages.
    row(
        f"devices kept live under 10,000 req/5 min ({fleet_row['devices']} publishing, "
        f"{fleet_row['pages']} on open pages)",
        live(today["calls_per_device_minute"]) + " (derived)",
        f"{fleet_row['fleet_fresh']}",
        f">= {FLEET}",
    )

    def lat(value):
        return "n/a" if not value else f"{value[0]:.2f} / {value[1]:.2f} s ({value[2]})"

    row(
        f"publish -> value on open pages, median / p95 ({args.pages} pages)",
        lat(today["latency"]),
        lat(events["latency"]),
        "<= 1 s / <= 2 s",
    )
    row(
        "webhook events taken in per second, SQLite",
        "-",
        intake_text(events["webhook_sqlite"]),
        ">= 500",
    )
    row(
        "webhook events taken in per second, PostgreSQL",
        "-",
        intake_text(events["webhook_postgres"]) if "webhook_postgres" in events else "n/a (--postgres)",
        ">= 500",
    )
    row(
        f"Particle calls for one view of a {args.dashboard}-device dashboard",
        f"{today['dashboard_calls']}",
        f"{events['dashboard_calls']}",
        "0",
    )
    before, after, opened = events["memory"]
    per_thousand = (after - before) / max(opened, 1) * 1000 / 1024
    row(
        f"memory per 1,000 open push connections ({opened} opened)",
        "1 thread each",
        f"{per_thousand:.0f} MiB",
        "report it",
    )
    lines.append("")
    lines.append(
        "  Latency with polling: pages poll every 5 s (cache 4 s), at most 40 polling pages; with events: "
        "the pump's fault state event -> listener -> cache -> NOTIFY/in-process -> SSE."
    )
    lines.append(
        "  Devices kept live, polling: derived (Particle's 2,000 requests a minute / calls per watched device per"
        " minute)."
    )
    lines.append(
        f"  Fleet phase (events): {fleet_row['seconds']:.0f} s with Particle's real limit on and a "
        f"{fleet_row['heartbeat']:.0f} s heartbeat: {fleet_row['opened']}/{fleet_row['pages']} pages open, "
        f"{fleet_row['pages_pushed']} received pushes ({fleet_row['pushes']} in all), "
        f"{fleet_row['watched_fresh']}/{fleet_row['pages']} watched and {fleet_row['fleet_fresh']}/"
        f"{fleet_row['devices']} devices fresh from events at the end, {fleet_row['particle_calls']} Particle "
        "requests in the phase."
    )
    lines.append(rule)
    cells = [line for line in lines if isinstance(line, tuple)]
    widths = [max(len(cell[column]) for cell in cells) for column in range(4)]
    table = [f"  {a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}    {d}" for a, b, c, d in cells]
    laid_out = iter(table)
    text = [next(laid_out) if isinstance(line, tuple) else line for line in lines]
    width = max(len(line) for line in table)
    print("\n".join("=" * width if line is rule else line for line in text), flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt()


def main(argv=None):
    args = parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="selfserve-events-bench-")
    cleanup = []
    signal.signal(signal.SIGTERM, _interrupt)
    status = 0
    try:
        (webhook_only if args.webhook_only else run)(args, workdir, cleanup)
    except KeyboardInterrupt:
        status = 130
    except BenchError as exc:
        say(str(exc))
        status = 1
    finally:
        load.STOP.set()
        for stop in reversed(cleanup):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001
                say(f"cleanup step failed: {exc!r}")
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
