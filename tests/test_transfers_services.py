"""Transfer rules without HTTP: offers, requests, the step machine, crash injection at every
step, Particle faults (transient and permanent), concurrency, emails as retried steps."""

import datetime
import threading

import pytest
from helpers import WINDOW
from helpers import make_user

from selfserve import mail
from selfserve import tokens
from selfserve.models import AuditEvent
from selfserve.models import Device
from selfserve.models import DeviceSnapshot
from selfserve.models import OutboxMail
from selfserve.models import Transfer
from selfserve.models import User
from selfserve.models import utcnow
from selfserve.services import devices
from selfserve.services import live_values
from selfserve.services import outbox
from selfserve.services import steps
from selfserve.services import transfers


class Crash(BaseException):
    """Stands in for the process dying mid-step (not an Exception: nothing catches it)."""


@pytest.fixture
def app_config(app_config):
    app_config["TRANSFER_QUICK_RETRY_SECONDS"] = ()  # no in-request retries unless a test asks
    return app_config


@pytest.fixture
def seller(app, sim):
    return make_user("seller@example.com")


@pytest.fixture
def buyer(app, sim):
    return make_user("buyer@example.com")


@pytest.fixture
def owned(labels, seller):
    label = labels[WINDOW]
    device = devices.claim(seller, label["serial_number"], label["setup_code"])
    devices.rename(seller, device, "Seller's blind")
    return Device.get_by_id(WINDOW)


def customer_of(user):
    return User.get_by_id(user.id).particle_customer_id


def expire_leases():
    """What time does for a worker that died: its lease runs out."""
    Transfer.update(lease_until=utcnow() - datetime.timedelta(seconds=1)).execute()


def make_due():
    Transfer.update(next_attempt_at=utcnow() - datetime.timedelta(seconds=1)).execute()


def assert_buyer_owns(device_id, buyer, sim):
    device = Device.get_by_id(device_id)
    assert device.owner_id == buyer.id
    assert device.claim_state is None
    assert device.name is None
    assert sim.device(device_id)["owner"] == customer_of(buyer)
    assert sim.device(device_id)["name"] == f"device_{device.serial_number}"  # not the seller's name


def assert_seller_owns(device_id, seller, sim):
    device = Device.get_by_id(device_id)
    assert device.owner_id == seller.id
    assert device.claim_state is None
    assert sim.device(device_id)["owner"] == customer_of(seller)


# --- the offer ------------------------------------------------------------------------------------


def test_offer_emails_a_signed_link_and_accept_moves_the_device(owned, seller, buyer, sim, mailbox):
    live_values.current(owned)  # the seller has read values: a snapshot exists
    assert DeviceSnapshot.get_or_none(DeviceSnapshot.device_id == WINDOW) is not None

    transfer = transfers.offer(seller, owned, " Buyer@Example.com ")
    assert transfer.state == "offered" and transfer.step is None and transfer.offer_mailed_at
    assert transfer.expires_at - transfer.created_at == datetime.timedelta(days=7)
    message = mailbox.wait_for("buyer@example.com")
    link = [url for url in mailbox.links(message) if "/transfers/offer/" in url][0]
    token = link.rsplit("/", 1)[1]
    assert transfers.from_offer_link(token).id == transfer.id
    assert "setup" not in mailbox.body(message).lower() or owned.setup_code_hash not in mailbox.body(message)
    # Still the seller's until accepted.
    assert_seller_owns(WINDOW, seller, sim)

    done = transfers.accept(buyer, transfer)
    assert done.state == "done" and done.step is None and done.open_device is None
    assert_buyer_owns(WINDOW, buyer, sim)
    assert DeviceSnapshot.get_or_none(DeviceSnapshot.device_id == WINDOW) is None
    # The seller can no longer reach it; the buyer can.
    with pytest.raises(Exception):
        devices.device_for(seller, WINDOW)
    assert devices.device_for(buyer, WINDOW).device_id == WINDOW
    # Both are told.
    assert "now in your account" in mailbox.body(mailbox.wait_for("buyer@example.com", count=2))
    assert "transferred" in mailbox.body(mailbox.wait_for("seller@example.com"))
    # Each keeps their own history: the seller's rename stays on the seller's account.
    seller_actions = [e.action for e in AuditEvent.select().where(AuditEvent.user == seller.id)]
    buyer_actions = [e.action for e in AuditEvent.select().where(AuditEvent.user == buyer.id)]
    assert "device.renamed" in seller_actions and "device.transferred_out" in seller_actions
    assert "device.renamed" not in buyer_actions and "device.transferred_in" in buyer_actions


