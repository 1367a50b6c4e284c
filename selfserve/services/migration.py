"""Moving devices already in the field to their owners, without setting them up again.

An operator runs `flask --app wsgi migrate-devices FILE.csv [--dry-run]` with one row per
device: `device_id,email`. For each row (a `MigrationRow` keyed by device id, so re-running the
file never duplicates anything):

- the owner already has a ready account: the device is claimed to their customer now;
- otherwise they are invited by email; when they sign up and verify that address, the
  provisioning-ready callback (and, as a fallback, the sweep) claims the device.

Claiming is a recorded sequence of idempotent steps, like a transfer:
`take` (our database: owner = the account, claim_state "migrating") -> `unclaim` (product-level
`remove_device_owner`: takes it off the company's own account) -> `claim` (the owner's customer
token) -> `record` (claim_state cleared) -> `mail_claimed`. A crash anywhere resumes in the
sweep; a permanent refusal frees the row in our database, marks it failed and alerts staff.

Particle allows about 10,000 requests per 5 minutes per IP (particle-cloud-api.md §12), shared
with the live site, so migration calls go through a client-side pacer
(`MIGRATION_REQUESTS_PER_SECOND`) and a 429 waits its Retry-After (with backoff) before trying
again.
"""

import csv
import dataclasses
import io
import logging
import sys
import threading
import time

import click
import peewee
from flask import current_app
from flask.cli import with_appcontext

from selfserve import device_models
from selfserve.i18n import lazy_text as _l
from selfserve.models import Device
from selfserve.models import MigrationRow
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.particle import get_client
from selfserve.particle.errors import TRANSIENT
from selfserve.particle.errors import NotFound
from selfserve.particle.errors import ParticleError
from selfserve.particle.errors import RateLimited
from selfserve.particle.errors import uncertain
from selfserve.services import audit
from selfserve.services import provisioning
from selfserve.services import registry
from selfserve.services import steps
from selfserve.services.accounts import absolute_url
from selfserve.services.accounts import email_problem
from selfserve.services.accounts import normalize_email

log = logging.getLogger(__name__)

MIGRATING = "migrating"  # Device.claim_state while a migration claim runs (owned by this module)
REQUESTS_PER_SECOND = 20.0  # well under Particle's ~33/s per IP, leaving room for the site
MAX_INLINE_RATE_WAITS = 5
MAX_RATE_WAIT_SECONDS = 60.0


# --- the pacer ----------------------------------------------------------------------------------


class Pacer:
    """At most `rate` calls per second, shared by every thread of this process. After an idle
    spell up to one second's worth of calls may go at once (a small token bucket)."""

    def __init__(self, rate):
        self.rate = float(rate)
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def wait(self):
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(self._next, now - 1.0 + 1.0 / self.rate)  # at most one second of saved-up calls
            self._next = slot + 1.0 / self.rate
        delay = slot - now
        if delay > 0:
            time.sleep(delay)


_pacers = {}
_pacers_lock = threading.Lock()


def pacer():
    rate = float(current_app.config.get("MIGRATION_REQUESTS_PER_SECOND", REQUESTS_PER_SECOND))
    with _pacers_lock:
        found = _pacers.get(rate)
        if found is None:
            found = _pacers[rate] = Pacer(rate)
        return found


def _paced(call, *args):
    """One Particle call through the pacer; a 429 waits Retry-After (or a growing backoff)
    and tries again a few times before giving up to the sweep."""
    waits = 0
    while True:
        pacer().wait()
        try:
            return call(*args)
        except RateLimited as exc:
            waits += 1
            if waits > int(current_app.config.get("MIGRATION_MAX_INLINE_RATE_WAITS", MAX_INLINE_RATE_WAITS)):
                raise
            delay = min(MAX_RATE_WAIT_SECONDS, float(exc.retry_after or 0) or 2.0**waits)
            log.info("Particle rate limit: waiting %.1f s", delay)
            time.sleep(delay)


# --- reading the file ---------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    line: int
    device_id: str
    email: str
    problem: str = None


@dataclasses.dataclass
class Result:
    line: int
    device_id: str
    email: str
    outcome: str  # see OUTCOMES
    detail: str = ""


OUTCOMES = {
    "invalid": "skipped: {detail}",
    "unknown_device": _l("skipped: not in the device registry (import it with import-registry first)"),
    "owned_by_other": "skipped: owned here by another account",
    "conflict": "skipped: already being migrated to another address",
    "claimed": _l("done: the device is in the owner's account"),
    "already_claimed": "already done",
    "invited": "invited: claimed when the owner verifies the address",
    "already_invited": _l("already invited, waiting for the owner"),
    "would_invite": "would invite the owner",
    "would_claim": _l("would claim to the owner's existing account"),
    "postponed": _l("started; the cloud was busy, the sweep finishes it ({detail})"),
    "failed": "failed: {detail}",
}


