"""History of device values: what a device did while nobody watched.

Writing: `record(device_id, values, at, online)` is called wherever values reach the shared
cache (live values read from Particle today; events as they arrive). It stores only *changes*
(a value equal to the one before it at an earlier time is not stored again), each with the
time it was published, under the device's current owner: the owner's ownership period. A
repeated event is stored once (unique device, name, time); an older event arriving after a
newer one is stored at its own time, so it never overwrites anything. Online / offline
changes are stored under the name "online" (1 / 0): charts draw offline time as gaps.

Keeping: raw changes for HISTORY_RAW_DAYS (7), hourly rollups (min, max, time-weighted mean,
last) for HISTORY_ROLLUP_DAYS (396, 13 months). Each new raw value marks its hour (and the next,
whose carried-in value may change) as pending; `maintain()`, run by the background sweep under
a database lease (one process at a time across workers), rolls up pending hours once they are
over and purges what is past retention.

Reading: `chart(device, window)` for "24h" (raw changes), "7d" and "30d" (hourly rollups),
for the device's current owner and their ownership period only (from `Device.claimed_at`).
"""

import collections
import csv
import dataclasses
import datetime
import io
import logging

import peewee
from flask import current_app
from flask import has_app_context

from selfserve import device_models
from selfserve import i18n
from selfserve.i18n import lazy_text as _l
from selfserve.models import Device
from selfserve.models import RollupPending
from selfserve.models import ValueRollup
from selfserve.models import ValueSample
from selfserve.models import db
from selfserve.models import execute_together
from selfserve.models import raw_sql
from selfserve.models import utcnow
from selfserve.services import leases

log = logging.getLogger(__name__)

HOUR = datetime.timedelta(hours=1)
ONLINE = "online"
TEXT_MAX = 64
# name -> (length, source): the chart windows a device page offers.
WINDOWS = {
    "24h": (datetime.timedelta(hours=24), "raw"),
    "7d": (datetime.timedelta(days=7), "hourly"),
    "30d": (datetime.timedelta(days=30), "hourly"),
}
WINDOW_LABELS = {"24h": _l("24 hours"), "7d": _l("7 days"), "30d": _l("30 days")}
MAINTAIN_LEASE = "history.maintain"
# Purging past retention is a range delete on an index; once an hour per process is plenty.
PURGE_EVERY = datetime.timedelta(hours=1)
_last_purge = None

# Functions called with (device_id, owner_id, model_key, changes) after changes were stored
# (alerts evaluate them); a failing listener never loses the history that was written.
LISTENERS = []


@dataclasses.dataclass
class Change:
    """One stored change of one value."""

    name: str
    at: datetime.datetime
    value: float = None
    text: str = None
    previous: object = None  # the value (or text) stored before it, None when none
    newest: bool = True  # False for an older value that arrived late (not what holds now)


def _setting(key, default):
    if has_app_context():
        return current_app.config.get(key, default)
    return default


def floor_hour(moment):
    return moment.replace(minute=0, second=0, microsecond=0)


# --- writing ------------------------------------------------------------------------------------


def _normalise(variable, raw):
    """(number, text) for a value as the device reported it; booleans are 1 / 0."""
    if raw is None:
        return None, None
    kind = variable.kind if variable else ("number" if isinstance(raw, (int, float)) else "text")
    if kind == "bool" or isinstance(raw, bool):
        if isinstance(raw, str):
            raw = raw.strip().lower() in ("1", "true", "yes", "on")
        return (1.0 if raw else 0.0), None
    if kind == "number":
        try:
            number = float(raw)
        except (TypeError, ValueError):
            return None, None  # garbage for a number: ignored, never charted as text
        if number != number or number in (float("inf"), float("-inf")):
            return None, None
        return number, None
    return None, str(raw)[:TEXT_MAX]


def _entry_time(entry, default):
    if isinstance(entry, dict):
        moment = entry.get("at")
        if isinstance(moment, str):
            moment = _parse_time(moment)
        return moment or default
    return default


def _parse_time(text):
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.UTC).replace(tzinfo=None)
    return moment


