"""Alerts: a message when it matters, once per episode, to the people who want it.

Deciding. An *episode* (models.AlertEpisode) is one stretch of a condition on one device:
offline longer than the model's grace, a pump fault, a low battery, a stuck transfer or
release. Episodes open and close from values as they arrive (`on_changes`, a listener of
services/history.py, which passes only real changes: a repeated or older event never reaches
us as new) and, for "offline longer than" and the stuck jobs, from `run_timers` (the background
sweep, one process at a time across workers: a database lease; nothing polls Particle). One
open episode per device and kind (a unique `open_key`); an episode that ends and starts again
within ALERT_REOPEN_SECONDS is the same episode (flapping makes no second alert), and its
"resolved" notice waits that long before it may be sent.

Notifying. Opening, reminding (every ALERT_REMINDER_HOURS while it lasts) and closing write
one AlertNotice per recipient in the same transaction, as each person chose per kind: at once,
in the daily digest, or not at all; quiet hours in their time zone move a notice to their end
(faults go through unless the person says otherwise). The owner receives them, and grantees
who opted in; an organisation routes them to a group's people (services/alert_recipients.py).
A notice for a device the person can no longer see is cancelled when it would be sent, so a
transfer, a release or a revoked grant stops that person's alerts at once.

Sending. `send_due` takes every due notice of a person under a lease and queues them as ONE
mail (a person with 500 devices in an outage gets one message, not 500), with a one-click
unsubscribe (signed link, RFC 8058 List-Unsubscribe / List-Unsubscribe-Post headers), in the
outbox (services/outbox.py) in the same transaction that marks them `sent_at`: a worker killed
before the commit leaves the notices to the next run, one killed after it left the mail in the
outbox, which sends it once. A mail server that is down delays the mail (the outbox's backoff)
and it is sent after, in order.
"""

import datetime
import logging
import secrets
import threading
import zoneinfo

import peewee
from flask import current_app
from flask import has_app_context
from flask_babel import gettext as _
from flask_babel import ngettext

from selfserve import background
from selfserve import device_models
from selfserve import i18n
from selfserve import mail
from selfserve import tokens
from selfserve.i18n import lazy_text as _l
from selfserve.models import AlertEpisode
from selfserve.models import AlertNotice
from selfserve.models import AlertSetting
from selfserve.models import Device
from selfserve.models import DeviceSnapshot
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.services import alert_recipients
from selfserve.services import history
from selfserve.services import leases
from selfserve.services import steps

log = logging.getLogger(__name__)

KINDS = device_models.ALERT_KINDS
MODES = {"now": _l("Email at once"), "digest": _l("In the daily digest"), "off": _l("Off")}
TIMER_LEASE = "alerts.timer"
BATTERY_HYSTERESIS_V = 0.1  # "battery low" ends only this far above the threshold
BATCH_USERS = 50
EVENT_TEXT = {
    "started": _l("started"),
    "reminder": _l("still going on"),
    "resolved": _l("resolved"),
    "test": _l("test"),
}


class AlertError(Exception):
    """A setting the person should correct; `message` is safe to show."""

    def __init__(self, message, field=None):
        super().__init__(message)
        self.message = message
        self.field = field


def _setting(key, default):
    if has_app_context():
        return current_app.config.get(key, default)
    return default


# --- a person's choices ------------------------------------------------------------------------


def settings_of(user_id):
    """The person's AlertSetting (an unsaved default when they never chose anything), with
    `time_zone`: the account's zone (User.time_zone, one for the whole site; UTC when unknown)."""
    user_id = getattr(user_id, "id", user_id)
    row = AlertSetting.get_or_none(AlertSetting.user == user_id)
    row = row or AlertSetting(user=user_id, modes={})
    zone = User.select(User.time_zone).where(User.id == user_id).scalar()
    row.time_zone = zone if i18n.valid_time_zone(zone) else "UTC"
    return row


def mode_of(setting, kind):
    mode = (setting.modes or {}).get(kind)
    return mode if mode in MODES else KINDS[kind].default


