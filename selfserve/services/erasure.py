"""Deleting an account: asked for with the password, undone by signing in during the grace
period, carried out afterwards by a recorded job.

Asking (`schedule`): the password is checked, an AccountDeletion row is written with its first
step due at the end of the grace (ACCOUNT_DELETION_GRACE_DAYS), every session of the account
ends, and a "deletion scheduled" email goes out. Until the step starts, the person can undo it
(`cancel`; signing in shows the date and the button). Staff see pending deletions and can't
undo one: only the person's own signed-in request does (the read-only wall refuses it to staff
viewing the account, and `cancel` takes the person, never an actor).

After the grace, the steps (services/steps.Runner, each idempotent: a crash anywhere runs the
step again and ends in the same state):

    begin           no way back from here: the password is made unusable and sessions end
    end_transfers   their offers and requests are cancelled, offers to them declined; a move
                    already running is waited for (it ends with a recorded owner)
    release_devices every device they own is released through devices.release (the one
                    release path: Particle first, then our database; it stays in the product);
                    a release a crash left half-done is waited for (devices.resume_pending
                    finishes it); requests for those devices close with the release
    end_access      access they hold ends (revoked), invitations they sent or that wait for
                    their address are withdrawn, their organisation memberships end. The last
                    admin of an organisation hands it to its longest-standing member; an
                    organisation left with no one is flagged for staff (its devices stay, so
                    its company does not lose them to one person's deletion)
    delete_customer their Particle shadow customer is deleted (DELETE /v1/products/:p/
                    customers/:id; 404 counts as already gone), which revokes its tokens
    scrub           personal data goes, in one transaction: email, password hash, names,
                    settings, sessions, history and alerts of their own periods, proofs; the
                    audit rows stay, with the person as "deleted account #<id>" (their address
                    replaced wherever a row names it, their IP addresses dropped); the
                    "account deleted" email is queued in that transaction (the outbox sends it)
    finish          the deletion is recorded as done
"""

import datetime
import logging
import re

import peewee
from flask import current_app

from selfserve import mail
from selfserve import passwords
from selfserve.i18n import lazy_text as _l
from selfserve.models import AccountDeletion
from selfserve.models import AlertEpisode
from selfserve.models import AlertNotice
from selfserve.models import AlertOptIn
from selfserve.models import AlertSetting
from selfserve.models import AuditEvent
from selfserve.models import ClaimAttempt
from selfserve.models import Device
from selfserve.models import Grant
from selfserve.models import Invitation
from selfserve.models import LoginSession
from selfserve.models import Membership
from selfserve.models import MigrationRow
from selfserve.models import Organisation
from selfserve.models import PossessionProof
from selfserve.models import Transfer
from selfserve.models import User
from selfserve.models import ValueRollup
from selfserve.models import ValueSample
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.particle import get_client
from selfserve.refusals import Refusal
from selfserve.security import end_all_login_sessions
from selfserve.services import audit
from selfserve.services import organisations
from selfserve.services import outbox
from selfserve.services import steps

log = logging.getLogger(__name__)

SCHEDULED, RUNNING, DONE, CANCELLED = "scheduled", "running", "done", "cancelled"
UNUSABLE_PASSWORD = "!"  # not an Argon2 hash: passwords.check_password is always False for it
DELETED_ROLE = "deleted"


class ErasureError(Refusal):
    """A refusal to show next to the form (wrong password) or as a message."""


def grace():
    return datetime.timedelta(days=float(current_app.config["ACCOUNT_DELETION_GRACE_DAYS"]))


def anonymous_label(user_id):
    """How the person appears once deleted, as stored on audit rows and staff alerts (in English:
    audit.describe shows it in the reader's language, audit.anonymous_name)."""
    return f"deleted account #{user_id}"


def anonymous_email(user_id):
    # Unique (the column is), never deliverable (.invalid, RFC 2606), names no one.
    return f"deleted-{user_id}@deleted.invalid"


def state_of(user):
    """The state of the account's deletion (scheduled, running, done, cancelled), or None."""
    row = AccountDeletion.select(AccountDeletion.state).where(AccountDeletion.user == user.id).first()
    return row.state if row else None


def pending_of(user):
    """The account's scheduled deletion (still undoable), or None."""
    return AccountDeletion.get_or_none(
        (AccountDeletion.user == user.id) & (AccountDeletion.state == SCHEDULED)
    )


# --- asking and undoing -----------------------------------------------------------------------------


