"""A homeowner's copy of their data ("download my data"), as JSON or as a zip of CSV files.

What it holds, one section each: the account, the devices they own now and owned before (with
their ownership periods), their transfers, their activity (the audit rows about them), the
access they gave and hold, their organisations, their alert settings and alert log, and the
device history of their own ownership periods (raw changes and hourly rollups).

Nothing of other people leaks: every section says only what the person already saw on the
site. A transfer shows the other party the way its page did (the address they offered a
device to, a requester's masked address, never a seller's); activity rows carry the sentence
their activity page shows (never the raw detail), and an address only for their own actions;
a device they owned before carries the name it had in their time, never its new owner's.

Built for a big account: every section is one query, or one query per batch of BATCH rows
(keyset on the id) for the long ones, never one per device or per row; rows are produced one
at a time, so the response streams (JSON text, or a zip written as it goes) and memory stays
flat however much history there is.
"""

import csv
import dataclasses
import io
import json
import zipfile

from peewee import JOIN

from selfserve import device_models
from selfserve import i18n
from selfserve.models import AlertNotice
from selfserve.models import AlertOptIn
from selfserve.models import AlertSetting
from selfserve.models import AuditEvent
from selfserve.models import Device
from selfserve.models import Grant
from selfserve.models import Membership
from selfserve.models import Organisation
from selfserve.models import Transfer
from selfserve.models import User
from selfserve.models import ValueRollup
from selfserve.models import ValueSample
from selfserve.models import utcnow
from selfserve.services import audit

FORMAT = "selfserve-export-1"
BATCH = 2000

# Audit actions that start and end an ownership period of the account they are recorded on.
PERIOD_STARTS = {
    "device.claimed": "added",
    "device.transferred_in": "transferred to you",
    "device.migrated_in": "moved in by the manufacturer",
}
PERIOD_ENDS = {
    "device.released": "released",
    "device.transferred_out": "transferred to a new owner",
    "support.released_device": "released by support",
}


@dataclasses.dataclass(frozen=True)
class Section:
    """One part of the export: `name` (the JSON key and the CSV file name), its `columns`, and
    `rows(user)` producing dicts with those keys. `single`: one row, a JSON object not a list."""

    name: str
    columns: tuple
    rows: object
    single: bool = False


def _iso(moment):
    return moment.replace(microsecond=0).isoformat() + "Z" if moment else None


def _batched(query, key, size=BATCH, tuples=False):
    """Rows of `query` in batches of `size`, keyset-paged on `key` (ascending): one query per
    batch, none held open between batches. `tuples`, for the long history sections: plain
    tuples (no model objects, a third of the time per row), the key first."""
    last = None
    while True:
        page = (query if last is None else query.where(key > last)).order_by(key).limit(size)
        rows = list(page.tuples() if tuples else page)
        yield from rows
        if len(rows) < size:
            return
        last = rows[-1][0] if tuples else getattr(rows[-1], key.name)


def _device_text(device):
    """The device's label as plain text for the file, or None for one we no longer know."""
    return str(device_models.device_label(device)) if device and device.serial_number else None


# --- the sections ---------------------------------------------------------------------------------


def _account(user):
    yield {
        "id": user.id,
        "email": user.email,
        "email_pending_confirmation": user.pending_email,
        "created_at": _iso(user.created_at),
        "email_verified_at": _iso(user.email_verified_at),
        "password_changed_at": _iso(user.password_changed_at),
        "device_cloud_customer_id": user.particle_customer_id,
        "language": user.locale,
        "time_zone": user.time_zone,
    }


def _periods(user):
    """The ownership periods of `user`, from their own audit trail (one query):
    {device_id: [[start, how, end, how_ended, name then], ...]} in time order."""
    periods = {}
    query = AuditEvent.select(
        AuditEvent.id, AuditEvent.at, AuditEvent.action, AuditEvent.device_id, AuditEvent.detail
    ).where(
        (AuditEvent.user == user.id)
        & AuditEvent.device_id.is_null(False)
        & AuditEvent.action.in_(list(PERIOD_STARTS) + list(PERIOD_ENDS))
    )
    for event in _batched(query, AuditEvent.id):
        spans = periods.setdefault(event.device_id, [])
        name = (event.detail or {}).get("name")
        if event.action in PERIOD_STARTS:
            spans.append([event.at, PERIOD_STARTS[event.action], None, None, name])
        elif spans and spans[-1][2] is None:
            spans[-1][2], spans[-1][3] = event.at, PERIOD_ENDS[event.action]
            spans[-1][4] = name or spans[-1][4]
        else:  # an end without a recorded start (older rows): a period of unknown start
            spans.append([None, None, event.at, PERIOD_ENDS[event.action], name])
    return periods


