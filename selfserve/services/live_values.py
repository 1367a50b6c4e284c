"""Live variable values: one short-lived cache shared by every viewer and every worker.

The cache is the DeviceSnapshot table. A read goes:

1. fresh snapshot (asked less than VALUES_CACHE_SECONDS ago, or the device was found offline
   less than OFFLINE_REMEMBER_SECONDS ago) -> serve it, no Particle call;
2. otherwise one thread per process may try (a per-device threading lock), and one process
   across all workers wins (an atomic UPDATE of `lease_until`): the winner reads the device
   (one get_device, then its variables in parallel, each call with its own timeout) and writes
   the snapshot;
3. everyone else serves the last snapshot at once, or waits briefly when there is none yet.

So many viewers of one device cost one upstream read per interval, and a slow or offline
device shows its last known values with their age instead of hanging the page. Reads use the
customer token of the device's owner in our database.
"""

import concurrent.futures
import dataclasses
import datetime
import logging
import threading
import time

from flask import current_app

from selfserve import device_models
from selfserve.i18n import lazy_text as _l
from selfserve.models import Device
from selfserve.models import DeviceSnapshot
from selfserve.models import User
from selfserve.models import utcnow
from selfserve.particle import get_client
from selfserve.particle.errors import CloudUnavailable
from selfserve.particle.errors import DeviceOffline
from selfserve.particle.errors import ParticleError
from selfserve.particle.errors import PermissionDenied
from selfserve.particle.errors import RateLimited
from selfserve.services import history

log = logging.getLogger(__name__)

# How long a viewer with nothing to show waits for another thread or worker's first read.
FIRST_READ_WAIT_SECONDS = 3.0
# Threads reading variables for every device of this process (each call has its own timeout).
_POOL_SIZE = 16
_pool = None
_pool_guard = threading.Lock()
_device_locks = {}
_device_locks_guard = threading.Lock()

# Why the values may be old. DeviceSnapshot.last_error is one row shared by every viewer, so it
# keeps the reason's key (language-neutral) and `_to_snapshot` translates it for whoever looks.
NOT_ANSWERING = "not_answering"
OFFLINE = "offline"
UNREACHABLE = "unreachable"
PARTLY_READ = "partly_read"
# On 429 the site retries by itself: the page says so, never "try again".
BUSY = "busy"
NOT_AVAILABLE = "not_available"
REASON_TEXTS = {
    NOT_ANSWERING: _l("The device is not answering right now."),
    OFFLINE: _l("The device is offline."),
    UNREACHABLE: _l("The device cloud is not reachable right now."),
    PARTLY_READ: _l("Some values could not be read."),
    BUSY: _l("The device cloud is busy right now, so the values are not being refreshed."),
    NOT_AVAILABLE: _l(
        "The device cloud says this device is not available to your account. Please contact support."
    ),
}
# Reasons after which the values shown are simply old: the page says so (or, before the first
# successful read, that there are none yet).
STALE_REASONS = (NOT_ANSWERING, OFFLINE, UNREACHABLE, PARTLY_READ, BUSY)
# After a command, a publishing device's state event is expected within this many seconds;
# without one, the values are read from Particle as for older firmware.
EVENT_AFTER_COMMAND_SECONDS = 5.0
NEVER_HEARD = _l("No values yet: the device hasn't been heard from since you added it. It is offline.")
# Values read this recently count as "Live" (a couple of polls); older ones show their age.
LIVE_SECONDS = 30


@dataclasses.dataclass
class Reading:
    """One variable as shown to a homeowner."""

    name: str
    label: str
    text: str
    unit: str
    at: datetime.datetime = None  # when this value was read (None: never)


