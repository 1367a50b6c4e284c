"""Sharing with people: invitations (link, accept once, withdraw), grants ending (revoke,
expiry, release, transfer), the audit trail on both sides, and the races."""

import datetime
import re
import threading

import pytest
from helpers import PASSWORD
from helpers import WINDOW
from helpers import csrf_token
from helpers import demo_devices
from helpers import make_user
from helpers import owner_of
from helpers import signed_in
from test_security_crawl import HTMX

from selfserve import tokens
from selfserve.models import AuditEvent
from selfserve.models import Grant
from selfserve.models import Invitation
from selfserve.models import utcnow
from selfserve.services import access
from selfserve.services import devices
from selfserve.services import outbox
from selfserve.services import sharing


@pytest.fixture
def owner(app, labels, mailbox):
    return owner_of(labels, WINDOW, "owner@example.com")


@pytest.fixture
def window(owner):
    return devices.device_for(owner, WINDOW)


def actions_of(user):
    return [e.action for e in AuditEvent.select().where(AuditEvent.user == user.id).order_by(AuditEvent.id)]


def race(app, **actions):
    """Run the actions at the same moment in threads; {name: "done" or the refusal's kind}."""
    barrier = threading.Barrier(len(actions))
    outcomes = {}

    def run(name, action):
        with app.app_context():
            barrier.wait()
            try:
                action()
                outcomes[name] = "done"
            except sharing.SharingError as exc:
                outcomes[name] = exc.kind

    threads = [threading.Thread(target=run, args=item) for item in actions.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def invite_link(mailbox, address):
    message = mailbox.wait_for(address)
    return next(link for link in mailbox.links(message) if "/share/" in link)


# --- invitations -------------------------------------------------------------------------------


def test_owner_invites_through_the_page_and_the_invitee_accepts_once(app, owner, mailbox, sim):
    page_client = signed_in(app, owner)
    token = csrf_token(page_client, f"/devices/{WINDOW}")
    response = page_client.post(
        f"/devices/{WINDOW}/sharing/invite",
        data={"email": "Teen@Example.com", "role": "operator", "csrf_token": token},
        headers={**HTMX, "X-CSRFToken": token},
    )
    assert response.status_code == 200
    assert "teen@example.com" in response.get_data(as_text=True)  # listed as waiting
    link = invite_link(mailbox, "teen@example.com")
    path = link.split("http://localhost", 1)[1]

    # Anonymous: the link shows the invitation and the way to sign in; nothing changes.
    anonymous = app.test_client().get(path)
    assert anonymous.status_code == 200 and "Sign in" in anonymous.get_data(as_text=True)
    teen = make_user("teen@example.com", PASSWORD, provisioned=False)
    client = signed_in(app, teen)
    page = client.get(path).get_data(as_text=True)
    assert "Accept the invitation" in page
    assert Grant.select().count() == 0
    invitation = Invitation.get()
    # Before accepting there is no access at all.
    assert client.get(f"/devices/{WINDOW}").status_code == 404
    form_token = csrf_token(client, path)
    accepted = client.post(f"/invitations/{invitation.id}/accept", data={"csrf_token": form_token})
    assert accepted.status_code == 302 and accepted.headers["Location"].endswith(f"/devices/{WINDOW}")
    assert devices.device_for(teen, WINDOW, need="operator").role == "operator"
    # Works once.
    again = client.post(f"/invitations/{invitation.id}/accept", data={"csrf_token": form_token})
    assert again.status_code == 410
    assert app.test_client().get(path).status_code == 410
    assert Grant.select().count() == 1
    assert "sharing.invited" in actions_of(owner) and "sharing.invitation_accepted" in actions_of(owner)
    assert "sharing.access_received" in actions_of(teen)
    # The dashboard lists it, grouped by owner.
    dashboard = client.get("/devices").get_data(as_text=True)
    assert "Shared with me" in dashboard and "owner@example.com" in dashboard


def test_an_invitation_for_another_address_or_unverified_account_is_refused(app, owner, window, mailbox):
    invitation = sharing.invite(owner, window, "guest@example.com", "viewer")
    other = make_user("other@example.com", PASSWORD)
    with pytest.raises(sharing.SharingError) as refused:
        sharing.accept(other, invitation)
    assert refused.value.kind == "wrong_account"
    # By id, someone else's invitation doesn't exist.
    client = signed_in(app, other)
    token = csrf_token(client, "/devices")
    assert client.get(f"/invitations/{invitation.id}").status_code == 404
    assert client.post(f"/invitations/{invitation.id}/accept", data={"csrf_token": token}).status_code == 404
    unverified = make_user("guest@example.com", PASSWORD, verified=False)
    with pytest.raises(sharing.SharingError):
        sharing.accept(unverified, invitation)
    assert Invitation.get_by_id(invitation.id).state == "pending" and Grant.select().count() == 0


def test_a_link_for_another_purpose_or_tampered_or_expired_is_refused(app, owner, window, mailbox):
    invitation = sharing.invite(owner, window, "guest@example.com", "viewer")
    good = tokens.make("share_invite", {"i": invitation.id, "n": invitation.nonce})
    assert sharing.from_link(good).id == invitation.id
    with pytest.raises(tokens.TokenInvalid):
        sharing.from_link(tokens.make("transfer_offer", {"i": invitation.id, "n": invitation.nonce}))
    with pytest.raises(tokens.TokenInvalid):
        sharing.from_link(tokens.make("share_invite", {"i": invitation.id, "n": "0" * 32}))
    old = tokens.make("share_invite", {"i": invitation.id, "n": invitation.nonce}, issued_at=0)
    assert app.test_client().get(f"/share/{old}").status_code == 410


def test_bad_input_is_a_clear_error_and_creates_nothing(app, owner, window):
    for email, role, until, field in [
        ("not-an-address", "viewer", "", "email"),
        ("owner@example.com", "viewer", "", "email"),
        ("guest@example.com", "owner", "", "role"),
        ("guest@example.com", "viewer", "2001-01-01", "until"),
        ("guest@example.com", "viewer", "tomorrow", "until"),
    ]:
        with pytest.raises(sharing.SharingError) as refused:
            sharing.invite(owner, window, email, role, until)
        assert refused.value.field == field
    assert Invitation.select().count() == 0
    sharing.invite(owner, window, "guest@example.com", "viewer")
    with pytest.raises(sharing.SharingError) as duplicate:
        sharing.invite(owner, window, "guest@example.com", "operator")
    assert duplicate.value.kind == "duplicate"


def test_accepting_a_withdrawn_invitation_fails_even_when_they_race(app, owner, window, mailbox):
    guest = make_user("guest@example.com", PASSWORD, provisioned=False)
    invitation = sharing.invite(owner, window, "guest@example.com", "operator")
    sharing.withdraw(owner, window, invitation.id)
    with pytest.raises(sharing.SharingError) as refused:
        sharing.accept(guest, Invitation.get_by_id(invitation.id))
    assert refused.value.kind == "too_late" and "withdrawn" in refused.value.message
    assert Grant.select().count() == 0

    # Withdraw and accept at the same moment: exactly one wins, and the state says which.
    for _ in range(3):
        invitation = sharing.invite(owner, window, "guest@example.com", "operator")
        outcomes = race(
            app,
            withdraw=lambda invitation=invitation: sharing.withdraw(owner, window, invitation.id),
            accept=lambda invitation=invitation: sharing.accept(guest, Invitation.get_by_id(invitation.id)),
        )
        assert sorted(outcomes.values()) == ["done", "too_late"], outcomes
        state = Invitation.get_by_id(invitation.id).state
        live = access.live_grant(guest.id, WINDOW)
        assert (state == "accepted") == (outcomes["accept"] == "done") == (live is not None)
        if live is not None:
            access.revoke(live, owner)


def test_withdraw_and_revoke_ask_for_confirmation_without_javascript(app, owner, window, mailbox):
    guest = make_user("guest@example.com", PASSWORD, provisioned=False)
    grant = access.give(window, guest, "viewer", owner)
    client = signed_in(app, owner)
    token = csrf_token(client, f"/devices/{WINDOW}")
    asked = client.post(f"/devices/{WINDOW}/sharing/grants/{grant.id}/revoke", data={"csrf_token": token})
    assert asked.status_code == 200 and "Yes, revoke it" in asked.get_data(as_text=True)
    assert access.live_grant(guest.id, WINDOW) is not None
    done = client.post(
        f"/devices/{WINDOW}/sharing/grants/{grant.id}/revoke", data={"csrf_token": token, "confirmed": "yes"}
    )
    assert done.status_code == 302
    assert access.live_grant(guest.id, WINDOW) is None
    assert signed_in(app, guest).get(f"/devices/{WINDOW}").status_code == 404
    assert "sharing.revoked" in actions_of(owner) and "sharing.revoked_for_me" in actions_of(guest)


# --- grants ending ------------------------------------------------------------------------------


def test_an_expired_grant_ends_by_itself_and_the_sweep_records_it(app, owner, window, sim):
    guest = make_user("guest@example.com", PASSWORD, provisioned=False)
    soon = utcnow() + datetime.timedelta(hours=1)
    access.give(window, guest, "operator", owner, expires_at=soon)
    assert devices.device_for(guest, WINDOW, need="operator").role == "operator"
    later = soon + datetime.timedelta(seconds=1)
    assert access.role_of(guest, window, now=later) is None
    # Really past its end: the lookup alone refuses it, before any job ran.
    Grant.update(expires_at=utcnow() - datetime.timedelta(seconds=1)).execute()
    sim.reset_counters()
    assert signed_in(app, guest).get(f"/devices/{WINDOW}/values", headers=HTMX).status_code == 404
    assert sim.counters()["total"] == 0
    assert access.record_expired() == 1
    assert access.record_expired() == 0  # recorded once
    assert "sharing.expired" in actions_of(owner) and "sharing.expired_for_me" in actions_of(guest)
    # Giving access again works (the old grant no longer holds the place).
    access.give(window, guest, "viewer", owner)
    assert access.role_of(guest, window) == "viewer"


def test_release_ends_every_grant_and_invitation(app, owner, window, sim, mailbox):
    guest = make_user("guest@example.com", PASSWORD, provisioned=False)
    access.give(window, guest, "manager", owner)
    invitation = sharing.invite(owner, window, "later@example.com", "viewer")
    devices.release(owner, window)
    assert access.live_grant(guest.id, WINDOW) is None
    assert Grant.get().end_cause == "released"
    assert Invitation.get_by_id(invitation.id).state == "ended"
    assert "sharing.ended_by_release" in actions_of(owner)
    assert "sharing.ended_by_release_for_me" in actions_of(guest)
    # The next owner starts clean.
    labels = {device["id"]: device for device in demo_devices()}
    buyer = make_user("next@example.com", PASSWORD)
    devices.claim(buyer, labels[WINDOW]["serial_number"], labels[WINDOW]["setup_code"])
    assert access.role_of(guest, devices.device_for(buyer, WINDOW)) is None


def test_transfer_ends_every_grant(app, owner, window, sim, mailbox):
    from selfserve.services import transfers

    guest = make_user("guest@example.com", PASSWORD, provisioned=False)
    access.give(window, guest, "operator", owner)
    buyer = make_user("buyer@example.com", PASSWORD)
    offer = transfers.offer(owner, window, "buyer@example.com")
    transfers.accept(buyer, offer)
    for _ in range(10):
        transfers.resume_pending(now=utcnow() + datetime.timedelta(hours=1))
    assert devices.device_for(buyer, WINDOW).role == "owner"
    assert access.live_grant(guest.id, WINDOW) is None
    assert Grant.get().end_cause == "transferred"
    assert "sharing.ended_by_transfer_for_me" in actions_of(guest)


def test_manager_shares_and_revokes_only_up_to_their_role(app, owner, window, mailbox):
    manager = make_user("manager@example.com", PASSWORD, provisioned=False)
    operator = make_user("operator@example.com", PASSWORD, provisioned=False)
    access.give(window, manager, "manager", owner)
    other_manager = make_user("m2@example.com", PASSWORD, provisioned=False)
    access.give(window, other_manager, "manager", owner)
    grant = access.give(window, operator, "operator", owner)
    as_manager = devices.device_for(manager, WINDOW, need="manager")
    assert sharing.grantable_by("manager") == ("viewer", "operator", "manager")
    assert sharing.grantable_by("operator") == ()
    sharing.revoke(manager, as_manager, grant.id)
    assert access.live_grant(operator.id, WINDOW) is None
    # Their own role on the device isn't the owner's: release and transfer stay refused.
    with pytest.raises(Exception) as refused:
        devices.device_for(manager, WINDOW, need="owner")
    assert getattr(refused.value, "code", None) == 404
    activity = signed_in(app, owner).get("/account/activity").get_data(as_text=True)
    assert "(by manager@example.com)" in activity


def test_revoke_while_the_grantee_runs_a_function(app, owner, window, sim):
    """The call that passed the check finishes (it is already on its way to the device) and is
    audited with its actor; the revoke lands; the next call is a 404 with no Particle call."""
    guest = make_user("guest@example.com", PASSWORD, provisioned=False)
    grant = access.give(window, guest, "operator", owner)
    client = signed_in(app, guest)
    token = csrf_token(client, f"/devices/{WINDOW}")
    sim.add_fault("POST", "/v1/devices/*/open", status=None, latency=1.0)
    results = {}

    def press():
        results["call"] = client.post(
            f"/devices/{WINDOW}/functions/open",
            data={"csrf_token": token},
            headers={**HTMX, "X-CSRFToken": token},
        )

    thread = threading.Thread(target=press)
    thread.start()
    deadline = utcnow() + datetime.timedelta(seconds=5)
    while sim.counters()["routes"].get("POST /v1/devices/:id/:name", 0) == 0 and utcnow() < deadline:
        threading.Event().wait(0.02)
    assert access.revoke(grant, owner)
    thread.join()
    assert results["call"].status_code == 200
    called = AuditEvent.select().where(AuditEvent.action == "device.function_called").get()
    assert called.actor_id == guest.id and called.user_id == owner.id
    revoked = AuditEvent.select().where(AuditEvent.action == "sharing.revoked").get()
    assert revoked.id > 0
    sim.reset_counters()
    again = client.post(
        f"/devices/{WINDOW}/functions/open",
        data={"csrf_token": token},
        headers={**HTMX, "X-CSRFToken": token},
    )
    assert again.status_code == 404
    assert sim.counters()["total"] == 0


def test_revocation_is_published_for_live_pages(app, owner, window):
    guest = make_user("guest@example.com", PASSWORD, provisioned=False)
    grant = access.give(window, guest, "viewer", owner)
    heard = []

    def listener(device_id, user_id, cause, **extra):
        heard.append((device_id, user_id, cause))

    access.access_ended.connect(listener)
    try:
        access.revoke(grant, owner)
    finally:
        access.access_ended.disconnect(listener)
    assert heard == [(WINDOW, guest.id, "revoked")]


def test_a_downgrade_is_announced_only_once_it_is_committed(app, owner, window):
    # A live page told before the commit would still find the old role; a rolled-back
    # downgrade changed nothing and must announce nothing.
    from selfserve.models import db

    guest = make_user("guest@example.com", PASSWORD, provisioned=False)
    access.give(window, guest, "operator", owner)
    heard = []

    def listener(device_id, user_id, cause, **extra):
        heard.append((device_id, user_id, cause))

    access.access_ended.connect(listener)
    try:
        with pytest.raises(RuntimeError), db.atomic():
            access.give(window, guest, "viewer", owner)
            raise RuntimeError("the rest of the change failed")
        assert heard == []
        with db.atomic():
            access.give(window, guest, "viewer", owner)
            assert heard == []
        assert heard == [(WINDOW, guest.id, "replaced")]
    finally:
        access.access_ended.disconnect(listener)


def test_invitation_mail_not_sent_is_retried_by_the_outbox(app, owner, window, mailbox):
    app.config["MAIL_PORT"] = 1  # nothing listens there
    invitation = sharing.invite(owner, window, "guest@example.com", "viewer")
    assert Invitation.get_by_id(invitation.id).mailed_at is not None  # queued with the invitation
    assert mailbox.to("guest@example.com") == []
    app.config["MAIL_PORT"] = mailbox.port
    assert outbox.send_due(now=utcnow() + datetime.timedelta(minutes=5)) == {"sent": 1}
    body = mailbox.body(mailbox.wait_for("guest@example.com"))
    assert len(mailbox.to("guest@example.com")) == 1
    assert re.search(r"/share/\S+", body) and "owner@example.com" in body


# --- who can see it ------------------------------------------------------------------------------


def test_who_can_see_the_device_for_the_owner_and_for_support(app, owner, window, sim):
    from test_support_views import sign_in_staff

    from selfserve.services import staff as staff_service

    guest = make_user("guest@example.com", PASSWORD, provisioned=False)
    access.give(window, guest, "operator", owner, expires_at=utcnow() + datetime.timedelta(days=7))
    gone = make_user("gone@example.com", PASSWORD, provisioned=False)
    access.revoke(access.give(window, gone, "viewer", owner), owner)
    reach = access.who_can_see(window)
    assert [(r.who, r.role) for r in reach] == [
        ("owner@example.com", "owner"),
        ("guest@example.com", "operator"),
    ]
    assert reach[1].why.startswith("Shared by owner@example.com on ")
    page = signed_in(app, owner).get(f"/devices/{WINDOW}/access").get_data(as_text=True)
    assert "guest@example.com" in page and "Shared by owner@example.com" in page and "until" in page
    assert "gone@example.com" not in page

    staff_user = staff_service.create_staff("desk@support.example", PASSWORD)
    console = sign_in_staff(app.test_client(), staff_user)
    device_page = console.get(f"/support/devices/{WINDOW}").get_data(as_text=True)
    assert "Who can see this device, and why" in device_page and "guest@example.com" in device_page
    customer_page = console.get(f"/support/customers/{owner.id}").get_data(as_text=True)
    assert "guest@example.com is operator" in customer_page
    guest_page = console.get(f"/support/customers/{guest.id}").get_data(as_text=True)
    assert "They are operator of" in guest_page


# --- dealers ----------------------------------------------------------------------------------------


def test_homeowner_gives_a_dealer_a_week_and_revokes_it(app, owner, window, sim):
    from selfserve.services import organisations

    boss = make_user("boss@dealer.example", PASSWORD)
    dealer = organisations.create(boss, "Blinds & Co", kind="dealer")
    technician = make_user("tech@dealer.example", PASSWORD, provisioned=False)
    organisations.add_member(boss, dealer, technician.email)
    company = organisations.create(make_user("x@company.example", PASSWORD), "Not A Dealer")
    with pytest.raises(sharing.SharingError) as refused:
        sharing.grant_dealer(owner, window, company.name, "operator", "2099-01-01")
    assert refused.value.field == "dealer"
    with pytest.raises(sharing.SharingError) as refused:
        sharing.grant_dealer(owner, window, dealer.name, "operator", "")
    assert refused.value.field == "dealer_until"

    client = signed_in(app, owner)
    token = csrf_token(client, f"/devices/{WINDOW}")
    week = (utcnow() + datetime.timedelta(days=7)).date().isoformat()
    response = client.post(
        f"/devices/{WINDOW}/sharing/dealer",
        data={"dealer": "Blinds & Co", "dealer_role": "operator", "dealer_until": week, "csrf_token": token},
        headers={**HTMX, "X-CSRFToken": token},
    )
    assert response.status_code == 200 and "organisation Blinds &amp; Co" in response.get_data(as_text=True)
    grant = Grant.get(Grant.grantee_org == dealer.id)
    assert grant.expires_at.date() == datetime.date.fromisoformat(week) + datetime.timedelta(days=1)
    tech = signed_in(app, technician)
    assert tech.get(f"/devices/{WINDOW}").status_code == 200
    assert "Blinds &amp; Co" in tech.get("/devices").get_data(
        as_text=True
    ) or "owner@example.com" in tech.get("/devices").get_data(as_text=True)
    # After the visit's last day it ends by itself.
    assert access.role_of(technician, window, now=grant.expires_at + datetime.timedelta(seconds=1)) is None
    done = client.post(
        f"/devices/{WINDOW}/sharing/grants/{grant.id}/revoke", data={"csrf_token": token, "confirmed": "yes"}
    )
    assert done.status_code == 302
    assert tech.get(f"/devices/{WINDOW}").status_code == 404
    assert "sharing.revoked" in actions_of(owner)