def record(device_id, values=None, at=None, online=None, device=None):
    """Store what changed among `values` ({name: value} or {name: {"value", "at"}}) published
    at `at`, and the online state when given; returns the list of stored Changes.

    Values of names the device's model doesn't list are ignored; a device with no owner has no
    ownership period, so nothing is stored for it. `device` (with device_id, owner, model) saves
    the lookup when the caller just read it (the event ingest)."""
    if device is None or device.device_id != device_id:
        device = (
            Device.select(Device.device_id, Device.owner, Device.model)
            .where(Device.device_id == device_id)
            .first()
        )
    if device is None or device.owner_id is None:
        return []
    at = at or utcnow()
    model = device_models.get(device.model)
    wanted = {}
    for name, entry in (values or {}).items():
        variable = model.variable(name) if model else None
        if variable is None:
            continue
        raw = entry.get("value") if isinstance(entry, dict) else entry
        number, text = _normalise(variable, raw)
        if number is None and text is None:
            continue
        wanted[name] = (_entry_time(entry, at), number, text)
    if online is not None:
        wanted[ONLINE] = (at, 1.0 if online else 0.0, None)
    if not wanted:
        return []
    changes = _store_changes(device.device_id, device.owner_id, wanted)
    if changes:
        for listener in list(LISTENERS):
            try:
                listener(device.device_id, device.owner_id, device.model, changes)
            except Exception:  # noqa: BLE001 - history is stored; a listener bug must not undo it
                log.exception("History listener %s failed", getattr(listener, "__name__", listener))
    return changes


_Latest = collections.namedtuple("_Latest", "name at value text owner_id")


def _latest(device_id, names):
    """{name: (name, at, value, text, owner_id)} of the newest stored sample of each name, in
    one statement: one index probe per name (newest first, LIMIT 1), so its cost doesn't grow
    with the days of history a device has (a MAX ... GROUP BY read them all). Written out
    (models.raw_sql): this runs for every event."""
    names = list(names)
    rows = db.execute_sql(_latest_sql(len(names)), [value for name in names for value in (device_id, name)])
    to_time = ValueSample.at.python_value
    return {row[0]: _Latest(row[0], to_time(row[1]), row[2], row[3], row[4]) for row in rows.fetchall()}


_NEWEST_OF_NAME = (
    "SELECT * FROM (SELECT name, at, value, text, owner_id FROM valuesample "
    "WHERE device_id = ? AND name = ? ORDER BY at DESC LIMIT 1) AS newest"
)


def _latest_sql(count):
    return raw_sql(" UNION ALL ".join([_NEWEST_OF_NAME] * count))


def _same(sample, owner_id, number, text):
    return (
        sample is not None and sample.owner_id == owner_id and sample.value == number and sample.text == text
    )


def _store_changes(device_id, owner_id, wanted):
    latest = _latest(device_id, list(wanted))
    rows = []
    changes = []
    for name, (moment, number, text) in sorted(wanted.items(), key=lambda item: item[1][0]):
        before = latest.get(name)
        if before is not None and moment <= before.at:
            # Out of order (or repeated): compare with what was stored just before its time.
            if moment == before.at:
                continue
            before = (
                ValueSample.select()
                .where(
                    (ValueSample.device_id == device_id)
                    & (ValueSample.name == name)
                    & (ValueSample.at <= moment)
                )
                .order_by(ValueSample.at.desc())
                .first()
            )
            if before is not None and before.at == moment:
                continue
        if _same(before, owner_id, number, text):
            continue
        rows.append((device_id, owner_id, name, moment, number, text))
        previous = None if before is None or before.owner_id != owner_id else (before.text or before.value)
        newest = latest.get(name) is None or moment > latest[name].at
        changes.append(Change(name, moment, number, text, previous, newest))
    if not rows:
        return []
    hours = sorted({floor_hour(row[3]) + extra for row in rows for extra in (datetime.timedelta(0), HOUR)})
    # transaction(), not atomic(): inside the event ingest's transaction no savepoint is needed
    # (an error rolls the whole event back), and on its own it is one transaction. Both inserts
    # go in one round trip on PostgreSQL (models.execute_together).
    with db.transaction():
        execute_together(
            (_insert_sql(_SAMPLE_INSERT, len(rows)), [value for row in rows for value in row]),
            (
                _insert_sql(_PENDING_INSERT, len(hours)),
                [value for hour in hours for value in (device_id, hour)],
            ),
        )
    return changes