def save_settings(
    user, modes, time_zone=None, quiet_from=None, quiet_until=None, faults_in_quiet=True, digest_hour=8
):
    """Store the person's choices; raises AlertError naming a bad field (nothing is saved).
    `time_zone` (None: unchanged) is the account's zone, which the account settings page also
    changes."""
    clean = {}
    for kind in KINDS:
        mode = (modes or {}).get(kind, KINDS[kind].default)
        if mode not in MODES:
            raise AlertError(
                _l("Choose how to get “%(kind)s” alerts.", kind=KINDS[kind].label), field=f"mode_{kind}"
            )
        clean[kind] = mode
    time_zone = time_zone.strip() if time_zone is not None else None
    if time_zone is not None and not i18n.valid_time_zone(time_zone):
        raise AlertError(
            _l("Enter a time zone such as Europe/London or America/New_York."), field="time_zone"
        )
    hours = {}
    for field, value in (
        ("quiet_from", quiet_from),
        ("quiet_until", quiet_until),
        ("digest_hour", digest_hour),
    ):
        if value in (None, ""):
            hours[field] = None
            continue
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = -1
        if not 0 <= number <= 23:
            raise AlertError(_l("Choose an hour from 0 to 23."), field=field)
        hours[field] = number
    if (hours["quiet_from"] is None) != (hours["quiet_until"] is None) or (
        hours["quiet_from"] is not None and hours["quiet_from"] == hours["quiet_until"]
    ):
        raise AlertError(_l("Quiet hours need a different start and end (or neither)."), field="quiet_from")
    values = {
        "modes": clean,
        "quiet_from": hours["quiet_from"],
        "quiet_until": hours["quiet_until"],
        "faults_in_quiet": bool(faults_in_quiet),
        "digest_hour": 8 if hours["digest_hour"] is None else hours["digest_hour"],
    }
    user_id = getattr(user, "id", user)
    if time_zone is not None:
        User.update(time_zone=time_zone).where(User.id == user_id).execute()
    AlertSetting.insert(user=user_id, **values).on_conflict(
        conflict_target=[AlertSetting.user], update=values
    ).execute()
    return settings_of(user_id)


def turn_off(user_id, kinds):
    """Unsubscribe: the given kinds become "off" (other choices are kept)."""
    setting = settings_of(user_id)
    modes = {kind: mode_of(setting, kind) for kind in KINDS}
    for kind in kinds:
        if kind in KINDS:
            modes[kind] = "off"
    save_settings(
        user_id,
        modes,
        None,
        setting.quiet_from,
        setting.quiet_until,
        setting.faults_in_quiet,
        setting.digest_hour,
    )


