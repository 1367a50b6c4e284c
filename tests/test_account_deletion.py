"""Deleting an account: asked with the password (signed out everywhere, emailed), undone by
signing in during the grace, refused to staff; after the grace the recorded steps release the
devices, end transfers, access and memberships, delete the Particle customer, remove the
personal data and keep the audit rows anonymised. A crash injected at each step, before and
after its work, resumes to the same end, with Particle (the simulator) and the database
agreeing."""

import datetime

import pytest
from helpers import OTHER_WINDOW
from helpers import PASSWORD
from helpers import PUMP
from helpers import STOPPED_PUMP
from helpers import WINDOW
from helpers import csrf_token
from helpers import login
from helpers import make_user
from peewee import Value

from selfserve.models import AccountDeletion
from selfserve.models import AuditEvent
from selfserve.models import Device
from selfserve.models import Grant
from selfserve.models import LoginSession
from selfserve.models import Membership
from selfserve.models import OutboxMail
from selfserve.models import Transfer
from selfserve.models import User
from selfserve.models import ValueSample
from selfserve.models import utcnow
from selfserve.services import access
from selfserve.services import devices
from selfserve.services import erasure
from selfserve.services import organisations
from selfserve.services import transfers

HOME = "home@example.com"


class Crash(BaseException):
    """A worker dying: not an Exception, so the runner can't catch and record it."""


def own(user, labels, device_id):
    label = labels[device_id]
    return devices.claim(user, label["serial_number"], label["setup_code"])


def later(days=30):
    return utcnow() + datetime.timedelta(days=days)


@pytest.fixture
def world(app, sim, labels, mailbox):
    """The homeowner with two devices, an offer they made and one made to them, access they
    gave and hold, an organisation they alone run (with one other member), and history."""
    home = make_user(HOME)
    friend = make_user("friend@example.com")
    own(home, labels, WINDOW)
    own(home, labels, PUMP)
    friends_pump = own(friend, labels, STOPPED_PUMP)
    own(friend, labels, OTHER_WINDOW)
    access.give(devices.device_for(home, WINDOW), friend, "viewer", home)
    access.give(friends_pump, home, "operator", friend)
    transfers.offer(home, devices.device_for(home, PUMP), "buyer@example.com")
    transfers.offer(friend, devices.device_for(friend, OTHER_WINDOW), HOME)
    organisation = organisations.create(home, "Acme Blinds")
    organisations.add_member(home, organisation, "friend@example.com", "member")
    ValueSample.create(device_id=WINDOW, owner=home.id, name="position", at=utcnow(), value=12)
    return {
        "home": home,
        "friend": friend,
        "organisation": organisation,
        "customer": home.particle_customer_id,
    }


def schedule(user):
    return erasure.schedule(User.get_by_id(user.id), PASSWORD)


def run_to_the_end(rounds=8):
    """What the background jobs do after the grace (and after any crash): the device release
    resumer, the transfer steps, the deletion steps; a few rounds, time moved past leases
    and backoffs."""
    for round_ in range(rounds):
        devices.resume_pending(grace_seconds=0)
        transfers.resume_pending()
        erasure.resume_pending(now=later(31 + round_))
        if AccountDeletion.get().state == erasure.DONE:
            return
    raise AssertionError(f"not finished: {AccountDeletion.get().step} {AccountDeletion.get().last_error}")


def assert_deleted_and_agreeing(sim, mailbox, world):
    user = User.get_by_id(world["home"].id)
    customer = world["customer"]
    # Particle and our database agree: the devices are free in both, still in the product.
    for device_id in (WINDOW, PUMP):
        row = Device.get_by_id(device_id)
        assert row.owner_id is None and row.claim_state is None, device_id
        assert sim.device(device_id)["owner"] is None, device_id
        assert sim.device(device_id)["in_product"] is True
    # The customer is gone from Particle, with every token of it.
    assert customer not in sim.cloud.customers
    assert not [t for t in sim.cloud.tokens.values() if t["customer"] == customer]
    assert not [t for t in sim.cloud.refresh_tokens.values() if t["customer"] == customer]
    # Personal data gone.
    assert user.email == erasure.anonymous_email(user.id) and user.role == erasure.DELETED_ROLE
    assert user.password_hash == erasure.UNUSABLE_PASSWORD and user.particle_customer_id is None
    assert not LoginSession.select().where(LoginSession.user == user.id).exists()
    assert not ValueSample.select().where(ValueSample.owner == user.id).exists()
    # Audit rows kept, each once, anonymised.
    actions = [e.action for e in AuditEvent.select().where(AuditEvent.user == user.id)]
    assert actions.count("account.deleted") == 1 and actions.count("account.deletion_started") == 1
    assert actions.count("device.released") == 2
    assert "device.claimed" in actions
    assert not AuditEvent.select().where(AuditEvent.detail ** Value(f"%{HOME}%", converter=False)).exists()
    assert (
        not AuditEvent.select().where((AuditEvent.actor == user.id) & AuditEvent.ip.is_null(False)).exists()
    )
    assert (
        AuditEvent.select()
        .where(AuditEvent.detail ** Value(f"%deleted account #{user.id}%", converter=False))
        .exists()
    )
    # Transfers and access ended; the organisation has an admin.
    assert not Transfer.select().where(Transfer.state.in_(["offered", "requested"])).exists()
    assert not Grant.select().where(Grant.ended_at.is_null() & (Grant.grantee == user.id)).exists()
    assert not Grant.select().where(Grant.ended_at.is_null() & (Grant.device == WINDOW)).exists()
    assert Membership.get(Membership.user == world["friend"].id).role == "admin"
    assert not Membership.select().where(Membership.user == user.id).exists()
    # The job is finished; the last email went once.
    deletion = AccountDeletion.get()
    assert (deletion.state, deletion.step) == (erasure.DONE, None)
    assert [m["Subject"] for m in mailbox.to(HOME)].count("Your account is deleted") == 1
    # Once sent, nothing in the outbox holds their address any more.
    assert not OutboxMail.select().where(OutboxMail.to_address == HOME).exists()


