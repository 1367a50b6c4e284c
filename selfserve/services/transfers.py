"""Transfers: a device changes hands between two accounts, without ever being lost.

Particle has no transfer between customers (particle-cloud-api.md §14): a transfer is the
product-level unclaim of the seller's claim, then a claim with the buyer's customer token. A
crash between the two must never lose the device, so our database stays the source of truth
and every transfer is a recorded sequence of idempotent steps (`Transfer.step` is the next
one to run):

    offer:    offered --accept-------------------> moving
    request:  requested --approve / no objection-> moving
    moving:   release -> claim -> reset_name -> record -> mail_done_buyer -> mail_done_seller
              (state done after record)
    returning (the buyer's claim failed for good):
              return_release -> return_claim -> return_record -> mail_returned_* (failed_returned)
    dispute:  objected --support gives it to the requester--> moving (mails mail_given_*)
              objected --support keeps it with the owner-----> kept -> mail_kept_*

- Until `record` runs, the device row stays owned by the seller; while the move runs its
  `claim_state` is "transferring" (a value only this module sets or clears), so device pages,
  claims and releases refuse it and devices.resume_pending leaves it alone.
- `release` = remove_device_owner (idempotent: an unclaimed device answers the same);
  `claim` = claim_device with the buyer's token (claiming your own device again succeeds);
  `record` = the database write, in one transaction with the transfer's state and the audit.
- Emails are their own steps: a mail server that is down retries them later and never holds
  up the ownership move.
- A worker takes a transfer with an atomic UPDATE of `lease_until` (as provisioning does), so
  several workers, the request that accepted and the sweep never run one step twice at once.
  Transient Particle errors (timeouts, 5xx, 429) are retried with backoff (429's Retry-After
  honoured); permanent ones stop with a clear state (back to the seller, staff alerted).

Recovery runs in the existing background sweep (selfserve/sweep.py) rather than a job
library: the sweep already runs in every web process and in the demo, needs no broker or
extra service, and the work is a handful of rows polled with one indexed query; the lease
makes it safe with any number of workers. See README "Transfers and migration".
"""

import dataclasses
import datetime
import hashlib
import logging
import secrets
import time

import peewee
from flask import current_app

from selfserve import device_models
from selfserve import sweep
from selfserve import tokens
from selfserve.models import Device
from selfserve.models import PossessionProof
from selfserve.models import Transfer
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.particle import get_client
from selfserve.particle.errors import CloudUnavailable
from selfserve.particle.errors import NotFound
from selfserve.particle.errors import ParticleError
from selfserve.particle.errors import RateLimited
from selfserve.services import audit
from selfserve.services import impersonation
from selfserve.services import live_values
from selfserve.services import provisioning
from selfserve.services import steps
from selfserve.services.accounts import absolute_url
from selfserve.services.accounts import email_problem
from selfserve.services.accounts import normalize_email

log = logging.getLogger(__name__)

OFFER_DAYS = 7
OBJECTION_DAYS = 7
PROOF_MINUTES = 15
REQUESTS_PER_DAY = 3  # per account: asking for other people's devices is rare
MAIL_MAX_ATTEMPTS = 8
TRANSIENT = (CloudUnavailable, RateLimited)

TRANSFERRING = "transferring"  # Device.claim_state while a move runs (owned by this module)
OPEN_STATES = ("offered", "requested", "moving", "returning")
CLOSED_STATES = ("done", "failed_returned", "declined", "cancelled", "objected", "expired", "kept")

STATE_LABELS = {
    "offered": "Offered, waiting for the new owner",
    "requested": "Requested, waiting for the owner's answer",
    "moving": "Moving to the new owner",
    "returning": "Going back to the previous owner",
    "done": "Transferred",
    "failed_returned": "Could not be moved; back with the previous owner",
    "declined": "Declined",
    "cancelled": "Cancelled",
    "objected": "Objected to by the owner",
    "expired": "Expired",
    "kept": "Kept by the owner (decided by support)",
}


class TransferError(Exception):
    """A refusal to show. `kind` names the case, `field` the form field at fault."""

    def __init__(self, message, kind="error", status=400, field=None, transfer=None):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.status = status
        self.field = field
        self.transfer = transfer


# --- small helpers ----------------------------------------------------------------------------


def _setting(key, default):
    return type(default)(current_app.config.get(key, default))


def is_open(transfer):
    return transfer.state in OPEN_STATES


def label(transfer):
    return STATE_LABELS.get(transfer.state, transfer.state)


def device_label(device):
    return f"{device_models.label(device.model)} {device.serial_number}"


def mask_email(email):
    """ "b***@example.com": enough for the seller to recognise, not a full address to others."""
    local, _, domain = (email or "").partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


def _name(transfer):
    """How activity pages name the device of a transfer (never the seller's private name)."""
    return device_label(Device.get_by_id(transfer.device_id))


def open_transfer_of(device):
    """The device's open transfer, or None."""
    return Transfer.get_or_none(Transfer.open_device == device.device_id)


def get(transfer_id):
    return Transfer.get_or_none(Transfer.id == transfer_id)


def _fresh(transfer):
    return Transfer.get_by_id(transfer.id)


