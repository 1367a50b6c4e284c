"""Issue 9, finding 4: an open offer survived a release, and the next owner's device page
showed "Offered to <a stranger's email>". A release closes the transfer waiting on the device
(the other side is told); a device page shows only transfers its current owner is party to."""

from helpers import csrf_token
from helpers import login
from helpers import make_user
from helpers import seed_registry

from selfserve.models import Device
from selfserve.models import Transfer
from selfserve.models import utcnow
from selfserve.services import devices
from selfserve.services import transfers

PASSWORD = "correct horse battery"
WINDOW = "e00fce68a1b2c3d4e5f60701"
STRANGER = "stranger.buyer@example.com"


def _labels():
    return {device["id"]: device for device in seed_registry()}


def _claim(user, label):
    return devices.claim(user, label["serial_number"], label["setup_code"])


def test_a_release_closes_an_open_offer_and_the_next_owner_never_sees_it(app, sim, mailbox):
    label = _labels()[WINDOW]
    seller = make_user("seller@example.com", PASSWORD)
    offer = transfers.offer(seller, _claim(seller, label), STRANGER)
    mailbox.wait_for(STRANGER)
    devices.release(seller, Device.get_by_id(WINDOW))

    closed = Transfer.get_by_id(offer.id)
    assert closed.state == "cancelled" and closed.open_device is None
    told = mailbox.wait_for(STRANGER, count=2)
    assert "released" in mailbox.body(told)

    next_owner = make_user("next@example.com", PASSWORD)
    _claim(next_owner, label)
    client = app.test_client()
    login(client, next_owner.email, PASSWORD)
    page = client.get(f"/devices/{WINDOW}").get_data(as_text=True)
    assert STRANGER not in page and "Offered to" not in page
    # The next owner can offer it themselves (the old offer no longer holds the device).
    assert transfers.offer(next_owner, Device.get_by_id(WINDOW), "friend@example.com").state == "offered"


def test_a_release_closes_a_request_and_tells_the_person_who_asked(app, sim, mailbox):
    label = _labels()[WINDOW]
    owner = make_user("owner@example.com", PASSWORD)
    _claim(owner, label)
    asker = make_user("asker@example.com", PASSWORD)
    proof = transfers.remember_possession(asker, Device.get_by_id(WINDOW))
    request = transfers.request_device(asker, proof)
    devices.release(owner, Device.get_by_id(WINDOW))
    assert Transfer.get_by_id(request.id).state == "cancelled"
    body = mailbox.body(mailbox.wait_for(asker.email))
    assert "released" in body and "you asked for" in body
    # Nothing left to complete on silence.
    assert transfers.complete_unopposed(utcnow().replace(year=utcnow().year + 1)) == 0
    assert Device.get_by_id(WINDOW).owner_id is None


def test_the_device_page_shows_only_transfers_its_owner_is_party_to(app, sim, mailbox):
    """Even a transfer row left open by some other path (an old database, a bug elsewhere) is
    not shown to an owner who is neither its seller nor its buyer."""
    label = _labels()[WINDOW]
    earlier = make_user("earlier@example.com", PASSWORD)
    owner = make_user("owner@example.com", PASSWORD)
    device = _claim(owner, label)
    Transfer.create(
        device=WINDOW,
        kind="offer",
        state="offered",
        open_device=WINDOW,
        seller=earlier.id,
        buyer_email=STRANGER,
        created_at=utcnow(),
        expires_at=utcnow().replace(year=utcnow().year + 1),
    )
    assert transfers.open_transfer_for_owner(Device.get_by_id(WINDOW)) is None
    client = app.test_client()
    login(client, owner.email, PASSWORD)
    assert STRANGER not in client.get(f"/devices/{WINDOW}").get_data(as_text=True)
    assert STRANGER not in client.get(f"/devices/{WINDOW}/transfer").get_data(as_text=True)
    assert STRANGER not in client.get("/devices").get_data(as_text=True)
    assert csrf_token(client, "/devices")
    assert device.owner_id == owner.id
