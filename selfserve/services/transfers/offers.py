"""Offers: the seller starts, the buyer accepts or declines, the seller may cancel; unanswered
offers expire."""

import datetime
import logging

import peewee

from selfserve.i18n import lazy_text as _l
from selfserve.models import Transfer
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.services import audit
from selfserve.services import steps
from selfserve.services.accounts import email_problem
from selfserve.services.accounts import normalize_email
from selfserve.services.transfers.common import OFFER_DAYS
from selfserve.services.transfers.common import TransferError
from selfserve.services.transfers.common import _check_buyer_ready
from selfserve.services.transfers.common import _close
from selfserve.services.transfers.common import _fresh
from selfserve.services.transfers.common import _name
from selfserve.services.transfers.common import open_transfer_of
from selfserve.services.transfers.common import role_of
from selfserve.services.transfers.common import too_late_message
from selfserve.services.transfers.move import _run
from selfserve.services.transfers.move import _start_move

log = logging.getLogger(__name__)


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
            _l("Tick the box to confirm you want to give this device away."),
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
            _l("That is your own email address. Enter the new owner's address."),
            kind="invalid",
            field="email",
            status=422,
        )
    existing = open_transfer_of(device)
    if existing is not None:
        return _existing_or_refuse(existing, seller, buyer_email)
    if device.owner_id != seller.id or device.claim_state is not None:
        raise TransferError(
            _l("This device is busy right now. Please try again in a minute."), kind="busy", status=409
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
            raise TransferError(
                _l("This device is busy right now. Please try again."), kind="busy", status=409
            )
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
            _l("Someone has asked for this device. Answer that request on this page first."),
            kind="open",
            status=409,
            transfer=existing,
        )
    raise TransferError(
        _l(
            "This device already has a pending transfer. Cancel it first to offer the device to someone else."
        ),
        kind="open",
        status=409,
        transfer=existing,
    )


def cancel(user, transfer, now=None):
    """The seller withdraws an offer, or the buyer withdraws a request (until it is decided)."""
    now = now or utcnow()
    role = role_of(user, transfer)
    allowed = (transfer.kind == "offer" and role == "seller") or (
        transfer.kind == "request" and role == "buyer"
    )
    if not allowed:
        raise TransferError(
            _l("Only the person who started this transfer can cancel it."), kind="forbidden", status=403
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
        raise TransferError(_l("This offer isn't addressed to your account."), kind="forbidden", status=403)
    if not _close(transfer, "offered", "declined", "mail_declined", now, buyer=user.id):
        raise TransferError(too_late_message(transfer), kind="decided", status=409)
    audit.record("transfer.declined", user=user, device_id=transfer.device_id, name=_name(transfer))
    return _run(transfer.id, holding_lease=False)


def accept(user, transfer, now=None):
    """The buyer accepts an offer: the device moves to their account (runs the steps now; a
    cloud outage leaves them to the sweep). Raises TransferError."""
    now = now or utcnow()
    if transfer.kind != "offer" or role_of(user, transfer) != "buyer":
        raise TransferError(_l("This offer isn't addressed to your account."), kind="forbidden", status=403)
    _check_buyer_ready(user)
    if transfer.state == "offered" and transfer.expires_at <= now:
        expire_lapsed(now)
        raise TransferError(
            _l("This offer has expired. Ask the seller to send a new one."), kind="expired", status=410
        )
    return _start_move(transfer, "offered", user, now)


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


# --- the device left its owner outside a transfer ---------------------------------------------


def close_on_release(device_id, now=None):
    """The device left its owner's account (released): the transfer waiting on it, an offer to
    someone or someone's request, ends as cancelled and the other side is told (the buyer of
    a mailed offer, the person who asked). The device's next owner never inherits it. Returns
    the closed transfer, or None."""
    now = now or utcnow()
    transfer = Transfer.get_or_none(Transfer.open_device == device_id)
    if transfer is None or transfer.state not in ("offered", "requested"):
        return None  # a move in progress keeps the device "transferring": no release then
    # The buyer hears of it (if the offer reached them at all).
    notify = "mail_released" if (transfer.kind == "request" or transfer.offer_mailed_at) else None
    if not _close(transfer, transfer.state, "cancelled", notify, now):
        return None  # answered at the same moment: that answer stands
    seller = User.get_or_none(User.id == transfer.seller_id)
    audit.record("transfer.cancelled", user=seller, device_id=transfer.device_id, name=_name(transfer))
    return _run(transfer.id, holding_lease=False) if notify else _fresh(transfer)