def test_offer_link_is_signed_and_expires(owned, seller, app):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    with pytest.raises(tokens.TokenInvalid):
        transfers.from_offer_link("nonsense")
    old = tokens.make(
        "transfer_offer",
        {"t": transfer.id, "e": tokens.fingerprint("buyer@example.com")},
        issued_at=(utcnow() - datetime.timedelta(days=8)).replace(tzinfo=datetime.UTC).timestamp(),
    )
    with pytest.raises(tokens.TokenExpired):
        transfers.from_offer_link(old)
    # A link of another purpose never works here.
    other = tokens.make("transfer_answer", {"t": transfer.id, "e": tokens.fingerprint("buyer@example.com")})
    with pytest.raises(tokens.TokenInvalid):
        transfers.from_offer_link(other)


def test_offer_input_errors_and_one_open_transfer_per_device(owned, seller, sim):
    for bad in ["", "not-an-email", "seller@example.com"]:
        with pytest.raises(transfers.TransferError) as caught:
            transfers.offer(seller, owned, bad)
        assert caught.value.field == "email"
    with pytest.raises(transfers.TransferError) as caught:
        transfers.offer(seller, owned, "buyer@example.com", confirmed=False)
    assert caught.value.field == "confirmed" and Transfer.select().count() == 0
    first = transfers.offer(seller, owned, "buyer@example.com")
    again = transfers.offer(seller, owned, "buyer@example.com")  # a double submit
    assert again.id == first.id
    with pytest.raises(transfers.TransferError) as caught:
        transfers.offer(seller, owned, "someone.else@example.com")
    assert caught.value.kind == "open"
    assert Transfer.select().count() == 1


def test_only_the_addressee_accepts_and_only_once(owned, seller, buyer, sim):
    stranger = make_user("stranger@example.com")
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    with pytest.raises(transfers.TransferError) as caught:
        transfers.accept(stranger, transfer)
    assert caught.value.kind == "forbidden"
    with pytest.raises(transfers.TransferError):
        transfers.accept(seller, transfer)
    transfers.accept(buyer, transfer)
    with pytest.raises(transfers.TransferError) as caught:
        transfers.accept(buyer, Transfer.get_by_id(transfer.id))
    assert caught.value.kind in ("decided", "forbidden")
    assert_buyer_owns(WINDOW, buyer, sim)


def test_unverified_or_unprovisioned_buyer_must_finish_first(owned, seller, sim):
    fresh = make_user("buyer@example.com", verified=False)
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    assert transfers.role_of(fresh, transfer) is None  # not proven to own the address yet
    pending = make_user("pending@example.com", provisioned=False)
    transfers.cancel(seller, transfer)
    transfer = transfers.offer(seller, owned, "pending@example.com")
    with pytest.raises(transfers.TransferError) as caught:
        transfers.accept(pending, transfer)
    assert caught.value.kind == "not_ready"
    assert Transfer.get_by_id(transfer.id).state == "offered"


def test_seller_cancels_and_buyer_declines(owned, seller, buyer, sim, mailbox):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    with pytest.raises(transfers.TransferError):
        transfers.cancel(buyer, transfer)  # the buyer declines instead
    cancelled = transfers.cancel(seller, transfer)
    assert cancelled.state == "cancelled" and cancelled.open_device is None
    assert "cancelled" in mailbox.body(mailbox.wait_for("buyer@example.com", count=2))
    with pytest.raises(transfers.TransferError):
        transfers.accept(buyer, Transfer.get_by_id(transfer.id))

    second = transfers.offer(seller, owned, "buyer@example.com")
    declined = transfers.decline(buyer, second)
    assert declined.state == "declined"
    assert "declined" in mailbox.body(mailbox.wait_for("seller@example.com"))
    assert_seller_owns(WINDOW, seller, sim)


def test_lapsed_offers_expire_in_the_sweep(owned, seller, buyer, sim, mailbox):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    Transfer.update(expires_at=utcnow() - datetime.timedelta(seconds=1)).execute()
    with pytest.raises(transfers.TransferError) as caught:
        transfers.accept(buyer, Transfer.get_by_id(transfer.id))
    assert caught.value.kind == "expired"
    assert Transfer.get_by_id(transfer.id).state == "expired"
    transfers.resume_pending()
    assert "expired" in mailbox.body(mailbox.wait_for("seller@example.com"))
    assert_seller_owns(WINDOW, seller, sim)


