"""The move: offered/requested -> moving, the recorded steps that carry a device from the seller's
Particle customer to the buyer's (or back), the emails, and the runner that takes and runs them."""

import functools
import logging

from selfserve import device_models
from selfserve.i18n import lazy_text as _l
from selfserve.models import Device
from selfserve.models import Transfer
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.particle import get_client
from selfserve.particle.errors import TRANSIENT
from selfserve.particle.errors import NotFound
from selfserve.particle.errors import ParticleError
from selfserve.particle.errors import uncertain
from selfserve.services import access
from selfserve.services import audit
from selfserve.services import live_values
from selfserve.services import steps
from selfserve.services.accounts import absolute_url
from selfserve.services.transfers.common import TRANSFERRING
from selfserve.services.transfers.common import TransferError
from selfserve.services.transfers.common import _close
from selfserve.services.transfers.common import _device
from selfserve.services.transfers.common import _display
from selfserve.services.transfers.common import _fresh
from selfserve.services.transfers.common import _name
from selfserve.services.transfers.common import device_label
from selfserve.services.transfers.common import needs_owner_answer
from selfserve.services.transfers.common import too_late_message
from selfserve.services.transfers.links import answer_link
from selfserve.services.transfers.links import offer_link

log = logging.getLogger(__name__)


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
                _l(
                    "The previous owner no longer has this device in their account, so it can't be "
                    "transferred. If you have it and its label, add it with its setup code."
                ),
                kind="gone",
                status=409,
            )
        raise TransferError(
            _l("This device is busy right now. Please try again in a minute."), kind="busy", status=409
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


# --- the steps --------------------------------------------------------------------------------


# A Particle write whose answer was lost may have happened (or happen later), and some answers
# are not confirmed (particle-cloud-api.md §15): each step reads the state back before it
# decides to go on, retry or give up. A read that fails makes the step try again later.


def _read_back(transfer, read):
    """The answer of a read-back, or None when it couldn't be read now."""
    try:
        return read()
    except ParticleError as exc:
        log.warning("Transfer %s: reading back the device's owner failed: %s", transfer.id, exc)
        return None


def _released(transfer):
    """Has the device no owner on Particle now (the seller's claim is gone)? None: unknown."""
    seller = User.get_or_none(User.id == transfer.seller_id) if transfer.seller_id else None
    previous = seller.particle_customer_id if seller else None
    return _read_back(
        transfer, lambda: get_client().device_is_free(transfer.device_id, previous_owner=previous)
    )


def _claimed_to(transfer, account):
    """Is the device claimed to `account`'s customer on Particle? None: unknown."""
    return _read_back(
        transfer, lambda: get_client().owns_device(account.particle_customer_id, transfer.device_id)
    )


def _step_release(transfer):
    try:
        get_client().remove_device_owner(transfer.device_id)
    except NotFound:
        # §15.3: what /owner answers for a device nobody owns is not confirmed: read it back.
        released = _released(transfer)
        if released is None:
            raise steps.Retry("the release answered 404 and the owner could not be read back")
        if not released:
            log.error("Transfer %s: the release answered 404 but the device still has an owner", transfer.id)
            raise steps.GiveUp("release answered 404 but the device still has an owner")
    except TRANSIENT as exc:
        if uncertain(exc) and _released(transfer):
            return "claim"  # the answer was lost, the release wasn't
        raise
    except ParticleError as exc:
        if _released(transfer):
            return "claim"
        # Refused: the seller's claim is still there. Give it back in the database.
        log.error("Transfer %s: release refused by Particle: %s", transfer.id, exc)
        raise steps.GiveUp(f"release refused: {type(exc).__name__}")
    return "claim"


def _step_claim(transfer):
    buyer = User.get_or_none(User.id == transfer.buyer_id)
    if buyer is None or not buyer.particle_customer_id:
        raise steps.GiveUp("the new owner's account is gone")
    device = _device(transfer)
    client = get_client()
    try:
        if not device.in_product:
            client.add_device_to_product(device.device_id)
            Device.update(in_product=True).where(Device.device_id == device.device_id).execute()
        client.claim_device(buyer.particle_customer_id, device.device_id)
    except TRANSIENT as exc:
        if uncertain(exc) and _claimed_to(transfer, buyer):
            return "reset_name"  # the claim landed; only its answer was lost
        raise
    except ParticleError as exc:
        # §15.4: what re-claiming a device the customer already owns answers is not confirmed
        # (after a lost answer the retry is such a re-claim): theirs is theirs.
        owned = _claimed_to(transfer, buyer)
        if owned:
            return "reset_name"
        if owned is None:
            raise steps.Retry(f"claim refused ({type(exc).__name__}) and the owner could not be read back")
        log.error("Transfer %s: the new owner's claim was refused: %s", transfer.id, exc)
        raise steps.GiveUp(f"claim refused: {type(exc).__name__}")
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
    """The hand-back path (a step gave up): the move failed for good, so give the device back
    to the seller (steps return_*)."""
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
        # The buyer starts clean: nobody keeps access given by the seller.
        access.end_all(
            device.device_id, "transferred", actor=seller, owner_id=transfer.seller_id, name=old_name, now=now
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
    except TRANSIENT as exc:
        if uncertain(exc) and _claimed_to(transfer, seller):
            return "return_record"
        raise
    except ParticleError as exc:
        if _claimed_to(transfer, seller):
            return "return_record"
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


# Emails: (recipient, subject, template). Each is its own step.
def _mail_context(transfer):
    device = _device(transfer)
    model = device_models.get(device.model)
    return {
        "transfer": transfer,
        "device": device,
        "device_label": device_label(device),
        "model_label": model.label if model else device.model,
        "expires_at": transfer.expires_at,  # the email shows it in its recipient's zone
        "site_url": absolute_url("main.index"),
        # A request that never completes on silence: both sides are told so.
        "needs_answer": needs_owner_answer(transfer),
    }


def _seller_email(transfer):
    seller = User.get_or_none(User.id == transfer.seller_id)
    return seller.email if seller else None


def _buyer_email(transfer):
    buyer = User.get_or_none(User.id == transfer.buyer_id) if transfer.buyer_id else None
    return buyer.email if buyer else transfer.buyer_email


MAILS = {
    "mail_offer": (_buyer_email, _l("A device is being transferred to you"), "transfer_offer", None),
    "mail_request": (_seller_email, _l("Someone asked for your device"), "transfer_request", None),
    "mail_done_buyer": (
        _buyer_email,
        _l("The device is now in your account"),
        "transfer_done_buyer",
        "mail_done_seller",
    ),
    "mail_done_seller": (_seller_email, _l("Your device was transferred"), "transfer_done_seller", None),
    "mail_declined": (_seller_email, _l("Your transfer offer was declined"), "transfer_declined", None),
    "mail_cancelled": (None, _l("A device transfer was cancelled"), "transfer_cancelled", None),
    "mail_unanswered_buyer": (
        _buyer_email,
        _l("Your request for a device goes to support"),
        "transfer_unanswered_buyer",
        "mail_unanswered_seller",
    ),
    "mail_unanswered_seller": (
        _seller_email,
        _l("A request for your device goes to support"),
        "transfer_unanswered_seller",
        None,
    ),
    "mail_released": (_buyer_email, _l("A device transfer was closed"), "transfer_released", None),
    "mail_objected": (_buyer_email, _l("Your request for a device was refused"), "transfer_objected", None),
    "mail_expired": (_seller_email, _l("Your transfer offer expired"), "transfer_expired", None),
    "mail_returned_seller": (
        _seller_email,
        _l("Your device could not be transferred"),
        "transfer_returned_seller",
        "mail_returned_buyer",
    ),
    "mail_returned_buyer": (
        _buyer_email,
        _l("The device could not be transferred to you"),
        "transfer_returned_buyer",
        None,
    ),
    "mail_given_buyer": (
        _buyer_email,
        _l("Support decided: the device is now in your account"),
        "transfer_dispute_given_buyer",
        "mail_given_seller",
    ),
    "mail_given_seller": (
        _seller_email,
        _l("Support decided: your device was transferred"),
        "transfer_dispute_given_seller",
        None,
    ),
    "mail_kept_buyer": (
        _buyer_email,
        _l("Support decided: the device stays with its owner"),
        "transfer_dispute_kept_buyer",
        "mail_kept_seller",
    ),
    "mail_kept_seller": (
        _seller_email,
        _l("Support decided: your device stays in your account"),
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
    steps.send_mail(
        to,
        subject,
        template,
        context,
        key=f"transfer:{transfer.id}:{step}",
        sensitive=step in ("mail_offer", "mail_request"),  # links that answer the transfer
    )
    if step == "mail_offer":
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
    # Each email is a step of its own (MAILS says to whom, what, and which step follows).
    **{name: functools.partial(_step_mail, step=name) for name in MAILS},
}


def run_step(transfer):
    """Run the transfer's current step once; return the next step (None: finished). Raises
    steps.Retry or a Particle error for a transient failure."""
    if transfer.step not in STEPS:
        raise RuntimeError(f"unknown transfer step {transfer.step!r}")
    return STEPS[transfer.step](transfer)


def _keeps_reason(transfer):
    """On the way back, last_error keeps why the move failed (staff and the emails read it)."""
    return transfer.state in ("returning", "failed_returned")


RUNNER = steps.Runner(
    "Transfer",
    Transfer,
    STEPS,
    on_give_up=_turn_back,
    keep_error=_keeps_reason,
    quick_retries=("TRANSFER_QUICK_RETRY_SECONDS", (0.2, 0.5)),
)


def _due(now):
    return RUNNER.due(now)


def take(transfer_id, now=None):
    """Take a transfer's next step for this worker. True for exactly one taker."""
    return RUNNER.take(transfer_id, now)


def _run(transfer_id, holding_lease=True):
    """Run steps of a transfer this worker holds the lease of, until none is left or one must
    wait. Returns the transfer as it is afterwards."""
    return RUNNER.run(transfer_id, holding_lease=holding_lease)
