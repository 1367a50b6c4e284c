"""Organisations: their own Particle customer, members, overlapping groups, grants on groups to
people and to other organisations, removal ending access at once, the member's list of every
device they can reach, and two admins editing one group at the same moment."""

import threading

import pytest
from helpers import csrf_token
from helpers import demo_devices
from helpers import login
from helpers import make_user
from helpers import seed_registry
from test_security_crawl import HTMX

from selfserve.models import AuditEvent
from selfserve.models import GroupDevice
from selfserve.models import User
from selfserve.services import access
from selfserve.services import devices
from selfserve.services import organisations
from selfserve.services import sharing

PASSWORD = "correct horse battery"
WINDOWS = ["e00fce68a1b2c3d4e5f60701", "e00fce68a1b2c3d4e5f60702", "e00fce68a1b2c3d4e5f60703"]
PUMP = "e00fce68a1b2c3d4e5f60801"


@pytest.fixture
def company(app, sim, mailbox):
    seed_registry()
    labels = {device["id"]: device for device in demo_devices()}
    admin = make_user("admin@company.example", PASSWORD)
    org = organisations.create(admin, "Pumps Inc")
    for device_id in WINDOWS + [PUMP]:
        organisations.claim(admin, org, labels[device_id]["serial_number"], labels[device_id]["setup_code"])
    north = organisations.create_group(admin, org, "North")
    site = organisations.create_group(admin, org, "Site A")
    organisations.add_to_group(admin, org, north, WINDOWS[:2])
    organisations.add_to_group(admin, org, site, WINDOWS[1:] + [PUMP])  # overlaps North on WINDOWS[1]
    return {"org": org, "admin": admin, "north": north, "site": site}


def test_an_organisation_has_its_own_particle_customer(company, sim):
    account = organisations.account_of(company["org"])
    assert account.provisioning_state == "ready" and account.particle_customer_id.startswith("c")
    assert "@" not in account.particle_customer_id
    # Its devices are claimed to its own customer on Particle.
    assert sim.device(PUMP)["owner"] == account.particle_customer_id
    # Nobody can sign in as it.
    from selfserve import passwords

    assert not passwords.check_password(account.password_hash, "")


def test_roles_through_membership_groups_and_other_organisations(company):
    org, admin = company["org"], company["admin"]
    member = make_user("member@company.example", PASSWORD, provisioned=False)
    organisations.add_member(admin, org, member.email)
    device = {d: devices.Device.get_by_id(d) for d in WINDOWS + [PUMP]}
    assert access.role_of(admin, device[PUMP]) == "owner"  # an admin acts as the owner
    assert all(access.role_of(member, device[d]) is None for d in device)  # member: nothing by default

    organisations.grant_group(admin, org, company["north"], "viewer", email=member.email)
    organisations.grant_group(admin, org, company["site"], "operator", email=member.email)
    assert access.role_of(member, device[WINDOWS[0]]) == "viewer"
    assert access.role_of(member, device[WINDOWS[1]]) == "operator"  # in both: the higher role
    assert access.role_of(member, device[PUMP]) == "operator"

    client_org_admin = make_user("boss@client.example", PASSWORD)
    client_org = organisations.create(client_org_admin, "Client Ltd")
    employee = make_user("staff@client.example", PASSWORD, provisioned=False)
    organisations.add_member(client_org_admin, client_org, employee.email)
    assert access.role_of(employee, device[PUMP]) is None
    organisations.grant_group(admin, org, company["site"], "operator", organisation_name="Client Ltd")
    assert access.role_of(employee, device[PUMP]) == "operator"
    assert access.role_of(employee, device[WINDOWS[0]]) is None  # not in Site A

    # Removing a member ends their access at once.
    organisations.remove_member(client_org_admin, client_org, employee.id)
    assert access.role_of(employee, device[PUMP]) is None
    # Taking a device out of a group ends what the group gave.
    organisations.remove_from_group(admin, org, company["site"], [PUMP])
    assert access.role_of(member, device[PUMP]) is None
    why = {(r.who, r.role): r.why for r in access.who_can_see(device[WINDOWS[1]])}
    assert why[("admin@company.example", "owner")] == "Admin of Pumps Inc"
    assert why[("member@company.example", "viewer")].startswith("Through the group North, shared by admin@")
    assert why[("member@company.example", "operator")].startswith("Through the group Site A")
    assert "org.member_removed_me" in [
        e.action for e in AuditEvent.select().where(AuditEvent.user == employee.id)
    ]