def describe(result):
    return OUTCOMES[result.outcome].format(detail=result.detail)


def read_csv(stream):
    """Rows of a `device_id,email` file (a header line is optional). Each row has `problem`
    set when it can't be used."""
    rows = []
    reader = csv.reader(stream)
    for line, fields in enumerate(reader, start=1):
        if not fields or all(not f.strip() for f in fields):
            continue
        if line == 1 and fields[0].strip().lower().replace(" ", "_") in ("device_id", "id", "device"):
            continue
        raw_id = fields[0].strip() if fields else ""
        raw_email = fields[1].strip() if len(fields) > 1 else ""
        device_id = registry.normalize_device_id(raw_id) if len(raw_id) == 24 else None
        email = normalize_email(raw_email)
        problem = None
        if device_id is None:
            problem = "the device id must be 24 hexadecimal characters"
        elif email_problem(email):
            problem = "the email address is not valid"
        rows.append(Row(line, device_id or raw_id[:40], email or raw_email[:254], problem))
    return rows


# --- planning and running -----------------------------------------------------------------------


def _ready_user(email):
    user = User.get_or_none(User.email == email)
    if user is not None and user.provisioning_state == provisioning.READY and user.particle_customer_id:
        return user
    return None


def plan(row):
    """What migrating this row would do now, without changing anything (the dry run)."""
    if row.problem:
        return Result(row.line, row.device_id, row.email, "invalid", row.problem)
    device = Device.get_or_none(Device.device_id == row.device_id)
    if device is None:
        return Result(row.line, row.device_id, row.email, "unknown_device")
    existing = MigrationRow.get_or_none(MigrationRow.device_id == row.device_id)
    owner = User.get_or_none(User.id == device.owner_id) if device.owner_id else None
    if owner is not None and owner.email == row.email and device.claim_state is None:
        return Result(row.line, row.device_id, row.email, "already_claimed")
    if existing is not None and existing.email != row.email:
        return Result(row.line, row.device_id, row.email, "conflict")
    if owner is not None and (existing is None or existing.user_id != owner.id):
        return Result(row.line, row.device_id, row.email, "owned_by_other")
    if existing is not None:
        if existing.state == "claimed":
            return Result(row.line, row.device_id, row.email, "already_claimed")
        if existing.state == "failed":
            return Result(
                row.line, row.device_id, row.email, "failed", existing.last_error or "failed earlier"
            )
        if existing.state == "claiming":
            return Result(row.line, row.device_id, row.email, "postponed", "in progress")
        return Result(row.line, row.device_id, row.email, "already_invited")
    if _ready_user(row.email):
        return Result(row.line, row.device_id, row.email, "would_claim")
    return Result(row.line, row.device_id, row.email, "would_invite")


def migrate_row(row, now=None):
    """Migrate one row (idempotent: a second run reports what is already done)."""
    now = now or utcnow()
    planned = plan(row)
    if planned.outcome not in ("would_claim", "would_invite"):
        if planned.outcome == "already_invited":
            # The owner may have verified meanwhile: claim now instead of waiting for the sweep.
            user = _ready_user(row.email)
            if user is not None and start_claim(row.device_id, user, now):
                return _outcome_of(row, run(row.device_id))
        return planned
    user = _ready_user(row.email)
    try:
        with db.atomic():
            MigrationRow.create(
                device_id=row.device_id,
                email=row.email,
                state="invited",
                created_at=now,
                step=None if user else "mail_invite",
                lease_until=None if user else steps.lease_until(now),
            )
    except peewee.IntegrityError:
        return plan(row)  # another run created it just now
    if user is not None:
        start_claim(row.device_id, user, now)
    return _outcome_of(row, run(row.device_id))


def _outcome_of(row, migration):
    if migration.state == "claimed":
        return Result(row.line, row.device_id, row.email, "claimed")
    if migration.state == "failed":
        return Result(row.line, row.device_id, row.email, "failed", migration.last_error or "")
    if migration.state == "claiming":
        return Result(row.line, row.device_id, row.email, "postponed", migration.last_error or "busy")
    return Result(row.line, row.device_id, row.email, "invited")


def migrate(rows, dry_run=False, progress=None):
    """Plan (dry run) or migrate every row; returns one Result per row in order."""
    results = []
    for row in rows:
        results.append(plan(row) if dry_run else migrate_row(row))
        if progress is not None:
            progress(1)
    return results


def summarize(results):
    counts = {}
    for result in results:
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    return counts


# --- claiming for a verified owner --------------------------------------------------------------


