"""The product event stream listener: one `GET /v1/products/:p/events` per deployment.

Every site process runs a Listener thread, but only the holder of the `product-event-stream`
lease (a row in the database, so all workers and machines agree) opens the stream; the others
try to take the lease every LEASE_POLL_SECONDS. The holder renews it while lines (events or
keep-alives) arrive; a holder that dies stops renewing and another process takes over once the
lease has run out (LEASE_SECONDS + LEASE_POLL_SECONDS < 1 minute).

Particle allows 100 stream opens per 5 minutes per address (reference §11/§12), shared with
everything else on that address: the listener never opens more often than every
EVENT_STREAM_MIN_OPEN_SECONDS (6 s: at most 50 per 5 minutes), backs off exponentially with
jitter after failures (a 401 longer, a 429 at least its Retry-After), and ends a stream that has
been silent (not even a keep-alive) for EVENT_STREAM_SILENCE_SECONDS (at most 80 % of the lease,
which is renewed as lines arrive) to open a new one.

A stream loses what is published while it is down, so after every (re)connection the values
that events made fresh are distrusted, and the devices someone has a page open on are read
again (in the background, so the stream keeps flowing meanwhile).

Kept running in every process that sweeps by the background job `keep_listening` (create_app's
job list: web workers from their first request, or `flask sweep`), and started by the demo;
disabled with EVENT_STREAM = False (tests start listeners themselves).
"""

import datetime
import logging
import os
import random
import socket
import threading
import time
import uuid

from selfserve import background
from selfserve.particle.errors import ParticleError
from selfserve.particle.errors import RateLimited
from selfserve.particle.errors import TokenInvalid

log = logging.getLogger(__name__)

LEASE_NAME = "product-event-stream"
LEASE_SECONDS = 40.0
LEASE_POLL_SECONDS = 10.0
BACKOFF_BASE_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 120.0
# Particle refused our credentials twice in a row (the client already minted a new token):
# retrying soon won't help, and token requests have their own lockout.
AUTH_BACKOFF_SECONDS = 120.0
RATE_LIMIT_BACKOFF_SECONDS = 60.0
# A stream that lived this long was healthy: the failure count starts again.
HEALTHY_SECONDS = 60.0


def open_delay(failures, retry_after=None, min_interval=6.0, rng=random.random):
    """Seconds between the previous stream open and the next one.

    No failure: `min_interval`. Otherwise BACKOFF_BASE * 2^(failures-1), capped, at least the
    cloud's Retry-After, with +-25 % jitter (so the processes of a fleet don't retry in step),
    and never less than `min_interval`."""
    if failures <= 0 and not retry_after:
        return min_interval
    base = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, failures - 1))
    if retry_after:
        base = max(base, float(retry_after))
    delay = base * (0.75 + 0.5 * rng())
    if retry_after:
        delay = max(delay, float(retry_after))
    return max(delay, min_interval)


class Lease:
    """The named lease row: take (or renew) it, or give it back."""

    def __init__(self, name, holder, seconds):
        self.name = name
        self.holder = holder
        self.seconds = seconds

    def take(self):
        """True when we hold the lease now (taken, or renewed) for `seconds` more."""
        from selfserve.models import ListenerLease
        from selfserve.models import utcnow

        now = utcnow()
        ListenerLease.insert(name=self.name).on_conflict_ignore().execute()
        taken = (
            ListenerLease.update(holder=self.holder, until=now + datetime.timedelta(seconds=self.seconds))
            .where(
                (ListenerLease.name == self.name)
                & (
                    (ListenerLease.holder == self.holder)
                    | ListenerLease.until.is_null()
                    | (ListenerLease.until < now)
                )
            )
            .execute()
        )
        return taken == 1

    def release(self):
        from selfserve.models import ListenerLease

        ListenerLease.update(until=None).where(
            (ListenerLease.name == self.name) & (ListenerLease.holder == self.holder)
        ).execute()

    @staticmethod
    def holder_of(name=LEASE_NAME):
        """Who holds the lease now (None when nobody does)."""
        from selfserve.models import ListenerLease
        from selfserve.models import utcnow

        row = ListenerLease.get_or_none(ListenerLease.name == name)
        if row is None or row.until is None or row.until < utcnow():
            return None
        return row.holder


