"""Transfer pages over HTTP: the seller's offer with confirmation, the emailed link (GET shows,
POST acts), accept/decline/cancel, the buyer's request from the claim form (no setup code in
any HTML), the owner's approve/object links, access rules and rate limits."""

import datetime
import re

import pytest
from helpers import PASSWORD
from helpers import WINDOW
from helpers import csrf_token
from helpers import make_user
from helpers import signed_in

from selfserve.models import Device
from selfserve.models import Transfer
from selfserve.models import utcnow
from selfserve.services import devices
from selfserve.services import transfers


@pytest.fixture
def app_config(app_config):
    app_config["TRANSFER_QUICK_RETRY_SECONDS"] = ()
    return app_config


@pytest.fixture
def seller(app, sim):
    return make_user("seller@example.com", PASSWORD)


@pytest.fixture
def buyer(app, sim):
    return make_user("buyer@example.com", PASSWORD)


@pytest.fixture
def owned(labels, seller):
    label = labels[WINDOW]
    return devices.claim(seller, label["serial_number"], label["setup_code"])


def post(client, path, data=None, page=None):
    token = csrf_token(client, page or "/devices")
    return client.post(path, data={"csrf_token": token, **(data or {})})


def test_seller_offers_from_the_device_page_with_confirmation(app, owned, seller, sim, mailbox):
    client = signed_in(app, "seller@example.com")
    page = client.get(f"/devices/{WINDOW}").get_data(as_text=True)
    assert "Transfer to a new owner" in page
    form = client.get(f"/devices/{WINDOW}/transfer")
    assert form.status_code == 200 and "I understand" in form.get_data(as_text=True)

    missing = post(
        client,
        f"/devices/{WINDOW}/transfer",
        {"email": "buyer@example.com"},
        page=f"/devices/{WINDOW}/transfer",
    )
    assert missing.status_code == 422 and "Tick the box" in missing.get_data(as_text=True)
    assert Transfer.select().count() == 0
    bad = post(
        client,
        f"/devices/{WINDOW}/transfer",
        {"email": "nope", "confirmed": "yes"},
        page=f"/devices/{WINDOW}/transfer",
    )
    assert bad.status_code == 422 and 'aria-invalid="true"' in bad.get_data(as_text=True)

    sent = post(
        client,
        f"/devices/{WINDOW}/transfer",
        {"email": "buyer@example.com", "confirmed": "yes"},
        page=f"/devices/{WINDOW}/transfer",
    )
    assert sent.status_code == 302 and sent.headers["Location"].endswith(f"/devices/{WINDOW}")
    # A double submit makes one transfer.
    post(
        client,
        f"/devices/{WINDOW}/transfer",
        {"email": "buyer@example.com", "confirmed": "yes"},
        page=f"/devices/{WINDOW}/transfer",
    )
    assert Transfer.select().count() == 1
    page = client.get(f"/devices/{WINDOW}").get_data(as_text=True)
    assert "Offered to" in page and "buyer@example.com" in page and "Cancel the transfer" in page
    mailbox.wait_for("buyer@example.com")


def test_offer_link_get_changes_nothing_and_leads_to_accept(app, owned, seller, buyer, sim, mailbox):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    link = [u for u in mailbox.links(mailbox.wait_for("buyer@example.com")) if "/transfers/offer/" in u][0]
    path = link.replace("http://localhost", "")
    anonymous = app.test_client()
    shown = anonymous.get(path)
    assert shown.status_code == 200
    body = shown.get_data(as_text=True)
    assert "A device is offered to you" in body and "Sign in" in body
    assert Transfer.get_by_id(transfer.id).state == "offered"

    client = signed_in(app, "buyer@example.com")
    to_detail = client.get(path)
    assert to_detail.status_code == 302 and to_detail.headers["Location"].endswith(
        f"/transfers/{transfer.id}"
    )
    detail = client.get(f"/transfers/{transfer.id}").get_data(as_text=True)
    assert "Accept the device" in detail and "starts clean" in detail.replace(
        "It starts clean", "starts clean"
    )
    # The dashboard lists the incoming offer.
    assert "A device is offered to you" in client.get("/devices").get_data(as_text=True)

    accepted = post(client, f"/transfers/{transfer.id}/accept")
    assert accepted.status_code == 302 and accepted.headers["Location"].endswith(f"/devices/{WINDOW}")
    assert client.get(f"/devices/{WINDOW}").status_code == 200
    assert sim.device(WINDOW)["owner"] == buyer.particle_customer_id
    # The seller's page is gone; the used link says so.
    seller_client = signed_in(app, "seller@example.com")
    assert seller_client.get(f"/devices/{WINDOW}").status_code == 404
    used = anonymous.get(path)
    assert used.status_code == 410 and "already accepted" in used.get_data(as_text=True)


