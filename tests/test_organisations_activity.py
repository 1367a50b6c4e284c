"""An organisation's activity page: every grant, revocation, invitation, acceptance, expiry,
membership and group change concerning it, from the audit trail, newest first and paged; admins
see all of it, members all but the membership changes, outsiders a 404; and the routes of the
organisation area refuse outsiders and members on admin routes."""

import datetime

import pytest
from helpers import csrf_token
from helpers import login
from helpers import make_user
from helpers import seed_registry

from selfserve.models import utcnow
from selfserve.services import access
from selfserve.services import devices
from selfserve.services import organisations
from selfserve.services import sharing

PASSWORD = "correct horse battery"
WINDOW = "e00fce68a1b2c3d4e5f60701"
PUMP = "e00fce68a1b2c3d4e5f60801"


@pytest.fixture
def world(app, sim, mailbox):
    labels = {device["id"]: device for device in seed_registry()}
    admin = make_user("admin@company.example", PASSWORD)
    org = organisations.create(admin, "Pumps Inc")
    organisations.claim(admin, org, labels[PUMP]["serial_number"], labels[PUMP]["setup_code"])
    member = make_user("member@company.example", PASSWORD, provisioned=False)
    organisations.add_member(admin, org, member.email)
    site = organisations.create_group(admin, org, "Site A")
    organisations.add_to_group(admin, org, site, [PUMP])
    client_staff = make_user("client@site.example", PASSWORD, provisioned=False)
    group_grant = organisations.grant_group(admin, org, site, "operator", email=client_staff.email)
    organisations.revoke_group_grant(admin, org, group_grant.id)
    # A homeowner's window shared with the organisation for a week, which then runs out.
    home = make_user("home@example.com", PASSWORD)
    devices.claim(home, labels[WINDOW]["serial_number"], labels[WINDOW]["setup_code"])
    window = devices.device_for(home, WINDOW)
    invitation = sharing.invite(home, window, admin.email, "viewer", to_organisation=True)
    grant = sharing.accept(admin, invitation)
    access.revoke(grant, home)
    # Then for an hour, which runs out.
    hour = utcnow() + datetime.timedelta(hours=1)
    access.give(window, None, "operator", home, expires_at=hour, grantee_org=org)
    assert access.record_expired(now=hour + datetime.timedelta(seconds=1)) == 1
    return {"org": org, "admin": admin, "member": member, "home": home}


def page_of(app, user, path):
    client = app.test_client()
    assert login(client, user.email, PASSWORD).status_code == 200
    return client.get(path)


def test_admins_see_everything_concerning_the_organisation(app, world):
    org = world["org"]
    text = page_of(app, world["admin"], f"/organisations/{org.id}/activity").get_data(as_text=True)
    for sentence in (
        "Created the organisation Pumps Inc",
        "Added member@company.example to the organisation as member",
        "Created the group Site A",
        "Gave client@site.example operator access to device group Site A",
        "Revoked the operator access of client@site.example to device group Site A",
        "accepted the invitation to device",
        "The organisation was given viewer access to device",
        "The organisation&#39;s viewer access to device",  # revoked
        "The organisation&#39;s operator access to device",
    ):
        assert sentence in text, sentence
    assert "home@example.com" in text  # who acted


def test_members_see_all_but_the_membership_changes_and_outsiders_nothing(app, world):
    org = world["org"]
    response = page_of(app, world["member"], f"/organisations/{org.id}/activity")
    text = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "Created the group Site A" in text and "The organisation was given viewer access" in text
    assert "Added member@company.example" not in text and "except who joined or left" in text
    assert page_of(app, world["home"], f"/organisations/{org.id}/activity").status_code == 404
    assert page_of(app, world["home"], "/organisations/999999/activity").status_code == 404


def test_the_activity_is_paged_newest_first(app, world):
    org, admin = world["org"], world["admin"]
    for number in range(organisations.ACTIVITY_PAGE_SIZE + 5):
        organisations.create_group(admin, org, f"Group {number:03d}")
    client = app.test_client()
    login(client, admin.email, PASSWORD)
    first = client.get(f"/organisations/{org.id}/activity").get_data(as_text=True)
    assert "Group 054" in first and "Created the organisation" not in first
    events, older = organisations.activity(org, "admin")
    assert older is not None and events[0].id > events[-1].id
    second = client.get(f"/organisations/{org.id}/activity?before={older}").get_data(as_text=True)
    assert "Created the organisation Pumps Inc" in second and "Group 054" not in second
    assert client.get(f"/organisations/{org.id}/activity?before=x1").status_code == 400


def test_organisation_routes_refuse_outsiders_and_members_on_admin_routes(app, world, sim):
    """Every route of the organisation area: an outsider gets 404 (as for an unknown id), a
    member 404 on the admin's routes; nothing changes."""
    from test_security_routes import database_state
    from test_security_routes import diff

    org = world["org"]
    rules = [r for r in app.url_map.iter_rules() if r.endpoint.startswith("organisations.") and r.arguments]
    assert len(rules) >= 8
    values = {"organisation_id": org.id, "group_id": 1, "grant_id": 1, "user_id": world["member"].id}
    for who, allowed in (
        (world["home"], set()),
        (world["member"], {"organisations.detail", "organisations.activity"}),
    ):
        client = app.test_client()
        login(client, who.email, PASSWORD)
        token = csrf_token(client, "/devices")
        before = database_state()
        sim.reset_counters()
        for rule in rules:
            path = rule.build(values, append_unknown=False)[1]
            method = "GET" if "GET" in rule.methods else "POST"
            response = client.open(path, method=method, data={"csrf_token": token, "confirmed": "yes"})
            expected = 200 if rule.endpoint in allowed else 404
            assert response.status_code == expected, (who.email, rule.endpoint, response.status_code)
        assert diff(before, database_state()) == {}
        assert sim.counters()["total"] == 0  # refused before anything reaches Particle


def test_removing_and_revoking_ask_first_without_javascript(app, world):
    from selfserve.models import DeviceGroup
    from selfserve.models import Grant
    from selfserve.models import Membership

    org, admin, member = world["org"], world["admin"], world["member"]
    site = DeviceGroup.get(DeviceGroup.name == "Site A")
    grant = organisations.grant_group(admin, org, site, "viewer", email=member.email)
    client = app.test_client()
    login(client, admin.email, PASSWORD)
    token = csrf_token(client, f"/organisations/{org.id}")
    for path, question in (
        (f"/organisations/{org.id}/members/{member.id}/remove", "Remove this member?"),
        (f"/organisations/{org.id}/grants/{grant.id}/revoke", "Revoke this access?"),
    ):
        asked = client.post(path, data={"csrf_token": token})
        text = asked.get_data(as_text=True)
        assert asked.status_code == 200 and question in text and f'action="{path}"' in text
    assert Membership.select().where(Membership.user == member.id).count() == 1
    assert Grant.get_by_id(grant.id).ended_at is None
    for path in (
        f"/organisations/{org.id}/grants/{grant.id}/revoke",
        f"/organisations/{org.id}/members/{member.id}/remove",
    ):
        assert client.post(path, data={"csrf_token": token, "confirmed": "yes"}).status_code == 302
    assert Membership.select().where(Membership.user == member.id).count() == 0
    assert Grant.get_by_id(grant.id).ended_at is not None
    # A grant that is gone: 404, as for any unknown id.
    assert (
        client.post(
            f"/organisations/{org.id}/grants/999999/revoke", data={"csrf_token": token, "confirmed": "yes"}
        ).status_code
        == 404
    )