@dataclasses.dataclass
class Snapshot:
    """What we know about a device's live state, and how old it is."""

    device_id: str
    online: bool = None  # None: unknown yet
    offline_since: datetime.datetime = None
    fetched_at: datetime.datetime = None
    checked_at: datetime.datetime = None
    readings: list = dataclasses.field(default_factory=list)
    message: str = ""  # why the values may be old (safe to show)
    raw: dict = dataclasses.field(default_factory=dict)  # name -> value
    model: object = None  # the DeviceModel, None for a model we don't know

    def reading(self, name):
        for reading in self.readings:
            if reading.name == name:
                return reading
        return None

    # What the catalogue makes of these values (device_models): the templates only show it.

    @property
    def state(self):
        return device_models.DeviceState(self.raw, self.online)

    @property
    def state_text(self):
        return self.model.state_text(self.state)[0] if self.model and self.fetched_at else ""

    @property
    def settled(self):
        return self.model.state_text(self.state)[1] if self.model and self.fetched_at else True

    @property
    def fault(self):
        return self.model.fault(self.state) if self.model and self.fetched_at else None

    def unavailable(self, function):
        """Why `function` can't apply now ("" when it can)."""
        return self.model.unavailable(function, self.state) if self.model else ""

    def unavailable_map(self):
        """{function name: reason} for every function that can't apply now."""
        if not self.model:
            return {}
        reasons = {f.name: self.unavailable(f) for f in self.model.functions}
        return {name: reason for name, reason in reasons.items() if reason}

    def freshness(self, now=None):
        """One indicator for the whole device: (kind, words, moment or None). kind is
        live | old | offline | unknown; the words go next to the moment's age."""
        now = now or utcnow()
        if self.online is False:
            if self.offline_since and self.fetched_at:
                return "offline", _l("Offline since"), self.offline_since
            return "offline", _l("Offline"), None
        if self.fetched_at is None:
            return "unknown", (_l("Status unknown") if self.checked_at else _l("Checking…")), None
        if self.online and (now - self.fetched_at).total_seconds() <= LIVE_SECONDS:
            return "live", _l("Live"), None
        return "old", _l("Updated"), self.fetched_at


def current(device):
    """The device's live values, reading Particle at most once per interval for everyone.

    Never raises for Particle trouble: the snapshot then carries the last known values and a
    `message` saying why they may be old.
    """
    device_id = device.device_id
    row = _row(device_id)
    if _is_fresh(row, utcnow()):
        return _to_snapshot(device, row)
    lock = _lock_for(device_id)
    if lock.acquire(blocking=False):
        try:
            row = _row(device_id)
            if not _is_fresh(row, utcnow()) and _take_lease(device_id):
                try:
                    _refresh(device, row)
                except Exception:
                    # A bug, not the cloud: don't leave other viewers waiting for the lease.
                    _store(device_id, {"lease_until": None})
                    raise
                row = _row(device_id)
        finally:
            lock.release()
        if not _has_anything(row):
            row = _wait_for_first(device.device_id)  # another worker holds the lease
        return _to_snapshot(device, row)
    # Another thread of this process is reading the device right now.
    if _has_anything(row):
        return _to_snapshot(device, row)
    if lock.acquire(timeout=FIRST_READ_WAIT_SECONDS):
        lock.release()
    return _to_snapshot(device, _wait_for_first(device_id))


def last_known(device):
    """The stored snapshot only; never calls Particle (for page shells and the dashboard)."""
    row = DeviceSnapshot.get_or_none(DeviceSnapshot.device_id == device.device_id)
    return _to_snapshot(device, row)


def last_known_many(devices):
    """`last_known` for several devices with one query: {device_id: Snapshot}."""
    ids = [device.device_id for device in devices]
    rows = (
        {row.device_id: row for row in DeviceSnapshot.select().where(DeviceSnapshot.device_id.in_(ids))}
        if ids
        else {}
    )
    return {device.device_id: _to_snapshot(device, rows.get(device.device_id)) for device in devices}