def schedule(user, password, now=None):
    """Schedule `user`'s deletion after the grace period: checks the password, ends every
    session of the account, emails them. Returns the AccountDeletion. Raises ErasureError."""
    from selfserve.services.accounts import absolute_url

    now = now or utcnow()
    user = User.get_by_id(user.id)
    if user.is_staff or user.role != "customer":
        raise ErasureError(_l("Staff and organisation accounts are not deleted here."), status=403)
    if not passwords.check_password(user.password_hash, password or ""):
        raise ErasureError(
            _l("That is not your current password."), kind="form", field="password", status=400
        )
    due = now + grace()
    with db.atomic():
        existing = AccountDeletion.get_or_none(AccountDeletion.user == user.id)
        if existing is not None and existing.state in (RUNNING, DONE):
            raise ErasureError(_l("Your account is being deleted already."), status=409)
        fields = {
            "state": SCHEDULED,
            "requested_at": now,
            "due_at": due,
            "cancelled_at": None,
            "step": "begin",
            "attempts": 0,
            "next_attempt_at": due,  # the runner takes it only then
            "lease_until": None,
            "last_error": None,
        }
        if existing is None:
            try:
                with db.atomic():
                    deletion = AccountDeletion.create(user=user.id, **fields)
            except peewee.IntegrityError:  # asked twice at the same moment: one row
                deletion = AccountDeletion.get(AccountDeletion.user == user.id)
        else:
            if existing.state == SCHEDULED:
                return existing  # asked again (a double submit): the first date stands
            AccountDeletion.update(fields).where(AccountDeletion.id == existing.id).execute()
            deletion = AccountDeletion.get_by_id(existing.id)
        audit.record("account.deletion_scheduled", user=user, due=due.isoformat(timespec="seconds"))
        end_all_login_sessions(user)
        # Queued in the same transaction as the change it reports (the outbox sends it).
        mail.send(
            user.email,
            _l("Your account will be deleted"),
            "account_deletion_scheduled",
            due_at=deletion.due_at,
            login_url=absolute_url("accounts.login"),
        )
    return deletion


def cancel(user, now=None):
    """The person undoes their scheduled deletion (signed in, during the grace). True when it
    was undone; False when there was nothing to undo. Raises ErasureError once it started."""
    now = now or utcnow()
    undone = (
        AccountDeletion.update(state=CANCELLED, cancelled_at=now, step=None, next_attempt_at=None)
        .where(
            (AccountDeletion.user == user.id)
            & (AccountDeletion.state == SCHEDULED)
            & (AccountDeletion.step == "begin")
            # Not while a worker holds it: that worker is starting the deletion.
            & (AccountDeletion.lease_until.is_null() | (AccountDeletion.lease_until <= now))
        )
        .execute()
    )
    if undone:
        audit.record("account.deletion_cancelled", user=user)
        return True
    if (
        AccountDeletion.select()
        .where((AccountDeletion.user == user.id) & AccountDeletion.state.in_([SCHEDULED, RUNNING]))
        .exists()
    ):
        raise ErasureError(_l("Your account is being deleted now; this can no longer be undone."), status=409)
    return False


def pending_for_staff(limit=200):
    """Scheduled and running deletions, soonest first, for the support area: AccountDeletion
    rows with their `user` joined (the finished ones: `recently_done`)."""
    rows = (
        AccountDeletion.select(AccountDeletion, User)
        .join(User)
        .where(AccountDeletion.state.in_([SCHEDULED, RUNNING]))
        .order_by(AccountDeletion.due_at, AccountDeletion.id)
        .limit(limit)
    )
    return list(rows)


def recently_done(limit=20):
    return list(
        AccountDeletion.select()
        .where(AccountDeletion.state == DONE)
        .order_by(AccountDeletion.finished_at.desc())
        .limit(limit)
    )


# --- the steps ----------------------------------------------------------------------------------


def _user(deletion):
    return User.get_by_id(deletion.user_id)


def _step_begin(deletion):
    now = utcnow()
    AccountDeletion.update(state=RUNNING, started_at=now).where(
        (AccountDeletion.id == deletion.id) & (AccountDeletion.state == SCHEDULED)
    ).execute()
    # No sign-in from here on: the deletion runs, and can't be undone any more.
    User.update(password_hash=UNUSABLE_PASSWORD).where(User.id == deletion.user_id).execute()
    end_all_login_sessions(_user(deletion))
    if (
        not AuditEvent.select()
        .where((AuditEvent.user == deletion.user_id) & (AuditEvent.action == "account.deletion_started"))
        .exists()
    ):
        audit.record("account.deletion_started", user=deletion.user_id, actor=None)
    return "end_transfers"


