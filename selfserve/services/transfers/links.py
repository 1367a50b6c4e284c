"""The signed links in transfer emails: the buyer's offer link, the owner's approve/object links."""

import logging

from selfserve import tokens
from selfserve.i18n import lazy_text as _l
from selfserve.models import utcnow
from selfserve.services.accounts import absolute_url
from selfserve.services.transfers.common import get

log = logging.getLogger(__name__)


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
        raise tokens.TokenExpired(_l("This offer has expired. Ask the seller to send a new one."))
    return transfer


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
