"""Device events in: the one function the product webhook and the product event stream feed.

`ingest(name, data, device_id, published_at)` applies one Particle event to the shared cache of
live values (`DeviceSnapshot`, see live_values.py), following the firmware contract (README,
"What the devices publish"):

- `selfserve/state` (JSON of every variable) replaces the device's values, each stamped with the
  event's publish time, and makes them good without reading Particle for the device's
  heartbeat plus a grace (`fresh_until`);
- `spark/status` (`online` / `offline`) sets the online state.

Delivery is at least once and in any order (reference §16), so each update is one conditional
UPDATE on the publish time: a repeated event changes nothing, and an event older than what we
hold (a state event, or values read from Particle later) never overwrites newer values.

Events only count for the device's current owner: none while a claim, release or transfer is in
flight (`claim_state`), none published before the owner got the device (`claimed_at`), so the
next owner never sees the previous owner's values. Unknown devices, unknown event names and
malformed data are ignored and counted (`EventCount`).
"""

import contextlib
import datetime
import json
import logging

import peewee
from flask import current_app

from selfserve import device_models
from selfserve.models import Device
from selfserve.models import DeviceSnapshot
from selfserve.models import EventCount
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.services import history

log = logging.getLogger(__name__)

STATE_EVENT = "selfserve/state"
STATUS_EVENT = "spark/status"
CONTRACT_VERSION = 1
# A device that sends a heartbeat period outside this range is treated as sending the default.
HEARTBEAT_RANGE = (1, 86400)

STORED = "stored"
# Ignored (the EventCount keys are "ignored:<reason>"):
STALE = "stale"  # a repeat, or older than what we hold
UNKNOWN_DEVICE = "unknown_device"
UNKNOWN_EVENT = "unknown_event"
MALFORMED = "malformed"
NO_OWNER = "no_owner"
IN_FLIGHT = "in_flight"  # claim, release or transfer under way
BEFORE_OWNER = "before_owner"  # published before the current owner got the device


def ingest(name, data, device_id, published_at):
    """Apply one event; return STORED or the reason it was ignored (never raises for bad data).

    `published_at` is Particle's ISO-8601 time (or a datetime). Any stored change is pushed to
    the pages that show the device.
    """
    if name not in (STATE_EVENT, STATUS_EVENT):
        return _ignored(UNKNOWN_EVENT)
    device_id = device_id.lower() if isinstance(device_id, str) else ""
    published = _parse_time(published_at)
    if len(device_id) != 24 or published is None:
        return _ignored(MALFORMED)
    device = (
        Device.select(Device.device_id, Device.model, Device.owner, Device.claim_state, Device.claimed_at)
        .where(Device.device_id == device_id)
        .first()
    )
    if device is None:
        return _ignored(UNKNOWN_DEVICE)
    if device.owner_id is None:
        return _ignored(NO_OWNER)
    if device.claim_state is not None:
        return _ignored(IN_FLIGHT)
    if device.claimed_at is not None and published < device.claimed_at:
        return _ignored(BEFORE_OWNER)
    if name == STATUS_EVENT:
        if data not in ("online", "offline"):
            return _ignored(MALFORMED)
        values, online = None, data == "online"
    else:
        state = _parse_state(device, data)
        if state is None:
            return _ignored(MALFORMED)
        values, online = state[0], True
    # The cache, the device's history and what alerts decide from it (services/history.py's
    # listeners) in one transaction: one commit per event, the cost that bounds intake.
    broker = current_app.extensions.get("push_broker")
    announce_in_transaction = getattr(broker, "transactional", False)
    with _event_transaction():
        if name == STATUS_EVENT:
            result = _apply_status(device_id, online, published)
        else:
            result = _apply_state(device_id, *state, published)
        if result == STORED:
            history.record(device_id, values, at=published, online=online, device=device)
            if announce_in_transaction:
                _announce(device_id)  # NOTIFY: delivered at the commit, no statement of its own
    if result != STORED:
        return _ignored(result)
    if not announce_in_transaction:
        _announce(device_id)  # after the commit, so a page that re-reads sees the change
    return STORED


@contextlib.contextmanager
def _event_transaction():
    """A transaction for one event. On PostgreSQL its commit doesn't wait for the write-ahead
    log to reach disk (`synchronous_commit = off` for this transaction only): a database crash
    can lose the last fraction of a second of events, never corrupt or half-apply one, and a
    state event is superseded by the device's next heartbeat anyway, while waiting for the
    flush on every event would cap intake at the disk's flush rate. (SQLite runs WAL with
    synchronous=NORMAL for the same reason, models.init_db.)"""
    with db.atomic():
        if db.obj is not None and isinstance(db.obj, peewee.PostgresqlDatabase):
            db.execute_sql("SET LOCAL synchronous_commit = off")
        yield