def _step_end_transfers(deletion):
    from selfserve.services import transfers

    user = _user(deletion)
    mine = (Transfer.seller == user.id) | (Transfer.buyer == user.id)
    if user.is_verified:
        mine |= (Transfer.kind == "offer") & (Transfer.buyer_email == user.email) & Transfer.buyer.is_null()
    for transfer in Transfer.select().where(mine & Transfer.state.in_(["offered", "requested"])):
        role = transfers.role_of(user, transfer)
        try:
            if transfer.kind == "offer" and role == "buyer":
                transfers.decline(user, transfer)
            elif (transfer.kind == "offer" and role == "seller") or (
                transfer.kind == "request" and role == "buyer"
            ):
                transfers.cancel(user, transfer)
            # A request for one of their devices closes with its release (the next step), and
            # the person who asked is told the device was released.
        except transfers.TransferError:
            pass  # answered at the same moment: that answer stands
    moving = Transfer.select().where(mine & Transfer.state.in_(["moving", "returning"])).exists()
    if moving:
        # A device changing hands ends with a recorded owner; then it is released (or gone).
        raise steps.Retry("a transfer of theirs is moving a device; waiting for it to finish", wait=60)
    return "release_devices"


def _step_release_devices(deletion):
    from selfserve.services import devices

    user = _user(deletion)
    waiting = 0
    for device in list(Device.select().where(Device.owner == user.id)):
        if device.claim_state is not None:
            waiting += 1  # a claim, release or move in flight: its own resumer finishes it
            continue
        try:
            devices.release(user, device)
        except devices.DeviceError as exc:
            if exc.kind == "checking":
                waiting += 1  # the cloud's answer was lost: the release sweep finishes it
                continue
            if exc.kind == "busy":
                waiting += 1
                continue
            raise steps.Retry(f"release of {device.device_id}: {exc.kind}") from None
    if waiting:
        raise steps.Retry(f"{waiting} device(s) still being released or moved", wait=30)
    return "end_access"


def _step_end_access(deletion):
    from selfserve.services import access

    user = _user(deletion)
    for grant in list(Grant.select().where((Grant.grantee == user.id) & Grant.ended_at.is_null())):
        access.revoke(grant, user)
    now = utcnow()
    Invitation.update(state="withdrawn", decided_at=now).where(
        (Invitation.state == "pending")
        & ((Invitation.invited_by == user.id) | (Invitation.email == user.email))
    ).execute()
    for membership in list(Membership.select().where(Membership.user == user.id)):
        _leave_organisation(user, membership)
    return "delete_customer"


def _leave_organisation(user, membership):
    """Take `user` out of an organisation. The last admin hands it on to the member who joined
    first (someone must run it); with no one left, staff are alerted and the organisation
    keeps its devices."""
    organisation = Organisation.get_by_id(membership.organisation_id)
    label = anonymous_label(user.id)
    with db.atomic():
        if membership.role == "admin":
            other_admins = Membership.select().where(
                (Membership.organisation == organisation.id)
                & (Membership.role == "admin")
                & (Membership.user != user.id)
            )
            if not other_admins.exists():
                successor = (
                    Membership.select()
                    .where((Membership.organisation == organisation.id) & (Membership.user != user.id))
                    .order_by(Membership.created_at, Membership.id)
                    .first()
                )
                if successor is not None:
                    Membership.update(role="admin").where(Membership.id == successor.id).execute()
                    person = User.get_by_id(successor.user_id)
                    for who in (organisation.account_id, person.id):
                        audit.record(
                            "org.admin_handed_on",
                            user=who,
                            actor=None,
                            to=person.email,
                            organisation=organisation.name,
                        )
                else:
                    audit.record(
                        "staff.alert",
                        user=organisation.account_id,
                        actor=None,
                        reason=f"the organisation {organisation.name} has no members left: its only admin "
                        f"deleted their account ({label})",
                    )
        organisations.end_membership(membership, organisation, None, label)


def _step_delete_customer(deletion):
    user = _user(deletion)
    now = utcnow()
    if user.provisioning_state == "pending":
        # Stop the account's set-up first, so it can't create the customer after we delete it.
        stopped = (
            User.update(provisioning_state=None, provisioning_next_at=None)
            .where(
                (User.id == user.id)
                & (User.provisioning_state == "pending")
                & (User.provisioning_next_at.is_null() | (User.provisioning_next_at <= now))
            )
            .execute()
        )
        if not stopped:
            raise steps.Retry("the account's set-up is running; waiting for it", wait=60)
    if user.particle_customer_id:
        if get_client().delete_customer(user.particle_customer_id):
            log.info("Account deletion %s: Particle customer deleted", deletion.id)
        else:
            log.info("Account deletion %s: Particle customer already gone", deletion.id)
    return "scrub"


