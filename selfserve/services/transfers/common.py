"""What the sections of a transfer share: states, the refusal, lookups and small helpers."""

import dataclasses
import logging

from flask import current_app

from selfserve import i18n
from selfserve.device_models import device_label
from selfserve.i18n import lazy_text as _l
from selfserve.models import Device
from selfserve.models import Transfer
from selfserve.refusals import Refusal
from selfserve.services import provisioning

log = logging.getLogger(__name__)

OFFER_DAYS = 7
OBJECTION_DAYS = 7
# A request for a device that changed hands less than this long before it was asked for never
# completes on silence (setting TRANSFER_RECENT_OWNER_CHANGE_DAYS).
RECENT_OWNER_CHANGE_DAYS = 30
PROOF_MINUTES = 15
REQUESTS_PER_DAY = 3  # per account: asking for other people's devices is rare

TRANSFERRING = "transferring"  # Device.claim_state while a move runs (owned by this module)
OPEN_STATES = ("offered", "requested", "moving", "returning")
CLOSED_STATES = (
    "done",
    "failed_returned",
    "declined",
    "cancelled",
    "objected",
    "unanswered",
    "expired",
    "kept",
)
# Requests support decides: the owner objected, or a request that needed the owner's answer
# got none by its deadline.
DISPUTED_STATES = ("objected", "unanswered")

STATE_LABELS = {
    "offered": _l("Offered, waiting for the new owner"),
    "requested": _l("Requested, waiting for the owner's answer"),
    "moving": _l("Moving to the new owner"),
    "returning": _l("Going back to the previous owner"),
    "done": _l("Transferred"),
    "failed_returned": _l("Could not be moved; back with the previous owner"),
    "declined": _l("Declined"),
    "cancelled": _l("Cancelled"),
    "objected": _l("Objected to by the owner"),
    "unanswered": _l("No answer from the owner: support decides"),
    "expired": _l("Expired"),
    "kept": _l("Kept by the owner (decided by support)"),
}


class TransferError(Refusal):
    """A refusal to show (see refusals.Refusal); `transfer` is the transfer it concerns."""

    def __init__(self, message, kind="error", status=400, field=None, transfer=None):
        super().__init__(message, kind=kind, field=field, status=status)
        self.transfer = transfer


# --- small helpers ----------------------------------------------------------------------------


def _setting(key, default):
    return type(default)(current_app.config.get(key, default))


def label(transfer):
    return STATE_LABELS.get(transfer.state, transfer.state)


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


def owner_transfers_of(devices):
    """{device_id: the open transfer its owner is party to} for the devices that have one, with
    one query (the dashboard's cards)."""
    ids = [device.device_id for device in devices]
    if not ids:
        return {}
    open_by_device = {
        transfer.open_device: transfer for transfer in Transfer.select().where(Transfer.open_device.in_(ids))
    }
    return {
        device.device_id: transfer
        for device in devices
        if (transfer := owner_party_to(device, open_by_device.get(device.device_id))) is not None
    }


def needs_owner_answer(transfer):
    """True for a request that must never complete on silence: the person asking owned the
    device before (a seller keeps the label, whose setup code never changes), or the device
    changed hands within TRANSFER_RECENT_OWNER_CHANGE_DAYS before it was asked for (a sale
    just made). The current owner approves it; without an answer by the deadline support
    decides, as for an objection."""
    import datetime

    from selfserve.models import User
    from selfserve.services import devices

    if transfer.kind != "request" or transfer.buyer_id is None:
        return False
    buyer = User.get_or_none(User.id == transfer.buyer_id)
    if buyer is not None and devices.former_ownership(buyer, transfer.device_id) is not None:
        return True
    device = Device.get_or_none(Device.device_id == transfer.device_id)
    window = datetime.timedelta(days=_setting("TRANSFER_RECENT_OWNER_CHANGE_DAYS", RECENT_OWNER_CHANGE_DAYS))
    return bool(device and device.claimed_at and device.claimed_at > transfer.created_at - window)


def open_transfer_for_owner(device):
    """The device's open transfer if its current owner is a party to it (the device page and
    the transfer form show nothing else: never an offer someone else made), else None."""
    return owner_party_to(device, open_transfer_of(device))


def owner_party_to(device, transfer):
    """`transfer` (the device's open one, or None) if the device's current owner is a party to
    it, else None (shared by the device page and the dashboard's one-query read)."""
    if transfer is None or device.owner_id is None:
        return None
    if device.owner_id not in (transfer.seller_id, transfer.buyer_id):
        return None
    return transfer


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


def _check_buyer_ready(user):
    if not user.is_verified:
        raise TransferError(_l("Please verify your email address first."), kind="not_ready", status=409)
    if user.provisioning_state != provisioning.READY or not user.particle_customer_id:
        raise TransferError(
            _l(
                "Your account is still being set up with the device cloud. This usually takes less than a "
                "minute; please try again shortly."
            ),
            kind="not_ready",
            status=409,
        )


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
        return _l("This transfer has expired.")
    if current.state in ("moving", "returning", "done", "failed_returned"):
        return _l("This transfer was already accepted.")
    return _l("This transfer was already %(label)s.", label=i18n.in_sentence(label(current)))


def _device(transfer):
    return Device.get_by_id(transfer.device_id)


def _display(device):
    from selfserve.services import devices

    return devices.display_name(device)
