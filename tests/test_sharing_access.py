"""The access matrix: every device route and fragment, for every kind of person.

Each route declares the least role it needs (NEEDS below, checked against the url_map so a new
device route fails until it is declared). For owner, manager, operator, viewer, a person with
an expired or a revoked grant, a stranger, staff, and staff viewing as each of them: allowed
cases work; denied cases are a 404 (403 for any write while staff view read-only) with zero
Particle calls and no state change.
"""

import datetime

import pytest
from helpers import csrf_token
from helpers import make_user
from helpers import seed_registry
from helpers import signed_in
from test_security_crawl import HTMX
from test_security_crawl import concrete_rules
from test_security_routes import database_state
from test_security_routes import diff

from selfserve.models import AuditEvent
from selfserve.models import Device
from selfserve.models import Grant
from selfserve.models import utcnow
from selfserve.services import access
from selfserve.services import devices
from selfserve.services import sharing
from selfserve.services import staff as staff_service

PASSWORD = "correct horse battery"
WINDOW = "e00fce68a1b2c3d4e5f60701"
PUMP = "e00fce68a1b2c3d4e5f60801"

# The least role each device route needs. A device route missing here fails the test below.
NEEDS = {
    "devices.detail": "viewer",
    "devices.values": "viewer",
    "devices.summary": "viewer",
    "devices.live": "viewer",  # the page's pushed values (server-sent events)
    "devices.history_charts": "viewer",
    "devices.history_csv": "viewer",
    "devices.call_function": "operator",
    "devices.rename": "manager",
    "devices.release": "owner",
    "transfers.start": "owner",
    "sharing.invite": "manager",
    "sharing.withdraw": "manager",
    "sharing.revoke": "manager",
    "sharing.grant_dealer": "manager",
    "sharing.who_can_see": "owner",
}

FORM = {
    "name": "Renamed by someone",
    "arg": "10",
    "confirmed": "yes",
    "email": "x@example.com",
    "role": "viewer",
}
PEOPLE = ("owner", "manager", "operator", "viewer", "expired", "revoked", "stranger")


def role_of(person):
    return {"owner": "owner", "manager": "manager", "operator": "operator", "viewer": "viewer"}.get(person)


@pytest.fixture
def world(app, sim, mailbox):
    labels = {device["id"]: device for device in seed_registry()}
    owner = make_user("owner@example.com", PASSWORD)
    for device_id in (WINDOW, PUMP):
        devices.claim(owner, labels[device_id]["serial_number"], labels[device_id]["setup_code"])
    people = {"owner": owner}
    window = devices.device_for(owner, WINDOW)
    grants = {}
    for person in ("manager", "operator", "viewer", "expired", "revoked"):
        user = make_user(f"{person}@example.com", PASSWORD, provisioned=False)
        people[person] = user
        role = person if person in access.GRANTABLE else "operator"
        grants[person] = access.give(window, user, role, owner, via="direct")
    Grant.update(expires_at=utcnow() - datetime.timedelta(minutes=1)).where(
        Grant.id == grants["expired"].id
    ).execute()
    access.revoke(grants["revoked"], owner)
    people["stranger"] = make_user("stranger@example.com", PASSWORD)
    invitation = sharing.invite(owner, window, "guest@example.com", "viewer")
    return {"people": people, "grants": grants, "invitation": invitation}


def url_values(world, device_id=WINDOW):
    return {
        "device_id": device_id,
        "function_name": "open",
        "grant_id": str(world["grants"]["viewer"].id),
        "invitation_id": str(world["invitation"].id),
    }


def device_rules(app, world, device_id=WINDOW):
    for method, path, rule in concrete_rules(app, url_values(world, device_id)):
        if "device_id" in rule.arguments and not rule.endpoint.startswith("support."):
            yield method, path, rule


def test_every_device_route_declares_what_it_needs(app, world):
    endpoints = {rule.endpoint for _m, _p, rule in device_rules(app, world)}
    assert endpoints - set(NEEDS) == set(), "a device route without a declared need: add it to NEEDS"
    assert set(NEEDS) <= endpoints


def test_denied_is_404_with_no_particle_call_and_no_change(app, world, sim):
    checked = 0
    for person in PEOPLE:
        client = signed_in(app, world["people"][person])
        token = csrf_token(client, "/devices")
        before = database_state()
        sim.reset_counters()
        for device_id in (WINDOW, PUMP):
            role = role_of(person) if device_id == WINDOW or person == "owner" else None
            for method, path, rule in device_rules(app, world, device_id):
                if access.at_least(role, NEEDS[rule.endpoint]):
                    continue
                for htmx in (False, True):
                    headers = {**HTMX, "X-CSRFToken": token} if htmx else {}
                    response = client.open(
                        path, method=method, headers=headers, data={"csrf_token": token, **FORM}
                    )
                    assert response.status_code == 404, (person, method, path, htmx, response.status_code)
                    checked += 1
        assert sim.counters()["total"] == 0, (person, sim.counters())
        assert diff(before, database_state()) == {}, person
    # The pump is shared with nobody: everyone but the owner is refused everything on it.
    assert checked >= 150