def ignored_counts():
    """{reason: count} of events ignored so far (all workers)."""
    return {
        row.key.split(":", 1)[1]: row.count for row in EventCount.select() if row.key.startswith("ignored:")
    }


def grace_seconds():
    return float(current_app.config.get("EVENTS_GRACE_SECONDS", 60.0))


# --- applying --------------------------------------------------------------------------------


def _parse_state(device, data):
    """(values for the cache, heartbeat seconds) from a state event's data, or None."""
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except ValueError:
            return None
    if not isinstance(data, dict) or data.get("v") != CONTRACT_VERSION:
        return None
    model = device_models.get(device.model)
    names = [variable.name for variable in model.variables] if model else []
    values = {name: data[name] for name in names if name in data and _plain(data[name])}
    if not values:
        return None
    heartbeat = data.get("hb")
    low, high = HEARTBEAT_RANGE
    if isinstance(heartbeat, bool) or not isinstance(heartbeat, (int, float)) or not low <= heartbeat <= high:
        heartbeat = float(current_app.config.get("EVENTS_DEFAULT_HEARTBEAT_SECONDS", 300.0))
    return values, float(heartbeat)


def _plain(value):
    return value is None or isinstance(value, (bool, int, float, str))


def _apply_state(device_id, values, heartbeat, published):
    """Replace the cached values unless we hold newer ones (inside the event's transaction)."""
    stamp = _iso(published)
    fresh_until = published + datetime.timedelta(seconds=heartbeat + grace_seconds())
    changed = _update_snapshot(
        device_id,
        DeviceSnapshot.update(
            values={name: {"value": value, "at": stamp} for name, value in values.items()},
            fetched_at=published,
            state_at=published,
            checked_at=published,
            fresh_until=fresh_until,
            last_error=None,
            # A device that publishes is online then, unless a later spark/status said
            # otherwise: the same statement sets it, when the status we hold is older.
            online=_if_status_older(published, True, DeviceSnapshot.online),
            offline_since=_if_status_older(published, None, DeviceSnapshot.offline_since),
            status_at=_if_status_older(published, published, DeviceSnapshot.status_at),
        ).where(
            (DeviceSnapshot.device_id == device_id)
            & (DeviceSnapshot.state_at.is_null() | (DeviceSnapshot.state_at < published))
            # Values read from Particle after this event was published are newer.
            & (DeviceSnapshot.fetched_at.is_null() | (DeviceSnapshot.fetched_at < published))
        ),
    )
    return STORED if changed else STALE


def _status_older(published):
    return DeviceSnapshot.status_at.is_null() | (DeviceSnapshot.status_at < published)


def _if_status_older(published, value, otherwise):
    return peewee.Case(None, [(_status_older(published), value)], otherwise)


def _apply_status(device_id, online, published):
    """Set the online state unless we hold a newer one (inside the event's transaction)."""
    changed = _update_snapshot(device_id, _online_update(device_id, online, published))
    if changed and not online:
        # Offline is known for as long as a state event would be: no read meanwhile.
        DeviceSnapshot.update(
            checked_at=utcnow(),
            fresh_until=published
            + datetime.timedelta(
                seconds=float(current_app.config.get("EVENTS_DEFAULT_HEARTBEAT_SECONDS", 300.0))
                + grace_seconds()
            ),
        ).where(DeviceSnapshot.device_id == device_id).execute()
    return STORED if changed else STALE


def _update_snapshot(device_id, update):
    """Run the conditional `update` of the device's cache row; the row is created first only
    when it is missing (a device's first event), not on every event."""
    changed = update.execute()
    if not changed and not DeviceSnapshot.select().where(DeviceSnapshot.device_id == device_id).exists():
        DeviceSnapshot.insert(device_id=device_id, values={}).on_conflict_ignore().execute()
        changed = update.execute()
    return changed


def _online_update(device_id, online, published):
    return DeviceSnapshot.update(
        online=online,
        offline_since=None if online else published,
        status_at=published,
    ).where((DeviceSnapshot.device_id == device_id) & _status_older(published))


def _ignored(reason):
    key = f"ignored:{reason}"
    try:
        EventCount.insert(key=key, count=1).on_conflict(
            conflict_target=[EventCount.key], update={EventCount.count: EventCount.count + 1}
        ).execute()
    except Exception:  # noqa: BLE001 - counting must never turn an ignored event into an error
        log.exception("could not count an ignored event")
    return reason


def _announce(device_id):
    """Tell the pages showing the device that it changed (services/push.py, when present)."""
    announce = current_app.extensions.get("announce_device_change")
    if announce is not None:
        announce(device_id)


# --- time ------------------------------------------------------------------------------------


def _iso(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value):
    """Naive UTC datetime from Particle's ISO-8601 time (or a datetime); None when unusable."""
    if isinstance(value, datetime.datetime):
        moment = value
    elif isinstance(value, str) and value:
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.UTC).replace(tzinfo=None)
    return moment