# Written out (models.raw_sql): these run for every stored event. A repeat is stored once.
_SAMPLE_INSERT = (
    "INSERT INTO valuesample (device_id, owner_id, name, at, value, text) VALUES ",
    "(?, ?, ?, ?, ?, ?)",
)
_PENDING_INSERT = ("INSERT INTO rolluppending (device_id, hour) VALUES ", "(?, ?)")


def _insert_sql(statement, count):
    head, row = statement
    return raw_sql(head + ", ".join([row] * count) + " ON CONFLICT DO NOTHING")


# --- rolling up and purging ------------------------------------------------------------------------


def hourly(points, carry, end):
    """{hour: (min, max, mean, last)} of a step function: `carry` (value before the first
    point, or None) and `points` [(time, value), ...] sorted by time, up to `end`. Only hours
    that contain a point get a row; the mean is weighted by how long each value held."""
    result = {}
    by_hour = {}
    for moment, value in points:
        by_hour.setdefault(floor_hour(moment), []).append((moment, value))
    current = carry
    for hour in sorted(by_hour):
        hour_end = min(hour + HOUR, end)
        carried = current is not None and by_hour[hour][0][0] > hour
        steps = ([(hour, current)] if carried else []) + by_hour[hour]
        weighted = 0.0
        seconds = 0.0
        for index, (moment, value) in enumerate(steps):
            until = steps[index + 1][0] if index + 1 < len(steps) else hour_end
            duration = max(0.0, (until - moment).total_seconds())
            weighted += value * duration
            seconds += duration
        values = [value for _, value in steps]
        last = steps[-1][1]
        mean = weighted / seconds if seconds > 0 else last
        result[hour] = (min(values), max(values), mean, last)
        current = last
    return result


def _roll_up_hour(device_id, hour):
    end = hour + HOUR
    samples = list(
        ValueSample.select()
        .where(
            (ValueSample.device_id == device_id)
            & (ValueSample.at >= hour)
            & (ValueSample.at < end)
            & ValueSample.value.is_null(False)
        )
        .order_by(ValueSample.at)
    )
    ValueRollup.delete().where((ValueRollup.device_id == device_id) & (ValueRollup.hour == hour)).execute()
    groups = {}
    for sample in samples:
        groups.setdefault((sample.owner_id, sample.name), []).append((sample.at, sample.value))
    rows = []
    for (owner_id, name), points in groups.items():
        carry = _carry_in(device_id, owner_id, name, hour)
        for row_hour, (low, high, mean, last) in hourly(points, carry, end).items():
            rows.append(
                {
                    "device_id": device_id,
                    "owner": owner_id,
                    "name": name,
                    "hour": row_hour,
                    "minimum": low,
                    "maximum": high,
                    "mean": mean,
                    "last": last,
                }
            )
    if rows:
        ValueRollup.insert_many(rows).on_conflict_ignore().execute()
    return len(rows)


def _carry_in(device_id, owner_id, name, hour):
    """The value `name` held when `hour` began, in the same ownership period."""
    sample = (
        ValueSample.select(ValueSample.value)
        .where(
            (ValueSample.device_id == device_id)
            & (ValueSample.owner == owner_id)
            & (ValueSample.name == name)
            & (ValueSample.at < hour)
            & ValueSample.value.is_null(False)
        )
        .order_by(ValueSample.at.desc())
        .first()
    )
    if sample is not None:
        return sample.value
    # Raw values past retention: the last rollup's last value.
    rollup = (
        ValueRollup.select(ValueRollup.last)
        .where(
            (ValueRollup.device_id == device_id)
            & (ValueRollup.owner == owner_id)
            & (ValueRollup.name == name)
            & (ValueRollup.hour < hour)
        )
        .order_by(ValueRollup.hour.desc())
        .first()
    )
    return rollup.last if rollup is not None else None


def roll_up(now=None, limit=1000):
    """Compute rollups of pending hours that are over; returns how many hours were done."""
    now = now or utcnow()
    pending = list(
        RollupPending.select()
        .where(RollupPending.hour < floor_hour(now))
        .order_by(RollupPending.hour)
        .limit(limit)
    )
    for mark in pending:
        with db.atomic():
            # The mark goes first: a value arriving for this hour meanwhile marks it again.
            RollupPending.delete().where(
                (RollupPending.device_id == mark.device_id) & (RollupPending.hour == mark.hour)
            ).execute()
            _roll_up_hour(mark.device_id, mark.hour)
    return len(pending)


