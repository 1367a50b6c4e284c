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

import collections
import contextlib
import datetime
import json
import logging

from flask import current_app

from selfserve import device_models
from selfserve.models import Device
from selfserve.models import DeviceSnapshot
from selfserve.models import EventCount
from selfserve.models import db
from selfserve.models import is_postgres
from selfserve.models import raw_sql
from selfserve.models import transaction_opening_with
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
    # The device read, the cache, the device's history and what alerts decide from it
    # (services/history.py's listeners) in one transaction: one commit per event, the cost
    # that bounds intake.
    broker = current_app.extensions.get("push_broker")
    announce_in_transaction = getattr(broker, "transactional", False)
    with _event_transaction(device_id) as device:
        result = _apply(device, name, data, published)
        if result == STORED and announce_in_transaction:
            _announce(device_id)  # NOTIFY: delivered at the commit, sent with it
    if result != STORED:
        return _ignored(result)
    if not announce_in_transaction:
        _announce(device_id)  # after the commit, so a page that re-reads sees the change
    return STORED


@contextlib.contextmanager
def _event_transaction(device_id):
    """The event's transaction, yielding the device (None when unknown): it opens with the
    device read (models.transaction_opening_with: one round trip with the BEGIN)."""
    opening = [(raw_sql(_DEVICE), [device_id])]
    if is_postgres():
        opening.insert(0, _NO_FLUSH_WAIT)
    with transaction_opening_with(*opening) as opened:
        yield _device(device_id, opened.fetchone())


def _apply(device, name, data, published):
    """Apply the event to the cache and the history, inside its transaction: STORED, or why
    it was ignored."""
    if device is None:
        return UNKNOWN_DEVICE
    if device.owner_id is None:
        return NO_OWNER
    if device.claim_state is not None:
        return IN_FLIGHT
    if device.claimed_at is not None and published < device.claimed_at:
        return BEFORE_OWNER
    if name == STATUS_EVENT:
        if data not in ("online", "offline"):
            return MALFORMED
        values, online = None, data == "online"
        result = _apply_status(device.device_id, online, published)
    else:
        state = _parse_state(device, data)
        if state is None:
            return MALFORMED
        values, online = state[0], True
        result = _apply_state(device.device_id, *state, published)
    if result == STORED:
        history.record(device.device_id, values, at=published, online=online, device=device)
    return result


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


# The statements that run for every event, written out (models.raw_sql). In an UPDATE's SET,
# a column on the right is the row's value before the update.
_DEVICE = "SELECT model, owner_id, claim_state, claimed_at FROM device WHERE device_id = ?"
_STATUS_OLDER = "(status_at IS NULL OR status_at < ?)"
# Replace the values unless we hold newer ones: a state event's, or values read from Particle
# after this event was published. A device that publishes is online then, unless a later
# spark/status said otherwise: the same statement sets that, when the status we hold is older.
_STATE_UPDATE = (
    'UPDATE devicesnapshot SET "values" = ?, fetched_at = ?, state_at = ?, checked_at = ?, '
    "fresh_until = ?, last_error = NULL, "
    f"online = CASE WHEN {_STATUS_OLDER} THEN ? ELSE online END, "
    f"offline_since = CASE WHEN {_STATUS_OLDER} THEN NULL ELSE offline_since END, "
    f"status_at = CASE WHEN {_STATUS_OLDER} THEN ? ELSE status_at END "
    "WHERE device_id = ? AND (state_at IS NULL OR state_at < ?) AND (fetched_at IS NULL OR fetched_at < ?)"
)
_ONLINE_UPDATE = f"UPDATE devicesnapshot SET online = ?, offline_since = NULL, status_at = ? WHERE device_id = ? AND {_STATUS_OLDER}"
# Offline is known for as long as a state event would be: no read from Particle meanwhile.
_OFFLINE_UPDATE = (
    "UPDATE devicesnapshot SET online = ?, offline_since = ?, status_at = ?, checked_at = ?, fresh_until = ? "
    f"WHERE device_id = ? AND {_STATUS_OLDER}"
)
# On PostgreSQL an event's commit doesn't wait for the write-ahead log to reach disk (for this
# transaction only): a database crash can lose the last fraction of a second of events, never
# corrupt or half-apply one, and a state event is superseded by the device's next heartbeat
# anyway, while waiting for the flush on every event would cap intake at the disk's flush rate.
# (SQLite runs WAL with synchronous=NORMAL for the same reason, models.init_db.)
_NO_FLUSH_WAIT = ("SET LOCAL synchronous_commit = off", [])

_EventDevice = collections.namedtuple("_EventDevice", "device_id model owner_id claim_state claimed_at")


def _device(device_id, row):
    """What the ingest needs of the device (owner, model, claim state) from its `_DEVICE` row,
    or None."""
    if row is None:
        return None
    model, owner_id, claim_state, claimed_at = row
    return _EventDevice(device_id, model, owner_id, claim_state, Device.claimed_at.python_value(claimed_at))


def _apply_state(device_id, values, heartbeat, published):
    """Replace the cached values unless we hold newer ones (inside the event's transaction)."""
    stamp = _iso(published)
    fresh_until = published + datetime.timedelta(seconds=heartbeat + grace_seconds())
    cached = DeviceSnapshot.values.db_value(
        {name: {"value": value, "at": stamp} for name, value in values.items()}
    )
    params = [cached, published, published, published, fresh_until]
    params += [published, True, published, published, published]  # the CASEs
    params += [device_id, published, published]
    return STORED if _update_snapshot(device_id, _STATE_UPDATE, params) else STALE


def _apply_status(device_id, online, published):
    """Set the online state unless we hold a newer one (inside the event's transaction)."""
    if online:
        changed = _update_snapshot(device_id, _ONLINE_UPDATE, [True, published, device_id, published])
    else:
        heartbeat = float(current_app.config.get("EVENTS_DEFAULT_HEARTBEAT_SECONDS", 300.0))
        fresh_until = published + datetime.timedelta(seconds=heartbeat + grace_seconds())
        params = [False, published, published, utcnow(), fresh_until, device_id, published]
        changed = _update_snapshot(device_id, _OFFLINE_UPDATE, params)
    return STORED if changed else STALE


def _update_snapshot(device_id, sql, params):
    """Run the conditional update `sql` of the device's cache row; the number of rows changed
    (0 or 1). The row is created first only when it is missing (a device's first event), not
    on every event."""
    update = (raw_sql(sql), params)
    changed = db.execute_sql(*update).rowcount
    if not changed and not DeviceSnapshot.select().where(DeviceSnapshot.device_id == device_id).exists():
        DeviceSnapshot.insert(device_id=device_id, values={}).on_conflict_ignore().execute()
        changed = db.execute_sql(*update).rowcount
    return changed


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