def _devices(user):
    periods = _periods(user)
    owned = {device.device_id: device for device in Device.select().where(Device.owner == user.id)}
    ids = sorted(set(periods) | set(owned))
    known = (
        {
            row.device_id: row
            for row in Device.select(Device.device_id, Device.serial_number, Device.model).where(
                Device.device_id.in_(ids)
            )
        }
        if ids
        else {}
    )
    for device_id in ids:
        device = owned.get(device_id)
        row = known.get(device_id)
        spans = list(periods.get(device_id, []))
        if device is not None and not (spans and spans[-1][2] is None):
            spans.append([device.claimed_at, None, None, None, None])  # no recorded start
        for start, how, end, how_ended, name_then in spans:
            current = device is not None and end is None
            yield {
                "device_id": device_id,
                "serial_number": row.serial_number if row else None,
                "model": row.model if row else None,
                # Their own name for it now; for a device they had before, the name it had then.
                "name": (device.name or _device_text(device)) if current else name_then,
                "owned_from": _iso(start),
                "how_it_came": how,
                "owned_until": _iso(end),
                "how_it_left": how_ended,
                "owned_now": current,
            }


def _transfers(user):
    devices = {}
    query = Transfer.select().where(
        (Transfer.seller == user.id)
        | (Transfer.buyer == user.id)
        | ((Transfer.kind == "offer") & (Transfer.buyer_email == user.email))
    )
    rows = list(_batched(query, Transfer.id))
    ids = {row.device_id for row in rows}
    if ids:
        devices = {
            d.device_id: d
            for d in Device.select(Device.device_id, Device.serial_number, Device.model).where(
                Device.device_id.in_(list(ids))
            )
        }
    from selfserve.services.transfers import STATE_LABELS
    from selfserve.services.transfers import mask_email

    for transfer in rows:
        device = devices.get(transfer.device_id)
        you_are = "seller" if transfer.seller_id == user.id else "buyer"
        if you_are == "seller" and transfer.kind == "offer":
            other = transfer.buyer_email  # the address they typed themselves
        elif you_are == "seller":
            other = mask_email(transfer.buyer_email)  # a requester, shown masked on their page
        else:
            other = None  # the seller's address was never shown to the buyer
        yield {
            "id": transfer.id,
            "kind": transfer.kind,
            "you_were": you_are,
            "device_id": transfer.device_id,
            "device": _device_text(device),
            "other_party": other,
            "state": STATE_LABELS.get(transfer.state, transfer.state),
            "created_at": _iso(transfer.created_at),
            "expires_at": _iso(transfer.expires_at),
            "decided_at": _iso(transfer.decided_at),
            "finished_at": _iso(transfer.finished_at),
        }


def _activity(user):
    actor = User.alias()
    query = (
        AuditEvent.select(AuditEvent, actor.id, actor.role)
        .join(actor, on=(AuditEvent.actor == actor.id), join_type=JOIN.LEFT_OUTER)
        .switch(AuditEvent)
        .where(AuditEvent.user == user.id)
    )
    for event in _batched(query, AuditEvent.id):
        yours = event.actor_id == event.user_id
        by_support = not yours and event.actor_id is not None and event.actor.role in ("staff", "admin")
        yield {
            "at": _iso(event.at),
            "what": audit.describe(event),
            "action": event.action,
            "device_id": event.device_id,
            "by": "you"
            if yours
            else ("support" if by_support else ("someone else" if event.actor_id else None)),
            # As on the activity page: an address only for the person's own actions.
            "from_address": event.ip if yours else None,
        }


def _grant_row(grant, direction, devices):
    device = devices.get(grant.device_id)
    return {
        "direction": direction,
        "device_id": grant.device_id,
        "device": _device_text(device),
        "group_id": grant.group_id,
        "to": (grant.grantee.email if grant.grantee_id else None) if direction == "given" else "you",
        "to_organisation": grant.grantee_org.name if direction == "given" and grant.grantee_org_id else None,
        "role": grant.role,
        "created_at": _iso(grant.created_at),
        "expires_at": _iso(grant.expires_at),
        "ended_at": _iso(grant.ended_at),
        "end_cause": grant.end_cause,
    }