def role_of(user, transfer):
    """ "seller", "buyer" or None: what `user` is to this transfer. A buyer of an offer is the
    verified account with the address it was sent to (until it accepts, then that account)."""
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    if transfer.seller_id == user.id:
        return "seller"
    if transfer.buyer_id == user.id:
        return "buyer"
    if (
        transfer.kind == "offer"
        and transfer.buyer_id is None
        and user.is_verified
        and user.email == transfer.buyer_email
    ):
        return "buyer"
    return None


def visible_to(user, transfer_id):
    """The transfer if `user` is its seller or buyer, else None (views answer 404)."""
    transfer = get(transfer_id) if isinstance(transfer_id, int) else None
    if transfer is None or role_of(user, transfer) is None:
        return None
    return transfer


@dataclasses.dataclass
class Dashboard:
    incoming: list  # offers waiting for this account
    outgoing: list  # this account's open requests and offers


def dashboard_of(user):
    """Open transfers that concern `user`, for the dashboard (database only)."""
    if not user.is_verified:
        return Dashboard([], [])
    incoming = list(
        Transfer.select()
        .where(
            (Transfer.state == "offered")
            & (Transfer.buyer_email == user.email)
            & (Transfer.seller != user.id)
        )
        .order_by(Transfer.id)
    )
    outgoing = list(
        Transfer.select()
        .where(Transfer.state.in_(["requested", "moving", "returning"]) & (Transfer.buyer == user.id))
        .order_by(Transfer.id)
    )
    return Dashboard(incoming, outgoing)


# --- offer (the seller starts) ----------------------------------------------------------------


def offer(seller, device, buyer_email, confirmed=True, now=None):
    """Offer `device` (owned by `seller`, checked by devices.device_for) to `buyer_email`.

    `confirmed`: the seller confirmed they give the device away (the page asks; giving a
    device away can't be undone once accepted).

    One open transfer per device (a unique index decides between simultaneous submits); a
    repeated submit of the same offer returns the existing transfer. The email with the link
    is a step: if the mail server is down it is sent later. Raises TransferError.
    """
    now = now or utcnow()
    buyer_email = normalize_email(buyer_email)
    if not confirmed:
        raise TransferError(
            "Tick the box to confirm you want to give this device away.",
            kind="invalid",
            field="confirmed",
            status=422,
        )
    problem = email_problem(buyer_email)
    if problem:
        raise TransferError(
            problem.replace("your email", "the new owner's email"), kind="invalid", field="email", status=422
        )
    if buyer_email == seller.email:
        raise TransferError(
            "That is your own email address. Enter the new owner's address.",
            kind="invalid",
            field="email",
            status=422,
        )
    existing = open_transfer_of(device)
    if existing is not None:
        return _existing_or_refuse(existing, seller, buyer_email)
    if device.owner_id != seller.id or device.claim_state is not None:
        raise TransferError(
            "This device is busy right now. Please try again in a minute.", kind="busy", status=409
        )
    try:
        with db.atomic():
            transfer = Transfer.create(
                device=device.device_id,
                kind="offer",
                state="offered",
                open_device=device.device_id,
                seller=seller.id,
                buyer_email=buyer_email,
                created_at=now,
                expires_at=now + datetime.timedelta(days=OFFER_DAYS),
                step="mail_offer",
                lease_until=steps.lease_until(now),
            )
    except peewee.IntegrityError:
        existing = open_transfer_of(device)
        if existing is None:
            raise TransferError("This device is busy right now. Please try again.", kind="busy", status=409)
        return _existing_or_refuse(existing, seller, buyer_email)
    audit.record(
        "transfer.offered", user=seller, device_id=device.device_id, to=buyer_email, name=_name(transfer)
    )
    return _run(transfer.id)


def _existing_or_refuse(existing, seller, buyer_email):
    if existing.kind == "offer" and existing.seller_id == seller.id and existing.buyer_email == buyer_email:
        return existing  # a double submit: the same offer
    if existing.kind == "request":
        raise TransferError(
            "Someone has asked for this device. Answer that request on this page first.",
            kind="open",
            status=409,
            transfer=existing,
        )
    raise TransferError(
        "This device already has a pending transfer. Cancel it first to offer the device to someone else.",
        kind="open",
        status=409,
        transfer=existing,
    )


def offer_link(transfer):
    token = tokens.make("transfer_offer", {"t": transfer.id, "e": tokens.fingerprint(transfer.buyer_email)})
    return absolute_url("transfers.offer_link", token=token)


def from_offer_link(token):
    """The transfer an offer link is for. Raises tokens.TokenError (expired, tampered,
    or no longer open: the message says which)."""
    payload = tokens.read("transfer_offer", token)
    transfer = get(payload.get("t")) if isinstance(payload.get("t"), int) else None
    if transfer is None or not tokens.same(payload.get("e"), tokens.fingerprint(transfer.buyer_email)):
        raise tokens.TokenInvalid()
    if transfer.state == "offered" and transfer.expires_at <= utcnow():
        raise tokens.TokenExpired("This offer has expired. Ask the seller to send a new one.")
    return transfer


def cancel(user, transfer, now=None):
    """The seller withdraws an offer, or the buyer withdraws a request (until it is decided)."""
    now = now or utcnow()
    role = role_of(user, transfer)
    allowed = (transfer.kind == "offer" and role == "seller") or (
        transfer.kind == "request" and role == "buyer"
    )
    if not allowed:
        raise TransferError(
            "Only the person who started this transfer can cancel it.", kind="forbidden", status=403
        )
    waiting = "offered" if transfer.kind == "offer" else "requested"
    notify = "mail_cancelled" if (transfer.kind == "request" or transfer.offer_mailed_at) else None
    closed = _close(transfer, waiting, "cancelled", notify, now)
    if not closed:
        raise TransferError(too_late_message(transfer), kind="decided", status=409)
    audit.record("transfer.cancelled", user=user, device_id=transfer.device_id, name=_name(transfer))
    return _run(transfer.id, holding_lease=False) if notify else _fresh(transfer)


