"""Alerts reach the right people (issue 13, "Who gets them"): the owner, and people with a
grant who opted in on the alert settings page; an organisation's device, the people of the
group chosen for its alerts, else its admins; a revoked grant or a release stops that person's
alerts at once (a notice already decided is cancelled when it would be sent)."""

import datetime

import pytest
from helpers import csrf_token
from helpers import login
from helpers import make_user

from selfserve.models import AlertNotice
from selfserve.models import AlertOptIn
from selfserve.models import Device
from selfserve.models import utcnow
from selfserve.services import access
from selfserve.services import alert_recipients
from selfserve.services import alerts
from selfserve.services import history
from selfserve.services import organisations

PUMP = "e00fce68a1b2c3d4e5f6a001"
OTHER = "e00fce68a1b2c3d4e5f6a002"
PASSWORD = "correct horse battery"


def add_device(device_id, owner):
    return Device.create(
        device_id=device_id,
        serial_number="SSP-" + device_id[-8:].upper(),
        setup_code_hash="not-used",
        model="pump",
        in_product=True,
        owner=owner,
        claimed_at=utcnow() - datetime.timedelta(days=1),
    )


def fault(value, device_id=PUMP, seconds=0):
    history.record(device_id, {"fault": value}, at=utcnow() + datetime.timedelta(seconds=seconds))


def told(device_id=PUMP):
    return {notice.user.email for notice in AlertNotice.select().where(AlertNotice.device_id == device_id)}


@pytest.fixture
def home(app):
    owner = make_user("owner@example.com", PASSWORD, provisioned=False)
    pump = add_device(PUMP, owner)
    add_device(OTHER, make_user("stranger@example.com", PASSWORD, provisioned=False))
    family = make_user("family@example.com", PASSWORD, provisioned=False)
    grant = access.give(pump, family, "viewer", owner)
    return {"owner": owner, "family": family, "grant": grant, "pump": pump}


def test_a_grantee_gets_alerts_only_after_opting_in_on_the_settings_page(app, home, mailbox):
    fault("overpressure")
    assert told() == {"owner@example.com"}
    client = app.test_client()
    login(client, "family@example.com", PASSWORD)
    page = client.get("/account/alerts").get_data(as_text=True)
    assert "Devices shared with you" in page and f'value="{PUMP}"' in page and f'value="{OTHER}"' not in page
    token = csrf_token(client, "/account/alerts")
    # A forged id of a device they can't see is ignored.
    saved = client.post(
        "/account/alerts/shared", data={"csrf_token": token, "shown": [PUMP, OTHER], "device": [PUMP, OTHER]}
    )
    assert saved.status_code == 302
    assert {row.device_id for row in AlertOptIn.select()} == {PUMP}
    assert "checked" in client.get("/account/alerts").get_data(as_text=True)
    fault("", seconds=1)
    fault("dry run", seconds=700)  # a new episode (past the reopen window)
    assert "family@example.com" in told()
    alerts.send_due(utcnow() + datetime.timedelta(seconds=800))
    assert mailbox.wait_for("family@example.com")
    # Opting out: the box unticked.
    client.post("/account/alerts/shared", data={"csrf_token": token, "shown": [PUMP]})
    assert AlertOptIn.select().count() == 0


def test_a_revoked_grant_stops_that_persons_alerts_at_once(app, home, mailbox):
    alert_recipients.set_opt_ins(home["family"], [PUMP], [PUMP])
    fault("overpressure")
    assert told() == {"owner@example.com", "family@example.com"}
    access.revoke(home["grant"], home["owner"])
    alerts.send_due()
    family_notice = AlertNotice.get(AlertNotice.user == home["family"].id)
    assert family_notice.cancelled_at is not None and family_notice.sent_at is None
    assert mailbox.wait_for("owner@example.com") and mailbox.to("family@example.com") == []
    # The opt-in stays, but counts only while they can see the device.
    assert alert_recipients.of_device(PUMP, home["owner"].id) == [home["owner"].id]


