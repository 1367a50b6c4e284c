"""Requests: someone who proved they hold a device asks its recorded owner for it; the owner
approves or objects, and without an objection the device moves after OBJECTION_DAYS."""

import datetime
import hashlib
import logging
import secrets

import peewee

from selfserve.i18n import lazy_text as _l
from selfserve.models import Device
from selfserve.models import PossessionProof
from selfserve.models import Transfer
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.services import audit
from selfserve.services import steps
from selfserve.services.transfers.common import OBJECTION_DAYS
from selfserve.services.transfers.common import PROOF_MINUTES
from selfserve.services.transfers.common import REQUESTS_PER_DAY
from selfserve.services.transfers.common import TransferError
from selfserve.services.transfers.common import _check_buyer_ready
from selfserve.services.transfers.common import _close
from selfserve.services.transfers.common import _name
from selfserve.services.transfers.common import _setting
from selfserve.services.transfers.common import device_label
from selfserve.services.transfers.common import needs_owner_answer
from selfserve.services.transfers.common import open_transfer_of
from selfserve.services.transfers.common import too_late_message
from selfserve.services.transfers.move import _run
from selfserve.services.transfers.move import _start_move

log = logging.getLogger(__name__)


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
            _l("Please enter the serial number and setup code again, then ask the owner."),
            kind="proof",
            status=422,
        )
    device = Device.get_by_id(proof.device_id)
    if device.owner_id is None:
        raise TransferError(
            _l("This device is free now: add it with its serial number and setup code."),
            kind="free",
            status=409,
        )
    if device.owner_id == user.id:
        raise TransferError(_l("This device is already in your account."), kind="already_yours", status=409)
    since = now - datetime.timedelta(days=1)
    recent = (
        Transfer.select()
        .where((Transfer.kind == "request") & (Transfer.buyer == user.id) & (Transfer.created_at > since))
        .count()
    )
    if recent >= _setting("TRANSFER_REQUESTS_PER_DAY", REQUESTS_PER_DAY):
        raise TransferError(
            _l("You have asked for several devices today. Please contact support if you need more."),
            kind="too_many",
            status=429,
        )
    existing = open_transfer_of(device)
    if existing is not None:
        if existing.kind == "request" and existing.buyer_id == user.id:
            return existing  # a double submit
        raise TransferError(
            _l(
                "This device already has a transfer in progress. Please contact support with the serial number."
            ),
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
            _l(
                "This device already has a transfer in progress. Please contact support with the serial number."
            ),
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


def approve(owner, transfer, now=None, actor=None):
    """The recorded owner lets a request go through now (instead of waiting out the deadline)."""
    now = now or utcnow()
    if transfer.kind != "request" or owner is None or transfer.seller_id != owner.id:
        raise TransferError(
            _l("Only the device's owner can answer this request."), kind="forbidden", status=403
        )
    buyer = User.get_or_none(User.id == transfer.buyer_id)
    if buyer is None:
        raise TransferError(
            _l("The account that asked for this device no longer exists."), kind="gone", status=409
        )
    audit.record("transfer.owner_approved", user=owner, device_id=transfer.device_id, name=_name(transfer))
    return _start_move(transfer, "requested", buyer, now)


def object_to(owner, transfer, now=None):
    """The recorded owner objects: the request closes and the buyer is told to contact support
    (staff decide disputes)."""
    now = now or utcnow()
    if transfer.kind != "request" or owner is None or transfer.seller_id != owner.id:
        raise TransferError(
            _l("Only the device's owner can answer this request."), kind="forbidden", status=403
        )
    if not _close(transfer, "requested", "objected", "mail_objected", now):
        raise TransferError(too_late_message(transfer), kind="decided", status=409)
    audit.record("transfer.objected", user=owner, device_id=transfer.device_id, name=_name(transfer))
    return _run(transfer.id, holding_lease=False)


def complete_unopposed(now=None):
    """Requests whose objection time ran out without an objection start moving, except those
    that need the owner's answer (`needs_owner_answer`): they go to support ("unanswered").
    Returns how many started (a busy device is tried again at the next sweep)."""
    now = now or utcnow()
    due = Transfer.select(Transfer.id).where((Transfer.state == "requested") & (Transfer.expires_at <= now))
    started = 0
    for row in list(due):
        transfer = Transfer.get_by_id(row.id)
        buyer = User.get_or_none(User.id == transfer.buyer_id)
        if buyer is None:
            _close(transfer, "requested", "cancelled", None, now)
            continue
        if needs_owner_answer(transfer):
            # Silence is no answer here: support decides, and both sides are told.
            if _close(transfer, "requested", "unanswered", "mail_unanswered_buyer", now):
                audit.record(
                    "transfer.unanswered", user=buyer, device_id=transfer.device_id, name=_name(transfer)
                )
                _run(transfer.id, holding_lease=False)
            continue
        try:
            _start_move(transfer, "requested", buyer, now, take_lease=False)
        except TransferError as exc:
            log.info("Request %s not started: %s", transfer.id, exc.kind)
            continue
        started += 1
    return started