def decline(user, transfer, now=None):
    """The buyer turns an offer down; the seller is told."""
    now = now or utcnow()
    if transfer.kind != "offer" or role_of(user, transfer) != "buyer":
        raise TransferError("This offer isn't addressed to your account.", kind="forbidden", status=403)
    if not _close(transfer, "offered", "declined", "mail_declined", now, buyer=user.id):
        raise TransferError(too_late_message(transfer), kind="decided", status=409)
    audit.record("transfer.declined", user=user, device_id=transfer.device_id, name=_name(transfer))
    return _run(transfer.id, holding_lease=False)


def accept(user, transfer, now=None):
    """The buyer accepts an offer: the device moves to their account (runs the steps now; a
    cloud outage leaves them to the sweep). Raises TransferError."""
    now = now or utcnow()
    if transfer.kind != "offer" or role_of(user, transfer) != "buyer":
        raise TransferError("This offer isn't addressed to your account.", kind="forbidden", status=403)
    _check_buyer_ready(user)
    if transfer.state == "offered" and transfer.expires_at <= now:
        expire_lapsed(now)
        raise TransferError(
            "This offer has expired. Ask the seller to send a new one.", kind="expired", status=410
        )
    return _start_move(transfer, "offered", user, now)


def _check_buyer_ready(user):
    if not user.is_verified:
        raise TransferError("Please verify your email address first.", kind="not_ready", status=409)
    if user.provisioning_state != provisioning.READY or not user.particle_customer_id:
        raise TransferError(
            "Your account is still being set up with the device cloud. This usually takes less than a "
            "minute; please try again shortly.",
            kind="not_ready",
            status=409,
        )


def _start_move(transfer, waiting, buyer, now, take_lease=True):
    """offered/requested -> moving, and the device row -> "transferring", in one transaction.
    Exactly one caller wins (the UPDATE matches the waiting state once)."""
    with db.atomic() as txn:
        started = (
            Transfer.update(
                state="moving",
                step="release",
                buyer=buyer.id,
                decided_at=now,
                attempts=0,
                next_attempt_at=None,
                last_error=None,
                lease_until=steps.lease_until(now) if take_lease else None,
            )
            .where((Transfer.id == transfer.id) & (Transfer.state == waiting))
            .execute()
        )
        if not started:
            txn.rollback()
            raise TransferError(too_late_message(_fresh(transfer)), kind="decided", status=409)
        marked = (
            Device.update(claim_state=TRANSFERRING, claim_state_at=now, claim_error=None)
            .where(
                (Device.device_id == transfer.device_id)
                & (Device.owner == transfer.seller_id)
                & Device.claim_state.is_null()
            )
            .execute()
        )
        if not marked:
            txn.rollback()
    if not marked:
        device = Device.get_by_id(transfer.device_id)
        if device.owner_id != transfer.seller_id:
            # The seller released the device (or support moved it): nothing to transfer.
            _close(transfer, waiting, "cancelled", None, now)
            raise TransferError(
                "The previous owner no longer has this device in their account, so it can't be "
                "transferred. If you have it and its label, add it with its setup code.",
                kind="gone",
                status=409,
            )
        raise TransferError(
            "This device is busy right now. Please try again in a minute.", kind="busy", status=409
        )
    audit.record(
        "transfer.accepted" if transfer.kind == "offer" else "transfer.approved",
        user=buyer,
        device_id=transfer.device_id,
        name=_name(transfer),
    )
    if not take_lease:
        return _fresh(transfer)
    return _run(transfer.id, holding_lease=True)


def _close(transfer, waiting, state, notify_step, now, **extra):
    """waiting -> a closed state (frees the device for a new transfer). True if it was us."""
    return (
        Transfer.update(
            state=state,
            open_device=None,
            decided_at=now,
            finished_at=now,
            step=notify_step,
            attempts=0,
            next_attempt_at=None,
            lease_until=None,
            **extra,
        )
        .where((Transfer.id == transfer.id) & (Transfer.state == waiting))
        .execute()
        == 1
    )


def too_late_message(transfer):
    current = _fresh(transfer)
    if current.state == "expired":
        return "This transfer has expired."
    if current.state in ("moving", "returning", "done", "failed_returned"):
        return "This transfer was already accepted."
    return f"This transfer was already {label(current).lower()}."


# --- request (the buyer starts) ---------------------------------------------------------------


def remember_possession(user, device, now=None):
    """Record that `user` just proved they hold `device` (serial and setup code matched) while
    it belongs to someone else. Returns an opaque id for the "ask the owner" form; the setup
    code itself is never sent back to the browser."""
    now = now or utcnow()
    opaque = secrets.token_urlsafe(24)
    PossessionProof.delete().where(PossessionProof.expires_at < now).execute()
    PossessionProof.create(
        id=_proof_key(opaque),
        user=user.id,
        device=device.device_id,
        expires_at=now + datetime.timedelta(minutes=PROOF_MINUTES),
    )
    return opaque


def _proof_key(opaque):
    return hashlib.sha256(opaque.encode()).hexdigest()