def start_claim(device_id, user, now=None):
    """invited -> claiming for `user` (exactly one caller wins). True if this call started it."""
    now = now or utcnow()
    return (
        MigrationRow.update(
            state="claiming",
            user=user.id,
            step="take",
            attempts=0,
            next_attempt_at=None,
            lease_until=steps.lease_until(now),
            last_error=None,
        )
        .where(
            (MigrationRow.device_id == device_id)
            & (MigrationRow.state == "invited")
            & (MigrationRow.email == user.email)
            & (MigrationRow.step.is_null() | (MigrationRow.step == "mail_invite"))
        )
        .execute()
        == 1
    )


def claim_for_new_account(user):
    """Provisioning-ready callback: claim every device `user`'s address was invited for."""
    if not user.is_verified:
        return 0
    device_ids = [
        r.device_id
        for r in MigrationRow.select(MigrationRow.device_id).where(
            (MigrationRow.email == user.email) & (MigrationRow.state == "invited")
        )
    ]
    started = 0
    for device_id in device_ids:
        if start_claim(device_id, user):
            run(device_id)
            started += 1
    return started


def _fail(migration, reason):
    """The hand-back path (a step gave up): free the device in our database, mark the row
    failed, alert staff once. Nothing follows (returns None)."""
    with db.atomic():
        Device.update(owner=None, claim_state=None, claim_state_at=None, claim_error=reason).where(
            (Device.device_id == migration.device_id) & (Device.claim_state == MIGRATING)
        ).execute()
        MigrationRow.update(state="failed", last_error=reason).where(
            MigrationRow.device_id == migration.device_id
        ).execute()
    log.error("STAFF ALERT: migration of device %s failed: %s", migration.device_id, reason)
    audit.record(
        "staff.alert", user=None, device_id=migration.device_id, reason=f"migration failed: {reason}"
    )
    return None


def _step_take(migration):
    user = User.get_by_id(migration.user_id)
    device = Device.get_or_none(Device.device_id == migration.device_id)
    if device is None:
        raise steps.GiveUp("the device is no longer in the registry")
    taken = (
        Device.update(owner=user.id, claim_state=MIGRATING, claim_state_at=utcnow(), claim_error=None)
        .where((Device.device_id == device.device_id) & Device.owner.is_null() & Device.claim_state.is_null())
        .execute()
    )
    if not taken:
        device = Device.get_by_id(device.device_id)
        if device.owner_id == user.id and device.claim_state is None:
            return "record"  # the owner claimed it with its label meanwhile
        if device.owner_id is not None and device.owner_id != user.id:
            raise steps.GiveUp("the device belongs to another account here")
        if device.claim_state != MIGRATING:
            raise steps.Retry("the device is busy (a claim or release is running)")
    return "unclaim"


def _read_back(migration, read):
    """The answer of a read-back (a lost answer, or one the reference doesn't confirm, §15),
    or None when it couldn't be read now."""
    try:
        return read()
    except ParticleError as exc:
        log.warning("Migration of %s: reading back the owner failed: %s", migration.device_id, exc)
        return None


def _released(migration):
    return _read_back(migration, lambda: _paced(get_client().device_is_free, migration.device_id))


def _claimed_to_owner(migration):
    user = User.get_by_id(migration.user_id)
    return _read_back(
        migration, lambda: _paced(get_client().owns_device, user.particle_customer_id, migration.device_id)
    )


def _step_unclaim(migration):
    try:
        _paced(get_client().remove_device_owner, migration.device_id)
    except NotFound:
        # §15.3: what /owner answers for a device nobody owns is not confirmed: read it back.
        released = _released(migration)
        if released is None:
            raise steps.Retry("the unclaim answered 404 and the owner could not be read back")
        if not released and not _claimed_to_owner(migration):
            raise steps.GiveUp("unclaim answered 404 but the device still has an owner")
    except TRANSIENT as exc:
        if uncertain(exc) and _released(migration):
            return "claim"
        raise
    except ParticleError as exc:
        if _released(migration):
            return "claim"
        raise steps.GiveUp(f"unclaim refused: {type(exc).__name__}")
    return "claim"


def _step_claim(migration):
    user = User.get_by_id(migration.user_id)
    device = Device.get_by_id(migration.device_id)
    client = get_client()
    try:
        if not device.in_product:
            _paced(client.add_device_to_product, device.device_id)
            Device.update(in_product=True).where(Device.device_id == device.device_id).execute()
        _paced(client.claim_device, user.particle_customer_id, device.device_id)
    except TRANSIENT as exc:
        if uncertain(exc) and _claimed_to_owner(migration):
            return "record"  # the claim landed; only its answer was lost
        raise
    except ParticleError as exc:
        # §15.4: a re-claim of a device the owner already has may be refused: theirs is theirs.
        owned = _claimed_to_owner(migration)
        if owned:
            return "record"
        if owned is None:
            raise steps.Retry(f"claim refused ({type(exc).__name__}) and the owner could not be read back")
        raise steps.GiveUp(f"claim refused: {type(exc).__name__}")
    return "record"