def test_others_cannot_see_or_act_on_a_transfer(app, owned, seller, buyer, sim):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    make_user("stranger@example.com", PASSWORD)
    stranger = signed_in(app, "stranger@example.com")
    assert stranger.get(f"/transfers/{transfer.id}").status_code == 404
    assert post(stranger, f"/transfers/{transfer.id}/accept").status_code == 404
    assert post(stranger, f"/transfers/{transfer.id}/cancel").status_code == 404
    assert stranger.get(f"/devices/{WINDOW}/transfer").status_code == 404
    # Signed out: sign in first; no state changes without CSRF.
    anonymous = app.test_client()
    assert anonymous.get(f"/transfers/{transfer.id}").status_code == 302
    client = signed_in(app, "buyer@example.com")
    assert client.post(f"/transfers/{transfer.id}/accept").status_code == 400
    assert Transfer.get_by_id(transfer.id).state == "offered"


def test_bad_and_expired_links_say_so(app, owned, seller, sim):
    client = app.test_client()
    bad = client.get("/transfers/offer/not-a-token")
    assert bad.status_code == 400 and "not valid" in bad.get_data(as_text=True)
    from selfserve import tokens

    transfer = transfers.offer(seller, owned, "buyer@example.com")
    old = tokens.make(
        "transfer_offer",
        {"t": transfer.id, "e": tokens.fingerprint("buyer@example.com")},
        issued_at=(utcnow() - datetime.timedelta(days=8)).replace(tzinfo=datetime.UTC).timestamp(),
    )
    expired = client.get(f"/transfers/offer/{old}")
    assert expired.status_code == 410 and "expired" in expired.get_data(as_text=True)


def test_seller_cancels_and_buyer_declines(app, owned, seller, buyer, sim):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    client = signed_in(app, "seller@example.com")
    assert post(client, f"/transfers/{transfer.id}/cancel").status_code == 302
    assert Transfer.get_by_id(transfer.id).state == "cancelled"
    assert "Transfer to a new owner" in client.get(f"/devices/{WINDOW}").get_data(as_text=True)

    second = transfers.offer(seller, Device.get_by_id(WINDOW), "buyer@example.com")
    buyer_client = signed_in(app, "buyer@example.com")
    assert post(buyer_client, f"/transfers/{second.id}/decline").status_code == 302
    assert Transfer.get_by_id(second.id).state == "declined"
    again = post(buyer_client, f"/transfers/{second.id}/accept")
    assert again.status_code == 409 and "already declined" in again.get_data(as_text=True)


def test_claim_of_someone_elses_device_offers_to_ask_without_echoing_the_code(
    app, owned, seller, buyer, labels, sim, mailbox
):
    label = labels[WINDOW]
    client = signed_in(app, "buyer@example.com")
    answer = post(
        client,
        "/devices/claim",
        {"serial": label["serial_number"], "setup_code": label["setup_code"]},
        page="/devices/claim",
    )
    body = answer.get_data(as_text=True)
    assert answer.status_code == 409
    assert "Ask the current owner for it" in body
    assert label["setup_code"] not in body
    proof = re.search(r'name="proof" value="([^"]+)"', body).group(1)
    assert label["setup_code"] not in proof

    asked = post(client, "/transfers/request", {"proof": proof}, page="/devices/claim")
    assert asked.status_code == 302
    transfer = Transfer.get()
    assert transfer.kind == "request" and transfer.state == "requested"
    detail = client.get(f"/transfers/{transfer.id}").get_data(as_text=True)
    assert "Withdraw my request" in detail
    # A wrong code never offers it.
    wrong = post(
        client,
        "/devices/claim",
        {"serial": label["serial_number"], "setup_code": "WRONG-123"},
        page="/devices/claim",
    )
    assert "Ask the current owner" not in wrong.get_data(as_text=True)

    # The owner sees it on the device page and in the email, and objects through the link.
    seller_client = signed_in(app, "seller@example.com")
    assert "asked for it" in seller_client.get(f"/devices/{WINDOW}").get_data(as_text=True)
    message = mailbox.wait_for("seller@example.com")
    object_url = [u for u in mailbox.links(message) if "/transfers/answer/" in u][1].replace(
        "http://localhost", ""
    )
    anonymous = app.test_client()
    page = anonymous.get(object_url)
    assert page.status_code == 200 and "Object" in page.get_data(as_text=True)
    assert Transfer.get_by_id(transfer.id).state == "requested"  # GET changed nothing
    done = anonymous.post(object_url, data={"csrf_token": csrf_token(anonymous, object_url)})
    assert done.status_code == 200 and "You objected" in done.get_data(as_text=True)
    assert Transfer.get_by_id(transfer.id).state == "objected"
    assert anonymous.get(object_url).status_code == 410  # single use
    assert "contact our support" in mailbox.body(mailbox.wait_for("buyer@example.com"))