def request_device(user, opaque_proof, now=None):
    """Ask the recorded owner for a device this account proved it holds. The owner is emailed
    at once with links to approve or object; without an objection the device moves after
    OBJECTION_DAYS. Raises TransferError."""
    now = now or utcnow()
    _check_buyer_ready(user)
    proof = None
    if isinstance(opaque_proof, str) and 10 < len(opaque_proof) < 100:
        proof = PossessionProof.get_or_none(
            (PossessionProof.id == _proof_key(opaque_proof)) & (PossessionProof.user == user.id)
        )
    if proof is None or proof.used_at is not None or proof.expires_at <= now:
        raise TransferError(
            "Please enter the serial number and setup code again, then ask the owner.",
            kind="proof",
            status=422,
        )
    device = Device.get_by_id(proof.device_id)
    if device.owner_id is None:
        raise TransferError(
            "This device is free now: add it with its serial number and setup code.", kind="free", status=409
        )
    if device.owner_id == user.id:
        raise TransferError("This device is already in your account.", kind="already_yours", status=409)
    since = now - datetime.timedelta(days=1)
    recent = (
        Transfer.select()
        .where((Transfer.kind == "request") & (Transfer.buyer == user.id) & (Transfer.created_at > since))
        .count()
    )
    if recent >= _setting("TRANSFER_REQUESTS_PER_DAY", REQUESTS_PER_DAY):
        raise TransferError(
            "You have asked for several devices today. Please contact support if you need more.",
            kind="too_many",
            status=429,
        )
    existing = open_transfer_of(device)
    if existing is not None:
        if existing.kind == "request" and existing.buyer_id == user.id:
            return existing  # a double submit
        raise TransferError(
            "This device already has a transfer in progress. Please contact support with the serial number.",
            kind="open",
            status=409,
        )
    try:
        with db.atomic():
            used = (
                PossessionProof.update(used_at=now)
                .where((PossessionProof.id == proof.id) & PossessionProof.used_at.is_null())
                .execute()
            )
            if not used:
                raise peewee.IntegrityError("proof used")
            transfer = Transfer.create(
                device=device.device_id,
                kind="request",
                state="requested",
                open_device=device.device_id,
                seller=device.owner_id,
                buyer=user.id,
                buyer_email=user.email,
                created_at=now,
                expires_at=now + datetime.timedelta(days=OBJECTION_DAYS),
                step="mail_request",
                lease_until=steps.lease_until(now),
            )
    except peewee.IntegrityError:
        existing = open_transfer_of(device)
        if existing is not None and existing.kind == "request" and existing.buyer_id == user.id:
            return existing
        raise TransferError(
            "This device already has a transfer in progress. Please contact support with the serial number.",
            kind="open",
            status=409,
        )
    audit.record("transfer.requested", user=user, device_id=device.device_id, name=device_label(device))
    audit.record(
        "transfer.request_received",
        user=User.get_by_id(device.owner_id),
        actor=user,
        device_id=device.device_id,
        name=device_label(device),
    )
    return _run(transfer.id)


def answer_link(transfer, action):
    token = tokens.make("transfer_answer", {"t": transfer.id, "a": action, "s": transfer.seller_id})
    return absolute_url("transfers.answer_link", token=token)


def from_answer_link(token):
    """(transfer, action) for an owner's approve/object link. Raises tokens.TokenError."""
    payload = tokens.read("transfer_answer", token)
    action = payload.get("a")
    transfer = get(payload.get("t")) if isinstance(payload.get("t"), int) else None
    if (
        transfer is None
        or action not in ("approve", "object")
        or transfer.kind != "request"
        or payload.get("s") != transfer.seller_id
        or transfer.seller_id is None
    ):
        raise tokens.TokenInvalid()
    return transfer, action


def approve(owner, transfer, now=None, actor=None):
    """The recorded owner lets a request go through now (instead of waiting out the deadline)."""
    now = now or utcnow()
    if transfer.kind != "request" or owner is None or transfer.seller_id != owner.id:
        raise TransferError("Only the device's owner can answer this request.", kind="forbidden", status=403)
    buyer = User.get_or_none(User.id == transfer.buyer_id)
    if buyer is None:
        raise TransferError(
            "The account that asked for this device no longer exists.", kind="gone", status=409
        )
    audit.record("transfer.owner_approved", user=owner, device_id=transfer.device_id, name=_name(transfer))
    return _start_move(transfer, "requested", buyer, now)


def object_to(owner, transfer, now=None):
    """The recorded owner objects: the request closes and the buyer is told to contact support
    (staff decide disputes)."""
    now = now or utcnow()
    if transfer.kind != "request" or owner is None or transfer.seller_id != owner.id:
        raise TransferError("Only the device's owner can answer this request.", kind="forbidden", status=403)
    if not _close(transfer, "requested", "objected", "mail_objected", now):
        raise TransferError(too_late_message(transfer), kind="decided", status=409)
    audit.record("transfer.objected", user=owner, device_id=transfer.device_id, name=_name(transfer))
    return _run(transfer.id, holding_lease=False)


# --- disputes (support decides) ---------------------------------------------------------------

# outcome -> (what the owner's activity says, what the requester's activity says)
DISPUTE_OUTCOMES = {
    "requester": ("device {name} goes to the person who asked for it", "device {name} goes to you"),
    "owner": ("device {name} stays in your account", "device {name} stays with its owner"),
}


