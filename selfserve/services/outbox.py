"""The outbox: every email is a row (models.OutboxMail) written in the same transaction as the
change it reports, and sent later by a background sender. A rolled-back change sends nothing;
a committed one is never lost; a mail server that is down or slow delays mail and never fails
or slows a request.

Queueing. `mail.send` renders the message and calls `enqueue` (the caller's transaction).
A "forgot password" request queues `enqueue_reset_request`, the same one row whether or not
the address has an account; the sender decides (finding 6: the request does the same work
for known and unknown addresses).

Sending. `send_due` (a background job in `create_app`'s list, and a sender thread per web
worker woken when a transaction that queued mail commits) takes one due row at a time with an atomic
UPDATE of its `lease_until` (so two workers or machines never send the same row), and only
when no earlier row to the same address is still pending (a recipient's mail leaves in the
order it was queued; one waiting for a retry holds back the later ones). Then:
- sent: state "sent";
- a permanent refusal (SMTP 5xx about this message, e.g. the recipient is refused): state
  "failed" at once, no retry;
- a temporary failure (connection refused, 4xx, timeout): retried with exponential backoff
  (services/steps.backoff_seconds: 5 s doubling up to 10 min), and "failed" after
  OUTBOX_MAX_ATTEMPTS attempts.
A worker killed after the SMTP server accepted a message but before it recorded "sent" lets
the lease run out and the row is sent once more (that narrow window is the only duplicate).

Support sees recent rows (`recent`): state, attempts, last error; never the body of a
`sensitive` mail (links that sign in or reset), whose body is wiped once it is finished.
"""

import datetime
import logging
import threading

import peewee
from flask import current_app
from flask import has_app_context

from selfserve import background
from selfserve import i18n
from selfserve import mail
from selfserve.i18n import lazy_text as _l
from selfserve.models import OutboxMail
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.services import steps

log = logging.getLogger(__name__)

PENDING, SENT, FAILED, SKIPPED = "pending", "sent", "failed", "skipped"
STATES = (PENDING, SENT, FAILED, SKIPPED)
# How the support mail page names each state (the database keeps the keys).
STATE_LABELS = {PENDING: _l("pending"), SENT: _l("sent"), FAILED: _l("failed"), SKIPPED: _l("skipped")}
RESET_REQUEST = "reset_request"
# Mails whose link lets whoever holds it act (verify, sign in, reset, confirm an address, accept
# an invitation or answer a transfer): never shown to staff, wiped once finished, whether or not
# the caller said `sensitive`.
SENSITIVE_KINDS = frozenset(
    {
        RESET_REQUEST,
        "verify_email",
        "sign_in_link",
        "reset_password",
        "confirm_email_change",
        "share_invitation",
        "transfer_offer",
        "transfer_request",
    }
)
STAFF_PAGE_SIZE = 100
FINISHED = (SENT, FAILED, SKIPPED)
# The last mail to a person whose account is erased (services/erasure.py): its row is deleted
# once finished, since the address would be all that stays of them.
ACCOUNT_DELETED = "account_deleted"
PURGE_BATCH = 1000


def _setting(key, default):
    if has_app_context():
        return current_app.config.get(key, default)
    return default


# --- queueing --------------------------------------------------------------------------------


def enqueue(to, subject, body, *, kind, headers=None, sensitive=False, dedupe_key=None):
    """Queue one rendered email in the current transaction; returns the row (None when
    `dedupe_key` was queued before: a step that ran twice queues its mail once)."""
    fields = {
        "kind": kind[:32],
        "to_address": to,
        "subject": subject[:255],
        "body": body,
        "headers": headers or None,
        "sensitive": bool(sensitive or kind in SENSITIVE_KINDS),
        "dedupe_key": dedupe_key,
        "created_at": utcnow(),
    }
    if dedupe_key is None:
        row = OutboxMail.create(**fields)
    else:
        # The row count, not the insert id: SQLite reports the previous insert's id when the
        # row was ignored, which would pass for a new row.
        if not OutboxMail.insert(**fields).on_conflict_ignore().as_rowcount().execute():
            return None
        row = OutboxMail.get_or_none(OutboxMail.dedupe_key == dedupe_key)
    _wake_after_commit()
    return row


def enqueue_reset_request(email):
    """A "forgot password" request: one row whatever the address; the sender looks the account
    up and sends the reset link, or nothing (the row is deleted, "skipped")."""
    # Stored in English (the row outlives the request); mail.render translates it for the account.
    return enqueue(email, i18n.english(_l("Reset your password")), "", kind=RESET_REQUEST, sensitive=True)


# --- sending ---------------------------------------------------------------------------------


# The blocking operations of one SMTP conversation (mail.deliver), each allowed MAIL_TIMEOUT:
# connect and greeting, EHLO, STARTTLS, EHLO again, AUTH (up to two exchanges), MAIL FROM,
# RCPT TO, DATA, the message and its reply, QUIT.
SMTP_OPERATIONS = 11


