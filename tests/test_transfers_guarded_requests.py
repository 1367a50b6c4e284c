"""Issue 9, finding 2: a former owner could take a device back. The setup code on the label
never changes, so a seller who handed the device over re-entered it, asked for it, and the
request completed by itself after 7 days without objection. A request from someone who owned
the device before, or for a device that changed hands recently, never completes on silence:
the current owner approves it, or support decides; both are told so."""

import datetime

from helpers import make_user
from test_transfers_services import WINDOW
from test_transfers_services import _prove
from test_transfers_services import assert_buyer_owns
from test_transfers_services import assert_seller_owns
from test_transfers_services import buyer  # noqa: F401 (fixture)
from test_transfers_services import owned  # noqa: F401 (fixture)
from test_transfers_services import seller  # noqa: F401 (fixture)

from selfserve.models import Device
from selfserve.models import Transfer
from selfserve.models import utcnow
from selfserve.services import staff
from selfserve.services import transfers


def _long_ago():
    Device.update(claimed_at=utcnow() - datetime.timedelta(days=365)).where(
        Device.device_id == WINDOW
    ).execute()


def _mail(mailbox, address, subject):
    """The body of the mail to `address` with this subject (waiting for it a little)."""
    import time

    for _ in range(100):
        found = [m for m in mailbox.to(address) if subject in m["Subject"]]
        if found:
            return mailbox.body(found[-1])
        time.sleep(0.05)
    raise AssertionError(f"no mail {subject!r} to {address}: {[m['Subject'] for m in mailbox.to(address)]}")


def _deadline_passes():
    Transfer.update(expires_at=utcnow() - datetime.timedelta(seconds=1)).where(
        Transfer.state == "requested"
    ).execute()
    return transfers.resume_pending()


def _hand_over(seller, buyer):  # noqa: F811
    offer = transfers.offer(seller, Device.get_by_id(WINDOW), buyer.email)
    assert transfers.accept(buyer, Transfer.get_by_id(offer.id)).state == "done"


def test_a_former_owner_cannot_take_the_device_back_on_silence(owned, seller, buyer, labels, sim, mailbox):  # noqa: F811
    """The reported attack: sell, keep the label, ask for it back, wait."""
    _hand_over(seller, buyer)
    _long_ago()  # even long after the sale: the request is the former owner's
    proof = _prove(seller, labels)
    request = transfers.request_device(seller, proof)
    assert transfers.needs_owner_answer(request)
    assert "will NOT move without your answer" in _mail(mailbox, buyer.email, "Someone asked for your device")

    counts = _deadline_passes()
    assert counts["started"] == 0
    assert Transfer.get_by_id(request.id).state == "unanswered"
    assert_buyer_owns(WINDOW, buyer, sim)  # in our database and on Particle
    assert "Support will decide" in _mail(mailbox, seller.email, "Your request for a device goes to support")
    assert "still yours" in _mail(mailbox, buyer.email, "A request for your device goes to support")
    # Support decides, as for an objection.
    from selfserve.services.transfers import disputes

    assert request.id in [t.id for t in _needing_staff()]
    desk = staff.create_staff("desk@support.example", "a long staff password")
    kept = disputes.decide_dispute(desk, Transfer.get_by_id(request.id), "owner", "ticket 12: sold it")
    assert kept.state == "kept"
    assert_buyer_owns(WINDOW, buyer, sim)


def _needing_staff():
    from selfserve.services import support

    return support.transfers_needing_staff()


def test_a_device_that_changed_hands_recently_moves_only_if_the_owner_agrees(
    owned,  # noqa: F811
    seller,  # noqa: F811
    buyer,  # noqa: F811
    labels,  # noqa: F811
    sim,
    mailbox,
):
    stranger = make_user("stranger@example.com")
    request = transfers.request_device(stranger, _prove(stranger, labels))
    assert transfers.needs_owner_answer(request)  # the seller claimed it moments ago
    assert _deadline_passes()["started"] == 0
    assert Transfer.get_by_id(request.id).state == "unanswered"
    assert_seller_owns(WINDOW, seller, sim)


def test_the_owner_can_still_agree(owned, seller, buyer, labels, sim, mailbox):  # noqa: F811
    request = transfers.request_device(buyer, _prove(buyer, labels))
    assert transfers.needs_owner_answer(request)
    moved = transfers.approve(seller, Transfer.get_by_id(request.id))
    assert moved.state == "done"
    assert_buyer_owns(WINDOW, buyer, sim)


def test_the_window_is_a_setting(app, owned, seller, buyer, labels, sim, mailbox):  # noqa: F811
    app.config["TRANSFER_RECENT_OWNER_CHANGE_DAYS"] = 0
    request = transfers.request_device(buyer, _prove(buyer, labels))
    assert not transfers.needs_owner_answer(request)
    assert _deadline_passes()["started"] == 1
    assert_buyer_owns(WINDOW, buyer, sim)