def invalidate(device_id):
    """Make the next read go to Particle (after a function call changed the device); for a
    device that publishes its state, only if its state event doesn't come first."""
    DeviceSnapshot.update(checked_at=None).where(DeviceSnapshot.device_id == device_id).execute()
    soon = utcnow() + datetime.timedelta(seconds=EVENT_AFTER_COMMAND_SECONDS)
    DeviceSnapshot.update(fresh_until=soon).where(
        (DeviceSnapshot.device_id == device_id) & (DeviceSnapshot.fresh_until > soon)
    ).execute()


def watch(device_id, seconds):
    """Note that a page shows the device for about `seconds` more (re-read after an event gap)."""
    now = utcnow()
    _row(device_id)
    DeviceSnapshot.update(watched_until=now + datetime.timedelta(seconds=seconds)).where(
        (DeviceSnapshot.device_id == device_id)
        & (
            DeviceSnapshot.watched_until.is_null()
            | (DeviceSnapshot.watched_until < now + datetime.timedelta(seconds=seconds / 2))
        )
    ).execute()


def watched_device_ids():
    """Devices someone has a page open on right now."""
    return [
        row.device_id
        for row in DeviceSnapshot.select(DeviceSnapshot.device_id).where(
            DeviceSnapshot.watched_until > utcnow()
        )
    ]


def distrust_events():
    """The event stream had a gap: what events made fresh must be read again when viewed."""
    DeviceSnapshot.update(fresh_until=None).where(DeviceSnapshot.fresh_until.is_null(False)).execute()


def publishes(row_or_snapshot):
    """Whether the values come from the device's own events (not stale past its heartbeat)."""
    fresh_until = getattr(row_or_snapshot, "fresh_until", None)
    return fresh_until is not None and utcnow() < fresh_until


def mark_offline(device_id):
    """Remember that the device did not answer (a function call timed out on it)."""
    _row(device_id)
    now = utcnow()
    DeviceSnapshot.update(online=False, checked_at=now, last_error=NOT_ANSWERING).where(
        DeviceSnapshot.device_id == device_id
    ).execute()
    DeviceSnapshot.update(offline_since=now).where(
        (DeviceSnapshot.device_id == device_id) & DeviceSnapshot.offline_since.is_null()
    ).execute()


def forget(device_id):
    """Drop the snapshot (the device left its owner: the next owner must not see old values)."""
    DeviceSnapshot.delete().where(DeviceSnapshot.device_id == device_id).execute()


# --- freshness and the lease --------------------------------------------------------------


def _settings():
    config = current_app.config
    cache = float(config.get("VALUES_CACHE_SECONDS", 4.0))
    offline = max(cache, float(config.get("OFFLINE_REMEMBER_SECONDS", 60.0)))
    timeout = float(config.get("PARTICLE_CONNECT_TIMEOUT", 3.05)) + float(
        config.get("PARTICLE_READ_TIMEOUT", 20.0)
    )
    # A lease outlives the slowest possible read (get_device, then one parallel round of
    # variables) so a second worker doesn't start a duplicate read, and expires by itself
    # when its holder crashed.
    lease = 2 * timeout + 2
    return cache, offline, lease


def _row(device_id):
    row = DeviceSnapshot.get_or_none(DeviceSnapshot.device_id == device_id)
    if row is None:
        DeviceSnapshot.insert(device_id=device_id, values={}).on_conflict_ignore().execute()
        row = DeviceSnapshot.get(DeviceSnapshot.device_id == device_id)
    return row


def _is_fresh(row, now):
    if row is None:
        return False
    if row.fresh_until is not None and now < row.fresh_until:
        return True  # the device's own events keep it current (its heartbeat plus a grace)
    if row.checked_at is None:
        return False
    cache, offline, _ = _settings()
    window = offline if row.online is False else cache
    return now - row.checked_at < datetime.timedelta(seconds=window)


def _has_anything(row):
    return row is not None and (row.checked_at is not None or row.fetched_at is not None)