def _lease_seconds():
    # Longer than the slowest SMTP conversation MAIL_TIMEOUT allows (every operation taking
    # almost all of it), so a lease only runs out when its worker died.
    return max(60.0, SMTP_OPERATIONS * float(_setting("MAIL_TIMEOUT", 10.0)))


def _due(now):
    return (
        (OutboxMail.state == PENDING)
        & (OutboxMail.next_attempt_at.is_null() | (OutboxMail.next_attempt_at <= now))
        & (OutboxMail.lease_until.is_null() | (OutboxMail.lease_until <= now))
    )


def _first_of_its_recipient():
    """No earlier mail to the same address is pending: the row is the head of its recipient's
    queue (so one address with a long queue behind a retry never crowds out the others)."""
    earlier = OutboxMail.alias()
    return ~peewee.fn.EXISTS(
        earlier.select(earlier.id).where(
            (earlier.to_address == OutboxMail.to_address)
            & (earlier.id < OutboxMail.id)
            & (earlier.state == PENDING)
        )
    )


def take(row, now=None):
    """Lease `row` for this worker: True for exactly one taker, and only while no earlier
    mail to the same address is pending (order per recipient)."""
    now = now or utcnow()
    earlier = OutboxMail.alias()
    earlier_pending = earlier.select(earlier.id).where(
        (earlier.to_address == row.to_address) & (earlier.id < row.id) & (earlier.state == PENDING)
    )
    until = now + datetime.timedelta(seconds=_lease_seconds())
    query = OutboxMail.update(lease_until=until).where(
        (OutboxMail.id == row.id) & _due(now) & ~peewee.fn.EXISTS(earlier_pending)
    )
    return query.execute() == 1


def send_due(now=None, limit=None):
    """The background job: send every due mail this worker can take (at most `limit`, default
    OUTBOX_BATCH). Returns counts by outcome."""
    now = now or utcnow()
    limit = limit or int(_setting("OUTBOX_BATCH", 100))
    counts = {}
    tried = set()  # each row at most once per round (a retry waits for a later round)
    progress = True
    while progress and len(tried) < limit:
        # Another pass only when this one sent something: a recipient's next mail may be free now.
        progress = False
        query = OutboxMail.select(OutboxMail.id, OutboxMail.to_address).where(
            _due(now) & _first_of_its_recipient()
        )
        if tried:
            query = query.where(OutboxMail.id.not_in(list(tried)))
        for row in list(query.order_by(OutboxMail.id).limit(limit - len(tried))):
            if not take(row, now):
                continue  # another worker has it, or an earlier mail to the address waits
            tried.add(row.id)
            outcome = send_one(row.id, now)
            counts[outcome] = counts.get(outcome, 0) + 1
            progress = True
    return counts


def send_one(row_id, now=None):
    """Send a row this worker leased; returns its new state ("pending" when it will be retried)."""
    row = OutboxMail.get_by_id(row_id)
    try:
        message = _message(row)
        if message is None:
            _finish(row, SKIPPED)
            return SKIPPED
        mail.deliver(*message)
        if row.kind == RESET_REQUEST:
            _audit_reset_sent(message[0])
    except mail.MailError as exc:
        return _failed(row, str(exc), exc.permanent, now)
    except Exception as exc:  # noqa: BLE001 - a bug in one mail must not stop the others
        log.exception("Outbox mail %s could not be prepared", row.id)
        return _failed(row, f"{type(exc).__name__}: {exc}", False, now)
    _finish(row, SENT)
    return SENT


def _message(row):
    """(to, subject, body, headers) to deliver, or None when there is nothing to send."""
    if row.kind == RESET_REQUEST:
        return _reset_message(row)
    return row.to_address, row.subject, row.body, row.headers


def _reset_message(row):
    """The reset link for a "forgot password" request, made now (bound to the current password,
    so it dies when that changes); None when the address has no account."""
    from selfserve import tokens
    from selfserve.services import accounts

    user = User.get_or_none(User.email == row.to_address)
    if user is None:
        return None
    token = tokens.make(
        "reset_password",
        {"u": user.id, "e": tokens.fingerprint(user.email), "p": tokens.fingerprint(user.password_hash)},
    )
    subject, body = mail.render(
        user.email,
        row.subject,
        "reset_password",
        reset_url=accounts.absolute_url("accounts.reset", token=token),
        minutes=accounts.RESET_MINUTES,
    )
    return user.email, subject, body, None


def _audit_reset_sent(address):
    from selfserve.services import audit

    user = User.get_or_none(User.email == address)
    if user is not None:
        audit.record("account.password_reset_requested", user=user)


def _finish(row, state, error=None):
    if _forgotten_when_finished(row, state):
        OutboxMail.delete().where((OutboxMail.id == row.id) & (OutboxMail.state == PENDING)).execute()
        return
    changes = {
        OutboxMail.state: state,
        OutboxMail.lease_until: None,
        OutboxMail.next_attempt_at: None,
        OutboxMail.finished_at: utcnow(),
    }
    if error is not None:
        changes[OutboxMail.last_error] = error[:500]
    if row.sensitive:
        changes[OutboxMail.body] = ""  # a sign-in or reset link has no business staying around
    OutboxMail.update(changes).where((OutboxMail.id == row.id) & (OutboxMail.state == PENDING)).execute()