def test_a_release_stops_the_owners_and_grantees_alerts(app, home, mailbox):
    alert_recipients.set_opt_ins(home["family"], [PUMP], [PUMP])
    fault("overpressure")
    Device.update(owner=None, claimed_at=None).where(Device.device_id == PUMP).execute()
    access.end_all(PUMP, "released", actor=home["owner"], owner_id=home["owner"].id)
    assert alerts.send_due() == 0
    assert AlertNotice.select().where(AlertNotice.cancelled_at.is_null()).count() == 0


@pytest.fixture
def company(app, sim):
    admin = make_user("admin@company.example", PASSWORD, provisioned=False)
    org = organisations.create(admin, "Pumps Inc")
    add_device(PUMP, organisations.account_of(org))
    site = organisations.create_group(admin, org, "Site A")
    organisations.add_to_group(admin, org, site, [PUMP])
    technician = make_user("tech@company.example", PASSWORD, provisioned=False)
    organisations.add_member(admin, org, technician.email)
    organisations.grant_group(admin, org, site, "operator", email=technician.email)
    # A client organisation given the group: all its members are its people too.
    client_boss = make_user("boss@client.example", PASSWORD, provisioned=False)
    client_org = organisations.create(client_boss, "Client Ltd")
    organisations.grant_group(admin, org, site, "viewer", organisation_name=client_org.name)
    return {"admin": admin, "org": org, "site": site, "technician": technician}


def test_an_organisation_sends_alerts_to_its_admins_until_it_routes_a_group_to_its_people(app, company):
    fault("overpressure")
    assert told() == {"admin@company.example"}
    client = app.test_client()
    login(client, "admin@company.example", PASSWORD)
    org, site = company["org"], company["site"]
    page = client.get(f"/organisations/{org.id}").get_data(as_text=True)
    assert "Alerts of these devices go to the admins." in page
    token = csrf_token(client, f"/organisations/{org.id}")
    routed = client.post(
        f"/organisations/{org.id}/groups/{site.id}/alerts", data={"csrf_token": token, "to_members": "yes"}
    )
    assert routed.status_code == 302
    assert "go to the people this group is shared with" in client.get(f"/organisations/{org.id}").get_data(
        as_text=True
    )
    fault("", seconds=1)
    fault("dry run", seconds=700)
    assert told() == {"admin@company.example", "tech@company.example", "boss@client.example"}
    latest = {
        n.user.email
        for n in AlertNotice.select()
        .where(AlertNotice.event == "started")
        .order_by(AlertNotice.id.desc())
        .limit(2)
    }
    assert latest == {"tech@company.example", "boss@client.example"}
    # A member can't change it (admins only: the same 404 as outsiders).
    member = app.test_client()
    login(member, "tech@company.example", PASSWORD)
    member_token = csrf_token(member, f"/organisations/{org.id}")
    refused = member.post(
        f"/organisations/{org.id}/groups/{site.id}/alerts",
        data={"csrf_token": member_token, "to_members": "no"},
    )
    assert refused.status_code == 404
    # Back to the admins; recorded on the organisation's activity.
    client.post(
        f"/organisations/{org.id}/groups/{site.id}/alerts", data={"csrf_token": token, "to_members": "no"}
    )
    assert alert_recipients.of_device(PUMP, org.account_id) == [company["admin"].id]
    assert "The alerts of the group Site A go to the admins" in client.get(
        f"/organisations/{org.id}/activity"
    ).get_data(as_text=True)


def test_removed_from_the_group_means_no_more_alerts(app, company):
    org, site = company["org"], company["site"]
    alert_recipients.set_group_routing(company["admin"], org, site, True)
    assert company["technician"].id in alert_recipients.of_device(PUMP, org.account_id)
    organisations.remove_from_group(company["admin"], org, site, [PUMP])
    assert alert_recipients.of_device(PUMP, org.account_id) == [company["admin"].id]
    assert not alert_recipients.may_still_hear(company["technician"].id, PUMP)
