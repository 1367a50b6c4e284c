"""A small load generator: threads, one requests.Session each, loopback only, every loop
bounded by a request budget AND a deadline (and by a stop event for Ctrl-C)."""

import collections
import concurrent.futures
import dataclasses
import ipaddress
import itertools
import random
import re
import statistics
import threading
import time
import urllib.parse

import requests

from bench.servers import BenchError

REQUEST_TIMEOUT = (3.05, 30.0)
CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
HTMX_HEADERS = {"HX-Request": "true"}

# Set on Ctrl-C / errors so every load thread ends at its next request.
STOP = threading.Event()


def check_loopback(url):
    """The bench never sends load anywhere but this machine."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise BenchError(f"refusing to send load to {host!r}: loopback only")


@dataclasses.dataclass
class Result:
    """What one load run did."""

    requests: int = 0
    ok: int = 0
    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    latencies: list = dataclasses.field(default_factory=list)  # seconds, successful requests
    elapsed: float = 0.0
    cpu_seconds: float = 0.0  # used by this process (the load generator) meanwhile

    @property
    def cpu_percent(self):
        return 100 * self.cpu_seconds / self.elapsed if self.elapsed else 0.0

    @property
    def errors(self):
        return self.requests - self.ok

    @property
    def per_second(self):
        return self.ok / self.elapsed if self.elapsed else 0.0

    def percentile_ms(self, fraction):
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    @property
    def median_ms(self):
        return 1000 * statistics.median(self.latencies) if self.latencies else float("nan")

    def error_summary(self):
        return (
            ", ".join(
                f"{status}: {count}"
                for status, count in sorted(self.statuses.items(), key=str)
                if status != 200
            )
            or "none"
        )


class _Recorder:
    def __init__(self):
        self.result = Result()
        self.lock = threading.Lock()

    def add(self, status, seconds):
        with self.lock:
            self.result.requests += 1
            self.result.statuses[status] += 1
            if status == 200:
                self.result.ok += 1
                self.result.latencies.append(seconds)


def _get(session, url, recorder, headers=None):
    started = time.perf_counter()
    try:
        answer = session.get(url, headers=headers, allow_redirects=False, timeout=REQUEST_TIMEOUT)
        answer.content  # noqa: B018 - read the whole body
        status = answer.status_code
    except requests.RequestException as exc:
        status = type(exc).__name__
    recorder.add(status, time.perf_counter() - started)
    return status


def _run_threads(targets):
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(timeout=0.5)


def hammer(sessions, plans, seconds, max_requests):
    """As fast as possible: one thread per session; thread i GETs the (url, headers) pairs of
    `plans[i % len(plans)]` in turn, until `seconds` pass or `max_requests` were sent in total."""
    for plan in plans:
        for url, _ in plan:
            check_loopback(url)
    recorder = _Recorder()
    budget = itertools.count()
    deadline = time.monotonic() + seconds

    def worker(session, plan):
        for url, headers in itertools.cycle(plan):
            if STOP.is_set() or time.monotonic() >= deadline or next(budget) >= max_requests:
                return
            _get(session, url, recorder, headers)

    started, cpu_started = time.monotonic(), time.process_time()
    _run_threads([lambda s=s, p=plans[i % len(plans)]: worker(s, p) for i, s in enumerate(sessions)])
    recorder.result.elapsed = time.monotonic() - started
    recorder.result.cpu_seconds = time.process_time() - cpu_started
    return recorder.result


def watch(sessions, page_url, values_url, seconds, poll_seconds):
    """Viewers of one device page: each loads the page shell, then its values fragment at once
    (hx-trigger "load") and again every `poll_seconds` (with ±10% jitter, as browsers drift),
    until `seconds` pass. Returns (shell Result, values Result)."""
    check_loopback(page_url)
    check_loopback(values_url)
    shells, values = _Recorder(), _Recorder()
    deadline = time.monotonic() + seconds
    max_polls = int(seconds / poll_seconds) + 2
    start_together = threading.Barrier(len(sessions))

    def viewer(session):
        try:
            start_together.wait(timeout=30)
        except threading.BrokenBarrierError:
            pass
        _get(session, page_url, shells)
        for _ in range(max_polls):
            polled_at = time.monotonic()
            if STOP.is_set() or polled_at >= deadline:
                return
            _get(session, values_url, values, HTMX_HEADERS)
            pause = poll_seconds * random.uniform(0.9, 1.1)
            if STOP.wait(max(0.0, min(polled_at + pause, deadline) - time.monotonic())):
                return

    started = time.monotonic()
    _run_threads([lambda s=s: viewer(s) for s in sessions])
    for recorder in (shells, values):
        recorder.result.elapsed = time.monotonic() - started
    return shells.result, values.result


def login(base_url, email, password, check_url):
    """A requests.Session signed in through the real /login form (with its CSRF token)."""
    check_loopback(base_url)
    session = requests.Session()
    form = session.get(base_url + "/login", timeout=REQUEST_TIMEOUT)
    match = CSRF_FIELD.search(form.text)
    if form.status_code != 200 or match is None:
        raise BenchError(f"GET /login answered {form.status_code} without a CSRF token")
    answer = session.post(
        base_url + "/login",
        data={"email": email, "password": password, "csrf_token": match.group(1)},
        allow_redirects=False,
        timeout=REQUEST_TIMEOUT,
    )
    if answer.status_code not in (302, 303):
        raise BenchError(f"signing in as {email} answered {answer.status_code} (expected a redirect)")
    check = session.get(check_url, allow_redirects=False, timeout=REQUEST_TIMEOUT)
    if check.status_code != 200:
        raise BenchError(f"after signing in as {email}, {check_url} answered {check.status_code}")
    return session


def login_many(base_url, emails, password, check_url, parallel=4):
    """Sessions for `emails` (in order; an address may repeat), signed in `parallel` at a time."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(lambda email: login(base_url, email, password, check_url), emails))
