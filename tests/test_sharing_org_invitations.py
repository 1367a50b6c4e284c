"""Email invitations to organisations (issue 11): the owner (or a manager) invites an address
for an organisation; whoever accepts it, signed in with that verified address, accepts for an
organisation they administer (choosing when they run several), or is told they must be an
admin of one. Single purpose, expiring, works once, withdrawable: the invitation machinery."""

import datetime

import pytest
from helpers import PASSWORD
from helpers import WINDOW
from helpers import csrf_token
from helpers import make_user
from helpers import owner_of
from helpers import seed_registry
from helpers import signed_in
from test_security_crawl import HTMX

from selfserve.models import AuditEvent
from selfserve.models import Grant
from selfserve.models import Invitation
from selfserve.services import access
from selfserve.services import devices
from selfserve.services import organisations
from selfserve.services import sharing


@pytest.fixture
def owner(app, labels, mailbox):
    return owner_of(labels, WINDOW, "owner@example.com")


@pytest.fixture
def window(owner):
    return devices.device_for(owner, WINDOW)


def test_the_owner_invites_an_organisation_and_its_admin_accepts_for_the_one_they_choose(
    app, owner, window, mailbox
):
    client = signed_in(app, owner)
    token = csrf_token(client, f"/devices/{WINDOW}")
    sent = client.post(
        f"/devices/{WINDOW}/sharing/invite",
        data={
            "email": "boss@dealer.example",
            "role": "operator",
            "to_organisation": "yes",
            "csrf_token": token,
        },
        headers={**HTMX, "X-CSRFToken": token},
    )
    assert sent.status_code == 200 and "(for an organisation)" in sent.get_data(as_text=True)
    message = mailbox.wait_for("boss@dealer.example")
    assert "your organisation" in mailbox.body(message)
    link = next(link for link in mailbox.links(message) if "/share/" in link)
    path = link.split("http://localhost", 1)[1]
    invitation = Invitation.get()
    assert invitation.to_organisation

    boss = make_user("boss@dealer.example", PASSWORD, provisioned=False)
    first = organisations.create(boss, "Blinds & Co", kind="dealer")
    second = organisations.create(boss, "Pumps Ltd")
    member_only = organisations.create(make_user("x@other.example", PASSWORD, provisioned=False), "Other")
    organisations.add_member(member_only.created_by, member_only, boss.email)
    technician = make_user("tech@dealer.example", PASSWORD, provisioned=False)
    organisations.add_member(boss, second, technician.email)

    boss_client = signed_in(app, boss)
    page = boss_client.get(path).get_data(as_text=True)
    assert "Accept for" in page and "Blinds &amp; Co" in page and "Pumps Ltd" in page
    assert f'value="{member_only.id}"' not in page  # only organisations they administer
    form_token = csrf_token(boss_client, path)
    # Several organisations: they must say which (an organisation they only belong to is refused).
    unchosen = boss_client.post(f"/invitations/{invitation.id}/accept", data={"csrf_token": form_token})
    assert unchosen.status_code == 422 and "Choose the organisation" in unchosen.get_data(as_text=True)
    not_admin = boss_client.post(
        f"/invitations/{invitation.id}/accept",
        data={"csrf_token": form_token, "organisation": member_only.id},
    )
    assert not_admin.status_code == 422
    assert Invitation.get_by_id(invitation.id).state == "pending" and Grant.select().count() == 0
    accepted = boss_client.post(
        f"/invitations/{invitation.id}/accept", data={"csrf_token": form_token, "organisation": second.id}
    )
    assert accepted.status_code == 302
    grant = Grant.get()
    assert grant.grantee_org_id == second.id and grant.grantee_id is None and grant.role == "operator"
    # Every member of that organisation reaches it; the other organisation doesn't.
    assert access.role_of(technician, window) == "operator"
    assert Grant.select().where(Grant.grantee_org == first.id).count() == 0
    # Works once.
    again = boss_client.post(
        f"/invitations/{invitation.id}/accept", data={"csrf_token": form_token, "organisation": first.id}
    )
    assert again.status_code == 410 and Grant.select().count() == 1
    concerned = {
        e.user_id for e in AuditEvent.select().where(AuditEvent.action == "sharing.invitation_accepted")
    }
    assert concerned == {owner.id, second.account_id}


def test_someone_who_runs_no_organisation_is_told_and_nothing_changes(app, owner, window, mailbox):
    invitation = sharing.invite(owner, window, "solo@example.com", "viewer", to_organisation=True)
    solo = make_user("solo@example.com", PASSWORD, provisioned=False)
    client = signed_in(app, solo)
    page = client.get(f"/invitations/{invitation.id}").get_data(as_text=True)
    assert "You need to be an admin of one" in page and "Accept the invitation" not in page
    token = csrf_token(client, "/devices")
    refused = client.post(f"/invitations/{invitation.id}/accept", data={"csrf_token": token})
    assert refused.status_code == 403
    assert Invitation.get_by_id(invitation.id).state == "pending" and Grant.select().count() == 0
    # One organisation: accepted for it without choosing.
    mine = organisations.create(solo, "Solo Services")
    grant = sharing.accept(solo, Invitation.get_by_id(invitation.id))
    assert grant.grantee_org_id == mine.id


def test_withdrawn_expired_or_wrong_address_invitations_to_organisations_are_refused(
    app, owner, window, mailbox
):
    boss = make_user("boss@dealer.example", PASSWORD, provisioned=False)
    organisations.create(boss, "Blinds & Co", kind="dealer")
    invitation = sharing.invite(owner, window, boss.email, "viewer", to_organisation=True)
    sharing.withdraw(owner, window, invitation.id)
    # Someone who runs no organisation hears first that it was withdrawn.
    solo = make_user("solo@example.com", PASSWORD, provisioned=False)
    solo_invitation = sharing.invite(owner, window, solo.email, "viewer", to_organisation=True)
    sharing.withdraw(owner, window, solo_invitation.id)
    with pytest.raises(sharing.SharingError) as refused:
        sharing.accept(solo, Invitation.get_by_id(solo_invitation.id))
    assert refused.value.kind == "too_late"
    with pytest.raises(sharing.SharingError) as refused:
        sharing.accept(boss, Invitation.get_by_id(invitation.id))
    assert refused.value.kind == "too_late"
    later = sharing.invite(owner, window, boss.email, "viewer", to_organisation=True)
    with pytest.raises(sharing.SharingError) as refused:
        sharing.accept(boss, later, now=later.expires_at + datetime.timedelta(seconds=1))
    assert refused.value.kind == "too_late"
    other = make_user("other@example.com", PASSWORD, provisioned=False)
    organisations.create(other, "Other Co")
    with pytest.raises(sharing.SharingError) as refused:
        sharing.accept(other, later)
    assert refused.value.kind == "wrong_account"
    assert Grant.select().count() == 0


def test_an_organisation_cannot_accept_access_to_its_own_device(app, sim, mailbox):
    labels = {device["id"]: device for device in seed_registry()}
    admin = make_user("admin@company.example", PASSWORD)
    company = organisations.create(admin, "Company")
    organisations.claim(admin, company, labels[WINDOW]["serial_number"], labels[WINDOW]["setup_code"])
    device = devices.device_for(admin, WINDOW)
    invitation = sharing.invite(admin, device, "admin2@company.example", "viewer", to_organisation=True)
    second = make_user("admin2@company.example", PASSWORD, provisioned=False)
    organisations.add_member(admin, company, second.email, role="admin")
    with pytest.raises(sharing.SharingError) as refused:
        sharing.accept(second, invitation)
    assert refused.value.status == 409 and Grant.select().count() == 0