def decide_dispute(staff, transfer, outcome, reason, now=None):
    """Support decides a request the recorded owner objected to (state "objected"), once.

    outcome "requester": the transfer opens again and enters the step machine exactly where an
    accepted transfer does (state moving, step release: release -> claim -> reset_name ->
    record -> emails); the steps run now, and a cloud outage or a crash leaves them to the
    sweep. outcome "owner": the dispute is closed for good (state "kept"); nothing moves and
    Particle is not called. Either way both parties are emailed the outcome (email steps; for
    "requester" once the move is recorded, while a move the cloud refuses for good ends like
    any failed transfer: back with the owner, both told, staff alerted) and the decision is
    audited on both accounts, `staff` as actor, in the transaction that
    changes the state: of several simultaneous decisions exactly one wins (the UPDATE matches
    state "objected" once). Returns the transfer afterwards. Raises TransferError: not staff
    (403), no reason or an unknown outcome (422), not an objected request or already decided,
    the device left the owner's account, is busy or has another transfer open (409).
    """
    now = now or utcnow()
    if staff is None or not getattr(staff, "is_staff", False):
        raise TransferError("Only support staff decide disputed transfers.", kind="forbidden", status=403)
    try:
        reason = impersonation.check_reason(reason)
    except impersonation.ViewRefused as exc:
        raise TransferError(exc.message, kind="invalid", field="reason", status=422) from None
    if outcome not in DISPUTE_OUTCOMES:
        raise TransferError(
            "Choose who gets the device: the person who asked, or its current owner.",
            kind="invalid",
            field="outcome",
            status=422,
        )
    transfer = _fresh(transfer)
    if transfer.kind != "request" or transfer.state != "objected":
        raise TransferError(_not_disputed_message(transfer), kind="decided", status=409)
    if outcome == "owner":
        with db.atomic():
            closed = (
                Transfer.update(
                    state="kept",
                    dispute_outcome="owner",
                    decided_at=now,
                    finished_at=now,
                    step="mail_kept_buyer",
                    attempts=0,
                    next_attempt_at=None,
                    lease_until=steps.lease_until(now),
                )
                .where(_undecided(transfer, now))
                .execute()
            )
            if not closed:
                raise TransferError(_not_disputed_message(transfer), kind="decided", status=409)
            _record_decision(staff, transfer, "owner", reason)
        return _run(transfer.id, holding_lease=True)
    buyer = User.get_or_none(User.id == transfer.buyer_id)
    if buyer is None:
        raise TransferError(
            "The account that asked for this device no longer exists. Keep the device with its owner.",
            kind="gone",
            status=409,
        )
    if buyer.provisioning_state != provisioning.READY or not buyer.particle_customer_id:
        raise TransferError(
            "The requester's account is not set up with the device cloud yet, so the device can't "
            "be moved to it. Retry their setup first.",
            kind="not_ready",
            status=409,
        )
    try:
        with db.atomic():
            started = (
                Transfer.update(
                    state="moving",
                    step="release",
                    open_device=transfer.device_id,
                    dispute_outcome="requester",
                    decided_at=now,
                    finished_at=None,
                    attempts=0,
                    next_attempt_at=None,
                    last_error=None,
                    lease_until=steps.lease_until(now),
                )
                .where(_undecided(transfer, now))
                .execute()
            )
            if not started:
                raise TransferError(_not_disputed_message(transfer), kind="decided", status=409)
            marked = (
                Device.update(claim_state=TRANSFERRING, claim_state_at=now, claim_error=None)
                .where(
                    (Device.device_id == transfer.device_id)
                    & (Device.owner == transfer.seller_id)
                    & Device.claim_state.is_null()
                )
                .execute()
            )
            if not marked:
                raise _device_not_movable(transfer)
            _record_decision(staff, transfer, "requester", reason)
    except peewee.IntegrityError:
        # The unique open_device: the device has another open transfer since the objection.
        raise TransferError(
            "This device has another transfer open now. Nothing was changed; that one must finish "
            "or be cancelled first.",
            kind="open",
            status=409,
        ) from None
    return _run(transfer.id, holding_lease=True)


def _undecided(transfer, now):
    """Still objected and no worker busy with it (one may still be sending the objection
    email: the decision's emails replace it)."""
    return (
        (Transfer.id == transfer.id)
        & (Transfer.state == "objected")
        & (Transfer.lease_until.is_null() | (Transfer.lease_until <= now))
    )


def _not_disputed_message(transfer):
    current = _fresh(transfer)
    if current.dispute_outcome:
        return f"Support already decided this request: {_decision_text(current.dispute_outcome, 0, current)}."
    if current.state == "objected":
        return "Someone is working on this transfer right now. Try again in a minute."
    return f"Only a request its owner objected to can be decided. This transfer is: {label(current).lower()}."


def _device_not_movable(transfer):
    device = Device.get_by_id(transfer.device_id)
    if device.owner_id != transfer.seller_id:
        return TransferError(
            "The device is no longer in the owner's account, so there is nothing to move. Nothing "
            "was changed; keep it with the owner to close the dispute.",
            kind="gone",
            status=409,
        )
    return TransferError(
        "This device is busy with another operation right now. Try again in a minute.",
        kind="busy",
        status=409,
    )


def _decision_text(outcome, side, transfer):
    return DISPUTE_OUTCOMES[outcome][side].format(name=_name(transfer))