# --- asking, undoing ------------------------------------------------------------------------------


def test_asking_needs_the_password_signs_out_everywhere_and_emails(app, world, mailbox):
    other_browser = app.test_client()
    login(other_browser, HOME)
    client = app.test_client()
    login(client, HOME)
    page = client.get("/account/delete")
    assert page.status_code == 200 and "Delete my account in 7 days" in page.get_data(as_text=True)
    assert "Acme Blinds" in page.get_data(as_text=True)
    token = csrf_token(client, "/account/delete")
    wrong = client.post("/account/delete", data={"password": "not it at all", "csrf_token": token})
    assert wrong.status_code == 400 and "not your current password" in wrong.get_data(as_text=True)
    assert not AccountDeletion.select().exists()
    response = client.post("/account/delete", data={"password": PASSWORD, "csrf_token": token})
    assert response.status_code == 302 and response.headers["Location"].startswith("/login")
    deletion = AccountDeletion.get()
    assert deletion.state == erasure.SCHEDULED and deletion.step == "begin"
    assert deletion.due_at - deletion.requested_at == datetime.timedelta(days=7)
    assert (
        not LoginSession.select()
        .where((LoginSession.user == world["home"].id) & LoginSession.ended_at.is_null())
        .exists()
    )
    assert other_browser.get("/account").status_code == 302  # signed out there too
    message = mailbox.wait_for(HOME)
    assert message["Subject"] == "Your account will be deleted"
    # Nothing runs before the date.
    assert erasure.resume_pending(now=utcnow() + datetime.timedelta(days=6)) == 0
    assert Device.get_by_id(WINDOW).owner_id == world["home"].id


def test_signing_in_during_the_grace_shows_the_date_and_undoes_it(app, world, mailbox):
    schedule(world["home"])
    client = app.test_client()
    landed = login(client, HOME)
    assert landed.request.path == "/account/delete/scheduled"
    assert "will be deleted on" in landed.get_data(as_text=True)
    # Every page shows it until they choose; the data can still be downloaded.
    assert client.get("/devices").headers["Location"] == "/account/delete/scheduled"
    assert client.get("/account/data.json").status_code == 200
    token = csrf_token(client, "/account/delete/scheduled")
    response = client.post("/account/delete/undo", data={"csrf_token": token})
    assert response.status_code == 302
    assert AccountDeletion.get().state == erasure.CANCELLED
    assert client.get("/devices").status_code == 200
    assert erasure.resume_pending(now=later()) == 0
    assert Device.get_by_id(WINDOW).owner_id == world["home"].id
    # Asking again later works (the same row, a new date).
    assert schedule(world["home"]).state == erasure.SCHEDULED
    assert AccountDeletion.select().count() == 1


def test_staff_see_pending_deletions_and_cannot_undo_one(app, world, sim):
    from test_support_views import sign_in_staff
    from test_support_views import start_view

    from selfserve.services import staff

    schedule(world["home"])
    console = sign_in_staff(app.test_client(), staff.create_staff("helper@support.example", PASSWORD))
    assert "/support/deletions" in console.get("/support").get_data(as_text=True)
    page = console.get("/support/deletions").get_data(as_text=True)
    assert HOME in page and "scheduled" in page
    assert start_view(console, world["home"]).status_code == 302
    token = csrf_token(console, "/account")
    response = console.post("/account/delete/undo", data={"csrf_token": token})
    assert response.status_code == 403 and "read-only" in response.get_data(as_text=True)
    assert AccountDeletion.get().state == erasure.SCHEDULED
    # Customers can't see the list.
    customer = app.test_client()
    login(customer, "friend@example.com")
    assert customer.get("/support/deletions").status_code == 403


# --- after the grace ------------------------------------------------------------------------------