class Listener:
    """One process's listener thread. `stats` counts opens, failures, events and gaps."""

    def __init__(self, app, holder=None):
        self.app = app
        config = app.config
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = Lease(
            LEASE_NAME, self.holder, float(config.get("EVENT_STREAM_LEASE_SECONDS", LEASE_SECONDS))
        )
        self.poll_seconds = float(config.get("EVENT_STREAM_LEASE_POLL_SECONDS", LEASE_POLL_SECONDS))
        self.min_interval = float(config.get("EVENT_STREAM_MIN_OPEN_SECONDS", 6.0))
        # The lease is renewed as lines arrive, so a stream must never stay silent for as long
        # as the lease lasts: it ends (and the round renews) well before.
        self.silence = min(float(config.get("EVENT_STREAM_SILENCE_SECONDS", 35.0)), self.lease.seconds * 0.8)
        self.stop_event = threading.Event()
        self.thread = None
        self.failures = 0
        self.retry_after = None
        self.last_open = None
        self.last_renew = 0.0
        self.lost_lease = False
        self.stats = {"opens": 0, "failures": 0, "events": 0, "stored": 0, "gaps": 0, "open_times": []}

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self):
        self.thread = threading.Thread(target=self._run, name="selfserve-event-stream", daemon=True)
        self.thread.start()
        return self

    def stop(self, release=True):
        """Stop listening (and give the lease back, unless simulating a crash)."""
        self.stop_event.set()
        self._release_on_exit = release
        if self.thread is not None:
            self.thread.join(timeout=self.silence + 5)

    @property
    def holding(self):
        return (
            self.last_renew
            and not self.lost_lease
            and time.monotonic() - self.last_renew < self.lease.seconds
        )

    def _run(self):
        self._release_on_exit = True
        while not self.stop_event.is_set():
            try:
                self._round()
            except Exception:  # noqa: BLE001 - the listener must outlive any one failure
                log.exception("event stream listener failed; trying again")
                self.stop_event.wait(self.poll_seconds)
        if self._release_on_exit:
            self._with_db(self.lease.release)

    def _with_db(self, function, *args):
        from selfserve import models

        with self.app.app_context():
            models.db.connect(reuse_if_open=True)
            try:
                return function(*args)
            finally:
                if not models.db.is_closed():
                    models.db.close()

    # --- one round: take the lease, wait for the open budget, listen ----------------------------------

    def _renew(self):
        held = self._with_db(self.lease.take)
        if held:
            self.last_renew = time.monotonic()
            self.lost_lease = False
        elif self.last_renew:
            self.lost_lease = True
        return held

    def _round(self):
        if not self._renew():
            self.stop_event.wait(self.poll_seconds)
            return
        # Wait until the next open is allowed, renewing the lease meanwhile.
        if self.last_open is not None:
            due = self.last_open + open_delay(self.failures, self.retry_after, self.min_interval)
            while not self.stop_event.is_set():
                left = due - time.monotonic()
                if left <= 0:
                    break
                self.stop_event.wait(min(left, self.poll_seconds))
                if not self._renew():
                    return
            if self.stop_event.is_set():
                return
        self._listen()

    def _listen(self):
        from selfserve import models
        from selfserve.particle import get_client
        from selfserve.services import device_events

        self.last_open = time.monotonic()
        self.stats["opens"] += 1
        self.stats["open_times"].append(self.last_open)
        self.retry_after = None
        with self.app.app_context():
            try:
                stream = get_client().get_product_event_stream(on_line=self._on_line, silence=self.silence)
            except RateLimited as exc:
                self._failed(exc, retry_after=exc.retry_after or RATE_LIMIT_BACKOFF_SECONDS)
                return
            except TokenInvalid as exc:
                self._failed(exc, retry_after=AUTH_BACKOFF_SECONDS)
                return
            except ParticleError as exc:
                self._failed(exc)
                return
            opened = time.monotonic()
            log.info("event stream open (%s)", self.holder)
            self._after_gap()
            models.db.connect(reuse_if_open=True)
            try:
                with stream:
                    for event in stream:
                        self.stats["events"] += 1
                        result = device_events.ingest(
                            event["name"], event["data"], event["coreid"], event["published_at"]
                        )
                        if result == device_events.STORED:
                            self.stats["stored"] += 1
            finally:
                if not models.db.is_closed():
                    models.db.close()
            lived = time.monotonic() - opened
            if lived >= HEALTHY_SECONDS:
                self.failures = 0
            else:
                # Dropped or silent soon after opening: back off as for a failed open.
                self.failures += 1
            log.info("event stream closed after %.0f s; reconnecting", lived)

    def _failed(self, exc, retry_after=None):
        self.failures += 1
        self.stats["failures"] += 1
        self.retry_after = retry_after
        log.warning("event stream could not be opened: %s", type(exc).__name__)

    def _on_line(self, _line):
        """Every line (keep-alives too): renew the lease now and then; False ends the stream."""
        if self.stop_event.is_set():
            return False
        if time.monotonic() - self.last_renew >= min(self.poll_seconds, self.lease.seconds / 3):
            if not self.lease.take():
                self.lost_lease = True
                log.warning("event stream lease lost to another process; closing the stream")
                return False
            self.last_renew = time.monotonic()
        return True

    def _after_gap(self):
        """Whatever was published while no stream was open is lost: distrust what events made
        fresh, and read the watched devices again (in the background)."""
        from selfserve.services import live_values

        self.stats["gaps"] += 1
        self._with_db(live_values.distrust_events)
        watched = self._with_db(live_values.watched_device_ids)
        if watched:
            threading.Thread(
                target=self._reread, args=(watched,), name="selfserve-reread", daemon=True
            ).start()

    def _reread(self, device_ids):
        from selfserve.models import Device
        from selfserve.services import live_values

        def read_all():
            for device in Device.select().where(
                Device.device_id.in_(device_ids) & Device.owner.is_null(False)
            ):
                try:
                    live_values.current(device)
                except Exception:  # noqa: BLE001 - one device must not stop the others
                    log.exception("re-reading device %s after a stream gap failed", device.device_id)

        self._with_db(read_all)


def keep_listening():
    """Background job (create_app's list): this process runs its listener; a new one if the
    thread died. Only the lease holder opens the stream. Returns what the listener is doing."""
    from flask import current_app

    app = current_app._get_current_object()
    if not app.config.get("EVENT_STREAM"):
        return "off"
    with _start_guard:
        listener = app.extensions.get("event_stream")
        if listener is None or listener.thread is None or not listener.thread.is_alive():
            listener = app.extensions["event_stream"] = Listener(app).start()
            background.on_stop(app, listener.stop)
    return "holding the stream" if listener.holding else "standing by"


def start(app):
    """Start this process's listener (once) unless EVENT_STREAM is off; return it or None."""
    if not app.config.get("EVENT_STREAM"):
        return None
    with _start_guard:
        listener = app.extensions.get("event_stream")
        if listener is None:
            listener = app.extensions["event_stream"] = Listener(app).start()
            background.on_stop(app, listener.stop)
        return listener


_start_guard = threading.Lock()
