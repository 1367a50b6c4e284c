"""Pushing device changes to open pages: a hub per process, fanned out between processes.

A change (an event stored by services/device_events.py, values read from Particle) is
*announced* with the device id only, never with values: each open page's stream then renders
the device again from the shared cache, after checking again that its viewer may see it
(`devices.device_for`). So no push channel can carry one customer's values to another.

Fan-out between workers and machines goes through an existing engine:

- PostgreSQL `LISTEN`/`NOTIFY` when the database is PostgreSQL (channel `selfserve_devices`);
- Redis pub/sub when PUSH_BROKER_URL is `redis://...`;
- in-process only otherwise (SQLite: the demo and single-process sites).

Each process has one broker thread that listens and hands announcements to the local hub.

Access that ends (services/access.py `access_ended`: a revoke, an expiry, a release or
transfer, a member leaving an organisation, a device leaving a group) is announced the same
way, once committed: the device's id, or EVERY_PAGE when no single device is concerned (a grant
on a group, an organisation's membership). Each open page then checks its viewer's access
again at once, in every process, and a page that lost it says so and stops (selfserve/sse.py).
"""

import logging
import queue
import select
import threading
import time

log = logging.getLogger(__name__)

CHANNEL = "selfserve_devices"
RECONNECT_SECONDS = 2.0
EVERY_PAGE = "*"  # an announcement every open page re-checks (not a device id: those are hex)


class Subscription:
    """The devices one open page shows; `wait` returns the ids that changed (coalesced)."""

    def __init__(self, device_ids):
        self.device_ids = frozenset(device_ids)
        self._changed = set()
        self._queue = queue.Queue()

    def notify(self, device_id):
        self._queue.put(device_id)

    def wait(self, timeout):
        """Device ids changed since the last call (empty after `timeout` seconds of quiet)."""
        changed = set()
        try:
            changed.add(self._queue.get(timeout=timeout))
        except queue.Empty:
            return changed
        while True:
            try:
                changed.add(self._queue.get_nowait())
            except queue.Empty:
                return changed


class Hub:
    """Open pages of this process by device id."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_device = {}

    def subscribe(self, device_ids):
        subscription = Subscription(device_ids)
        with self._lock:
            for device_id in subscription.device_ids:
                self._by_device.setdefault(device_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription):
        with self._lock:
            for device_id in subscription.device_ids:
                pages = self._by_device.get(device_id)
                if pages is not None:
                    pages.discard(subscription)
                    if not pages:
                        del self._by_device[device_id]

    def deliver(self, device_id):
        if device_id == EVERY_PAGE:
            with self._lock:
                pages = {s for subscriptions in self._by_device.values() for s in subscriptions}
            for subscription in pages:
                for shown in subscription.device_ids:
                    subscription.notify(shown)
            return
        with self._lock:
            pages = list(self._by_device.get(device_id, ()))
        for subscription in pages:
            subscription.notify(device_id)

    def open_pages(self):
        with self._lock:
            return len({id(s) for pages in self._by_device.values() for s in pages})


class LocalBroker:
    """No fan-out: announcements reach this process's pages only."""

    # Whether `announce` may run inside the change's transaction (it then takes effect when
    # the transaction commits). Brokers that deliver at once are called after the commit, or
    # a page would re-read the value before it is there.
    transactional = False

    def __init__(self, hub):
        self.hub = hub

    def announce(self, device_id):
        self.hub.deliver(device_id)

    def start(self):
        return self


class PostgresBroker:
    """NOTIFY on the announcing connection (sent when its transaction commits); one LISTEN
    connection per process delivers to the local hub (our own announcements included)."""

    transactional = True  # NOTIFY is delivered when the announcing transaction commits

    def __init__(self, hub, url):
        self.hub = hub
        self.url = url
        self.stop_event = threading.Event()

    def announce(self, device_id):
        from selfserve.models import at_commit

        at_commit("SELECT pg_notify(%s, %s)", [CHANNEL, device_id])

    def start(self):
        threading.Thread(target=self._listen_forever, name="selfserve-push-pg", daemon=True).start()
        return self

    def _listen_forever(self):
        import psycopg2

        while not self.stop_event.is_set():
            connection = None
            try:
                connection = psycopg2.connect(self.url)  # libpq takes the postgresql:// URL
                connection.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
                with connection.cursor() as cursor:
                    cursor.execute(f"LISTEN {CHANNEL}")
                while not self.stop_event.is_set():
                    if select.select([connection], [], [], 5.0) == ([], [], []):
                        continue
                    connection.poll()
                    while connection.notifies:
                        self.hub.deliver(connection.notifies.pop(0).payload)
            except Exception:  # noqa: BLE001 - reconnect; pages fall back to polling meanwhile
                log.exception("push: PostgreSQL LISTEN failed; reconnecting")
                time.sleep(RECONNECT_SECONDS)
            finally:
                if connection is not None:
                    connection.close()


class RedisBroker:
    """PUBLISH to a channel; one subscriber connection per process delivers to the hub."""

    transactional = False  # PUBLISH delivers at once

    def __init__(self, hub, url):
        import redis

        self.hub = hub
        self.client = redis.Redis.from_url(url)
        self.stop_event = threading.Event()

    def announce(self, device_id):
        try:
            self.client.publish(CHANNEL, device_id)
        except Exception:  # noqa: BLE001 - the value is stored; pages poll the cache as a fallback
            log.exception("push: Redis PUBLISH failed")

    def start(self):
        threading.Thread(target=self._listen_forever, name="selfserve-push-redis", daemon=True).start()
        return self

    def _listen_forever(self):
        while not self.stop_event.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                for message in pubsub.listen():
                    if self.stop_event.is_set():
                        return
                    payload = message.get("data")
                    if isinstance(payload, bytes):
                        self.hub.deliver(payload.decode())
            except Exception:  # noqa: BLE001 - reconnect
                log.exception("push: Redis subscription failed; reconnecting")
                time.sleep(RECONNECT_SECONDS)


def init_app(app):
    """One hub and one broker per app; devices announce changes through `announce`."""
    hub = Hub()
    url = app.config.get("PUSH_BROKER_URL") or ""
    database_url = app.config.get("DATABASE_URL") or ""
    if url.startswith(("redis://", "rediss://", "unix://")):
        broker = RedisBroker(hub, url)
    elif url.startswith("postgres") or (not url and database_url.startswith("postgres")):
        broker = PostgresBroker(hub, url or database_url)
    else:
        broker = LocalBroker(hub)
    app.extensions["push_hub"] = hub
    app.extensions["push_broker"] = broker
    app.extensions["announce_device_change"] = broker.announce
    from selfserve.services import access

    access.access_ended.connect(_announce_access_ended)  # one receiver, whatever the apps
    return hub


def _announce_access_ended(device_id, **why):
    """An access ended (committed): every open page showing that device (EVERY_PAGE when not
    one device) checks its viewer again, in every process."""
    from flask import current_app
    from flask import has_app_context

    if not has_app_context():
        return
    announce = current_app.extensions.get("announce_device_change")
    if announce is not None:
        announce(device_id or EVERY_PAGE)


_start_guard = threading.Lock()


def subscribe(app, device_ids):
    """A Subscription of this process's hub; the first one starts the broker's listener (so
    processes without open pages, CLI commands and most tests, hold no LISTEN connection)."""
    hub = app.extensions["push_hub"]
    with _start_guard:
        if not app.extensions.get("push_started"):
            app.extensions["push_broker"].start()
            app.extensions["push_started"] = True
    return hub.subscribe(device_ids)
