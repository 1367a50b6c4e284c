"""The access matrix for an organisation's device: its admin, a member in the device's group
(operator through the group), a member in none of its groups, a dealer organisation's member
with an active, an expired and a revoked grant, and a stranger. Allowed pages work; everything
denied is a 404 with zero Particle calls and no state change (NEEDS as in the homeowner matrix)."""

import datetime

import pytest
from helpers import csrf_token
from helpers import demo_devices
from helpers import login
from helpers import make_user
from helpers import seed_registry
from test_security_crawl import HTMX
from test_security_routes import database_state
from test_security_routes import diff
from test_sharing_access import FORM
from test_sharing_access import NEEDS
from test_sharing_access import device_rules

from selfserve.models import Device
from selfserve.models import Grant
from selfserve.models import utcnow
from selfserve.services import access
from selfserve.services import organisations

PASSWORD = "correct horse battery"
PUMP = "e00fce68a1b2c3d4e5f60801"
OTHER_PUMP = "e00fce68a1b2c3d4e5f60802"

EXPECTED = {
    "org_admin": "owner",
    "member_in_group": "operator",
    "member_out_of_groups": None,
    "dealer_active": "viewer",
    "dealer_expired": None,
    "dealer_revoked": None,
    "stranger": None,
}


@pytest.fixture
def world(app, sim, mailbox):
    seed_registry()
    labels = {device["id"]: device for device in demo_devices()}
    admin = make_user("admin@company.example", PASSWORD)
    org = organisations.create(admin, "Pumps Inc")
    for device_id in (PUMP, OTHER_PUMP):
        organisations.claim(admin, org, labels[device_id]["serial_number"], labels[device_id]["setup_code"])
    site = organisations.create_group(admin, org, "Site A")
    other_site = organisations.create_group(admin, org, "Site B")
    organisations.add_to_group(admin, org, site, [PUMP])
    organisations.add_to_group(admin, org, other_site, [OTHER_PUMP])
    people = {"org_admin": admin}
    for name in ("member_in_group", "member_out_of_groups"):
        people[name] = make_user(f"{name}@company.example", PASSWORD, provisioned=False)
        organisations.add_member(admin, org, people[name].email)
    organisations.grant_group(admin, org, site, "operator", email=people["member_in_group"].email)
    organisations.grant_group(admin, org, other_site, "manager", email=people["member_out_of_groups"].email)
    grants = {}
    for name in ("dealer_active", "dealer_expired", "dealer_revoked"):
        boss = make_user(f"boss-{name}@dealer.example", PASSWORD)
        dealer = organisations.create(boss, f"Dealer {name}", kind="dealer")
        people[name] = make_user(f"{name}@dealer.example", PASSWORD, provisioned=False)
        organisations.add_member(boss, dealer, people[name].email)
        grants[name] = Grant.create(
            device=PUMP,
            grantee_org=dealer.id,
            role="viewer",
            granted_by=admin.id,
            active_key=access.active_key(device_id=PUMP, org_id=dealer.id),
        )
    Grant.update(expires_at=utcnow() - datetime.timedelta(minutes=1)).where(
        Grant.id == grants["dealer_expired"].id
    ).execute()
    access.revoke(grants["dealer_revoked"], admin)
    people["stranger"] = make_user("stranger@example.com", PASSWORD)
    return {"people": people, "grants": {"viewer": grants["dealer_active"]}, "invitation": _invitation(admin)}


def _invitation(admin):
    from selfserve.services import devices
    from selfserve.services import sharing

    return sharing.invite(admin, devices.device_for(admin, PUMP), "guest@example.com", "viewer")


def test_the_organisation_matrix(app, world, sim):
    for person, role in EXPECTED.items():
        assert access.role_of(world["people"][person], Device.get_by_id(PUMP)) == role, person
        client = app.test_client()
        assert login(client, world["people"][person].email, PASSWORD).status_code == 200
        token = csrf_token(client, "/devices")
        rules = list(device_rules(app, world, PUMP))
        # Denied first, counted on their own: 404, no Particle call, nothing changed.
        before = database_state()
        sim.reset_counters()
        denied = 0
        for method, path, rule in rules:
            if access.at_least(role, NEEDS[rule.endpoint]):
                continue
            response = client.open(
                path,
                method=method,
                headers={**HTMX, "X-CSRFToken": token},
                data={"csrf_token": token, **FORM},
            )
            assert response.status_code == 404, (person, method, path, response.status_code)
            denied += 1
        assert denied >= (15 if role is None else 1) or role == "owner", person
        assert sim.counters()["total"] == 0, (person, sim.counters())
        assert diff(before, database_state()) == {}, person
        # Allowed pages and fragments work.
        for method, path, rule in rules:
            if method == "GET" and access.at_least(role, NEEDS[rule.endpoint]):
                headers = HTMX if rule.endpoint in ("devices.values", "devices.summary") else {}
                assert client.get(path, headers=headers).status_code == 200, (person, path)