def _grants(user):
    grantee = User.alias()
    holder = Organisation.alias()
    given = list(
        _batched(
            Grant.select(Grant, grantee.id, grantee.email, holder.id, holder.name)
            .join(grantee, join_type=JOIN.LEFT_OUTER, on=(Grant.grantee == grantee.id))
            .switch(Grant)
            .join(holder, join_type=JOIN.LEFT_OUTER, on=(Grant.grantee_org == holder.id))
            .switch(Grant)
            .where(Grant.granted_by == user.id),
            Grant.id,
        )
    )
    held = list(_batched(Grant.select().where(Grant.grantee == user.id), Grant.id))
    ids = {g.device_id for g in given + held if g.device_id}
    devices = (
        {
            d.device_id: d
            for d in Device.select(Device.device_id, Device.serial_number, Device.model).where(
                Device.device_id.in_(list(ids))
            )
        }
        if ids
        else {}
    )
    for grant in given:
        yield _grant_row(grant, "given", devices)
    for grant in held:
        yield _grant_row(grant, "held", devices)


def _organisations(user):
    rows = (
        Membership.select(Membership, Organisation.id, Organisation.name, Organisation.kind)
        .join(Organisation)
        .where(Membership.user == user.id)
        .order_by(Membership.id)
    )
    for row in rows:
        yield {
            "organisation": row.organisation.name,
            "kind": row.organisation.kind,
            "role": row.role,
            "member_since": _iso(row.created_at),
        }


def _alert_settings(user):
    setting = AlertSetting.get_or_none(AlertSetting.user == user.id)
    if setting is None:
        return
    yield {
        "modes": json.dumps(setting.modes or {}, sort_keys=True),
        "quiet_from": setting.quiet_from,
        "quiet_until": setting.quiet_until,
        "faults_in_quiet": setting.faults_in_quiet,
        "digest_hour": setting.digest_hour,
    }


def _alert_opt_ins(user):
    rows = (
        AlertOptIn.select(AlertOptIn, Device.device_id, Device.serial_number, Device.model)
        .join(Device, JOIN.LEFT_OUTER)
        .where(AlertOptIn.user == user.id)
        .order_by(AlertOptIn.id)
    )
    for row in rows:
        yield {"device_id": row.device_id, "device": _device_text(row.device)}


def _alert_log(user):
    for notice in _batched(AlertNotice.select().where(AlertNotice.user == user.id), AlertNotice.id):
        yield {
            "created_at": _iso(notice.created_at),
            "device_id": notice.device_id,
            "kind": notice.kind,
            "event": notice.event,
            "delivery": notice.delivery,
            "sent_at": _iso(notice.sent_at),
            "withdrawn_at": _iso(notice.cancelled_at),
        }


def _samples(user):
    query = ValueSample.select(
        ValueSample.id,
        ValueSample.device_id,
        ValueSample.name,
        ValueSample.at,
        ValueSample.value,
        ValueSample.text,
    ).where(ValueSample.owner == user.id)
    for _id, device_id, name, at, value, text in _batched(query, ValueSample.id, tuples=True):
        yield {"device_id": device_id, "name": name, "at": _iso(at), "value": value, "text": text}


def _rollups(user):
    query = ValueRollup.select(
        ValueRollup.id,
        ValueRollup.device_id,
        ValueRollup.name,
        ValueRollup.hour,
        ValueRollup.minimum,
        ValueRollup.maximum,
        ValueRollup.mean,
        ValueRollup.last,
    ).where(ValueRollup.owner == user.id)
    for _id, device_id, name, hour, minimum, maximum, mean, last in _batched(
        query, ValueRollup.id, tuples=True
    ):
        yield {
            "device_id": device_id,
            "name": name,
            "hour": _iso(hour),
            "minimum": minimum,
            "maximum": maximum,
            "mean": mean,
            "last": last,
        }