def test_owner_approves_through_the_link(app, owned, seller, buyer, labels, sim, mailbox):
    label = labels[WINDOW]
    with pytest.raises(devices.DeviceError) as caught:
        devices.claim(buyer, label["serial_number"], label["setup_code"])
    transfer = transfers.request_device(buyer, transfers.remember_possession(buyer, caught.value.device))
    approve_url = [
        u for u in mailbox.links(mailbox.wait_for("seller@example.com")) if "/transfers/answer/" in u
    ][0]
    approve_url = approve_url.replace("http://localhost", "")
    anonymous = app.test_client()
    done = anonymous.post(approve_url, data={"csrf_token": csrf_token(anonymous, approve_url)})
    assert done.status_code == 200 and "transferred" in done.get_data(as_text=True)
    assert Transfer.get_by_id(transfer.id).state == "done"
    assert sim.device(WINDOW)["owner"] == buyer.particle_customer_id


def test_requests_are_rate_limited(app, owned, seller, buyer, sim):
    app.config["RATE_LIMIT_TRANSFER_REQUEST"] = "2 per hour"
    client = signed_in(app, "buyer@example.com")
    statuses = [
        post(client, "/transfers/request", {"proof": "x" * 32}, page="/devices/claim").status_code
        for _ in range(3)
    ]
    assert statuses[:2] == [302, 302] and statuses[2] == 429


def test_unverified_account_cannot_ask(app, owned, sim):
    make_user("unverified@example.com", PASSWORD, verified=False)
    client = signed_in(app, "unverified@example.com")
    answer = client.post(
        "/transfers/request", data={"proof": "x" * 32, "csrf_token": csrf_token(client, "/verify-email")}
    )
    assert answer.status_code == 302 and "/verify-email" in answer.headers["Location"]
    assert Transfer.select().count() == 0


def test_an_offer_past_its_date_says_expired(app, owned, seller, sim, mailbox):
    transfers.offer(seller, owned, "buyer@example.com")
    link = [u for u in mailbox.links(mailbox.wait_for("buyer@example.com")) if "/transfers/offer/" in u][0]
    Transfer.update(expires_at=utcnow() - datetime.timedelta(minutes=1)).execute()
    answer = app.test_client().get(link.replace("http://localhost", ""))
    assert answer.status_code == 410 and "This offer has expired" in answer.get_data(as_text=True)


def test_pages_during_the_move(app, owned, seller, buyer, sim):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    sim.add_fault("POST", "/v1/devices", count=1, status=503)
    transfers.accept(buyer, transfer)
    seller_client = signed_in(app, "seller@example.com")
    assert seller_client.get(f"/devices/{WINDOW}").status_code == 404
    assert "being transferred to its new owner" in seller_client.get("/devices").get_data(as_text=True)
    buyer_client = signed_in(app, "buyer@example.com")
    assert "Moving to the new owner" in buyer_client.get("/devices").get_data(as_text=True)
    assert "finishes by itself" in buyer_client.get(f"/transfers/{transfer.id}").get_data(as_text=True)


def test_transfer_links_are_redacted_from_access_logs():
    import logging

    from selfserve.tokens import RedactTokenPaths

    for path in ("/transfers/offer/eyJ0Ijox.abc-def_1", "/transfers/answer/eyJ0Ijox.abc-def_1"):
        record = logging.LogRecord(
            "werkzeug", logging.INFO, __file__, 1, '"GET %s HTTP/1.1" 200 -', (path,), None
        )
        RedactTokenPaths().filter(record)
        assert "eyJ0Ijox" not in record.getMessage() and "<redacted>" in record.getMessage()