def _take_lease(device_id):
    """Atomically become the one reader of this device; False when another worker is, or
    when someone just refreshed it."""
    now = utcnow()
    cache, offline, lease = _settings()
    stale = (
        DeviceSnapshot.checked_at.is_null()
        | (
            (DeviceSnapshot.online.is_null() | (DeviceSnapshot.online == True))  # noqa: E712
            & (DeviceSnapshot.checked_at < now - datetime.timedelta(seconds=cache))
        )
        | (
            (DeviceSnapshot.online == False)  # noqa: E712
            & (DeviceSnapshot.checked_at < now - datetime.timedelta(seconds=offline))
        )
    )
    taken = (
        DeviceSnapshot.update(lease_until=now + datetime.timedelta(seconds=lease))
        .where(
            (DeviceSnapshot.device_id == device_id)
            & (DeviceSnapshot.lease_until.is_null() | (DeviceSnapshot.lease_until < now))
            & (DeviceSnapshot.fresh_until.is_null() | (DeviceSnapshot.fresh_until <= now))
            & stale
        )
        .execute()
    )
    return taken == 1


def _wait_for_first(device_id):
    """Another worker holds the lease and we have nothing to show: wait a little for it."""
    deadline = time.monotonic() + FIRST_READ_WAIT_SECONDS
    row = _row(device_id)
    while not _has_anything(row) and time.monotonic() < deadline:
        time.sleep(0.1)
        row = _row(device_id)
    return row


def _lock_for(device_id):
    with _device_locks_guard:
        lock = _device_locks.get(device_id)
        if lock is None:
            lock = _device_locks[device_id] = threading.Lock()
        return lock


def _executor():
    global _pool
    with _pool_guard:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=_POOL_SIZE, thread_name_prefix="live-values"
            )
        return _pool


# --- reading Particle ------------------------------------------------------------------------


def _refresh(device, row):
    """Read the device from Particle and store what we learned; we hold the lease."""
    now = utcnow()
    values = dict(row.values or {})
    update = {"checked_at": now, "lease_until": None}
    # The owner as the database says now (the device may have changed hands since the page
    # loaded): reads always use the current owner's customer token.
    customer_id = (
        User.select(User.particle_customer_id)
        .join(Device, on=(Device.owner == User.id))
        .where(Device.device_id == device.device_id)
        .scalar()
    )
    if customer_id is None:
        update["last_error"] = "This device has no owner with a device-cloud account."
        _store(device.device_id, update)
        return
    client = get_client()
    try:
        info = client.get_device(customer_id, device.device_id)
    except RateLimited as exc:
        # Hold the lease until the cloud lets us back in: nobody asks again before then.
        wait = max(float(exc.retry_after or 0), _settings()[0])
        update["lease_until"] = now + datetime.timedelta(seconds=wait)
        update["last_error"] = BUSY
        _store(device.device_id, update)
        return
    except ParticleError as exc:
        log.info("Reading device %s failed: %s", device.device_id, exc)
        update["last_error"] = _message_for(exc)
        _store(device.device_id, update)
        return

    if not (info.get("online") or info.get("connected")):
        _store_offline(device.device_id, update, row, _parse_time(info.get("last_heard")) or now)
        return

    names = _variable_names(device, info)
    results = _read_variables(client, customer_id, device.device_id, names)
    offline = False
    errors = []
    for name, (value, error) in results.items():
        if error is None:
            values[name] = {"value": value, "at": _iso(utcnow())}
        elif isinstance(error, (DeviceOffline, CloudUnavailable)) and not isinstance(error, RateLimited):
            # 408, or no answer within our own read timeout: the device isn't answering.
            offline = True
        else:
            errors.append(error)
    got_any = any(error is None for _, error in results.values())
    update["values"] = values
    if got_any:
        update["fetched_at"] = utcnow()
    if offline:
        _store_offline(device.device_id, update, row, utcnow())
        return
    update["online"] = True
    update["offline_since"] = None
    update["last_error"] = _message_for(errors[0]) if errors else None
    _store(device.device_id, update)
    _announce(device.device_id)


