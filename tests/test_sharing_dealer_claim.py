"""Dealers at claim time (issue 11): the registry names the dealer a device was sold through;
claiming it asks the homeowner what access that dealer gets (no access preselected, or the
role DEALER_ACCESS_AT_CLAIM configures), before the claim completes, without JavaScript and
from the label's QR link; the choice is an ordinary grant, audited and revocable."""

import io
import re

import pytest
from helpers import csrf_token
from helpers import login
from helpers import make_user
from helpers import seed_registry
from test_security_crawl import HTMX

from selfserve.models import AuditEvent
from selfserve.models import Device
from selfserve.models import Grant
from selfserve.services import access
from selfserve.services import organisations
from selfserve.services import registry

PASSWORD = "correct horse battery"
DEALT = "e00fce68a1b2c3d4e5f60704"  # the demo registry names "Demo Window Dealer" for it
PLAIN = "e00fce68a1b2c3d4e5f60701"  # no dealer


@pytest.fixture
def labels(app, sim):
    return {device["id"]: device for device in seed_registry()}


@pytest.fixture
def dealer(app, labels):
    boss = make_user("boss@dealer.example", PASSWORD, provisioned=False)
    organisation = organisations.create(boss, "Demo Window Dealer", kind="dealer")
    organisation.boss = boss
    return organisation


@pytest.fixture
def home(app, labels):
    user = make_user("home@example.com", PASSWORD)
    client = app.test_client()
    assert login(client, user.email, PASSWORD).status_code == 200
    client.user = user
    return client


def _label_form(client, device_id, labels, headers=None):
    token = csrf_token(client, "/devices/claim")
    label = labels[device_id]
    return client.post(
        "/devices/claim",
        data={"serial": label["serial_number"], "setup_code": label["setup_code"], "csrf_token": token},
        headers=headers or {},
    )


def _claim_token(page):
    return re.search(r'name="claim_token" value="([^"]+)"', page).group(1)


def _choose(client, claim_token, choice, serial=""):
    """The dealer step's form as the browser sends it (its hidden serial too)."""
    token = csrf_token(client, "/devices/claim")
    data = {"claim_token": claim_token, "dealer_access": choice, "csrf_token": token, "serial": serial}
    return client.post("/devices/claim", data=data)


def test_the_registry_names_the_dealer_and_a_reimport_updates_it(app, sim):
    rows = registry.read_csv(
        io.StringIO(
            "device_id,serial_number,setup_code,model,dealer\n"
            "e00fce68a1b2c3d4e5f60799,SSW-24A-000199,ABCD2345,window,  Blinds   & Co \n"
        )
    )
    [result] = registry.import_rows(rows, add_to_product=False)
    assert result.status == "added"
    assert Device.get_by_id("e00fce68a1b2c3d4e5f60799").sold_through == "Blinds & Co"
    rows[0]["dealer"] = ""
    [result] = registry.import_rows(rows, add_to_product=False)
    assert result.status == "updated" and "sold_through" in result.reason
    assert Device.get_by_id("e00fce68a1b2c3d4e5f60799").sold_through is None
    rows[0]["dealer"] = "x" * 101
    [result] = registry.import_rows(rows, add_to_product=False)
    assert result.status == "invalid" and "dealer" in result.reason


def test_without_javascript_the_homeowner_sees_the_dealer_before_the_claim_and_may_say_yes(
    app, home, dealer, labels, sim
):
    page = _label_form(home, DEALT, labels)
    text = page.get_data(as_text=True)
    assert page.status_code == 200
    assert "Demo Window Dealer" in text and "viewer" in text
    assert 'value="none" checked' in text
    assert labels[DEALT]["setup_code"] not in text  # the code is never sent back
    device = Device.get_by_id(DEALT)
    assert device.owner_id is None and sim.device(DEALT)["owner"] is None  # not claimed yet

    done = _choose(home, _claim_token(text), "viewer")
    assert done.status_code == 302 and done.headers["Location"].endswith(f"/devices/{DEALT}")
    assert Device.get_by_id(DEALT).owner_id == home.user.id
    grant = Grant.get(Grant.grantee_org == dealer.id)
    assert grant.device_id == DEALT and grant.role == "viewer" and grant.expires_at is None
    assert access.role_of(dealer.boss, Device.get_by_id(DEALT)) == "viewer"
    actions = [e.action for e in AuditEvent.select().where(AuditEvent.user == home.user.id)]
    assert "sharing.granted" in actions
    # Shown on the Sharing section, and revocable there like any grant.
    shown = home.get(f"/devices/{DEALT}").get_data(as_text=True)
    assert "organisation Demo Window Dealer" in shown
    token = csrf_token(home, f"/devices/{DEALT}")
    revoked = home.post(
        f"/devices/{DEALT}/sharing/grants/{grant.id}/revoke", data={"csrf_token": token, "confirmed": "yes"}
    )
    assert revoked.status_code == 302
    assert access.role_of(dealer.boss, Device.get_by_id(DEALT)) is None


def test_no_access_is_the_default_and_is_recorded(app, home, dealer, labels):
    page = _label_form(home, DEALT, labels).get_data(as_text=True)
    assert _choose(home, _claim_token(page), "none").status_code == 302
    assert Device.get_by_id(DEALT).owner_id == home.user.id
    assert Grant.select().where(Grant.grantee_org == dealer.id).count() == 0
    assert AuditEvent.get(AuditEvent.action == "sharing.dealer_declined").user_id == home.user.id