def _record_decision(staff, transfer, outcome, reason):
    """On both accounts, as `staff`: their activity pages show that support decided, and what."""
    for side, account_id in ((0, transfer.seller_id), (1, transfer.buyer_id)):
        account = User.get_or_none(User.id == account_id) if account_id else None
        if account is not None:
            audit.record(
                "support.decided_transfer",
                user=account,
                actor=staff,
                device_id=transfer.device_id,
                name=_name(transfer),
                decision=_decision_text(outcome, side, transfer),
                outcome=outcome,
                transfer=transfer.id,
                reason=reason,
            )
    log.info("Staff %s decided transfer %s: %s", staff.id, transfer.id, outcome)


# --- deadlines --------------------------------------------------------------------------------


def expire_lapsed(now=None):
    """Offers nobody accepted in time expire (the seller is told). Returns how many."""
    now = now or utcnow()
    lapsed = Transfer.select(Transfer.id).where((Transfer.state == "offered") & (Transfer.expires_at <= now))
    count = 0
    for row in list(lapsed):
        transfer = Transfer.get_by_id(row.id)
        notify = "mail_expired"
        if _close(transfer, "offered", "expired", notify, now):
            count += 1
    return count


def complete_unopposed(now=None):
    """Requests whose objection time ran out without an objection start moving. Returns how
    many started (a busy device is tried again at the next sweep)."""
    now = now or utcnow()
    due = Transfer.select(Transfer.id).where((Transfer.state == "requested") & (Transfer.expires_at <= now))
    started = 0
    for row in list(due):
        transfer = Transfer.get_by_id(row.id)
        buyer = User.get_or_none(User.id == transfer.buyer_id)
        if buyer is None:
            _close(transfer, "requested", "cancelled", None, now)
            continue
        try:
            _start_move(transfer, "requested", buyer, now, take_lease=False)
        except TransferError as exc:
            log.info("Request %s not started: %s", transfer.id, exc.kind)
            continue
        started += 1
    return started


# --- the steps --------------------------------------------------------------------------------


def _device(transfer):
    return Device.get_by_id(transfer.device_id)


def _step_release(transfer):
    try:
        get_client().remove_device_owner(transfer.device_id)
    except NotFound:
        pass  # not claimed on Particle: what we want
    except TRANSIENT:
        raise
    except ParticleError as exc:
        # Refused: the seller's claim is presumably still there. Give it back in the database.
        log.error("Transfer %s: release refused by Particle: %s", transfer.id, exc)
        return _turn_back(transfer, f"release refused: {type(exc).__name__}")
    return "claim"


def _step_claim(transfer):
    buyer = User.get_or_none(User.id == transfer.buyer_id)
    if buyer is None or not buyer.particle_customer_id:
        return _turn_back(transfer, "the new owner's account is gone")
    device = _device(transfer)
    client = get_client()
    try:
        if not device.in_product:
            client.add_device_to_product(device.device_id)
            Device.update(in_product=True).where(Device.device_id == device.device_id).execute()
        client.claim_device(buyer.particle_customer_id, device.device_id)
    except TRANSIENT:
        raise
    except ParticleError as exc:
        log.error("Transfer %s: the new owner's claim was refused: %s", transfer.id, exc)
        return _turn_back(transfer, f"claim refused: {type(exc).__name__}")
    return "reset_name"


def _step_reset_name(transfer):
    """The seller's name for the device is theirs: on Particle too, the buyer starts with a
    neutral one. Not worth failing the move over: a refusal is logged and skipped."""
    from selfserve.services import devices

    buyer = User.get_by_id(transfer.buyer_id)
    device = _device(transfer)
    try:
        get_client().rename_device(
            buyer.particle_customer_id, device.device_id, devices.particle_name("", device)
        )
    except TRANSIENT:
        raise
    except ParticleError as exc:
        log.warning("Transfer %s: resetting the device name refused: %s", transfer.id, exc)
    return "record"


def _turn_back(transfer, reason):
    """The move failed for good: give the device back to the seller (steps return_*)."""
    Transfer.update(state="returning", last_error=reason).where(
        (Transfer.id == transfer.id) & (Transfer.state == "moving")
    ).execute()
    return "return_release"


def _step_record(transfer):
    now = utcnow()
    device = _device(transfer)
    seller = User.get_or_none(User.id == transfer.seller_id)
    buyer = User.get_by_id(transfer.buyer_id)
    old_name = _display(device)
    with db.atomic():
        moved = (
            Device.update(
                owner=buyer.id,
                name=None,
                claimed_at=now,
                claim_state=None,
                claim_state_at=None,
                claim_error=None,
            )
            .where(
                (Device.device_id == device.device_id)
                & (Device.claim_state == TRANSFERRING)
                & ((Device.owner == transfer.seller_id) if transfer.seller_id else Device.owner.is_null())
            )
            .execute()
        )
        if not moved:
            raise RuntimeError("the device row is no longer the seller's transferring row")
        Transfer.update(state="done", open_device=None, finished_at=now).where(
            Transfer.id == transfer.id
        ).execute()
        if seller is not None:
            audit.record(
                "device.transferred_out", user=seller, actor=seller, device_id=device.device_id, name=old_name
            )
        audit.record(
            "device.transferred_in",
            user=buyer,
            actor=buyer,
            device_id=device.device_id,
            name=device_label(device),
        )
    # The buyer starts clean: no name, no values read for the seller.
    live_values.forget(device.device_id)
    # A move support decided tells both sides that support's decision is now carried out.
    return "mail_given_buyer" if transfer.dispute_outcome == "requester" else "mail_done_buyer"