def purge(now=None):
    """Delete raw values and rollups past retention; returns (raw rows, rollup rows) deleted."""
    now = now or utcnow()
    raw_days = float(_setting("HISTORY_RAW_DAYS", 7))
    rollup_days = float(_setting("HISTORY_ROLLUP_DAYS", 396))
    raw = ValueSample.delete().where(ValueSample.at < now - datetime.timedelta(days=raw_days)).execute()
    rolled = (
        ValueRollup.delete().where(ValueRollup.hour < now - datetime.timedelta(days=rollup_days)).execute()
    )
    return raw, rolled


def maintain(now=None):
    """The background job: roll up finished hours, then purge; one process at a time."""
    if not leases.take(MAINTAIN_LEASE, 600):
        return "busy"
    try:
        hours = 0
        while True:
            done = roll_up(now)
            hours += done
            if done < 1000:
                break
        raw = rolled = 0
        global _last_purge
        moment = now or utcnow()
        if _last_purge is None or not _last_purge <= moment < _last_purge + PURGE_EVERY:
            raw, rolled = purge(now)
            _last_purge = moment
        return {"hours": hours, "raw_purged": raw, "rollups_purged": rolled}
    finally:
        leases.release(MAINTAIN_LEASE)


# --- reading ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Series:
    """One value over a window, ready to draw: `segments` are runs of (time, value) with the
    value holding until the next point (offline time and unknown time are the gaps between
    runs); `rows` the table alternative (period start, min, max, mean, last, or None when the
    device was offline or nothing was known)."""

    name: str
    label: str
    unit: str
    decimals: int
    segments: list
    rows: list
    row_label: str  # "Hour" | "Day"

    @property
    def empty(self):
        return not any(len(segment) for segment in self.segments)

    @property
    def hourly(self):
        return self.row_label == "Hour"

    def fmt(self, value):
        """The value in the reader's locale ("1.5" / "1,5"), with the series' decimals."""
        return "" if value is None else i18n.number(value, self.decimals)


@dataclasses.dataclass
class Chart:
    window: str
    start: datetime.datetime
    end: datetime.datetime
    series: list
    queries: int = 0


def chart_names(device):
    model = device_models.get(device.model)
    return list(model.charts) if model else []


def chart(device, window, now=None):
    """The chart data of the device's main values over `window` (a key of WINDOWS), for its
    current owner's ownership period only."""
    length, source = WINDOWS[window]
    now = now or utcnow()
    names = chart_names(device)
    start = now - length
    period_start = device.claimed_at or now
    if device.owner_id is None:
        return Chart(window, start, now, [])
    if source == "raw":
        timelines, queries = _raw_timelines(device, names, max(start, period_start), now)
    else:
        timelines, queries = _hourly_timelines(device, names, max(start, period_start), now)
    model = device_models.get(device.model)
    series = []
    for name in names:
        variable = model.variable(name)
        segments, rows = timelines[name]
        series.append(
            Series(
                name,
                variable.label,
                variable.unit,
                variable.decimals,
                segments,
                rows,
                "Hour" if window == "24h" else "Day",
            )
        )
    return Chart(window, start, now, series, queries)


def _period(device):
    return (ValueSample.device_id == device.device_id) & (ValueSample.owner == device.owner_id)


def _raw_timelines(device, names, start, end):
    """{name: (segments, hourly rows)} from raw changes between start and end (2 queries)."""
    wanted = names + [ONLINE]
    samples = list(
        ValueSample.select()
        .where(
            _period(device)
            & ValueSample.name.in_(wanted)
            & (ValueSample.at >= start)
            & (ValueSample.at <= end)
        )
        .order_by(ValueSample.at)
    )
    carry = _carry_before(device, wanted, start, device.claimed_at or start)
    points = {name: [] for name in wanted}
    for sample in samples:
        if sample.value is not None:
            points[sample.name].append((sample.at, sample.value))
    online_points = points[ONLINE]
    result = {}
    for name in names:
        segments = _segments(points[name], carry.get(name), online_points, carry.get(ONLINE), start, end)
        hours = _hour_rows(points[name], carry.get(name), online_points, carry.get(ONLINE), start, end)
        result[name] = (segments, hours)
    return result, 2


