"""Support decides disputed transfers (a request the recorded owner objected to): through the
console for the journeys and refusals, through the service for crashes and races. Giving the
device to the requester runs the transfers' own step machine against the simulator."""

import datetime
import threading

import pytest
from helpers import PASSWORD
from helpers import WINDOW
from helpers import csrf_token
from helpers import login
from helpers import make_user
from test_support_views import STAFF_EMAIL
from test_support_views import console  # noqa: F401 - a signed-in support console
from test_support_views import post
from test_support_views import staff_user  # noqa: F401
from test_support_views import start_view
from test_support_views import writes

from selfserve import mail
from selfserve.models import AuditEvent
from selfserve.models import Device
from selfserve.models import Transfer
from selfserve.models import User
from selfserve.models import utcnow
from selfserve.services import devices
from selfserve.services import transfers

OWNER = "owner@example.com"
REQUESTER = "requester@example.com"
REASON = "ticket 5512: deed of sale checked"


class Crash(BaseException):
    """Stands in for the process dying mid-step (not an Exception: nothing catches it)."""


@pytest.fixture
def app_config(app_config):
    app_config["TRANSFER_QUICK_RETRY_SECONDS"] = ()
    return app_config


@pytest.fixture
def owner(app, sim):
    return make_user(OWNER, PASSWORD)


@pytest.fixture
def requester(app, sim):
    return make_user(REQUESTER, PASSWORD)


@pytest.fixture
def disputed(labels, owner, requester, mailbox):  # noqa: F811
    """WINDOW is the owner's; the requester proved they hold it and asked; the owner objected."""
    label = labels[WINDOW]
    devices.claim(owner, label["serial_number"], label["setup_code"])
    devices.rename(owner, Device.get_by_id(WINDOW), "Kitchen blind")
    with pytest.raises(devices.DeviceError) as caught:
        devices.claim(requester, label["serial_number"], label["setup_code"])
    proof = transfers.remember_possession(requester, caught.value.device)
    transfer = transfers.request_device(requester, proof)
    transfer = transfers.object_to(owner, transfer)
    assert transfer.state == "objected" and transfer.step is None
    mailbox.wait_for(OWNER)  # the request
    mailbox.wait_for(REQUESTER)  # the objection
    mailbox.clear()
    return transfer


@pytest.fixture
def staff_account(console):  # noqa: F811
    return User.get(User.email == STAFF_EMAIL)


def decide_path(transfer):
    return f"/support/transfers/{transfer.id}/decide"


def decide(client, transfer, outcome, reason=REASON, confirm=True, follow=True, **extra):
    data = {"outcome": outcome, "reason": reason, "next": f"/support/customers/{transfer.seller_id}", **extra}
    if confirm:
        data["confirm"] = "yes"
    return post(client, decide_path(transfer), data, follow_redirects=follow)


def customer_of(user):
    return User.get_by_id(user.id).particle_customer_id


def decisions(user=None):
    query = AuditEvent.select().where(AuditEvent.action == "support.decided_transfer")
    if user is not None:
        query = query.where(AuditEvent.user == user.id)
    return list(query.order_by(AuditEvent.id))


def activity_page(app, user):
    client = app.test_client()
    login(client, user.email, PASSWORD)
    return client.get("/account/activity").get_data(as_text=True)


def text(mailbox, address):
    """The newest mail to `address`, its line breaks folded (templates wrap lines)."""
    return " ".join(mailbox.body(mailbox.wait_for(address)).split())


def expire_leases():
    Transfer.update(lease_until=utcnow() - datetime.timedelta(seconds=1)).execute()


# --- the two outcomes ------------------------------------------------------------------------------


def test_giving_it_to_the_requester_moves_the_device_on_particle_and_tells_both(
    app, console, disputed, owner, requester, staff_account, sim, mailbox
):
    response = decide(console, disputed, "requester")
    page = response.get_data(as_text=True)
    assert response.request.path == f"/support/customers/{owner.id}"  # back where the form was
    assert "Decided: the device is now in the requester" in page

    transfer = Transfer.get_by_id(disputed.id)
    assert transfer.state == "done" and transfer.step is None and transfer.dispute_outcome == "requester"
    assert transfer.open_device is None
    device = Device.get_by_id(WINDOW)
    assert device.owner_id == requester.id and device.claim_state is None and device.name is None
    assert sim.device(WINDOW)["owner"] == customer_of(requester)
    assert sim.device(WINDOW)["name"] != "Kitchen blind"
    # The same machine as any transfer: the move is recorded once, on both sides.
    assert AuditEvent.select().where(AuditEvent.action == "device.transferred_in").count() == 1
    assert AuditEvent.select().where(AuditEvent.action == "device.transferred_out").count() == 1

    assert "decided that it goes to you" in text(mailbox, REQUESTER)
    assert "decided that the device goes to the person who asked" in text(mailbox, OWNER)
    assert (
        len(mailbox.to(REQUESTER)) == 1 and len(mailbox.to(OWNER)) == 1
    )  # the dispute mails, not the generic ones

    for user, sentence in ((owner, "goes to the person who asked for it"), (requester, "goes to you")):
        (row,) = decisions(user)
        assert row.actor_id == staff_account.id and row.detail["reason"] == REASON
        assert row.detail["outcome"] == "requester" and row.device_id == WINDOW
        assert sentence in row.detail["decision"]
        assert "Support decided the transfer request: device" in activity_page(app, user)
    assert "goes to you" in activity_page(app, requester)
    # The requester now has it; the owner no longer reaches it.
    assert devices.device_for(User.get_by_id(requester.id), WINDOW).device_id == WINDOW