SECTIONS = (
    Section(
        "account",
        (
            "id",
            "email",
            "email_pending_confirmation",
            "created_at",
            "email_verified_at",
            "password_changed_at",
            "device_cloud_customer_id",
            "language",
            "time_zone",
        ),
        _account,
        single=True,
    ),
    Section(
        "devices",
        (
            "device_id",
            "serial_number",
            "model",
            "name",
            "owned_from",
            "how_it_came",
            "owned_until",
            "how_it_left",
            "owned_now",
        ),
        _devices,
    ),
    Section(
        "transfers",
        (
            "id",
            "kind",
            "you_were",
            "device_id",
            "device",
            "other_party",
            "state",
            "created_at",
            "expires_at",
            "decided_at",
            "finished_at",
        ),
        _transfers,
    ),
    Section("activity", ("at", "what", "action", "device_id", "by", "from_address"), _activity),
    Section(
        "access",
        (
            "direction",
            "device_id",
            "device",
            "group_id",
            "to",
            "to_organisation",
            "role",
            "created_at",
            "expires_at",
            "ended_at",
            "end_cause",
        ),
        _grants,
    ),
    Section("organisations", ("organisation", "kind", "role", "member_since"), _organisations),
    Section(
        "alert_settings",
        ("modes", "quiet_from", "quiet_until", "faults_in_quiet", "digest_hour"),
        _alert_settings,
        single=True,
    ),
    Section("alert_opt_ins", ("device_id", "device"), _alert_opt_ins),
    Section(
        "alert_log",
        ("created_at", "device_id", "kind", "event", "delivery", "sent_at", "withdrawn_at"),
        _alert_log,
    ),
    Section("history_changes", ("device_id", "name", "at", "value", "text"), _samples),
    Section("history_hourly", ("device_id", "name", "hour", "minimum", "maximum", "mean", "last"), _rollups),
)


# --- the two formats --------------------------------------------------------------------------------


def filename(user, extension, now=None):
    return f"selfserve-data-{user.id}-{(now or utcnow()):%Y%m%d}.{extension}"


def json_chunks(user, now=None):
    """The export as JSON text, in pieces (a streamed response body)."""
    now = now or utcnow()
    yield "{" + f'"format": "{FORMAT}", "exported_at": {json.dumps(_iso(now))}'
    for section in SECTIONS:
        yield f", {json.dumps(section.name)}: "
        if section.single:
            row = next(iter(section.rows(user)), None)
            yield json.dumps(row, sort_keys=False, default=i18n.json_text)
            continue
        yield "["
        first = True
        for row in section.rows(user):
            yield ("" if first else ", ") + json.dumps(row, default=i18n.json_text)
            first = False
        yield "]"
    yield "}\n"


class _Pipe:
    """A write-only file for zipfile: collects what is written until the caller takes it. No
    tell() or seek(), so zipfile writes a stream (data descriptors), never going back."""

    def __init__(self):
        self._parts = []

    def write(self, data):
        self._parts.append(bytes(data))
        return len(data)

    def flush(self):
        pass

    def take(self):
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def csv_zip_chunks(user, now=None, flush_every=500):
    """The export as a zip of CSV files, one per section (plus README.txt), in pieces."""
    now = now or utcnow()
    pipe = _Pipe()
    with zipfile.ZipFile(pipe, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(
            "README.txt",
            f"Your Tidewell data, exported {_iso(now)}. Times are UTC.\n"
            "One CSV file per part: " + ", ".join(s.name for s in SECTIONS) + ".\n",
        )
        yield pipe.take()
        for section in SECTIONS:
            with archive.open(f"{section.name}.csv", "w") as member:
                text = io.TextIOWrapper(member, encoding="utf-8", newline="")
                writer = csv.DictWriter(text, fieldnames=section.columns)
                writer.writeheader()
                for count, row in enumerate(section.rows(user), 1):
                    writer.writerow({key: _cell(value) for key, value in row.items()})
                    if count % flush_every == 0:
                        text.flush()
                        yield pipe.take()
                text.flush()
                text.detach()
            yield pipe.take()
    yield pipe.take()


def _cell(value):
    """A CSV cell: booleans as true/false, and text that a spreadsheet would run as a formula
    (=, +, -, @ first) kept as text with a leading apostrophe."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def as_dict(user, now=None):
    """The whole export as one dict (tests, and small accounts)."""
    return json.loads("".join(json_chunks(user, now)))


__all__ = ["SECTIONS", "as_dict", "csv_zip_chunks", "filename", "json_chunks"]
