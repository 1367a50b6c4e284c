"""The bench: what the site costs and what it costs the Particle Cloud, in one run.

    bench/run [--quick] [--duration S] [--users N] [--concurrency C] [--viewers V] [--views N]

1. Starts the bundled Particle Cloud simulator in-process and a fresh SQLite database (WAL) in
   a temporary folder, and sets up N homeowners through the real services (bench/fleet.py).
2. Starts two gunicorns with the production settings (-k gthread -w 2 --threads 8) on
   loopback: the site (bench/app.py) and a bare Flask page (bench/bare.py).
3. Throughput: GET /devices (signed in through the real login form) against the bare page,
   same concurrency, same duration.
4. Particle calls per device-page view with 1 viewer, with 20 viewers of one device, and with
   20 viewers of an offline device; each viewer loads the page shell, then its values fragment
   and polls it like the page does.
5. Token requests per 1000 page views (device pages + values fragments across all
   homeowners), starting with an empty customer-token cache.

Prints one table with the settings used. Everything it starts is stopped and its temporary
folder removed at the end, also after Ctrl-C or an error.
"""

import argparse
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time

import requests

from bench import fleet
from bench import load
from bench.servers import THREADS
from bench.servers import WORKERS
from bench.servers import BenchError
from bench.servers import Gunicorn
from bench.servers import loopback_site_env