def test_removals_announce_the_end_of_access_only_once_committed(company):
    from selfserve.models import db

    org, admin = company["org"], company["admin"]
    member = make_user("member@company.example", PASSWORD, provisioned=False)
    organisations.add_member(admin, org, member.email)
    heard = []

    def listener(device_id, cause, **extra):
        heard.append(cause)

    access.access_ended.connect(listener)
    try:
        with pytest.raises(RuntimeError), db.atomic():
            organisations.remove_from_group(admin, org, company["site"], [PUMP])
            organisations.remove_member(admin, org, member.id)
            raise RuntimeError("the rest of the change failed")
        assert heard == []
        with db.atomic():
            organisations.remove_from_group(admin, org, company["site"], [PUMP])
            organisations.remove_member(admin, org, member.id)
            assert heard == []
        assert heard == ["ungrouped", "removed"]
    finally:
        access.access_ended.disconnect(listener)


def test_the_last_admin_stays_and_outsiders_get_404(company, app):
    org, admin = company["org"], company["admin"]
    with pytest.raises(organisations.OrgError):
        organisations.remove_member(admin, org, admin.id)
    stranger = make_user("stranger@example.com", PASSWORD)
    client = app.test_client()
    login(client, stranger.email, PASSWORD)
    assert client.get(f"/organisations/{org.id}").status_code == 404


def test_a_member_reaches_every_device_grouped_by_owner_and_group_paginated_and_filtered(company):
    org, admin = company["org"], company["admin"]
    member = make_user("member@company.example", PASSWORD, provisioned=False)
    organisations.add_member(admin, org, member.email)
    organisations.grant_group(admin, org, company["north"], "viewer", email=member.email)
    organisations.grant_group(admin, org, company["site"], "operator", email=member.email)
    reach = sharing.reachable(member)
    assert reach.total == 5  # North: 2, Site A: 3 (one device in both)
    assert [(g.owner_label, g.group_name, len(g.devices)) for g in reach.groups] == [
        ("Pumps Inc", "North", 2),
        ("Pumps Inc", "Site A", 3),
    ]
    roles = {(g.group_name, d.device_id): d.role for g in reach.groups for d in g.devices}
    assert roles[("North", WINDOWS[1])] == "viewer" and roles[("Site A", WINDOWS[1])] == "operator"
    first = sharing.reachable(member, page=1, per_page=2)
    second = sharing.reachable(member, page=3, per_page=2)
    assert first.pages == 3 and sum(len(g.devices) for g in second.groups) == 1
    pump_serial = devices.Device.get_by_id(PUMP).serial_number
    filtered = sharing.reachable(member, query=pump_serial[-4:])
    assert filtered.total == 1 and filtered.groups[0].devices[0].device_id == PUMP
    # The admin reaches everything, once per group plus devices in no group.
    assert sharing.reachable(admin).total == 5


def test_two_admins_editing_one_group_at_once(company, app):
    org, admin = company["org"], company["admin"]
    second = make_user("second@company.example", PASSWORD, provisioned=False)
    organisations.add_member(admin, org, second.email, role="admin")
    group = organisations.create_group(admin, org, "Contested")
    barrier = threading.Barrier(2)
    errors = []

    def edit(who, ids):
        with app.app_context():
            barrier.wait()
            try:
                organisations.add_to_group(who, org, group, ids)
            except Exception as exc:  # noqa: BLE001 - the test reports any
                errors.append(exc)

    threads = [
        threading.Thread(target=edit, args=(admin, WINDOWS)),
        threading.Thread(target=edit, args=(User.get_by_id(second.id), WINDOWS[1:] + [PUMP])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(r.device_id for r in GroupDevice.select().where(GroupDevice.group == group.id)) == sorted(
        WINDOWS + [PUMP]
    )


def test_org_area_pages(company, app, sim):
    org, admin = company["org"], company["admin"]
    client = app.test_client()
    login(client, admin.email, PASSWORD)
    page = client.get(f"/organisations/{org.id}").get_data(as_text=True)
    assert "North" in page and "Site A" in page
    token = csrf_token(client, f"/organisations/{org.id}")
    make_user("new@company.example", PASSWORD, provisioned=False)
    response = client.post(
        f"/organisations/{org.id}/members",
        data={"email": "new@company.example", "role": "member", "csrf_token": token},
    )
    assert response.status_code == 302
    assert "new@company.example" in client.get(f"/organisations/{org.id}").get_data(as_text=True)
    # An operator of a group runs the pump with the organisation's customer token.
    worker = User.get(User.email == "new@company.example")
    organisations.grant_group(admin, org, company["site"], "operator", email=worker.email)
    worker_client = app.test_client()
    login(worker_client, worker.email, PASSWORD)
    token = csrf_token(worker_client, f"/devices/{PUMP}")
    done = worker_client.post(
        f"/devices/{PUMP}/functions/stop",
        data={"csrf_token": token, "confirmed": "yes"},
        headers={**HTMX, "X-CSRFToken": token},
    )
    assert done.status_code == 200 and "device-changed" in done.headers.get("HX-Trigger", "")
    dashboard = worker_client.get("/devices").get_data(as_text=True)
    assert "Pumps Inc" in dashboard and "Site A" in dashboard