def _step_return_release(transfer):
    try:
        get_client().remove_device_owner(transfer.device_id)
    except NotFound:
        pass
    except TRANSIENT:
        raise
    except ParticleError as exc:
        log.error("Transfer %s: unclaim before returning refused: %s", transfer.id, exc)
    return "return_claim"


def _step_return_claim(transfer):
    seller = User.get_or_none(User.id == transfer.seller_id)
    if seller is None or not seller.particle_customer_id:
        return "return_record"  # nobody to give it back to on Particle
    try:
        get_client().claim_device(seller.particle_customer_id, transfer.device_id)
    except TRANSIENT:
        raise
    except ParticleError as exc:
        # Neither side can have it on Particle: staff must look. Keep retrying slowly.
        _alert(transfer, f"giving the device back failed: {type(exc).__name__}")
        raise steps.Retry(f"return claim refused: {type(exc).__name__}", wait=steps.BACKOFF_MAX_SECONDS)
    return "return_record"


def _step_return_record(transfer):
    now = utcnow()
    with db.atomic():
        if transfer.seller_id:
            Device.update(claim_state=None, claim_state_at=None, claim_error=transfer.last_error).where(
                (Device.device_id == transfer.device_id) & (Device.claim_state == TRANSFERRING)
            ).execute()
        else:
            Device.update(
                owner=None, claim_state=None, claim_state_at=None, claim_error=transfer.last_error
            ).where((Device.device_id == transfer.device_id) & (Device.claim_state == TRANSFERRING)).execute()
        Transfer.update(state="failed_returned", open_device=None, finished_at=now).where(
            Transfer.id == transfer.id
        ).execute()
    for side in (transfer.seller_id, transfer.buyer_id):
        account = User.get_or_none(User.id == side) if side else None
        if account is not None:
            audit.record(
                "transfer.failed_returned",
                user=account,
                actor=None,
                device_id=transfer.device_id,
                name=_name(transfer),
            )
    _alert(transfer, transfer.last_error or "the move failed")
    return "mail_returned_seller"


def _alert(transfer, reason):
    """Tell staff (once per transfer): an audit event support lists, and an error log line."""
    marked = (
        Transfer.update(alerted_at=utcnow())
        .where((Transfer.id == transfer.id) & Transfer.alerted_at.is_null())
        .execute()
    )
    if marked:
        log.error("STAFF ALERT: transfer %s of device %s: %s", transfer.id, transfer.device_id, reason)
        audit.record(
            "staff.alert", user=None, device_id=transfer.device_id, transfer=transfer.id, reason=reason
        )


def _display(device):
    from selfserve.services import devices

    return devices.display_name(device)


# Emails: (recipient, subject, template). Each is its own step.
def _mail_context(transfer):
    device = _device(transfer)
    model = device_models.get(device.model)
    return {
        "transfer": transfer,
        "device": device,
        "device_label": device_label(device),
        "model_label": model.label if model else device.model,
        "expires_at": transfer.expires_at.strftime("%d %B %Y, %H:%M UTC"),
        "site_url": absolute_url("main.index"),
    }


def _seller_email(transfer):
    seller = User.get_or_none(User.id == transfer.seller_id)
    return seller.email if seller else None


def _buyer_email(transfer):
    buyer = User.get_or_none(User.id == transfer.buyer_id) if transfer.buyer_id else None
    return buyer.email if buyer else transfer.buyer_email


MAILS = {
    "mail_offer": (_buyer_email, "A device is being transferred to you", "transfer_offer", None),
    "mail_request": (_seller_email, "Someone asked for your device", "transfer_request", None),
    "mail_done_buyer": (
        _buyer_email,
        "The device is now in your account",
        "transfer_done_buyer",
        "mail_done_seller",
    ),
    "mail_done_seller": (_seller_email, "Your device was transferred", "transfer_done_seller", None),
    "mail_declined": (_seller_email, "Your transfer offer was declined", "transfer_declined", None),
    "mail_cancelled": (None, "A device transfer was cancelled", "transfer_cancelled", None),
    "mail_objected": (_buyer_email, "Your request for a device was refused", "transfer_objected", None),
    "mail_expired": (_seller_email, "Your transfer offer expired", "transfer_expired", None),
    "mail_returned_seller": (
        _seller_email,
        "Your device could not be transferred",
        "transfer_returned_seller",
        "mail_returned_buyer",
    ),
    "mail_returned_buyer": (
        _buyer_email,
        "The device could not be transferred to you",
        "transfer_returned_buyer",
        None,
    ),
    "mail_given_buyer": (
        _buyer_email,
        "Support decided: the device is now in your account",
        "transfer_dispute_given_buyer",
        "mail_given_seller",
    ),
    "mail_given_seller": (
        _seller_email,
        "Support decided: your device was transferred",
        "transfer_dispute_given_seller",
        None,
    ),
    "mail_kept_buyer": (
        _buyer_email,
        "Support decided: the device stays with its owner",
        "transfer_dispute_kept_buyer",
        "mail_kept_seller",
    ),
    "mail_kept_seller": (
        _seller_email,
        "Support decided: your device stays in your account",
        "transfer_dispute_kept_seller",
        None,
    ),
}