def test_seller_released_the_device_meanwhile(owned, seller, buyer, sim):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    # Releasing is still possible (nothing is moving yet); it closes the offer (issue 9,
    # finding 4), so it can then not be accepted.
    devices.release(seller, Device.get_by_id(WINDOW))
    with pytest.raises(transfers.TransferError) as caught:
        transfers.accept(buyer, Transfer.get_by_id(transfer.id))
    assert caught.value.kind == "decided" and "cancelled" in caught.value.message
    assert Transfer.get_by_id(transfer.id).state == "cancelled"
    assert Device.get_by_id(WINDOW).owner_id is None


def test_the_moving_device_refuses_other_actions(owned, seller, buyer, sim, labels):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    sim.add_fault("POST", "/v1/devices", count=1, status=503)
    moving = transfers.accept(buyer, transfer)
    assert moving.state == "moving" and moving.step == "claim" and moving.next_attempt_at
    assert Device.get_by_id(WINDOW).claim_state == "transferring"
    with pytest.raises(Exception):
        devices.device_for(seller, WINDOW)
    with pytest.raises(devices.DeviceError) as caught:
        devices.release(seller, Device.get_by_id(WINDOW))
    assert caught.value.kind == "busy"
    third = make_user("third@example.com")
    with pytest.raises(devices.DeviceError) as caught:
        devices.claim(third, labels[WINDOW]["serial_number"], labels[WINDOW]["setup_code"])
    assert caught.value.kind == "owned_by_other"
    # The devices resumer leaves the transfer's state alone, however old it is.
    Device.update(claim_state_at=utcnow() - datetime.timedelta(hours=1)).execute()
    devices.resume_pending()
    assert Device.get_by_id(WINDOW).claim_state == "transferring"
    assert Device.get_by_id(WINDOW).owner_id == seller.id


# --- crash injection: every step, then the sweep finishes the job ------------------------------


def _crash_in(monkeypatch, target, name):
    original = getattr(target, name)
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise Crash()
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, crashing)
    return calls


def _crash_after(monkeypatch, target, name):
    """The call goes through (Particle did it) but the process dies before we record it."""
    original = getattr(target, name)
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        result = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise Crash()
        return result

    monkeypatch.setattr(target, name, crashing)


CRASH_POINTS = [
    ("before release", "client", "remove_device_owner", "before"),
    ("between release and claim", "client", "remove_device_owner", "after"),
    ("before the claim", "client", "claim_device", "before"),
    ("after the claim, before the database write", "client", "claim_device", "after"),
    ("while resetting the name", "client", "rename_device", "after"),
    ("during the database write", "step", "_step_record", "before"),
    ("during the buyer's email", "mail", "send", "before"),
]


@pytest.mark.parametrize("label,where,name,when", CRASH_POINTS, ids=[p[0] for p in CRASH_POINTS])
def test_a_crash_at_any_step_resumes_to_the_buyer_owning_it(
    owned, seller, buyer, sim, mailbox, particle, monkeypatch, label, where, name, when
):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    target = {"client": particle, "mail": mail, "step": None}[where]
    if where == "step":
        original = transfers.STEPS["record"]
        fired = {"n": 0}

        def crashing(t):
            fired["n"] += 1
            if fired["n"] == 1:
                raise Crash()
            return original(t)

        monkeypatch.setitem(transfers.STEPS, "record", crashing)
    elif when == "before":
        _crash_in(monkeypatch, target, name)
    else:
        _crash_after(monkeypatch, target, name)

    with pytest.raises(Crash):
        transfers.accept(buyer, transfer)
    row = Transfer.get_by_id(transfer.id)
    assert row.lease_until > utcnow()  # the dead worker's lease
    # The database never shows the device as nobody's, nor as the buyer's before the claim.
    device = Device.get_by_id(WINDOW)
    assert device.owner_id in (seller.id, buyer.id)
    if device.owner_id == seller.id:
        assert device.claim_state == "transferring"

    # The sweep does nothing while the lease is held, then finishes once it has run out.
    transfers.resume_pending()
    assert Transfer.get_by_id(transfer.id).lease_until == row.lease_until
    expire_leases()
    transfers.resume_pending()
    done = Transfer.get_by_id(transfer.id)
    assert done.state == "done" and done.step is None, (done.state, done.step, done.last_error)
    assert_buyer_owns(WINDOW, buyer, sim)
    assert "now in your account" in mailbox.body(mailbox.wait_for("buyer@example.com", count=2))
    mailbox.wait_for("seller@example.com")
    # Audited exactly once however often steps ran.
    assert AuditEvent.select().where(AuditEvent.action == "device.transferred_in").count() == 1