def test_after_the_grace_everything_is_released_ended_and_removed(app, world, sim, mailbox):
    schedule(world["home"])
    run_to_the_end()
    assert_deleted_and_agreeing(sim, mailbox, world)
    # The offer made to them was declined, the one they made cancelled (its buyer never saw it).
    states = {t.buyer_email: t.state for t in Transfer.select()}
    assert states["buyer@example.com"] == "cancelled"
    assert states[erasure.anonymous_email(world["home"].id)] == "declined"
    # They can't sign in any more, nor sign up's "someone tried" mail go to them: the address is free.
    client = app.test_client()
    assert login(client, HOME).request.path == "/login"
    assert User.get_or_none(User.email == HOME) is None
    staff_page = organisations.members(world["organisation"])
    assert [m.user.email for m in staff_page] == ["friend@example.com"]


def test_a_customer_already_gone_from_particle_counts_as_deleted(app, world, sim, particle, mailbox):
    assert particle.delete_customer(world["customer"]) is True
    assert particle.delete_customer(world["customer"]) is False  # 404: already gone
    schedule(world["home"])
    run_to_the_end()
    deletion = AccountDeletion.get()
    assert deletion.state == erasure.DONE


STEPS = list(erasure.STEPS)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_each_step_resumes_to_the_same_end(app, world, sim, mailbox, monkeypatch, step, when):
    real = erasure.STEPS[step]
    crashed = []

    def crashing(row):
        if not crashed:
            crashed.append(step)
            if when == "before":
                raise Crash()
            real(row)
            raise Crash()  # the work is done, the runner never recorded it
        return real(row)

    monkeypatch.setitem(erasure.STEPS, step, crashing)
    schedule(world["home"])
    with pytest.raises(Crash):
        for _ in range(10):
            devices.resume_pending(grace_seconds=0)
            erasure.resume_pending(now=later())
    assert crashed == [step]
    assert AccountDeletion.get().step == step and AccountDeletion.get().lease_until is not None
    # A later sweep, once the dead worker's lease ran out, takes it over and finishes.
    run_to_the_end()
    assert_deleted_and_agreeing(sim, mailbox, world)


def test_a_crash_inside_a_device_release_resumes(app, world, sim, mailbox, monkeypatch):
    """Particle unclaimed the device, the worker died before our database recorded it."""
    real = devices._finish_release
    calls = []

    def dies_once(device, user, name):
        if not calls:
            calls.append(device.device_id)
            raise Crash()
        return real(device, user, name)

    monkeypatch.setattr(devices, "_finish_release", dies_once)
    schedule(world["home"])
    with pytest.raises(Crash):
        erasure.resume_pending(now=later())
    (device_id,) = calls
    assert Device.get_by_id(device_id).claim_state == "releasing"
    assert sim.device(device_id)["owner"] is None
    run_to_the_end()
    assert_deleted_and_agreeing(sim, mailbox, world)


def test_no_way_in_once_the_deletion_started(app, world, mailbox, monkeypatch):
    """While the steps run, a password reset still works by email, but signing in with the new
    password gets no session (the deletion can't be undone, nor the account used, any more)."""
    from selfserve.services import accounts

    schedule(world["home"])
    monkeypatch.setitem(erasure.STEPS, "end_transfers", lambda row: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        erasure.resume_pending(now=later())  # "begin" ran, the worker stopped after it
    assert AccountDeletion.get().state == erasure.RUNNING
    assert login(app.test_client(), HOME).request.path == "/login"  # the old password: unusable
    accounts.request_password_reset(HOME)
    link = [url for url in mailbox.links(mailbox.wait_for(HOME, count=2)) if "/reset/" in url][0]
    accounts.reset_password(link.rsplit("/", 1)[1], "a brand new password 123")
    client = app.test_client()
    response = login(client, HOME, "a brand new password 123")
    assert response.request.path == "/login" and "being deleted" in response.get_data(as_text=True)
    assert client.get("/account").status_code == 302
    assert (
        not LoginSession.select()
        .where((LoginSession.user == world["home"].id) & LoginSession.ended_at.is_null())
        .exists()
    )


def test_requests_for_their_devices_close_and_a_lone_organisation_is_flagged(app, sim, labels, mailbox):
    """Someone asking for one of their devices is told it was released; an organisation whose
    only person leaves keeps its devices and raises a staff alert."""
    from selfserve.services import support

    home = make_user(HOME)
    asker = make_user("asker@example.com")
    own(home, labels, WINDOW)
    opaque = transfers.remember_possession(asker, Device.get_by_id(WINDOW))
    request = transfers.request_device(asker, opaque)
    organisation = organisations.create(home, "Solo Shades")
    own(organisations.account_of(organisation), labels, PUMP)
    schedule(home)
    run_to_the_end()
    assert Transfer.get_by_id(request.id).state == "cancelled"
    assert any(
        "released" in (m["Subject"] or "").lower() or "released" in mailbox.body(m)
        for m in mailbox.to("asker@example.com")
    )
    assert Device.get_by_id(PUMP).owner_id == organisation.account_id  # the company keeps it
    assert sim.device(PUMP)["owner"] is not None
    assert not Membership.select().where(Membership.organisation == organisation.id).exists()
    (alert,) = support.staff_alerts()
    assert "Solo Shades" in alert.detail["reason"] and f"deleted account #{home.id}" in alert.detail["reason"]