def _step_mail(transfer, step):
    recipient, subject, template, next_step = MAILS[step]
    if step == "mail_cancelled":
        # The other side hears about it: the buyer of an offer, the owner asked by a request.
        recipient = _buyer_email if transfer.kind == "offer" else _seller_email
    to = recipient(transfer)
    if not to:
        return next_step
    context = _mail_context(transfer)
    if step == "mail_offer":
        context["link"] = offer_link(transfer)
    elif step == "mail_request":
        context["approve_link"] = answer_link(transfer, "approve")
        context["object_link"] = answer_link(transfer, "object")
    sent = steps.send_mail(
        to,
        subject,
        template,
        context,
        transfer.attempts,
        _setting("TRANSFER_MAIL_MAX_ATTEMPTS", MAIL_MAX_ATTEMPTS),
        f"Transfer {transfer.id}",
    )
    if sent and step == "mail_offer":
        Transfer.update(offer_mailed_at=utcnow()).where(Transfer.id == transfer.id).execute()
    return next_step


STEPS = {
    "release": _step_release,
    "claim": _step_claim,
    "reset_name": _step_reset_name,
    "record": _step_record,
    "return_release": _step_return_release,
    "return_claim": _step_return_claim,
    "return_record": _step_return_record,
}


def run_step(transfer):
    """Run the transfer's current step once; return the next step (None: finished). Raises
    steps.Retry or a Particle error for a transient failure."""
    if transfer.step in STEPS:
        return STEPS[transfer.step](transfer)
    if transfer.step in MAILS:
        return _step_mail(transfer, transfer.step)
    raise RuntimeError(f"unknown transfer step {transfer.step!r}")


# --- the runner -------------------------------------------------------------------------------


def _due(now):
    return (
        Transfer.step.is_null(False)
        & (Transfer.next_attempt_at.is_null() | (Transfer.next_attempt_at <= now))
        & (Transfer.lease_until.is_null() | (Transfer.lease_until <= now))
    )


def take(transfer_id, now=None):
    """Take a transfer's next step for this worker. True for exactly one taker."""
    now = now or utcnow()
    return (
        Transfer.update(lease_until=steps.lease_until(now))
        .where((Transfer.id == transfer_id) & _due(now))
        .execute()
        == 1
    )


def _run(transfer_id, holding_lease=True):
    """Run steps of a transfer this worker holds the lease of, until none is left or one must
    wait. Returns the transfer as it is afterwards."""
    if not holding_lease and not take(transfer_id):
        return Transfer.get_by_id(transfer_id)
    quick_retries = list(current_app.config.get("TRANSFER_QUICK_RETRY_SECONDS", (0.2, 0.5)))
    while True:
        transfer = Transfer.get_by_id(transfer_id)
        step = transfer.step
        if step is None:
            break
        try:
            next_step = run_step(transfer)
        except (steps.Retry, *TRANSIENT) as exc:
            wait = getattr(exc, "retry_after", None) or getattr(exc, "wait", None)
            if isinstance(exc, TRANSIENT) and quick_retries and (wait is None or wait <= 1):
                # A blip: the person is waiting on the page, so try again right away, briefly.
                time.sleep(quick_retries.pop(0))
                continue
            _postpone(transfer, step, exc, wait)
            return Transfer.get_by_id(transfer_id)
        except Exception as exc:  # noqa: BLE001 - an unexpected bug must not stop the others
            log.exception("Transfer %s: step %s failed unexpectedly", transfer_id, step)
            _postpone(transfer, step, exc, None)
            return Transfer.get_by_id(transfer_id)
        # On the way back, last_error keeps why the move failed (staff and the emails read it).
        keep_reason = transfer.state in ("returning", "failed_returned") or Transfer.select(
            Transfer.state
        ).where(Transfer.id == transfer_id).scalar() in ("returning", "failed_returned")
        Transfer.update(
            step=next_step,
            attempts=0,
            next_attempt_at=None,
            last_error=Transfer.last_error if keep_reason else None,
        ).where((Transfer.id == transfer_id) & (Transfer.step == step)).execute()
    Transfer.update(lease_until=None).where(Transfer.id == transfer_id).execute()
    return Transfer.get_by_id(transfer_id)


def _postpone(transfer, step, exc, wait):
    attempts = transfer.attempts + 1
    delay = max(steps.backoff_seconds(attempts), float(wait or 0))
    message = str(exc)[:500]
    Transfer.update(
        attempts=Transfer.attempts + 1,
        next_attempt_at=utcnow() + datetime.timedelta(seconds=delay),
        lease_until=None,
        last_error=message,
    ).where((Transfer.id == transfer.id) & (Transfer.step == step)).execute()
    log.warning(
        "Transfer %s: step %s postponed %.0f s (attempt %d): %s", transfer.id, step, delay, attempts, message
    )


def resume_pending(now=None, limit=50):
    """The sweep: expire lapsed offers, start unopposed requests, and run every due step
    (crashed, postponed or new). Safe with several workers. Returns counts."""
    now = now or utcnow()
    counts = {"expired": expire_lapsed(now), "started": complete_unopposed(now), "ran": 0}
    due = [row.id for row in Transfer.select(Transfer.id).where(_due(now)).order_by(Transfer.id).limit(limit)]
    for transfer_id in due:
        if take(transfer_id, now):
            _run(transfer_id)
            counts["ran"] += 1
    return counts


sweep.register(resume_pending)