def _forgotten_when_finished(row, state):
    """Rows that go once finished instead of waiting for OUTBOX_KEEP_DAYS: a "forgot password"
    request for an address without an account (skipped: it only holds the address of someone
    who is not a customer) and the "account deleted" mail (the person is erased)."""
    return (row.kind == RESET_REQUEST and state == SKIPPED) or row.kind == ACCOUNT_DELETED


def _failed(row, error, permanent, now=None):
    attempts = row.attempts + 1
    max_attempts = int(_setting("OUTBOX_MAX_ATTEMPTS", 20))
    if permanent or attempts >= max_attempts:
        reason = error if permanent else f"gave up after {attempts} attempts: {error}"
        OutboxMail.update(attempts=attempts).where(OutboxMail.id == row.id).execute()
        _finish(row, FAILED, reason)
        log.warning("Outbox mail %s (%s) failed for good: %s", row.id, row.kind, reason)
        return FAILED
    delay = steps.backoff_seconds(attempts)
    OutboxMail.update(
        attempts=attempts,
        last_error=error[:500],
        lease_until=None,
        next_attempt_at=(now or utcnow()) + datetime.timedelta(seconds=delay),
    ).where((OutboxMail.id == row.id) & (OutboxMail.state == PENDING)).execute()
    log.warning(
        "Outbox mail %s (%s) not sent (attempt %d), retry in %d s: %s",
        row.id,
        row.kind,
        attempts,
        delay,
        error,
    )
    return PENDING


def forget(addresses):
    """Delete every outbox row to these addresses (an account being erased: its mail, sent or
    waiting, names the person)."""
    if addresses:
        OutboxMail.delete().where(OutboxMail.to_address.in_(list(addresses))).execute()


def purge_finished(now=None):
    """The retention job: delete rows finished (sent, failed, skipped) more than
    OUTBOX_KEEP_DAYS ago, in batches (short transactions). Returns how many."""
    days = float(_setting("OUTBOX_KEEP_DAYS", 30))
    cutoff = (now or utcnow()) - datetime.timedelta(days=days)
    purged = 0
    while True:
        ids = [
            row.id
            for row in OutboxMail.select(OutboxMail.id)
            .where(OutboxMail.state.in_(FINISHED) & (OutboxMail.finished_at < cutoff))
            .limit(PURGE_BATCH)
        ]
        if not ids:
            return purged
        purged += OutboxMail.delete().where(OutboxMail.id.in_(ids)).execute()
        if len(ids) < PURGE_BATCH:
            return purged


# --- support's view --------------------------------------------------------------------------


def recent(address=None, state=None, limit=STAFF_PAGE_SIZE):
    """The newest outbox rows, optionally for one address (exact, case-insensitive) or state."""
    query = OutboxMail.select().order_by(OutboxMail.id.desc()).limit(limit)
    if address:
        query = query.where(OutboxMail.to_address == address.strip().lower())
    if state in STATES:
        query = query.where(OutboxMail.state == state)
    return list(query)


def latest_state(address, kind):
    """The state of the newest `kind` mail to `address`, or None when there is none."""
    row = (
        OutboxMail.select(OutboxMail.state)
        .where((OutboxMail.to_address == address) & (OutboxMail.kind == kind))
        .order_by(OutboxMail.id.desc())
        .first()
    )
    return row.state if row else None


def shown_body(row):
    """The body support may read: none for security mails (links that sign in or reset)."""
    return None if row.sensitive else row.body


# --- the sender thread -----------------------------------------------------------------------


def _wakeup(app):
    # One event per app (not per process): a request of one app never wakes another app's
    # sender (the tests build many apps in one process).
    return app.extensions.setdefault("outbox_wakeup", threading.Event())


def wake(app=None):
    """Tell the app's sender thread (the current app's by default) that mail may be due now."""
    if app is None and has_app_context():
        app = current_app._get_current_object()
    if app is not None:
        _wakeup(app).set()


def _wake_after_commit():
    # The row is only visible once the caller's transaction commits: wake the sender then
    # (at once outside a transaction), not now.
    if has_app_context():
        app = current_app._get_current_object()
        db.after_commit(lambda: wake(app))


def init_app(app):
    """Start this worker's sender thread at its first request (web workers only, like the
    sweep)."""

    @app.before_request
    def _start_outbox_sender():
        if app.extensions.get("outbox_sender") is None:
            start_sender(app)


def start_sender(app, interval=None):
    """This worker's sender thread (selfserve/background.py): sends mail as soon as it is
    queued (`wake`) and every `interval` (SWEEP_SECONDS) as a fallback; none when that is 0
    (tests send themselves, and the sweep's job sends too)."""
    interval = interval if interval is not None else app.config.get("SWEEP_SECONDS")
    return background.start(app, "outbox_sender", send_due, interval, wakeup=_wakeup(app))