def _carry_before(device, names, start, period_start):
    """{name: value} each name held at `start` (latest sample before it in the period)."""
    newest = (
        ValueSample.select(ValueSample.name, peewee.fn.MAX(ValueSample.at).alias("newest"))
        .where(
            _period(device)
            & ValueSample.name.in_(names)
            & (ValueSample.at < start)
            & (ValueSample.at >= period_start)
            & ValueSample.value.is_null(False)
        )
        .group_by(ValueSample.name)
        .alias("newest")
    )
    rows = (
        ValueSample.select(ValueSample.name, ValueSample.value)
        .join(newest, on=((ValueSample.name == newest.c.name) & (ValueSample.at == newest.c.newest)))
        .where(_period(device))
    )
    return {row.name: row.value for row in rows}


def _segments(points, carry, online_points, online_carry, start, end):
    """Runs of a step line: breaks where the device went offline, resumes when it is back."""
    events = [(moment, 0, value) for moment, value in online_points] + [
        (moment, 1, value) for moment, value in points
    ]
    events.sort(key=lambda event: (event[0], event[1]))
    value = carry
    online = online_carry != 0.0  # unknown counts as online while values arrive
    segments = []
    run = [(start, value)] if value is not None and online else None
    for moment, kind, new in events:
        if kind == 0:  # online state
            if new == 0.0 and online:
                if run:
                    run.append((moment, value))
                    segments.append(run)
                run = None
                online = False
            elif new != 0.0 and not online:
                online = True
                run = [(moment, value)] if value is not None else None
            continue
        value = new
        if online:
            if run and run[-1][0] == moment:
                run[-1] = (moment, value)  # back online with a new value at the same moment
            elif run is None:
                run = [(moment, value)]
            else:
                run.append((moment, value))
    if run:
        run.append((end, value))
        segments.append(run)
    return segments


def _hour_rows(points, carry, online_points, online_carry, start, end):
    """The table of a raw window: one row per hour (min, max, mean, last), None when offline."""
    values = hourly(points, carry, end)
    online = hourly(online_points, online_carry, end)
    rows = []
    hour = floor_hour(start)
    value = carry
    state = online_carry
    while hour <= end:
        if hour in online:
            state = online[hour][3]
            fraction = online[hour][2]
        else:
            fraction = state
        if hour in values:
            row = values[hour]
            value = row[3]
        else:
            row = (value, value, value, value) if value is not None else None
        if fraction == 0.0:
            row = None
        rows.append((hour, row))
        hour += HOUR
    return rows


def _hourly_timelines(device, names, start, end):
    """{name: (segments, daily rows)} from hourly rollups, plus raw values of the hours not
    rolled up yet (3 queries)."""
    wanted = names + [ONLINE]
    first_hour = floor_hour(start)
    period = (ValueRollup.device_id == device.device_id) & (ValueRollup.owner == device.owner_id)
    rollups = list(
        ValueRollup.select(
            ValueRollup.name,
            ValueRollup.hour,
            ValueRollup.minimum,
            ValueRollup.maximum,
            ValueRollup.mean,
            ValueRollup.last,
        )
        .where(period & ValueRollup.name.in_(wanted) & (ValueRollup.hour >= first_hour))
        .order_by(ValueRollup.hour)
        .tuples()
    )
    # Hours not rolled up yet: the current one, and any the job hasn't reached.
    newest_rolled = max((row[1] for row in rollups), default=None)
    raw_from = floor_hour(end)
    if newest_rolled is None or newest_rolled + HOUR < raw_from:
        raw_from = max(first_hour, (newest_rolled + HOUR) if newest_rolled else first_hour)
    raw = list(
        ValueSample.select(ValueSample.name, ValueSample.at, ValueSample.value)
        .where(
            _period(device)
            & ValueSample.name.in_(wanted)
            & (ValueSample.at >= raw_from)
            & ValueSample.value.is_null(False)
        )
        .order_by(ValueSample.at)
        .tuples()
    )
    # What each value held when the window began: the newest rollup before it.
    carry_rows = (
        ValueRollup.select(ValueRollup.name, peewee.fn.MAX(ValueRollup.hour).alias("newest"))
        .where(period & ValueRollup.name.in_(wanted) & (ValueRollup.hour < first_hour))
        .group_by(ValueRollup.name)
        .alias("newest")
    )
    carry = {
        name: last
        for name, last in ValueRollup.select(ValueRollup.name, ValueRollup.last)
        .join(
            carry_rows,
            on=((ValueRollup.name == carry_rows.c.name) & (ValueRollup.hour == carry_rows.c.newest)),
        )
        .where(period)
        .tuples()
    }
    per_name = {name: {} for name in wanted}
    for name, hour, low, high, mean, last in rollups:
        if hour < raw_from:
            per_name[name][hour] = (low, high, mean, last)
    raw_points = {name: [] for name in wanted}
    for name, moment, value in raw:
        raw_points[name].append((moment, value))
    for name in wanted:
        before = [row for hour, row in sorted(per_name[name].items())]
        held = before[-1][3] if before else carry.get(name)
        per_name[name].update(hourly(raw_points[name], held, end))
    result = {}
    for name in names:
        result[name] = _hourly_series(
            per_name[name], carry.get(name), per_name[ONLINE], carry.get(ONLINE), start, end
        )
    return result, 3