TOKEN_ROUTE = "POST /oauth/token"
DEVICE_READ_ROUTE = "GET /v1/devices/:id"
# Particle's general API limit per source IP (particle-cloud-api.md §12; design.md).
PARTICLE_REQUESTS_PER_5_MIN = 10000


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases (~30 s in all)")
    parser.add_argument("--duration", type=float, help="seconds of each throughput and viewer phase")
    parser.add_argument("--users", type=int, help="homeowners, one device each (default 20; 6 with --quick)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=WORKERS * THREADS,
        help="clients in the throughput phase (default workers x threads = 16)",
    )
    parser.add_argument(
        "--viewers", type=int, default=20, help="concurrent viewers of one device (default 20)"
    )
    parser.add_argument(
        "--views", type=int, help="page views in the token phase (default 1000; 300 with --quick)"
    )
    parser.add_argument(
        "--poll",
        type=float,
        help="seconds between a viewer's polls (default: the site's VALUES_POLL_SECONDS)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.users = args.users or (6 if quick else 20)
    args.throughput_seconds = args.duration if args.duration else (3.0 if quick else 15.0)
    args.viewer_seconds = args.duration if args.duration else (5.0 if quick else 25.0)
    args.warmup_seconds = 0.5 if quick else 1.0
    args.views = args.views or (300 if quick else 1000)
    args.token_phase_limit = 60.0 if quick else 120.0
    if args.users < 2:
        parser.error("--users must be at least 2")
    if min(args.concurrency, args.viewers, args.views) < 1 or args.throughput_seconds <= 0:
        parser.error("counts and durations must be positive")
    return args


_STARTED = time.monotonic()


def say(message):
    """Progress on stderr (the table goes to stdout), with the seconds since the start."""
    print(f"[{time.monotonic() - _STARTED:5.1f} s] {message}", file=sys.stderr, flush=True)


class Simulator:
    """The in-process simulator, counted through its HTTP control API (/_sim/counters)."""

    def __init__(self):
        from selfserve.simulator.server import SimulatorServer

        self.server = SimulatorServer(host="127.0.0.1", port=0).start()
        self.url = self.server.url

    def reset_counters(self):
        requests.post(self.url + "/_sim/counters/reset", timeout=5).raise_for_status()

    def counters(self):
        answer = requests.get(self.url + "/_sim/counters", timeout=5)
        answer.raise_for_status()
        return answer.json()["routes"]

    def stop(self):
        self.server.stop()


def device_calls(routes):
    """Requests to device and variable routes (customer or product level)."""
    return sum(count for route, count in routes.items() if "/devices/:id" in route)


def run(args, workdir, cleanup):

    say("bench: starting the Particle Cloud simulator and setting up homeowners...")
    simulator = Simulator()
    cleanup.append(simulator.stop)
    os.environ.update(
        loopback_site_env(
            f"sqlite:///{os.path.join(workdir, 'bench.db')}",
            simulator.url,
            secrets.token_hex(32),
            # It signs in a few dozen sessions from one loopback address (see bench/app.py).
            RATE_LIMIT_LOGIN="100000 per minute",
        )
    )
    site = Gunicorn("site", "bench.app:app", None, workdir)
    bare = Gunicorn("bare", "bench.bare:app", None, workdir)
    os.environ["SELFSERVE_BASE_URL"] = site.url
    site.env = bare.env = dict(os.environ)

    from selfserve import create_app

    # The schema, as `flask db upgrade` makes it in production.
    from selfserve import schema

    schema.upgrade_url(os.environ["SELFSERVE_DATABASE_URL"])
    # The setup's own app: same database and settings as the gunicorn workers, no sweep thread.
    app = create_app({"SWEEP_SECONDS": 0})
    config = app.config
    poll_seconds = args.poll or float(config["VALUES_POLL_SECONDS"])
    started = time.monotonic()
    homeowners, offline_device = fleet.create(app, simulator.server, args.users)
    setup_seconds = time.monotonic() - started

    say("bench: starting gunicorn (site and bare page)...")
    cleanup.append(site.stop)
    cleanup.append(bare.stop)
    site.launch()
    bare.launch()
    site.wait_ready("/login")
    bare.wait_ready("/")

    with app.test_request_context():
        from flask import url_for

        dashboard_url = site.url + url_for("devices.dashboard")
        page_url = {}
        values_url = {}
        for device_id in [d for h in homeowners for d in h.device_ids]:
            page_url[device_id] = site.url + url_for("devices.detail", device_id=device_id)
            values_url[device_id] = site.url + url_for("devices.values", device_id=device_id)

    say(f"bench: signing in {args.users + args.viewers - 1} sessions through the login form...")
    watched = homeowners[1]
    emails = [h.email for h in homeowners] + [watched.email] * (args.viewers - 1)
    sessions = load.login_many(site.url, emails, fleet.PASSWORD, dashboard_url)
    user_sessions = sessions[: args.users]
    viewer_sessions = [user_sessions[1]] + sessions[args.users :]

    # --- throughput ---------------------------------------------------------------------
    throughput_sessions = [user_sessions[i % args.users] for i in range(args.concurrency)]
    bare_sessions = [requests.Session() for _ in range(args.concurrency)]
    bare_plan = [[(bare.url + "/", None)]]
    dashboard_plan = [[(dashboard_url, None)]]
    say(f"bench: throughput, {args.concurrency} clients, {args.throughput_seconds:g} s each...")
    load.hammer(bare_sessions, bare_plan, args.warmup_seconds, 10**9)
    bare_result = load.hammer(bare_sessions, bare_plan, args.throughput_seconds, 10**9)
    load.hammer(throughput_sessions, dashboard_plan, args.warmup_seconds, 10**9)
    simulator.reset_counters()
    dashboard_result = load.hammer(throughput_sessions, dashboard_plan, args.throughput_seconds, 10**9)
    dashboard_particle = sum(simulator.counters().values())

    # --- viewers ------------------------------------------------------------------------
    viewer_runs = []
    cases = [
        ("1 viewer", [user_sessions[0]], homeowners[0].device_ids[0]),
        (f"{args.viewers} viewers", viewer_sessions, watched.device_ids[0]),
        (f"{args.viewers} v., offline dev.", viewer_sessions, offline_device),
    ]
    for label, viewers, device_id in cases:
        say(f"bench: {label} polling one device page for {args.viewer_seconds:g} s...")
        simulator.reset_counters()
        shells, values = load.watch(
            viewers, page_url[device_id], values_url[device_id], args.viewer_seconds, poll_seconds
        )
        viewer_runs.append((label, shells, values, simulator.counters()))

    # --- token requests -----------------------------------------------------------------
    plans = [
        [(page_url[h.device_ids[0]], None), (values_url[h.device_ids[0]], load.HTMX_HEADERS)]
        for h in homeowners
    ]
    token_runs = []
    for label in ("cold token cache", "tokens cached"):
        say(f"bench: {args.views} page views across {args.users} homeowners ({label})...")
        cached_tokens = fleet.forget_customer_tokens(app) if label == "cold token cache" else None
        simulator.reset_counters()
        result = load.hammer(user_sessions, plans, args.token_phase_limit, args.views)
        token_runs.append((label, result, simulator.counters(), cached_tokens))

    report(
        args,
        config,
        poll_seconds,
        setup_seconds,
        bare_result,
        dashboard_result,
        dashboard_particle,
        viewer_runs,
        token_runs,
    )


def report(
    args,
    config,
    poll_seconds,
    setup_seconds,
    bare_result,
    dashboard_result,
    dashboard_particle,
    viewer_runs,
    token_runs,
):
    cache = float(config["VALUES_CACHE_SECONDS"])
    offline_remember = float(config["OFFLINE_REMEMBER_SECONDS"])
    lines = []
    width = 50

    def row(label, *cells):
        lines.append(f"  {label:<{width}}" + "".join(f"{cell:>20}" for cell in cells))

    def heading(text, *cells):
        lines.append("")
        lines.append(f"{text:<{width + 2}}" + "".join(f"{cell:>20}" for cell in cells))

    lines.append("=" * (width + 2 + 60))
    lines.append("selfserve bench")
    lines.append(
        f"  gunicorn -k gthread -w {WORKERS} --threads {THREADS} on 127.0.0.1 (site: bench.app:app, "
        f"baseline: bench.bare:app); SQLite (WAL); {os.cpu_count()} CPUs shared with the load generator"
    )
    lines.append(
        f"  {args.users} homeowners with 1 device each (+1 offline device); set up through the services in "
        f"{setup_seconds:.1f} s"
    )
    lines.append(
        f"  site settings: VALUES_CACHE_SECONDS={cache:g}, OFFLINE_REMEMBER_SECONDS={offline_remember:g}, "
        f"viewers poll every {poll_seconds:g} s (±10%)"
    )

    heading(
        f"Throughput ({args.concurrency} clients, {args.throughput_seconds:g} s each)",
        "bare Flask page",
        "GET /devices",
    )
    row("requests/s", f"{bare_result.per_second:.1f}", f"{dashboard_result.per_second:.1f}")
    row(
        "requests (ok / not 200)",
        f"{bare_result.ok} / {bare_result.errors}",
        f"{dashboard_result.ok} / {dashboard_result.errors}",
    )
    row(
        "latency median / p95 (ms)",
        f"{bare_result.median_ms:.1f} / {bare_result.percentile_ms(0.95):.1f}",
        f"{dashboard_result.median_ms:.1f} / {dashboard_result.percentile_ms(0.95):.1f}",
    )
    ratio = dashboard_result.per_second / bare_result.per_second if bare_result.per_second else float("nan")
    row("dashboard / bare", "", f"{ratio:.2f}")
    row(
        "load generator CPU (% of one core)",
        f"{bare_result.cpu_percent:.0f}",
        f"{dashboard_result.cpu_percent:.0f}",
    )
    row("Particle requests during the dashboard run", "", f"{dashboard_particle}")

    heading(
        f"Particle calls per device-page view ({args.viewer_seconds:g} s)", *[run[0] for run in viewer_runs]
    )
    row("page shells loaded", *[f"{shells.ok}" for _, shells, _, _ in viewer_runs])
    row("values fragments served = views", *[f"{values.ok}" for _, _, values, _ in viewer_runs])
    row(
        "requests not 200 (shells + fragments)",
        *[f"{shells.errors + values.errors}" for _, shells, values, _ in viewer_runs],
    )
    row("Particle device/variable calls", *[f"{device_calls(routes)}" for *_, routes in viewer_runs])
    row(
        "  of which device reads (GET /v1/devices/:id)",
        *[f"{routes.get(DEVICE_READ_ROUTE, 0)}" for *_, routes in viewer_runs],
    )
    row(
        "Particle calls per view",
        *[
            f"{device_calls(routes) / values.ok:.2f}" if values.ok else "n/a"
            for _, _, values, routes in viewer_runs
        ],
    )
    row(
        "Particle calls per second",
        *[
            f"{device_calls(routes) / values.elapsed:.2f}" if values.elapsed else "n/a"
            for _, _, values, routes in viewer_runs
        ],
    )
    row(
        "device reads allowed (1 per cache interval)",
        *[
            f"<= {bound}"
            for bound in (_read_bound(label, values, config) for label, _, values, _ in viewer_runs)
        ],
    )
    row("token requests", *[f"{routes.get(TOKEN_ROUTE, 0)}" for *_, routes in viewer_runs])
    row(
        "values fragment latency median / p95 (ms)",
        *[f"{values.median_ms:.0f} / {values.percentile_ms(0.95):.0f}" for _, _, values, _ in viewer_runs],
    )

    heading(f"Token requests per page view ({args.users} clients)", *[run[0] for run in token_runs])
    row("page views (device pages + values fragments)", *[f"{result.ok}" for _, result, _, _ in token_runs])
    row("requests not 200", *[f"{result.errors}" for _, result, _, _ in token_runs])
    row("took (s)", *[f"{result.elapsed:.1f}" for _, result, _, _ in token_runs])
    row(
        "customer tokens in the cache before",
        *[f"{cached} (emptied)" if cached is not None else f"{args.users}" for *_, cached in token_runs],
    )
    row(
        "token requests (POST /oauth/token)",
        *[f"{routes.get(TOKEN_ROUTE, 0)}" for _, _, routes, _ in token_runs],
    )
    row(
        "token requests per 1000 page views",
        *[
            f"{1000 * routes.get(TOKEN_ROUTE, 0) / result.ok:.1f}" if result.ok else "n/a"
            for _, result, routes, _ in token_runs
        ],
    )
    row(
        "Particle device/variable calls per view",
        *[
            f"{device_calls(routes) / result.ok:.2f}" if result.ok else "n/a"
            for _, result, routes, _ in token_runs
        ],
    )

    lines.append("")
    lines.append("Checks")
    for ok, text in checks(
        args, config, bare_result, dashboard_result, dashboard_particle, viewer_runs, token_runs
    ):
        lines.append(f"  {'ok     ' if ok else 'PROBLEM'}  {text}")
    watched_rate = (
        device_calls(viewer_runs[1][3]) / viewer_runs[1][2].elapsed if viewer_runs[1][2].elapsed else 0
    )
    if watched_rate:
        lines.append("")
        lines.append(
            f"Capacity: one watched online device costs {watched_rate:.2f} Particle calls/s however many "
            f"watch it; Particle allows {PARTICLE_REQUESTS_PER_5_MIN} requests per 5 minutes per source IP, "
            f"so about {PARTICLE_REQUESTS_PER_5_MIN / 300 / watched_rate:.0f} devices can be watched at once "
            f"from one IP."
        )
    lines.append("=" * (width + 2 + 60))
    print("\n".join(lines), flush=True)


def _read_bound(label, values, config):
    """Most device reads a phase may cause if the cache works: one when it starts cold, then
    one per cache interval (the offline interval for the offline device)."""
    key = "OFFLINE_REMEMBER_SECONDS" if "offline" in label else "VALUES_CACHE_SECONDS"
    return int(values.elapsed // float(config[key])) + 1


def checks(args, config, bare_result, dashboard_result, dashboard_particle, viewer_runs, token_runs):
    """Plain statements of what the issue promises, each with the number that shows it."""
    single, many, offline = viewer_runs
    single_calls, many_calls = device_calls(single[3]), device_calls(many[3])
    failures = sum(r.errors for r in [bare_result, dashboard_result] + [run[1] for run in token_runs]) + sum(
        shells.errors + values.errors for _, shells, values, _ in viewer_runs
    )
    yield failures == 0, f"every request answered 200 ({failures} did not)"
    yield (
        dashboard_particle == 0,
        f"page shells make no Particle call ({dashboard_particle} during the dashboard run)",
    )
    # Single-flight: however many viewers, at most one device read per cache interval (plus
    # one for where the phase boundaries fall).
    cache = float(config["VALUES_CACHE_SECONDS"])
    many_reads = many[3].get(DEVICE_READ_ROUTE, 0)
    allowed = _read_bound(many[0], many[2], config)
    yield (
        many_reads <= allowed,
        (
            f"{args.viewers} viewers: at most one device read per {cache:g} s cache interval ({many_reads} reads "
            f"in {many[2].elapsed:.0f} s, at most {allowed}); {many_calls} calls vs {single_calls} for 1 viewer"
        ),
    )
    offline_reads = offline[3].get(DEVICE_READ_ROUTE, 0)
    yield (
        offline_reads <= _read_bound(offline[0], offline[2], config),
        (
            f"an offline device is remembered ({offline_reads} device reads, {device_calls(offline[3])} calls "
            f"for {offline[2].ok} views)"
        ),
    )
    (_, cold, cold_routes, _), (_, warm, warm_routes, _) = token_runs
    cold_tokens, warm_tokens = cold_routes.get(TOKEN_ROUTE, 0), warm_routes.get(TOKEN_ROUTE, 0)
    yield (
        cold_tokens <= args.users and warm_tokens == 0,
        (
            f"at most one token request per customer per token lifetime ({cold_tokens} for {args.users} customers "
            f"starting cold, then {warm_tokens} for {warm.ok} views)"
        ),
    )


def _interrupt(signum, frame):
    raise KeyboardInterrupt()


def main(argv=None):
    args = parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="selfserve-bench-")
    cleanup = []
    # SIGTERM ends the run the same way Ctrl-C does: through the finally below.
    signal.signal(signal.SIGTERM, _interrupt)
    status = 0
    try:
        run(args, workdir, cleanup)
    except KeyboardInterrupt:
        say("bench: interrupted")
        status = 130
    except BenchError as exc:
        say(f"bench: {exc}")
        status = 1
    finally:
        load.STOP.set()
        for stop in reversed(cleanup):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - clean up everything else anyway
                say(f"bench: cleanup step failed: {exc!r}")
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