def test_a_crash_while_sending_the_offer_email_sends_it_later(owned, seller, buyer, mailbox, monkeypatch):
    _crash_in(monkeypatch, mail, "send")
    with pytest.raises(Crash):
        transfers.offer(seller, owned, "buyer@example.com")
    transfer = Transfer.get()
    assert transfer.state == "offered" and transfer.step == "mail_offer"
    expire_leases()
    transfers.resume_pending()
    assert Transfer.get_by_id(transfer.id).offer_mailed_at is not None
    mailbox.wait_for("buyer@example.com")


# --- Particle faults -----------------------------------------------------------------------------


def test_transient_faults_are_retried_with_backoff(owned, seller, buyer, sim, mailbox):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    sim.add_fault("DELETE", "/v1/products/*/devices/*/owner", count=2, status=503)
    first = transfers.accept(buyer, transfer)
    assert first.state == "moving" and first.step == "release" and first.attempts == 1
    assert first.next_attempt_at > utcnow() and first.lease_until is None
    assert "503" in first.last_error or "Service" in first.last_error
    transfers.resume_pending()  # not due yet: nothing happens
    assert Transfer.get_by_id(transfer.id).attempts == 1
    make_due()
    second = transfers.resume_pending() and Transfer.get_by_id(transfer.id)
    assert second.attempts == 2
    # The wait grows.
    assert second.next_attempt_at - utcnow() > datetime.timedelta(seconds=steps.backoff_seconds(1))
    make_due()
    transfers.resume_pending()
    assert Transfer.get_by_id(transfer.id).state == "done"
    assert_buyer_owns(WINDOW, buyer, sim)


def test_rate_limits_honour_retry_after(owned, seller, buyer, sim):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    sim.add_fault("POST", "/v1/devices", count=1, status=429, headers={"Retry-After": "120"})
    moving = transfers.accept(buyer, transfer)
    assert moving.step == "claim"
    assert moving.next_attempt_at - utcnow() > datetime.timedelta(seconds=100)
    make_due()
    transfers.resume_pending()
    assert_buyer_owns(WINDOW, buyer, sim)


def test_quick_retries_in_the_request_absorb_a_blip(app, owned, seller, buyer, sim):
    app.config["TRANSFER_QUICK_RETRY_SECONDS"] = (0.01, 0.01)
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    sim.add_fault("POST", "/v1/devices", count=2, status=502)
    assert transfers.accept(buyer, transfer).state == "done"
    assert_buyer_owns(WINDOW, buyer, sim)


def test_a_permanent_claim_refusal_returns_the_device_and_alerts_staff(owned, seller, buyer, sim, mailbox):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    sim.add_fault(
        "POST", "/v1/devices", count=1, status=403, body={"ok": False, "error": "Permission Denied"}
    )
    result = transfers.accept(buyer, transfer)
    assert result.state == "failed_returned" and result.open_device is None
    assert "claim refused" in result.last_error
    assert_seller_owns(WINDOW, seller, sim)
    assert Device.get_by_id(WINDOW).name == "Seller's blind"  # nothing of the seller's was lost
    alerts = list(AuditEvent.select().where(AuditEvent.action == "staff.alert"))
    assert len(alerts) == 1 and alerts[0].device_id == WINDOW
    assert "could not move" in mailbox.body(mailbox.wait_for("seller@example.com"))
    assert "could not move" in mailbox.body(mailbox.wait_for("buyer@example.com", count=2))
    # The seller can use the device again and offer it anew.
    assert devices.device_for(seller, WINDOW)
    assert transfers.offer(seller, Device.get_by_id(WINDOW), "buyer@example.com").state == "offered"


def test_a_crash_while_returning_still_ends_with_the_seller(owned, seller, buyer, sim, particle, monkeypatch):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    sim.add_fault("POST", "/v1/devices", count=1, status=403)
    real_claim = particle.claim_device
    calls = {"n": 0}

    def claim(customer_id, device_id):
        calls["n"] += 1
        if calls["n"] == 2:  # the return claim for the seller
            raise Crash()
        return real_claim(customer_id, device_id)

    monkeypatch.setattr(particle, "claim_device", claim)
    with pytest.raises(Crash):
        transfers.accept(buyer, transfer)
    assert Transfer.get_by_id(transfer.id).state == "returning"
    assert Device.get_by_id(WINDOW).owner_id == seller.id
    expire_leases()
    transfers.resume_pending()
    assert Transfer.get_by_id(transfer.id).state == "failed_returned"
    assert_seller_owns(WINDOW, seller, sim)