def test_keeping_it_with_the_owner_moves_nothing_and_tells_both(
    app, console, disputed, owner, requester, staff_account, sim, mailbox
):
    sim.reset_counters()
    response = decide(console, disputed, "owner", confirm=False)
    assert "Decided: the device stays with its owner" in response.get_data(as_text=True)
    assert writes(sim) == {}

    transfer = Transfer.get_by_id(disputed.id)
    assert transfer.state == "kept" and transfer.step is None and transfer.dispute_outcome == "owner"
    assert transfer.open_device is None
    device = Device.get_by_id(WINDOW)
    assert device.owner_id == owner.id and device.claim_state is None and device.name == "Kitchen blind"
    assert sim.device(WINDOW)["owner"] == customer_of(owner)

    assert "decided that it stays with its current owner" in text(mailbox, REQUESTER)
    assert "decided that the device stays in your account" in text(mailbox, OWNER)
    assert [row.actor_id for row in decisions()] == [staff_account.id, staff_account.id]
    assert {row.user_id for row in decisions()} == {owner.id, requester.id}
    assert "Support decided the transfer request: device" in activity_page(app, owner)
    assert "stays in your account" in activity_page(app, owner)
    assert "stays with its owner" in activity_page(app, requester)
    # Closed for good: the dispute can't be decided again, the other way either.
    response = decide(console, disputed, "requester")
    assert "Support already decided this request" in response.get_data(as_text=True)
    assert Device.get_by_id(WINDOW).owner_id == owner.id and writes(sim) == {}


# --- refusals ----------------------------------------------------------------------------------------


def test_a_reason_is_required_and_giving_needs_confirmation(console, disputed, owner, sim, mailbox):
    sim.reset_counters()
    for reason in ("", "  ", "x"):
        response = decide(console, disputed, "owner", reason=reason)
        assert "Give a reason" in response.get_data(as_text=True)
    response = decide(console, disputed, "requester", confirm=False)
    assert "Tick the box" in response.get_data(as_text=True)
    response = decide(console, disputed, "somebody-else")
    assert "Choose who gets the device" in response.get_data(as_text=True)
    assert Transfer.get_by_id(disputed.id).state == "objected"
    assert Device.get_by_id(WINDOW).owner_id == owner.id
    assert decisions() == [] and mailbox.messages == [] and writes(sim) == {}


def test_only_an_objected_request_can_be_decided(console, labels, owner, requester, sim, mailbox):  # noqa: F811
    label = labels[WINDOW]
    devices.claim(owner, label["serial_number"], label["setup_code"])
    offer = transfers.offer(owner, Device.get_by_id(WINDOW), REQUESTER)
    response = decide(console, offer, "requester")
    assert "Only a request its owner objected to can be decided" in response.get_data(as_text=True)
    assert Transfer.get_by_id(offer.id).state == "offered"
    transfers.cancel(owner, offer)
    with pytest.raises(devices.DeviceError) as caught:
        devices.claim(requester, label["serial_number"], label["setup_code"])
    waiting = transfers.request_device(
        requester, transfers.remember_possession(requester, caught.value.device)
    )
    response = decide(console, waiting, "requester")
    assert "This transfer is: requested" in response.get_data(as_text=True)
    assert Transfer.get_by_id(waiting.id).state == "requested"
    assert Device.get_by_id(WINDOW).owner_id == owner.id and decisions() == []
    # An unknown transfer is a 404 (once the form is filled in).
    response = post(console, "/support/transfers/999999/decide", {"outcome": "owner", "reason": REASON})
    assert response.status_code == 404


