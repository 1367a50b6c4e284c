"""Disputes: support decides a request its owner objected to."""

import logging

import peewee

from selfserve import i18n
from selfserve.i18n import lazy_text as _l
from selfserve.models import Device
from selfserve.models import Transfer
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.services import audit
from selfserve.services import impersonation
from selfserve.services import provisioning
from selfserve.services import steps
from selfserve.services.transfers.common import DISPUTED_STATES
from selfserve.services.transfers.common import TRANSFERRING
from selfserve.services.transfers.common import TransferError
from selfserve.services.transfers.common import _fresh
from selfserve.services.transfers.common import _name
from selfserve.services.transfers.common import label
from selfserve.services.transfers.move import _run

log = logging.getLogger(__name__)


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
        raise TransferError(_l("Only support staff decide disputed transfers."), kind="forbidden", status=403)
    try:
        reason = impersonation.check_reason(reason)
    except impersonation.ViewRefused as exc:
        raise TransferError(exc.message, kind="invalid", field="reason", status=422) from None
    if outcome not in DISPUTE_OUTCOMES:
        raise TransferError(
            _l("Choose who gets the device: the person who asked, or its current owner."),
            kind="invalid",
            field="outcome",
            status=422,
        )
    transfer = _fresh(transfer)
    if transfer.kind != "request" or transfer.state not in DISPUTED_STATES:
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
            _l("The account that asked for this device no longer exists. Keep the device with its owner."),
            kind="gone",
            status=409,
        )
    if buyer.provisioning_state != provisioning.READY or not buyer.particle_customer_id:
        raise TransferError(
            _l(
                "The requester's account is not set up with the device cloud yet, so the device can't "
                "be moved to it. Retry their setup first."
            ),
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
            _l(
                "This device has another transfer open now. Nothing was changed; that one must finish "
                "or be cancelled first."
            ),
            kind="open",
            status=409,
        ) from None
    return _run(transfer.id, holding_lease=True)


def _undecided(transfer, now):
    """Still objected and no worker busy with it (one may still be sending the objection
    email: the decision's emails replace it)."""
    return (
        (Transfer.id == transfer.id)
        & Transfer.state.in_(DISPUTED_STATES)
        & (Transfer.lease_until.is_null() | (Transfer.lease_until <= now))
    )


def _not_disputed_message(transfer):
    current = _fresh(transfer)
    if current.dispute_outcome:
        return _l(
            "Support already decided this request: %(decision)s.",
            decision=_decision_text(current.dispute_outcome, 0, current),
        )
    if current.state in DISPUTED_STATES:
        return _l("Someone is working on this transfer right now. Try again in a minute.")
    return _l(
        "Only a request its owner objected to can be decided. This transfer is: %(label)s.",
        label=i18n.in_sentence(label(current)),
    )


def _device_not_movable(transfer):
    device = Device.get_by_id(transfer.device_id)
    if device.owner_id != transfer.seller_id:
        return TransferError(
            _l(
                "The device is no longer in the owner's account, so there is nothing to move. Nothing "
                "was changed; keep it with the owner to close the dispute."
            ),
            kind="gone",
            status=409,
        )
    return TransferError(
        _l("This device is busy with another operation right now. Try again in a minute."),
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