def test_allowed_pages_and_fragments_work_for_each_role(app, world, sim):
    for person in ("owner", "manager", "operator", "viewer"):
        client = signed_in(app, world["people"][person])
        for method, path, rule in device_rules(app, world):
            if method != "GET" or not access.at_least(role_of(person), NEEDS[rule.endpoint]):
                continue
            headers = HTMX if rule.endpoint in ("devices.values", "devices.summary") else {}
            response = client.get(path, headers=headers)
            assert response.status_code == 200, (person, path, response.status_code)
        page = client.get(f"/devices/{WINDOW}").get_data(as_text=True)
        # The page offers only what the role allows.
        assert ("/functions/open" in page) == access.at_least(role_of(person), "operator"), person
        assert ("/rename" in page) == access.at_least(role_of(person), "manager"), person
        assert ('id="sharing"' in page) == access.at_least(role_of(person), "manager"), person
        assert ("/release" in page) == (person == "owner"), person


def test_operator_runs_functions_as_the_owners_customer_audited_with_the_actor(app, world, sim):
    operator = world["people"]["operator"]
    client = signed_in(app, operator)
    token = csrf_token(client, f"/devices/{WINDOW}")
    response = client.post(
        f"/devices/{WINDOW}/functions/open",
        data={"csrf_token": token},
        headers={**HTMX, "X-CSRFToken": token},
    )
    assert response.status_code == 200
    assert "device-changed" in response.headers.get("HX-Trigger", "")
    event = AuditEvent.select().where(AuditEvent.action == "device.function_called").get()
    assert event.user_id == world["people"]["owner"].id and event.actor_id == operator.id
    assert "(by operator@example.com)" in _activity(app, world["people"]["owner"])
    # The operator has no Particle customer at all: only the owner's token could do it.
    assert operator.particle_customer_id is None


def test_manager_renames_and_invites_up_to_their_role(app, world, sim, mailbox):
    manager = world["people"]["manager"]
    client = signed_in(app, manager)
    token = csrf_token(client, f"/devices/{WINDOW}")
    assert (
        client.post(f"/devices/{WINDOW}/rename", data={"name": "Hall", "csrf_token": token}).status_code
        == 302
    )
    assert Device.get_by_id(WINDOW).name == "Hall"
    window = devices.device_for(manager, WINDOW, need="manager")
    assert window.role == "manager"
    with pytest.raises(sharing.SharingError):
        sharing.invite(manager, window, "friend@example.com", "owner")
    sharing.invite(manager, window, "friend@example.com", "manager")
    assert mailbox.wait_for("friend@example.com")


def test_staff_see_no_device_and_staff_viewing_as_each_person_are_read_only(app, world, sim):
    from test_support_views import sign_in_staff

    staff_user = staff_service.create_staff("desk@support.example", PASSWORD)
    console = sign_in_staff(app.test_client(), staff_user)
    token = csrf_token(console, "/support")
    sim.reset_counters()
    for method, path, _rule in device_rules(app, world):
        response = console.open(
            path, method=method, headers={**HTMX, "X-CSRFToken": token}, data={"csrf_token": token, **FORM}
        )
        assert response.status_code == 404, (method, path, response.status_code)
    assert sim.counters()["total"] == 0

    for person in PEOPLE:
        user = world["people"][person]
        started = console.post(
            f"/support/customers/{user.id}/view", data={"reason": "ticket 12", "csrf_token": token}
        )
        assert started.status_code == 302, person
        token = csrf_token(console, "/devices")
        before = database_state(page_views_allowed=True)
        sim.reset_counters()
        for method, path, rule in device_rules(app, world):
            allowed = access.at_least(role_of(person), NEEDS[rule.endpoint])
            response = console.open(
                path,
                method=method,
                headers={**HTMX, "X-CSRFToken": token},
                data={"csrf_token": token, **FORM},
            )
            if method != "GET":
                assert response.status_code == 403, (person, method, path, response.status_code)
            else:
                assert response.status_code == (200 if allowed else 404), (person, path, response.status_code)
        assert diff(before, database_state(page_views_allowed=True)) == {}, person
        writes = {
            r: n
            for r, n in sim.counters()["routes"].items()
            if n and not r.startswith("GET ") and r != "POST /oauth/token"
        }
        assert writes == {}, person
        console.post("/support/view/end", data={"csrf_token": token})
        token = csrf_token(console, "/support")


def _activity(app, user):
    return signed_in(app, user).get("/account/activity").get_data(as_text=True)