def _read_variables(client, customer_id, device_id, names):
    """Read variables in parallel; {name: (value, None) | (None, ParticleError)}."""
    futures = {name: _executor().submit(client.get_variable, customer_id, device_id, name) for name in names}
    results = {}
    for name, future in futures.items():
        try:
            results[name] = (future.result(), None)
        except ParticleError as exc:
            results[name] = (None, exc)
    return results


def _store_offline(device_id, update, row, since):
    update["online"] = False
    update["offline_since"] = row.offline_since if row.online is False and row.offline_since else since
    update["last_error"] = None
    _store(device_id, update)
    _announce(device_id)


def _announce(device_id):
    """Pages of other viewers (other workers too) show what this read found (selfserve/push.py)."""
    announce = current_app.extensions.get("announce_device_change")
    if announce is not None:
        try:
            announce(device_id)
        except Exception:  # noqa: BLE001 - the values are stored; pages still poll the cache
            log.exception("could not announce a change of %s", device_id)


def _store(device_id, update):
    DeviceSnapshot.update(**update).where(DeviceSnapshot.device_id == device_id).execute()
    # What was learned goes into the device's history too (changes only; services/history.py).
    online = update.get("online")
    history.record(
        device_id,
        update.get("values"),
        at=(update.get("offline_since") if online is False else None) or update.get("checked_at"),
        online=online,
    )


def _variable_names(device, info):
    """The catalogue's variables first, then any others the device reports."""
    reported = info.get("variables")
    model = device_models.get(device.model)
    known = [variable.name for variable in model.variables] if model else []
    if not isinstance(reported, dict):
        return known
    names = [name for name in known if name in reported]
    names += sorted(name for name in reported if name not in known)
    return names


def _message_for(exc):
    if isinstance(exc, PermissionDenied):
        return NOT_AVAILABLE
    if isinstance(exc, CloudUnavailable):
        return UNREACHABLE
    if isinstance(exc, RateLimited):
        return BUSY
    return PARTLY_READ


# --- presenting ------------------------------------------------------------------------------


def _to_snapshot(device, row):
    snapshot = Snapshot(device_id=device.device_id, model=device_models.get(device.model))
    values = {}
    if row is not None:
        snapshot.online = row.online
        snapshot.offline_since = row.offline_since if row.online is False else None
        snapshot.fetched_at = row.fetched_at
        snapshot.checked_at = row.checked_at
        snapshot.message = row.last_error or ""
        values = row.values or {}
    snapshot.message = _note(
        snapshot.message or (OFFLINE if snapshot.online is False else ""),
        has_values=bool(snapshot.fetched_at or values),
        offline=snapshot.online is False,
    )
    model = device_models.get(device.model)
    catalogue = list(model.variables) if model else []
    names = [variable.name for variable in catalogue]
    names += sorted(name for name in values if name not in names)
    for name in names:
        variable = (model.variable(name) if model else None) or device_models.Variable(
            name, name, kind="text"
        )
        entry = values.get(name)
        value = entry.get("value") if isinstance(entry, dict) else None
        at = _parse_time(entry.get("at")) if isinstance(entry, dict) else None
        snapshot.raw[name] = value
        snapshot.readings.append(
            Reading(
                name=name,
                label=variable.label,
                text=variable.format(value) if entry else "—",
                unit=variable.unit if entry else "",
                at=at,
            )
        )
    return snapshot


def _note(reason, has_values, offline):
    """The sentence above the values: the reason they may be old, saying whether old values
    are shown or there are none yet (never "last known values" when there is nothing)."""
    text = REASON_TEXTS.get(reason, reason)  # a key, else text stored before keys were
    if reason not in STALE_REASONS:
        return text
    if not has_values:
        return NEVER_HEARD if offline else _l("No values yet: ") + text
    return str(text).rstrip(".") + _l("; showing the last known values.")


def _iso(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text):
    """Naive UTC datetime from Particle's ISO-8601 "…Z" (or our own); None when unparseable."""
    if not text or not isinstance(text, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.UTC).replace(tzinfo=None)
    return moment