def _zone(setting):
    try:
        return zoneinfo.ZoneInfo(setting.time_zone or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return zoneinfo.ZoneInfo("UTC")


def _local(setting, moment):
    return moment.replace(tzinfo=datetime.UTC).astimezone(_zone(setting))


def _utc(local):
    return local.astimezone(datetime.UTC).replace(tzinfo=None)


def _next_local_hour(setting, moment, hour):
    """The next time after `moment` (naive UTC) when the person's clock shows hour:00."""
    local = _local(setting, moment)
    candidate = local.replace(hour=hour, minute=0, second=0, microsecond=0)
    if candidate <= local:
        candidate = (candidate + datetime.timedelta(days=1)).replace(hour=hour)
    return _utc(candidate.replace(tzinfo=_zone(setting)))


def in_quiet_hours(setting, moment):
    if setting.quiet_from is None or setting.quiet_until is None:
        return False
    hour = _local(setting, moment).hour
    if setting.quiet_from < setting.quiet_until:
        return setting.quiet_from <= hour < setting.quiet_until
    return hour >= setting.quiet_from or hour < setting.quiet_until


def due_time(setting, kind, mode, moment):
    """When a notice decided at `moment` may be sent, for this person and kind."""
    if mode == "digest":
        return _next_local_hour(setting, moment, setting.digest_hour)
    if in_quiet_hours(setting, moment) and not (KINDS[kind].fault and setting.faults_in_quiet):
        return _next_local_hour(setting, moment, setting.quiet_until)
    return moment


# --- who receives them --------------------------------------------------------------------------


def recipients(device_id, owner_id):
    """The people told about a device's episodes: its owner (an organisation's chosen group,
    or admins) and the grantees who opted in (services/alert_recipients.py)."""
    return alert_recipients.of_device(device_id, owner_id)


def _still_theirs(user_id, device_id):
    """Whether `user_id` may still be told about `device_id` (ownership or access may have
    changed: a transfer, a release, a revoked grant)."""
    return alert_recipients.may_still_hear(user_id, device_id)


# --- episodes ---------------------------------------------------------------------------------


def _notify(episode, event, at, kind=None, due=None):
    """One notice per recipient who wants this kind; returns how many were written."""
    kind = kind or episode.kind
    written = 0
    for user_id in recipients(episode.device_id, episode.owner_id):
        setting = settings_of(user_id)
        mode = mode_of(setting, kind)
        if mode == "off":
            continue
        AlertNotice.create(
            user=user_id,
            episode=episode.id,
            kind=kind,
            event=event,
            delivery=mode,
            device_id=episode.device_id,
            created_at=at,
            due_at=due_time(setting, kind, mode, due or at),
        )
        written += 1
    return written


def _deciding():
    """The transaction of a decision: it reads the open episode, then writes. On SQLite it
    takes the write lock at BEGIN (IMMEDIATE): a deferred one that read first would fail at
    once with "database is locked" if another thread (the sender) wrote meanwhile, and the
    alert would be lost; waiting for the lock is what we want."""
    if isinstance(db.obj, peewee.SqliteDatabase) and db.transaction_depth() == 0:
        return db.atomic("IMMEDIATE")
    return db.atomic()


def _reopen_seconds():
    return float(_setting("ALERT_REOPEN_SECONDS", 600))


def open_episode(device_id, owner_id, kind, at, detail=None):
    """Start an episode of `kind` on the device (the owner's period) at `at`; returns it, or
    None when one is already open or one that just ended is taken up again (no new alert)."""
    key = f"{device_id}:{kind}"
    with _deciding():
        current = AlertEpisode.get_or_none(AlertEpisode.open_key == key)
        if current is not None:
            if current.owner_id == owner_id:
                return None
            _close_silently(current, at)  # an old owner's episode: theirs ends without a word
        recent = (
            AlertEpisode.select()
            .where(
                (AlertEpisode.device_id == device_id)
                & (AlertEpisode.kind == kind)
                & (AlertEpisode.owner == owner_id)
                & (AlertEpisode.ended_at >= at - datetime.timedelta(seconds=_reopen_seconds()))
            )
            .order_by(AlertEpisode.ended_at.desc())
            .first()
        )
        if recent is not None:
            # Flapping: the episode goes on; its "resolved" notice (not sent yet) is withdrawn.
            reopened = (
                AlertEpisode.update(ended_at=None, open_key=key)
                .where((AlertEpisode.id == recent.id) & AlertEpisode.ended_at.is_null(False))
                .execute()
            )
            if reopened:
                AlertNotice.update(cancelled_at=at).where(
                    (AlertNotice.episode == recent.id)
                    & (AlertNotice.event == "resolved")
                    & AlertNotice.sent_at.is_null()
                    & AlertNotice.cancelled_at.is_null()
                ).execute()
            return None
        try:
            with db.atomic():
                episode = AlertEpisode.create(
                    device_id=device_id, owner=owner_id, kind=kind, open_key=key, detail=detail, started_at=at
                )
        except peewee.IntegrityError:
            return None  # another worker opened it at the same moment
        _notify(episode, "started", at)
    wake()
    return episode


def close_episode(device_id, kind, at):
    """End the open episode of `kind` on the device, if any: a "resolved" notice that waits
    ALERT_REOPEN_SECONDS (withdrawn if the condition comes back meanwhile)."""
    key = f"{device_id}:{kind}"
    with _deciding():
        episode = AlertEpisode.get_or_none(AlertEpisode.open_key == key)
        if episode is None:
            return None
        closed = (
            AlertEpisode.update(ended_at=at, open_key=None)
            .where((AlertEpisode.id == episode.id) & (AlertEpisode.open_key == key))
            .execute()
        )
        if not closed:
            return None
        resolved_kind = "back_online" if kind == "offline" else kind
        _notify(
            episode,
            "resolved",
            at,
            kind=resolved_kind,
            due=at + datetime.timedelta(seconds=_reopen_seconds()),
        )
    return episode


def _close_silently(episode, at):
    AlertEpisode.update(ended_at=at, open_key=None).where(AlertEpisode.id == episode.id).execute()
    AlertNotice.update(cancelled_at=at).where(
        (AlertNotice.episode == episode.id)
        & AlertNotice.sent_at.is_null()
        & AlertNotice.cancelled_at.is_null()
    ).execute()


# --- from values as they arrive -------------------------------------------------------------


def on_changes(device_id, owner_id, model_key, changes):
    """history.LISTENERS: open or close episodes from the newest stored changes."""
    model = device_models.get(model_key)
    if model is None or owner_id is None:
        return
    for change in changes:
        if not change.newest:
            continue  # an older value arriving late says nothing about now
        if change.name == history.ONLINE and change.value == 1.0:
            close_episode(device_id, "offline", change.at)
        elif change.name == "fault" and "fault" in model.alerts:
            if change.text:
                open_episode(device_id, owner_id, "fault", change.at, detail=change.text)
            else:
                close_episode(device_id, "fault", change.at)
        elif change.name == "battery_v" and "battery_low" in model.alerts and model.battery_low_v:
            if change.value < model.battery_low_v:
                open_episode(device_id, owner_id, "battery_low", change.at, detail=f"{change.value:.2f} V")
            elif change.value >= model.battery_low_v + BATTERY_HYSTERESIS_V:
                close_episode(device_id, "battery_low", change.at)


history.LISTENERS.append(on_changes)


# --- timers: offline longer than, stuck jobs, reminders ------------------------------------------


def check_offline(now=None):
    """Open an "offline" episode for each owned device offline longer than its model's grace
    (from the shared cache, which events and reads keep; no Particle call)."""
    now = now or utcnow()
    over_grace = None
    for model in device_models.MODELS.values():
        if "offline" not in model.alerts:
            continue
        condition = (Device.model == model.key) & (
            DeviceSnapshot.offline_since <= now - datetime.timedelta(minutes=model.offline_grace_minutes)
        )
        over_grace = condition if over_grace is None else (over_grace | condition)
    if over_grace is None:
        return 0
    already = AlertEpisode.select(AlertEpisode.device_id).where(
        (AlertEpisode.kind == "offline") & AlertEpisode.open_key.is_null(False)
    )
    rows = (
        DeviceSnapshot.select(DeviceSnapshot.device_id, DeviceSnapshot.offline_since, Device.owner)
        .join(Device, on=(Device.device_id == DeviceSnapshot.device_id))
        .where(
            (DeviceSnapshot.online == False)  # noqa: E712
            & DeviceSnapshot.offline_since.is_null(False)
            & Device.owner.is_null(False)
            & Device.claim_state.is_null()
            & (Device.claimed_at <= DeviceSnapshot.offline_since)
            & over_grace
            & DeviceSnapshot.device_id.not_in(already)
        )
        .tuples()
    )
    opened = 0
    for device_id, offline_since, owner_id in rows:
        if open_episode(device_id, owner_id, "offline", offline_since) is not None:
            opened += 1
    return opened


def check_stuck(now=None):
    """A release (or claim) of one's own that has not finished after ALERT_STUCK_MINUTES: an
    episode for the owner; it resolves when the device's step is done."""
    now = now or utcnow()
    limit = now - datetime.timedelta(minutes=float(_setting("ALERT_STUCK_MINUTES", 60)))
    opened = 0
    stuck = (
        Device.select(Device.device_id, Device.owner, Device.claim_state_at)
        .where(
            Device.claim_state.is_null(False) & Device.owner.is_null(False) & (Device.claim_state_at <= limit)
        )
        .tuples()
    )
    stuck_ids = set()
    for device_id, owner_id, since in stuck:
        stuck_ids.add(device_id)
        if open_episode(device_id, owner_id, "transfer_stuck", since) is not None:
            opened += 1
    for episode in AlertEpisode.select().where(
        (AlertEpisode.kind == "transfer_stuck") & AlertEpisode.open_key.is_null(False)
    ):
        if episode.device_id not in stuck_ids:
            close_episode(episode.device_id, "transfer_stuck", now)
    return opened


def end_foreign_episodes(now=None):
    """Open episodes of people who no longer own the device end without a word."""
    now = now or utcnow()
    foreign = (
        AlertEpisode.select()
        .join(Device, peewee.JOIN.LEFT_OUTER, on=(Device.device_id == AlertEpisode.device_id))
        .where(
            AlertEpisode.open_key.is_null(False)
            & (Device.owner.is_null() | (Device.owner != AlertEpisode.owner))
        )
    )
    count = 0
    for episode in foreign:
        _close_silently(episode, now)
        count += 1
    return count


def remind(now=None):
    """A reminder for each episode still open ALERT_REMINDER_HOURS after it started or was
    last reminded."""
    now = now or utcnow()
    every = datetime.timedelta(hours=float(_setting("ALERT_REMINDER_HOURS", 24)))
    count = 0
    for episode in AlertEpisode.select().where(
        AlertEpisode.open_key.is_null(False)
        & (peewee.fn.COALESCE(AlertEpisode.reminded_at, AlertEpisode.started_at) <= now - every)
    ):
        with db.atomic():
            taken = (
                AlertEpisode.update(reminded_at=now)
                .where(
                    (AlertEpisode.id == episode.id)
                    & (
                        AlertEpisode.reminded_at == episode.reminded_at
                        if episode.reminded_at
                        else AlertEpisode.reminded_at.is_null()
                    )
                )
                .execute()
            )
            if taken:
                count += _notify(episode, "reminder", now)
    return count


def run_timers(now=None):
    """The background timer (the sweep runs it in every worker; one runs it at a time)."""
    if not leases.take(TIMER_LEASE, 120):
        return "busy"
    try:
        result = {
            "foreign": end_foreign_episodes(now),
            "offline": check_offline(now),
            "stuck": check_stuck(now),
            "reminders": remind(now),
        }
    finally:
        leases.release(TIMER_LEASE)
    result["sent"] = send_due(now)
    return result


# --- the test alert ---------------------------------------------------------------------------


def send_test(user):
    """Queue a test alert to the person, at once whatever their choices and quiet hours."""
    now = utcnow()
    notice = AlertNotice.create(
        user=user.id, kind="test", event="test", delivery="now", created_at=now, due_at=now
    )
    wake()
    return notice


# --- sending ----------------------------------------------------------------------------------


def unsubscribe_token(user_id, kinds):
    return tokens.make("alert_unsubscribe", {"u": user_id, "k": sorted(set(kinds))})


def read_unsubscribe(token):
    """(user, kinds) from an unsubscribe link; raises tokens.TokenError."""
    payload = tokens.read("alert_unsubscribe", token)
    user = User.get_or_none(User.id == payload.get("u"))
    kinds = [kind for kind in payload.get("k") or [] if kind in KINDS]
    if user is None or not kinds:
        raise tokens.TokenInvalid()
    return user, kinds


def _due_users(now, limit):
    free = AlertNotice.lease_until.is_null() | (AlertNotice.lease_until < now)
    return [
        user_id
        for (user_id,) in AlertNotice.select(AlertNotice.user)
        .where(
            AlertNotice.sent_at.is_null()
            & AlertNotice.cancelled_at.is_null()
            & (AlertNotice.due_at <= now)
            & free
        )
        .group_by(AlertNotice.user)
        .order_by(peewee.fn.MIN(AlertNotice.due_at))
        .limit(limit)
        .tuples()
    ]


def send_due(now=None):
    """Send every due notice, one mail per person; returns how many mails left."""
    now = now or utcnow()
    sent = 0
    for user_id in _due_users(now, BATCH_USERS):
        if _send_to(user_id, now):
            sent += 1
    return sent


def _send_to(user_id, now):
    with db.atomic():  # deciding what this mail says and queueing it: all or nothing
        return _queue_mail_to(user_id, now)


def _queue_mail_to(user_id, now):
    batch = secrets.token_hex(8)
    lease = steps.lease_until(now)
    free = AlertNotice.lease_until.is_null() | (AlertNotice.lease_until < now)
    taken = (
        AlertNotice.update(lease_until=lease, mail_id=batch)
        .where(
            (AlertNotice.user == user_id)
            & AlertNotice.sent_at.is_null()
            & AlertNotice.cancelled_at.is_null()
            & (AlertNotice.due_at <= now)
            & free
        )
        .execute()
    )
    if not taken:
        return False  # another worker is sending them
    notices = list(
        AlertNotice.select().where(AlertNotice.mail_id == batch).order_by(AlertNotice.due_at, AlertNotice.id)
    )
    # Ownership may have changed since the decision: a device that is no longer theirs says
    # nothing more to them.
    keep = []
    owned = {}
    for notice in notices:
        if notice.device_id not in owned:
            owned[notice.device_id] = _still_theirs(user_id, notice.device_id)
        (keep if owned[notice.device_id] else []).append(notice)
    dropped = [notice.id for notice in notices if notice not in keep]
    if dropped:
        AlertNotice.update(cancelled_at=now, lease_until=None).where(AlertNotice.id.in_(dropped)).execute()
    user = User.get_or_none(User.id == user_id)
    if not keep or user is None:
        return False
    _mail(user, keep, now)  # queued in the outbox (this transaction)
    AlertNotice.update(sent_at=utcnow(), lease_until=None).where(
        (AlertNotice.mail_id == batch) & AlertNotice.cancelled_at.is_null()
    ).execute()
    return True


def _device_names(device_ids):
    from selfserve.services import devices

    rows = Device.select().where(Device.device_id.in_([device_id for device_id in device_ids if device_id]))
    return {row.device_id: devices.display_name(row) for row in rows}


def describe(notice, names, episodes):
    """One line about a notice, as the mail and the alerts log say it."""
    if notice.kind == "test":
        return _l("Test alert: your alerts reach this address.")
    name = names.get(notice.device_id) or _("A device")
    episode = episodes.get(notice.episode_id)
    detail = f" ({episode.detail})" if episode is not None and episode.detail else ""
    since = i18n.local_datetime(episode.started_at if episode is not None else notice.created_at)
    texts = {
        ("offline", "started"): _l("%(name)s has been offline since %(since)s.", name=name, since=since),
        ("offline", "reminder"): _l("%(name)s is still offline (since %(since)s).", name=name, since=since),
        ("back_online", "resolved"): _l("%(name)s is back online.", name=name),
        ("fault", "started"): _l("%(name)s reports a fault%(detail)s.", name=name, detail=detail),
        ("fault", "reminder"): _l("%(name)s still reports a fault%(detail)s.", name=name, detail=detail),
        ("fault", "resolved"): _l("%(name)s no longer reports a fault.", name=name),
        ("battery_low", "started"): _l("%(name)s: battery low%(detail)s.", name=name, detail=detail),
        ("battery_low", "reminder"): _l("%(name)s: battery still low%(detail)s.", name=name, detail=detail),
        ("battery_low", "resolved"): _l("%(name)s: battery fine again.", name=name),
        ("transfer_stuck", "started"): _l(
            "%(name)s: handing it over or releasing it is not finishing.", name=name
        ),
        ("transfer_stuck", "reminder"): _l(
            "%(name)s: handing it over or releasing it is still not finished.", name=name
        ),
        ("transfer_stuck", "resolved"): _l("%(name)s: the handover or release has finished.", name=name),
    }
    text = texts.get((notice.kind, notice.event))
    if text is None:
        text = _l(
            "%(name)s: %(kind)s %(event)s.",
            name=name,
            kind=KINDS[notice.kind].label,
            event=EVENT_TEXT[notice.event],
        )
    return str(text)


def _mail(user, notices, now):
    # The lines and the subject are written in the recipient's language and time zone.
    with i18n.as_recipient(*i18n.recipient_preferences(user.email)):
        _mail_in_their_language(user, notices)


def _mail_in_their_language(user, notices):
    names = _device_names({notice.device_id for notice in notices})
    episode_ids = {notice.episode_id for notice in notices if notice.episode_id}
    episodes = (
        {row.id: row for row in AlertEpisode.select().where(AlertEpisode.id.in_(list(episode_ids)))}
        if episode_ids
        else {}
    )
    lines = [describe(notice, names, episodes) for notice in notices]
    kinds = sorted({notice.kind for notice in notices if notice.kind in KINDS})
    from selfserve.services.accounts import absolute_url

    unsubscribe = None
    headers = {}
    if kinds:
        unsubscribe = absolute_url("alerts.unsubscribe", token=unsubscribe_token(user.id, kinds))
        headers = {
            "List-Unsubscribe": f"<{unsubscribe}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }
    if len(lines) == 1:
        subject = (
            _("Alert: %(line)s", line=lines[0])
            if notices[0].kind != "test"
            else _("Test alert from Tidewell")
        )
    else:
        subject = ngettext(
            "%(num)d alert about your devices", "%(num)d alerts about your devices", len(lines)
        )
    device_links = {device_id: absolute_url("devices.detail", device_id=device_id) for device_id in names}
    mail.send(
        user.email,
        subject[:200],
        "alert",
        headers=headers,
        lines=lines,
        notices=notices,
        device_links=device_links,
        unsubscribe=unsubscribe,
        kind_labels=[str(KINDS[kind].label) for kind in kinds],
        settings_link=absolute_url("alerts.settings"),
    )


def log_of(user, limit=20):
    """The person's recent alerts for the activity page: [(notice, text, state)]."""
    notices = list(
        AlertNotice.select()
        .where(AlertNotice.user == user.id)
        .order_by(AlertNotice.created_at.desc(), AlertNotice.id.desc())
        .limit(limit)
    )
    names = _device_names({notice.device_id for notice in notices})
    episode_ids = [notice.episode_id for notice in notices if notice.episode_id]
    episodes = (
        {row.id: row for row in AlertEpisode.select().where(AlertEpisode.id.in_(episode_ids))}
        if episode_ids
        else {}
    )
    result = []
    for notice in notices:
        if notice.sent_at:
            state = "sent"
        elif notice.cancelled_at:
            state = "withdrawn"
        elif notice.delivery == "digest":
            state = "waiting for the digest"
        else:
            state = "waiting to be sent"
        result.append((notice, describe(notice, names, episodes), state))
    return result


# --- the sender thread ----------------------------------------------------------------------------


def _wakeup(app):
    # One event per app (not per process), as the outbox's: a change made in one app never
    # wakes another app's sender (the tests build many apps in one process).
    return app.extensions.setdefault("alert_wakeup", threading.Event())


def wake():
    """Tell the current app's sender thread that a notice may be due now: once the caller's
    transaction commits (at once outside one). Woken before, the sender would look for the
    notice, not see it yet, and sleep a whole interval."""
    if has_app_context():
        db.after_commit(_wakeup(current_app._get_current_object()).set)


def init_app(app):
    """Start this worker's sender thread at its first request (web workers only, like the
    sweep; never in CLI commands, where `flask sweep` sends through run_timers)."""

    @app.before_request
    def _start_alert_sender():
        if app.extensions.get("alert_sender") is None:
            start_sender(app)


def start_sender(app, interval=None):
    """This worker's sender thread (selfserve/background.py): sends due alerts as soon as
    they are decided (`wake`), and every `interval` (SWEEP_SECONDS) as a fallback; none when
    that is 0 (tests send themselves)."""
    interval = interval if interval is not None else app.config.get("SWEEP_SECONDS")
    return background.start(app, "alert_sender", send_due, interval, wakeup=_wakeup(app))