def test_a_choice_the_dealer_did_not_ask_for_or_a_foreign_token_claims_nothing(app, home, dealer, labels):
    page = _label_form(home, DEALT, labels).get_data(as_text=True)
    claim_token = _claim_token(page)
    refused = _choose(home, claim_token, "manager")
    assert refused.status_code == 422 and "Choose what access" in refused.get_data(as_text=True)
    assert Device.get_by_id(DEALT).owner_id is None
    # Someone else can't use this person's token (it names who proved the label).
    other = app.test_client()
    make_user("other@example.com", PASSWORD)
    login(other, "other@example.com", PASSWORD)
    stolen = _choose(other, claim_token, "none")
    assert stolen.status_code == 400 and Device.get_by_id(DEALT).owner_id is None
    assert _choose(home, "not-a-token", "none").status_code == 400
    assert Device.get_by_id(DEALT).owner_id is None


def test_the_qr_path_with_htmx_asks_the_same_question(app, home, dealer, labels):
    assert home.get("/claim").status_code == 200
    fragment = _label_form(home, DEALT, labels, headers=HTMX)
    text = fragment.get_data(as_text=True)
    assert fragment.status_code == 200
    assert 'id="claim-form"' in text and "Demo Window Dealer" in text
    token = csrf_token(home, "/devices/claim")
    done = home.post(
        "/devices/claim",
        data={"claim_token": _claim_token(text), "dealer_access": "viewer", "csrf_token": token},
        headers=HTMX,
    )
    assert done.headers.get("HX-Redirect", "").endswith(f"/devices/{DEALT}")
    assert Grant.select().where(Grant.grantee_org == dealer.id).count() == 1


def test_nothing_is_asked_without_a_dealer_or_when_the_company_asks_for_none(app, home, dealer, labels):
    assert _label_form(home, PLAIN, labels).status_code == 302  # no dealer named: claimed at once
    app.config["DEALER_ACCESS_AT_CLAIM"] = "none"
    assert _label_form(home, DEALT, labels).status_code == 302
    assert Device.get_by_id(DEALT).owner_id == home.user.id
    assert Grant.select().count() == 0


def test_a_dealer_the_site_does_not_know_asks_nothing(app, home, labels):
    assert _label_form(home, DEALT, labels).status_code == 302
    assert Device.get_by_id(DEALT).owner_id == home.user.id


def test_the_dealer_step_counts_against_its_own_serials_rate_limit(app, dealer, labels):
    """Each claim's two posts count for its serial; other people's dealer steps don't share
    one bucket (10 an hour for the whole site otherwise)."""
    app.config["RATE_LIMIT_CLAIM_SERIAL"] = "2 per hour"
    dealt = ["e00fce68a1b2c3d4e5f60702", "e00fce68a1b2c3d4e5f60703", DEALT]
    Device.update(sold_through="Demo Window Dealer").where(Device.device_id.in_(dealt)).execute()
    for number, device_id in enumerate(dealt):
        person = make_user(f"home{number}@example.com", PASSWORD)
        client = app.test_client()
        login(client, person.email, PASSWORD)
        page = _label_form(client, device_id, labels).get_data(as_text=True)
        assert 'name="serial" value="' + labels[device_id]["serial_number"] in page
        chosen = _choose(client, _claim_token(page), "none", serial=labels[device_id]["serial_number"])
        assert chosen.status_code == 302, device_id
        assert Device.get_by_id(device_id).owner_id == person.id


def test_a_claim_whose_answer_is_lost_keeps_the_dealer_choice_for_the_sweep_to_finish(
    app, home, dealer, labels, sim
):
    import time

    client = app.extensions["particle"]
    client.timeout = (client.timeout[0], 0.3)  # the claim's answer comes after we stop waiting
    page = _label_form(home, DEALT, labels).get_data(as_text=True)
    sim.add_fault("POST", "/v1/devices", count=1, status=504, latency=1.0)
    chosen = _choose(home, _claim_token(page), "viewer", serial=labels[DEALT]["serial_number"])
    assert chosen.status_code == 302 and chosen.headers["Location"].endswith("/devices")
    device = Device.get_by_id(DEALT)
    assert device.owner_id == home.user.id and device.claim_state == "claiming"
    grant = Grant.get(Grant.grantee_org == dealer.id)
    assert access.role_of(dealer.boss, device) == "viewer"  # on paper; the page waits for the claim
    time.sleep(1.2)  # the fault's late answer is over (no timing is asserted)
    from selfserve.services import devices

    assert devices.resume_pending(grace_seconds=0)["claimed"] == 1
    assert devices.device_for(dealer.boss, DEALT, need="viewer").role == "viewer"
    assert Grant.get_by_id(grant.id).ended_at is None


def test_a_grant_left_by_an_undone_claim_ends_when_the_device_is_claimed_again(
    app, home, dealer, labels, sim
):
    from selfserve.services import devices

    page = _label_form(home, DEALT, labels).get_data(as_text=True)
    assert (
        _choose(home, _claim_token(page), "viewer", serial=labels[DEALT]["serial_number"]).status_code == 302
    )
    # As an undone claim leaves it: no owner, the dealer's grant still on the row.
    Device.update(owner=None, claim_state=None, claimed_at=None).where(Device.device_id == DEALT).execute()
    sim.set_device(DEALT, owner=None)
    app.config["DEALER_ACCESS_AT_CLAIM"] = "none"
    buyer = make_user("next@example.com", PASSWORD)
    devices.claim(buyer, labels[DEALT]["serial_number"], labels[DEALT]["setup_code"])
    assert Device.get_by_id(DEALT).owner_id == buyer.id
    assert access.role_of(dealer.boss, Device.get_by_id(DEALT)) is None
    assert Grant.get(Grant.grantee_org == dealer.id).end_cause == "unclaimed"
    ended = AuditEvent.get(AuditEvent.action == "sharing.ended_by_unclaim")
    assert ended.user_id == home.user.id  # told to the one who gave it, not the next owner