# --- emails never block the move ----------------------------------------------------------------


def test_mail_server_down_does_not_block_the_move(app, owned, seller, buyer, sim, mailbox):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    app.config["MAIL_PORT"] = 1  # nothing listens there
    result = transfers.accept(buyer, transfer)
    # The move finished and its mails wait in the outbox (queued once each).
    assert result.state == "done" and result.step is None
    assert_buyer_owns(WINDOW, buyer, sim)
    assert mailbox.to("buyer@example.com") == []
    assert OutboxMail.select().where(OutboxMail.state == "pending").count() == 3  # offer, done x2
    app.config["MAIL_PORT"] = mailbox.port
    outbox.send_due(now=utcnow() + datetime.timedelta(minutes=1))
    offer, done = mailbox.to("buyer@example.com")  # in the order they were queued
    assert "now in your account" in mailbox.body(done) and "now in your account" not in mailbox.body(offer)
    assert len(mailbox.to("seller@example.com")) == 1


# --- concurrency ---------------------------------------------------------------------------------


def _in_threads(app, functions):
    results = [None] * len(functions)
    barrier = threading.Barrier(len(functions))

    def run(index, function):
        from selfserve import models

        with app.app_context():
            models.db.connect(reuse_if_open=True)
            barrier.wait()
            try:
                results[index] = function()
            except Exception as exc:  # noqa: BLE001 - collected for the assertions
                results[index] = exc
            finally:
                models.db.close()

    threads = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate(functions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_two_offers_of_one_device_at_once_make_one_transfer(app, owned, seller, sim):
    device = Device.get_by_id(WINDOW)
    results = _in_threads(
        app,
        [
            lambda: transfers.offer(seller, device, "one@example.com"),
            lambda: transfers.offer(seller, device, "two@example.com"),
        ],
    )
    made = [r for r in results if isinstance(r, Transfer)]
    refused = [r for r in results if isinstance(r, transfers.TransferError)]
    assert len(made) == 1 and len(refused) == 1, results
    assert Transfer.select().count() == 1


def test_two_accepts_at_once_move_the_device_once(app, owned, seller, buyer, sim):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    results = _in_threads(
        app,
        [
            lambda: transfers.accept(User.get_by_id(buyer.id), Transfer.get_by_id(transfer.id)),
            lambda: transfers.accept(User.get_by_id(buyer.id), Transfer.get_by_id(transfer.id)),
        ],
    )
    assert len([r for r in results if isinstance(r, Transfer)]) == 1, results
    assert len([r for r in results if isinstance(r, transfers.TransferError)]) == 1, results
    assert_buyer_owns(WINDOW, buyer, sim)
    assert AuditEvent.select().where(AuditEvent.action == "device.transferred_in").count() == 1


def test_two_sweeps_at_once_run_a_step_once(app, owned, seller, buyer, sim, particle, monkeypatch):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    sim.add_fault("POST", "/v1/devices", count=1, status=503)
    transfers.accept(buyer, transfer)
    make_due()
    real = particle.claim_device
    calls = []
    monkeypatch.setattr(particle, "claim_device", lambda *a: calls.append(a) or real(*a))
    _in_threads(app, [transfers.resume_pending, transfers.resume_pending])
    assert len(calls) == 1
    assert_buyer_owns(WINDOW, buyer, sim)


# --- the buyer asks -----------------------------------------------------------------------------


def _prove(buyer, labels, device_id=WINDOW):
    label = labels[device_id]
    with pytest.raises(devices.DeviceError) as caught:
        devices.claim(buyer, label["serial_number"], label["setup_code"])
    assert caught.value.kind == "owned_by_other"
    return transfers.remember_possession(buyer, caught.value.device)


def test_request_without_objection_completes_by_itself(owned, seller, buyer, labels, sim, mailbox):
    # The seller has had it for a year: a device that changed hands recently (or a request from
    # a former owner) never moves on silence (tests/test_transfers_guarded_requests.py).
    Device.update(claimed_at=utcnow() - datetime.timedelta(days=365)).where(
        Device.device_id == WINDOW
    ).execute()
    proof = _prove(buyer, labels)
    transfer = transfers.request_device(buyer, proof)
    assert transfer.state == "requested" and transfer.seller_id == seller.id
    message = mailbox.wait_for("seller@example.com")
    links = mailbox.links(message)
    assert any("/transfers/answer/" in url for url in links)
    assert labels[WINDOW]["setup_code"] not in mailbox.body(message)
    # The proof works once.
    with pytest.raises(transfers.TransferError):
        transfers.request_device(buyer, proof)
    # Before the deadline nothing moves.
    transfers.resume_pending()
    assert_seller_owns(WINDOW, seller, sim)
    # The deadline passes (tests move time rather than wait).
    Transfer.update(expires_at=utcnow() - datetime.timedelta(seconds=1)).execute()
    counts = transfers.resume_pending()
    assert counts["started"] == 1
    assert Transfer.get_by_id(transfer.id).state == "done"
    assert_buyer_owns(WINDOW, buyer, sim)


def test_objection_closes_the_request_and_tells_the_buyer(owned, seller, buyer, labels, sim, mailbox):
    transfer = transfers.request_device(buyer, _prove(buyer, labels))
    message = mailbox.wait_for("seller@example.com")
    object_url = [url for url in mailbox.links(message) if "/transfers/answer/" in url][1]
    found, action = transfers.from_answer_link(object_url.rsplit("/", 1)[1])
    assert found.id == transfer.id and action == "object"
    with pytest.raises(transfers.TransferError):
        transfers.object_to(buyer, transfer)  # only the owner answers
    result = transfers.object_to(seller, transfer)
    assert result.state == "objected" and result.open_device is None
    assert "contact our support" in mailbox.body(mailbox.wait_for("buyer@example.com"))
    Transfer.update(expires_at=utcnow() - datetime.timedelta(seconds=1)).execute()
    transfers.resume_pending()
    assert_seller_owns(WINDOW, seller, sim)
    with pytest.raises(transfers.TransferError):
        transfers.approve(seller, Transfer.get_by_id(transfer.id))


def test_owner_approves_early(owned, seller, buyer, labels, sim):
    transfer = transfers.request_device(buyer, _prove(buyer, labels))
    assert transfers.approve(seller, transfer).state == "done"
    assert_buyer_owns(WINDOW, buyer, sim)


def test_request_rules(owned, seller, buyer, labels, sim, app):
    with pytest.raises(transfers.TransferError) as caught:
        transfers.request_device(buyer, "made-up-proof-value")
    assert caught.value.kind == "proof"
    # A proof is bound to the account that made it and expires.
    proof = _prove(buyer, labels)
    other = make_user("other@example.com")
    with pytest.raises(transfers.TransferError):
        transfers.request_device(other, proof)
    from selfserve.models import PossessionProof

    PossessionProof.update(expires_at=utcnow() - datetime.timedelta(seconds=1)).execute()
    with pytest.raises(transfers.TransferError):
        transfers.request_device(buyer, proof)
    # Rate limit per account.
    app.config["TRANSFER_REQUESTS_PER_DAY"] = 1
    transfers.request_device(buyer, _prove(buyer, labels))
    transfers.cancel(buyer, Transfer.get())
    with pytest.raises(transfers.TransferError) as caught:
        transfers.request_device(buyer, _prove(buyer, labels))
    assert caught.value.kind == "too_many"


def test_an_open_offer_blocks_a_request(owned, seller, buyer, labels, sim):
    transfers.offer(seller, owned, "someone@example.com")
    with pytest.raises(transfers.TransferError) as caught:
        transfers.request_device(buyer, _prove(buyer, labels))
    assert caught.value.kind == "open"


def test_when_giving_it_back_fails_too_staff_are_alerted_and_it_keeps_trying(owned, seller, buyer, sim):
    transfer = transfers.offer(seller, owned, "buyer@example.com")
    sim.add_fault("POST", "/v1/devices", count=2, status=403)  # the buyer's claim, then the seller's
    stuck = transfers.accept(buyer, transfer)
    assert stuck.state == "returning" and stuck.step == "return_claim"
    assert stuck.next_attempt_at - utcnow() > datetime.timedelta(minutes=5)
    device = Device.get_by_id(WINDOW)
    assert device.owner_id == seller.id and device.claim_state == "transferring"  # never nobody's
    assert AuditEvent.select().where(AuditEvent.action == "staff.alert").count() == 1
    make_due()
    transfers.resume_pending()
    final = Transfer.get_by_id(transfer.id)
    assert final.state == "failed_returned"
    assert_seller_owns(WINDOW, seller, sim)
    assert AuditEvent.select().where(AuditEvent.action == "staff.alert").count() == 1  # once per transfer