def _hourly_series(values, carry, online, online_carry, start, end):
    """Hourly points (the mean at each hour's middle), gaps for hours fully offline or with
    nothing known; and daily table rows."""
    segments = []
    run = None
    days = {}
    value = carry
    state = online_carry
    hour = floor_hour(start)
    while hour <= end:
        if hour in online:
            state = online[hour][3]
            fraction = online[hour][2]
        else:
            fraction = state
        if hour in values:
            row = values[hour]
            value = row[3]
        else:
            row = (value, value, value, value) if value is not None else None
        if row is None or fraction == 0.0:
            if run:
                segments.append(run)
            run = None
        else:
            point = (min(hour + HOUR / 2, end), row[2])
            run = (run or []) + [point]
            days.setdefault(hour.replace(hour=0), []).append(row)
        hour += HOUR
    if run:
        segments.append(run)
    rows = []
    day = floor_hour(start).replace(hour=0)
    while day <= end:
        hours = days.get(day)
        if hours:
            rows.append(
                (
                    day,
                    (
                        min(row[0] for row in hours),
                        max(row[1] for row in hours),
                        sum(row[2] for row in hours) / len(hours),
                        hours[-1][3],
                    ),
                )
            )
        else:
            rows.append((day, None))
        day += datetime.timedelta(days=1)
    return segments, rows


def csv_text(device, window, now=None):
    """The window's data as CSV: every change for 24 h, hourly rollups for longer windows."""
    length, source = WINDOWS[window]
    now = now or utcnow()
    start = max(now - length, device.claimed_at or now)
    names = chart_names(device) + [ONLINE]
    out = io.StringIO()
    writer = csv.writer(out)
    if device.owner_id is None:
        return out.getvalue()
    if source == "raw":
        writer.writerow(["time_utc", "name", "value"])
        for sample in (
            ValueSample.select()
            .where(
                _period(device)
                & ValueSample.name.in_(names)
                & (ValueSample.at >= start)
                & (ValueSample.at <= now)
            )
            .order_by(ValueSample.at, ValueSample.name)
        ):
            writer.writerow([_iso(sample.at), sample.name, _number(sample.value)])
        return out.getvalue()
    writer.writerow(["hour_utc", "name", "min", "max", "mean", "last"])
    for row in (
        ValueRollup.select()
        .where(
            (ValueRollup.device_id == device.device_id)
            & (ValueRollup.owner == device.owner_id)
            & ValueRollup.name.in_(names)
            & (ValueRollup.hour >= floor_hour(start))
        )
        .order_by(ValueRollup.hour, ValueRollup.name)
    ):
        writer.writerow(
            [
                _iso(row.hour),
                row.name,
                _number(row.minimum),
                _number(row.maximum),
                _number(row.mean),
                _number(row.last),
            ]
        )
    return out.getvalue()


def _iso(moment):
    return moment.replace(microsecond=0).isoformat() + "Z"


def _number(value):
    return "" if value is None else f"{value:.6g}"