def _step_scrub(deletion):
    user = _user(deletion)
    if user.role == DELETED_ROLE:
        return "finish"  # done before a crash (its transaction committed, the mail with it)
    label = anonymous_label(user.id)
    replacement = anonymous_email(user.id)
    with db.atomic():
        addresses = [a for a in {user.email, user.pending_email} if a]
        _anonymise_audit(user, addresses, label)
        Transfer.update(buyer_email=replacement).where(Transfer.buyer_email.in_(addresses)).execute()
        Invitation.update(email=replacement).where(Invitation.email.in_(addresses)).execute()
        MigrationRow.update(email=replacement).where(
            (MigrationRow.user == user.id) | MigrationRow.email.in_(addresses)
        ).execute()
        for model in (ValueSample, ValueRollup, AlertEpisode):
            model.delete().where(model.owner == user.id).execute()
        for model in (AlertNotice, AlertSetting, AlertOptIn, PossessionProof, LoginSession):
            model.delete().where(model.user == user.id).execute()
        ClaimAttempt.delete().where(ClaimAttempt.key == f"user:{user.id}").execute()
        # Their mail, sent or not. The "deleted" mail below is queued after, to the same
        # address: the outbox deletes that row once it is sent (outbox.ACCOUNT_DELETED).
        outbox.forget(addresses)
        # The last email, queued with the deletion it reports and rendered now, while the
        # account still says which language they read.
        steps.send_mail(
            user.email,
            _l("Your account is deleted"),
            "account_deleted",
            {},
            key=f"account-deletion:{deletion.id}",
        )
        cleared = {
            User.email: replacement,
            User.pending_email: None,
            User.password_hash: UNUSABLE_PASSWORD,
            User.role: DELETED_ROLE,
            User.particle_customer_id: None,
            User.provisioning_state: None,
            User.provisioning_error: None,
            User.provisioning_next_at: None,
            User.sign_in_link_used_at: None,
            User.totp_secret_encrypted: None,
            User.totp_enrolled_at: None,
            User.totp_last_step: None,
            User.locale: None,
            User.seen_locale: None,
            User.time_zone: None,
        }
        User.update(cleared).where(User.id == user.id).execute()
        audit.record("account.deleted", user=user.id, actor=None)
    return "finish"


def _anonymise_audit(user, addresses, label):
    """Audit rows stay (append-only for everything else); here alone they are rewritten so
    that no row names the person: their address becomes `label` wherever a detail holds it
    (as a whole address, never part of a longer one), and the IP address of what they did is
    dropped."""
    AuditEvent.update(ip=None).where(AuditEvent.actor == user.id).execute()
    for address in addresses:
        whole = re.compile(r"(?<![\w.+-])" + re.escape(address) + r"(?![\w.-])", re.IGNORECASE)
        rows = AuditEvent.select(AuditEvent.id, AuditEvent.detail).where(
            AuditEvent.detail ** _text(f"%{address}%")
        )
        for row in list(rows):
            detail = _replaced(row.detail, whole, label)
            if detail != row.detail:
                AuditEvent.update(detail=detail).where(AuditEvent.id == row.id).execute()


def _text(pattern):
    # A LIKE pattern as it is: the JSON column would otherwise encode it as a JSON string.
    return peewee.Value(pattern, converter=False)


def _replaced(value, pattern, label):
    if isinstance(value, str):
        return pattern.sub(label, value)
    if isinstance(value, dict):
        return {key: _replaced(item, pattern, label) for key, item in value.items()}
    if isinstance(value, list):
        return [_replaced(item, pattern, label) for item in value]
    return value


def _step_finish(deletion):
    AccountDeletion.update(state=DONE, finished_at=utcnow()).where(
        AccountDeletion.id == deletion.id
    ).execute()
    return None


STEPS = {
    "begin": _step_begin,
    "end_transfers": _step_end_transfers,
    "release_devices": _step_release_devices,
    "end_access": _step_end_access,
    "delete_customer": _step_delete_customer,
    "scrub": _step_scrub,
    "finish": _step_finish,
}

# How staff's pending-deletions page names the step a deletion is at (the row keeps the key).
STEP_LABELS = {
    "begin": _l("starting"),
    "end_transfers": _l("ending transfers"),
    "release_devices": _l("releasing devices"),
    "end_access": _l("ending shared access"),
    "delete_customer": _l("deleting the device cloud account"),
    "scrub": _l("removing personal data"),
    "finish": _l("finishing"),
}

RUNNER = steps.Runner("Deleting account", AccountDeletion, STEPS)


def resume_pending(now=None, limit=50):
    """The background job: start deletions whose grace ended, and run every due step (crashed,
    postponed or new). Safe with several workers. Returns how many ran."""
    return RUNNER.resume(now, limit)


def run(deletion_id):
    """Run a deletion now if it is due and free (tests, and support's "retry")."""
    return RUNNER.run(deletion_id, holding_lease=False)