def test_a_double_submit_decides_once(console, disputed, owner, requester, sim, mailbox):
    first = decide(console, disputed, "requester", follow=False)
    second = decide(console, disputed, "requester")
    assert first.status_code == 302
    assert "Support already decided this request: device" in second.get_data(as_text=True)
    assert len(decisions()) == 2  # one per account, not per submit
    assert AuditEvent.select().where(AuditEvent.action == "device.transferred_in").count() == 1
    assert len(mailbox.to(REQUESTER)) == 1 and len(mailbox.to(OWNER)) == 1
    assert Device.get_by_id(WINDOW).owner_id == requester.id


def test_two_staff_deciding_at_once_decide_once(app, disputed, owner, requester, staff_account, sim):
    results = [None, None]
    barrier = threading.Barrier(2)

    def run(index, outcome):
        from selfserve import models

        with app.app_context():
            models.db.connect(reuse_if_open=True)
            barrier.wait()
            try:
                results[index] = transfers.decide_dispute(
                    User.get_by_id(staff_account.id), Transfer.get_by_id(disputed.id), outcome, REASON
                )
            except Exception as exc:  # noqa: BLE001 - collected for the assertions
                results[index] = exc
            finally:
                models.db.close()

    threads = [
        threading.Thread(target=run, args=(0, "requester")),
        threading.Thread(target=run, args=(1, "owner")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    won = [r for r in results if isinstance(r, Transfer)]
    refused = [r for r in results if isinstance(r, transfers.TransferError)]
    assert len(won) == 1 and len(refused) == 1, results
    assert len(decisions()) == 2 and {row.detail["outcome"] for row in decisions()} == {
        won[0].dispute_outcome
    }
    expected = requester if won[0].dispute_outcome == "requester" else owner
    assert Device.get_by_id(WINDOW).owner_id == expected.id
    assert sim.device(WINDOW)["owner"] == customer_of(expected)


def test_customers_get_403(app, disputed, owner, requester):
    for user in (owner, requester):
        client = app.test_client()
        login(client, user.email, PASSWORD)
        token = csrf_token(client, "/account")
        response = client.post(
            decide_path(disputed),
            data={
                "csrf_token": token,
                "outcome": "requester" if user == requester else "owner",
                "reason": REASON,
                "confirm": "yes",
                "next": "/support/fleet",
            },
        )
        assert response.status_code == 403
    assert Transfer.get_by_id(disputed.id).state == "objected" and decisions() == []


def test_refused_while_viewing_as_a_customer(console, disputed, owner, sim, mailbox):
    start_view(console, owner)
    sim.reset_counters()
    token = csrf_token(console, "/devices")
    response = console.post(
        decide_path(disputed),
        data={"csrf_token": token, "outcome": "requester", "reason": REASON, "confirm": "yes"},
    )
    assert response.status_code == 403 and "read-only" in response.get_data(as_text=True)
    assert Transfer.get_by_id(disputed.id).state == "objected"
    assert Device.get_by_id(WINDOW).owner_id == owner.id
    assert decisions() == [] and writes(sim) == {} and mailbox.messages == []


def test_the_device_changed_since_the_objection(console, disputed, owner, sim):
    # The owner offered it to someone else after objecting: that transfer is open.
    offer = transfers.offer(owner, Device.get_by_id(WINDOW), "friend@example.com")
    response = decide(console, disputed, "requester")
    assert "another transfer open" in response.get_data(as_text=True)
    assert Transfer.get_by_id(disputed.id).state == "objected"
    assert Device.get_by_id(WINDOW).claim_state is None  # the whole decision rolled back
    transfers.cancel(owner, offer)
    # The owner released it meanwhile: nothing to move; keeping it closes the dispute.
    devices.release(owner, Device.get_by_id(WINDOW))
    response = decide(console, disputed, "requester")
    assert "no longer in the owner" in response.get_data(as_text=True)
    transfer = Transfer.get_by_id(disputed.id)
    assert transfer.state == "objected" and transfer.open_device is None and decisions() == []
    assert Device.get_by_id(WINDOW).owner_id is None and Device.get_by_id(WINDOW).claim_state is None
    assert "stays with its owner" in decide(console, disputed, "owner").get_data(as_text=True)
    assert Transfer.get_by_id(disputed.id).state == "kept"


def test_only_staff_decide_in_the_service(disputed, owner, requester):
    for user in (owner, requester, None):
        with pytest.raises(transfers.TransferError) as caught:
            transfers.decide_dispute(user, disputed, "requester", REASON)
        assert caught.value.status == 403
    assert Transfer.get_by_id(disputed.id).state == "objected"


# --- the move after the decision: the same crash-safe machine ----------------------------------------


def _crash_in(monkeypatch, target, name, after=False):
    original = getattr(target, name)
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1 and not after:
            raise Crash()
        result = original(*args, **kwargs)
        if calls["n"] == 1:
            raise Crash()
        return result

    monkeypatch.setattr(target, name, crashing)


CRASH_POINTS = [
    ("before the release", "client", "remove_device_owner", False),
    ("after the claim, before the database write", "client", "claim_device", True),
    ("during the requester's email", "mail", "send", False),
]


@pytest.mark.parametrize("where,name,after", [p[1:] for p in CRASH_POINTS], ids=[p[0] for p in CRASH_POINTS])
def test_a_crash_after_deciding_resumes_in_the_sweep(
    disputed, owner, requester, staff_account, sim, mailbox, particle, monkeypatch, where, name, after
):
    _crash_in(monkeypatch, {"client": particle, "mail": mail}[where], name, after=after)
    with pytest.raises(Crash):
        transfers.decide_dispute(staff_account, disputed, "requester", REASON)
    # The decision itself is committed (once), the device is never nobody's in the database.
    assert len(decisions()) == 2
    device = Device.get_by_id(WINDOW)
    assert device.owner_id in (owner.id, requester.id)
    if device.owner_id == owner.id:
        assert device.claim_state == "transferring"
    # Deciding again is refused; the sweep waits for the dead worker's lease, then finishes.
    with pytest.raises(transfers.TransferError):
        transfers.decide_dispute(staff_account, Transfer.get_by_id(disputed.id), "owner", REASON)
    transfers.resume_pending()
    assert Transfer.get_by_id(disputed.id).state in ("moving", "done")
    expire_leases()
    transfers.resume_pending()
    done = Transfer.get_by_id(disputed.id)
    assert done.state == "done" and done.step is None, (done.state, done.step, done.last_error)
    assert Device.get_by_id(WINDOW).owner_id == requester.id
    assert sim.device(WINDOW)["owner"] == customer_of(requester)
    assert "decided that it goes to" in text(mailbox, REQUESTER)
    assert "decided that the device goes to" in text(mailbox, OWNER)
    assert AuditEvent.select().where(AuditEvent.action == "device.transferred_in").count() == 1
    assert len(decisions()) == 2


def test_a_cloud_outage_after_deciding_leaves_the_move_to_the_sweep(
    console, disputed, owner, requester, sim, mailbox
):
    sim.add_fault("DELETE", "/v1/products/*/devices/*/owner", count=1, status=503)
    response = decide(console, disputed, "requester")
    assert "the sweep finishes the move" in response.get_data(as_text=True)
    moving = Transfer.get_by_id(disputed.id)
    assert moving.state == "moving" and moving.step == "release" and moving.next_attempt_at
    assert Device.get_by_id(WINDOW).owner_id == owner.id and mailbox.messages == []
    Transfer.update(next_attempt_at=utcnow() - datetime.timedelta(seconds=1)).execute()
    transfers.resume_pending()
    assert Transfer.get_by_id(disputed.id).state == "done"
    assert sim.device(WINDOW)["owner"] == customer_of(requester)
    mailbox.wait_for(REQUESTER)
    mailbox.wait_for(OWNER)


def test_a_refused_claim_gives_it_back_to_the_owner(console, disputed, owner, sim, mailbox):
    sim.add_fault(
        "POST", "/v1/devices", count=1, status=403, body={"ok": False, "error": "Permission Denied"}
    )
    response = decide(console, disputed, "requester")
    assert "the device stays with its owner" in response.get_data(as_text=True)
    assert Transfer.get_by_id(disputed.id).state == "failed_returned"
    assert Device.get_by_id(WINDOW).owner_id == owner.id
    assert sim.device(WINDOW)["owner"] == customer_of(owner)
    assert "could not move" in text(mailbox, OWNER)


# --- where staff find it --------------------------------------------------------------------------


def test_the_forms_are_on_the_customer_page_and_in_the_fleet(console, disputed, owner, requester):
    for path in (f"/support/customers/{owner.id}", f"/support/customers/{requester.id}", "/support/fleet"):
        page = console.get(path).get_data(as_text=True)
        assert f'data-dispute="{disputed.id}"' in page, path
        assert f'action="{decide_path(disputed)}"' in page
        assert 'name="outcome" value="requester"' in page and 'name="outcome" value="owner"' in page
        assert f'name="next" value="{path}"' in page
        # The translated question is markup (its apostrophe as typed); the address is escaped.
        assert "Yes, move this device out of owner@example.com's account" in page
    decide(console, disputed, "owner")
    page = console.get("/support/fleet").get_data(as_text=True)
    assert f'data-dispute="{disputed.id}"' not in page
    page = console.get(f"/support/customers/{owner.id}").get_data(as_text=True)
    assert "decided by support: kept with the owner" in page