def _step_record(migration):
    now = utcnow()
    user = User.get_by_id(migration.user_id)
    device = Device.get_by_id(migration.device_id)
    with db.atomic():
        Device.update(
            claim_state=None, claim_state_at=None, claimed_at=now, name=None, claim_error=None
        ).where(
            (Device.device_id == device.device_id)
            & (Device.owner == user.id)
            & (Device.claim_state == MIGRATING)
        ).execute()
        changed = (
            MigrationRow.update(state="claimed", claimed_at=now)
            .where((MigrationRow.device_id == device.device_id) & (MigrationRow.state == "claiming"))
            .execute()
        )
        if changed:
            audit.record(
                "device.migrated_in",
                user=user,
                device_id=device.device_id,
                name=f"{device_models.label(device.model)} {device.serial_number}",
            )
    return "mail_claimed"


def _step_mail(migration, template):
    device = Device.get_by_id(migration.device_id)
    model = device_models.get(device.model)
    context = {
        "serial_number": device.serial_number,
        "model_label": model.label if model else device.model,
        "signup_url": absolute_url("accounts.signup"),
        "site_url": absolute_url("main.index"),
    }
    subject = (
        _l("Your device is ready for Tidewell")
        if template == "migration_invite"
        else _l("Your device is in your account")
    )
    steps.send_mail(
        migration.email, subject, template, context, key=f"migration:{migration.device_id}:{template}"
    )
    if template == "migration_invite":
        MigrationRow.update(invited_at=utcnow()).where(
            MigrationRow.device_id == migration.device_id
        ).execute()
    return None


STEPS = {
    "take": _step_take,
    "unclaim": _step_unclaim,
    "claim": _step_claim,
    "record": _step_record,
    "mail_invite": lambda m: _step_mail(m, "migration_invite"),
    "mail_claimed": lambda m: _step_mail(m, "migration_claimed"),
}


RUNNER = steps.Runner(
    "Migration of",
    MigrationRow,
    STEPS,
    on_give_up=_fail,
    # A failed or postponed row's reason stays for the operator's report (_outcome_of).
    keep_error=lambda migration: True,
)


def _due(now):
    return RUNNER.due(now)


def take(device_id, now=None):
    return RUNNER.take(device_id, now)


def run(device_id):
    """Run the row's steps (the caller holds its lease) until done or one must wait."""
    return RUNNER.run(device_id)


def resume_pending(now=None, limit=100):
    """The sweep: start claims for invited owners whose accounts are ready (in case the
    callback was missed), and run every due step. Safe with several workers."""
    now = now or utcnow()
    ready = (
        MigrationRow.select(MigrationRow.device_id, User.id.alias("uid"))
        .join(User, on=(User.email == MigrationRow.email))
        .where(
            (MigrationRow.state == "invited")
            & (MigrationRow.step.is_null())
            & (User.provisioning_state == provisioning.READY)
            & User.particle_customer_id.is_null(False)
        )
        .limit(limit)
        .dicts()
    )
    started = 0
    for item in list(ready):
        if start_claim(item["device_id"], User.get_by_id(item["uid"]), now):
            run(item["device_id"])
            started += 1
    return {"started": started, "ran": RUNNER.resume(now, limit)}


# --- the command ----------------------------------------------------------------------------------


@click.command("migrate-devices")
@click.argument("csv_file", type=click.File("r", encoding="utf-8-sig"))
@click.option("--dry-run", is_flag=True, help="Only report what would happen; change nothing.")
@with_appcontext
def migrate_devices_command(csv_file, dry_run):
    """Move devices already in the field (CSV: device_id,email) to their owners' accounts.

    Owners with an account get the device now; the others are invited by email and get it
    when they verify. Safe to run again: finished rows are reported, not redone.
    """
    from selfserve import models

    models.db.connect(reuse_if_open=True)
    try:
        rows = read_csv(io.StringIO(csv_file.read()))
    except csv.Error as exc:
        raise click.ClickException(f"{csv_file.name}: {exc}")
    if not rows:
        raise click.ClickException(f"{csv_file.name}: no rows")
    with click.progressbar(
        length=len(rows), label="Dry run" if dry_run else "Migrating", file=sys.stderr
    ) as bar:
        results = migrate(rows, dry_run=dry_run, progress=bar.update)
    for result in results:
        click.echo(f"line {result.line}: {result.device_id} {result.email}: {describe(result)}")
    counts = summarize(results)
    click.echo(
        ("Dry run, nothing changed. " if dry_run else "")
        + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    )
    failed = counts.get("failed", 0)
    if failed and not dry_run:
        raise click.ClickException(
            f"{failed} row(s) failed; staff were alerted (see the support fleet page)."
        )