def test_offer_page_sign_in_link_does_not_carry_the_token(app, owned, seller, buyer, sim, mailbox):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    link = [u for u in mailbox.links(mailbox.wait_for("buyer@example.com")) if "/transfers/offer/" in u][0]
    token = link.rsplit("/", 1)[1]
    client = app.test_client()
    body = client.get(f"/transfers/offer/{token}").get_data(as_text=True)
    assert body.count(token) == 0
    sign_in = re.search(r'href="(/login\?next=[^"]+)"', body).group(1)
    answer = client.post(
        sign_in.replace("&amp;", "&"),
        data={"email": "buyer@example.com", "password": PASSWORD, "csrf_token": csrf_token(client, "/login")},
    )
    assert answer.headers["Location"].endswith(f"/transfers/{transfer.id}")


def test_dashboard_card_shows_an_offer_and_a_request_for_the_device(
    app, owned, seller, buyer, labels, sim, mailbox
):
    seller_client = signed_in(app, "seller@example.com")
    transfers.offer(seller, owned, "buyer@example.com")
    card = seller_client.get("/devices").get_data(as_text=True)
    assert "Offered to <strong" in card and "buyer@example.com" in card
    transfer = Transfer.get()
    assert f'href="/transfers/{transfer.id}"' in card
    transfers.cancel(seller, transfer)

    label = labels[WINDOW]
    with pytest.raises(devices.DeviceError) as caught:
        devices.claim(buyer, label["serial_number"], label["setup_code"])
    request = transfers.request_device(buyer, transfers.remember_possession(buyer, caught.value.device))
    card = seller_client.get("/devices").get_data(as_text=True)
    assert "Someone asked for this device — respond by" in card
    # The date in the reader's locale (English: "Dec 7, 2026").
    assert f"{request.expires_at:%b} {request.expires_at.day}, {request.expires_at.year}" in card
    assert f'href="/transfers/{request.id}"' in card
    # The buyer sees nothing of it on their own (empty) device list.
    assert "Someone asked for this device" not in signed_in(app, "buyer@example.com").get(
        "/devices"
    ).get_data(as_text=True)


def test_former_owner_after_a_transfer_gets_a_friendly_404(app, owned, seller, buyer, sim):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    transfers.accept(buyer, transfer)
    assert Device.get_by_id(WINDOW).owner_id == buyer.id
    seller_client = signed_in(app, "seller@example.com")
    sim.reset_counters()
    response = seller_client.get(f"/devices/{WINDOW}")
    page = response.get_data(as_text=True)
    assert response.status_code == 404
    assert sim.counters()["total"] == 0
    assert "This device is no longer on your account (it was transferred to its new owner on" in page
    assert 'href="/devices"' in page
    assert "buyer@example.com" not in page


def test_create_an_account_from_an_offer_prefills_the_address_and_returns_to_it(
    app, owned, seller, sim, mailbox
):
    transfer = transfers.offer(seller, owned, "newbuyer@example.com")
    link = [u for u in mailbox.links(mailbox.wait_for("newbuyer@example.com")) if "/transfers/offer/" in u][0]
    visitor = app.test_client()
    offer = visitor.get(link.replace("http://localhost", "")).get_data(as_text=True)
    create = re.search(r'href="([^"]*/signup[^"]*)">Create an account', offer).group(1).replace("&amp;", "&")
    assert create == f"/signup?next=/transfers/{transfer.id}"  # the offer, not its token
    form = visitor.get(create).get_data(as_text=True)
    assert 'value="newbuyer@example.com"' in form  # pre-filled (from the session, not the URL)
    assert f'name="next" value="/transfers/{transfer.id}"' in form
    token = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    visitor.post(
        "/signup",
        data={
            "email": "newbuyer@example.com",
            "password": PASSWORD,
            "next": f"/transfers/{transfer.id}",
            "csrf_token": token,
        },
    )
    verify = [u for u in mailbox.links(mailbox.wait_for("newbuyer@example.com", count=2)) if "/verify/" in u]
    verify_path = verify[0].replace("http://localhost", "")
    page = visitor.get(verify_path).get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    verified = visitor.post(verify_path, data={"csrf_token": token})
    # Verified: sign in, and from there back to the offer.
    assert verified.status_code == 302
    assert verified.headers["Location"] == f"/login?next=/transfers/{transfer.id}"
