"""Uncertain outcomes are not failures: a Particle write whose answer is lost may have happened
or happen later, and some answers are not confirmed (particle-cloud-api.md §15). End to end
against the simulator's latency and fault controls: a write that lands after our read timeout,
a lost answer of a write that never lands, the `/owner` 404, a re-claim of one's own device
answered "belongs to someone else", a duplicate-customer error in another shape. Each case ends
with our database and Particle agreeing."""

import datetime
import time

import pytest
from helpers import PASSWORD
from helpers import WINDOW
from helpers import csrf_token
from helpers import login
from helpers import make_user

from selfserve.models import AuditEvent
from selfserve.models import Device
from selfserve.models import MigrationRow
from selfserve.models import NameSync
from selfserve.models import Transfer
from selfserve.models import User
from selfserve.models import utcnow
from selfserve.services import devices
from selfserve.services import migration
from selfserve.services import provisioning
from selfserve.services import transfers

CLAIM = ("POST", "/v1/devices")
UNCLAIM = ("DELETE", "/v1/products/*/devices/*/owner")
BELONGS_TO_SOMEONE_ELSE = {"ok": False, "errors": ["That belongs to someone else."]}
LATE = 1.0  # the write lands this long after it was sent; our read timeout is shorter


@pytest.fixture
def app_config(app_config):
    app_config["PARTICLE_READ_TIMEOUT"] = 0.3
    app_config["TRANSFER_QUICK_RETRY_SECONDS"] = ()  # no in-request retries: the sweep decides
    return app_config


@pytest.fixture
def owner(app, sim):
    return make_user("owner@example.com", PASSWORD)


def customer_of(user):
    return User.get_by_id(user.id).particle_customer_id


def claim(user, labels, device_id=WINDOW):
    label = labels[device_id]
    return devices.claim(user, label["serial_number"], label["setup_code"])


def wait_until(condition, what, timeout=10.0):
    """Wait for the simulator to apply a delayed write (no timing is asserted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def wait_for_faults_to_finish(sim):
    wait_until(lambda: not sim.state()["faults"], "the injected faults")
    time.sleep(LATE)  # a fault already taken may still be holding its request


def sweep_devices():
    return devices.resume_pending(grace_seconds=0)


# --- claim -----------------------------------------------------------------------------------


def test_a_claim_that_lands_after_the_timeout_ends_claimed_on_both_sides(labels, owner, sim):
    sim.add_fault(*CLAIM, count=1, status=None, latency=LATE)
    with pytest.raises(devices.DeviceError) as error:
        claim(owner, labels)
    assert error.value.kind == "checking"
    assert "checking" in error.value.message and "Nothing was changed" not in error.value.message
    # Recorded as being added: hidden from device pages, listed as pending, nobody else's.
    device = Device.get_by_id(WINDOW)
    assert device.owner_id == owner.id and device.claim_state == "claiming"
    assert [d.device_id for d in devices.pending_of(owner)] == [WINDOW]

    wait_until(lambda: sim.device(WINDOW)["owner"] == customer_of(owner), "the late claim")
    assert sweep_devices()["claimed"] == 1
    device = Device.get_by_id(WINDOW)
    assert device.owner_id == owner.id and device.claim_state is None
    assert sim.device(WINDOW)["owner"] == customer_of(owner)
    assert AuditEvent.select().where(AuditEvent.action == "device.claimed").count() == 1


def test_a_claim_whose_answer_is_lost_and_never_lands_is_finished_by_the_sweep(labels, owner, sim):
    # The gateway gives up after our timeout and Particle never applies it.
    sim.add_fault(*CLAIM, count=1, status=504, latency=LATE)
    with pytest.raises(devices.DeviceError) as error:
        claim(owner, labels)
    assert error.value.kind == "checking"
    wait_for_faults_to_finish(sim)
    assert sim.device(WINDOW)["owner"] is None
    assert Device.get_by_id(WINDOW).claim_state == "claiming"
    # The homeowner asked for it: the sweep claims again (idempotent) and both sides agree.
    assert sweep_devices()["claimed"] == 1
    assert Device.get_by_id(WINDOW).owner_id == owner.id
    assert sim.device(WINDOW)["owner"] == customer_of(owner)


def test_another_customer_cannot_take_a_device_whose_claim_is_being_checked(labels, owner, sim):
    other = make_user("other@example.com", PASSWORD)
    sim.add_fault(*CLAIM, count=1, status=None, latency=LATE)
    with pytest.raises(devices.DeviceError):
        claim(owner, labels)
    with pytest.raises(devices.DeviceError) as error:
        claim(other, labels)
    assert error.value.kind == "owned_by_other"
    wait_until(lambda: sim.device(WINDOW)["owner"] == customer_of(owner), "the late claim")
    sweep_devices()
    assert Device.get_by_id(WINDOW).owner_id == owner.id


def test_a_re_claim_of_ones_own_device_answered_as_someone_elses_is_finished(labels, owner, sim):
    """§15.4: what re-claiming a device the customer already owns answers is not confirmed."""
    Device.update(owner=owner.id, claim_state="claiming").where(Device.device_id == WINDOW).execute()
    sim.set_device(WINDOW, owner=customer_of(owner))  # the first claim landed, its answer was lost
    sim.add_fault(*CLAIM, count=1, status=403, body=BELONGS_TO_SOMEONE_ELSE)
    assert sweep_devices()["claimed"] == 1
    device = Device.get_by_id(WINDOW)
    assert device.owner_id == owner.id and device.claim_state is None and device.claim_error is None


def test_a_device_someone_else_owns_on_particle_is_still_refused_as_drift(labels, owner, sim):
    sim.set_device(WINDOW, owner="someone-else")
    with pytest.raises(devices.DeviceError) as error:
        claim(owner, labels)
    assert error.value.kind == "drift"
    assert Device.get_by_id(WINDOW).owner_id is None


# --- release ---------------------------------------------------------------------------------


def test_a_release_that_lands_after_the_timeout_ends_free_on_both_sides(labels, owner, sim):
    device = claim(owner, labels)
    sim.add_fault(*UNCLAIM, count=1, status=None, latency=LATE)
    with pytest.raises(devices.DeviceError) as error:
        devices.release(owner, device)
    assert error.value.kind == "checking"
    assert "checking" in error.value.message and "still yours" not in error.value.message
    assert Device.get_by_id(WINDOW).claim_state == "releasing"

    wait_until(lambda: sim.device(WINDOW)["owner"] is None, "the late release")
    assert sweep_devices()["released"] == 1
    device = Device.get_by_id(WINDOW)
    assert device.owner_id is None and device.claim_state is None
    assert sim.device(WINDOW)["owner"] is None
    # And whoever holds the label can add it again.
    other = make_user("next@example.com", PASSWORD)
    assert claim(other, labels).owner_id == other.id


def test_a_release_whose_answer_is_lost_and_never_lands_is_finished_by_the_sweep(labels, owner, sim):
    device = claim(owner, labels)
    sim.add_fault(*UNCLAIM, count=1, status=504, latency=LATE)
    with pytest.raises(devices.DeviceError) as error:
        devices.release(owner, device)
    assert error.value.kind == "checking"
    wait_for_faults_to_finish(sim)
    assert sim.device(WINDOW)["owner"] == customer_of(owner)
    assert sweep_devices()["released"] == 1
    assert Device.get_by_id(WINDOW).owner_id is None
    assert sim.device(WINDOW)["owner"] is None


def test_a_release_answered_404_while_still_owned_is_not_taken_for_done(labels, owner, sim):
    """§15.3: the /owner 404 is not confirmed to mean "nobody owns it"."""
    device = claim(owner, labels)
    sim.add_fault(*UNCLAIM, count=1, status=404, body={"ok": False, "error": "Not Found"})
    with pytest.raises(devices.DeviceError) as error:
        devices.release(owner, device)
    assert error.value.kind == "refused"
    device = Device.get_by_id(WINDOW)
    assert device.owner_id == owner.id and device.claim_state is None
    assert sim.device(WINDOW)["owner"] == customer_of(owner)


def test_a_release_answered_404_for_a_free_device_is_done(labels, owner, sim):
    device = claim(owner, labels)
    sim.set_device(WINDOW, owner=None)
    sim.add_fault(*UNCLAIM, count=1, status=404, body={"ok": False, "error": "Not Found"})
    devices.release(owner, device)
    assert Device.get_by_id(WINDOW).owner_id is None


# --- the pages say the outcome is being checked ------------------------------------------------


def test_the_claim_page_says_it_is_being_checked(client, labels, owner, sim):
    login(client, owner.email, PASSWORD)
    sim.add_fault(*CLAIM, count=1, status=None, latency=LATE)
    label = labels[WINDOW]
    response = client.post(
        "/devices/claim",
        data={
            "serial": label["serial_number"],
            "setup_code": label["setup_code"],
            "csrf_token": csrf_token(client, "/devices/claim"),
        },
        follow_redirects=True,
    )
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "checking that the device was added" in page
    assert "being added to your account" in page  # the dashboard's pending list
    assert "Nothing was changed" not in page


def test_the_release_page_says_it_is_being_checked(client, labels, owner, sim):
    claim(owner, labels)
    login(client, owner.email, PASSWORD)
    sim.add_fault(*UNCLAIM, count=1, status=None, latency=LATE)
    response = client.post(
        f"/devices/{WINDOW}/release",
        data={"csrf_token": csrf_token(client, f"/devices/{WINDOW}/release")},
        follow_redirects=True,
    )
    page = response.get_data(as_text=True)
    assert "checking that the device was released" in page
    assert "being released" in page
    assert "It is still yours" not in page


# --- transfers -------------------------------------------------------------------------------


@pytest.fixture
def seller(owner):
    return owner


@pytest.fixture
def buyer(app, sim):
    return make_user("buyer@example.com", PASSWORD)


def make_due(model):
    model.update(next_attempt_at=utcnow() - datetime.timedelta(seconds=1)).execute()


def test_a_transfer_claim_that_lands_late_and_is_then_refused_as_someone_elses_completes(
    labels, seller, buyer, sim
):
    device = claim(seller, labels)
    transfer = transfers.offer(seller, device, buyer.email)
    sim.add_fault(*CLAIM, count=1, status=None, latency=LATE)
    moving = transfers.accept(buyer, transfer)
    assert moving.state == "moving" and moving.step == "claim"  # postponed, not failed
    wait_until(lambda: sim.device(WINDOW)["owner"] == customer_of(buyer), "the late claim")
    # The retry is a re-claim of the buyer's own device; suppose Particle refuses it (§15.4).
    sim.add_fault(*CLAIM, count=1, status=403, body=BELONGS_TO_SOMEONE_ELSE)
    make_due(Transfer)
    transfers.resume_pending()
    done = Transfer.get_by_id(transfer.id)
    assert done.state == "done", (done.state, done.step, done.last_error)
    assert Device.get_by_id(WINDOW).owner_id == buyer.id
    assert sim.device(WINDOW)["owner"] == customer_of(buyer)


def test_a_transfer_release_that_lands_late_goes_on(labels, seller, buyer, sim):
    device = claim(seller, labels)
    transfer = transfers.offer(seller, device, buyer.email)
    sim.add_fault(*UNCLAIM, count=1, status=None, latency=LATE)
    moving = transfers.accept(buyer, transfer)
    assert moving.state == "moving" and moving.step == "release"
    wait_until(lambda: sim.device(WINDOW)["owner"] is None, "the late release")
    # The next attempt reads the state back: released, so it goes on (the 404 of a second
    # unclaim would not be trusted without the read-back either).
    sim.add_fault(*UNCLAIM, count=1, status=404, body={"ok": False, "error": "Not Found"})
    make_due(Transfer)
    transfers.resume_pending()
    assert Transfer.get_by_id(transfer.id).state == "done"
    assert Device.get_by_id(WINDOW).owner_id == buyer.id
    assert sim.device(WINDOW)["owner"] == customer_of(buyer)


def test_a_transfer_release_answered_404_while_the_seller_still_owns_it_returns_it(
    labels, seller, buyer, sim
):
    device = claim(seller, labels)
    transfer = transfers.offer(seller, device, buyer.email)
    sim.add_fault(*UNCLAIM, count=1, status=404, body={"ok": False, "error": "Not Found"})
    result = transfers.accept(buyer, transfer)
    assert result.state == "failed_returned" and "404" in result.last_error
    assert Device.get_by_id(WINDOW).owner_id == seller.id
    assert sim.device(WINDOW)["owner"] == customer_of(seller)


# --- migration -------------------------------------------------------------------------------


def test_a_migration_claim_that_lands_late_and_is_then_refused_ends_claimed(app, labels, sim, tmp_path):
    user = make_user("field.owner@example.com", PASSWORD)
    sim.add_fault(*CLAIM, count=1, status=None, latency=LATE)
    row = migration.Row(1, WINDOW, user.email)
    result = migration.migrate_row(row)
    assert result.outcome == "postponed"
    wait_until(lambda: sim.device(WINDOW)["owner"] == customer_of(user), "the late claim")
    sim.add_fault(*CLAIM, count=1, status=403, body=BELONGS_TO_SOMEONE_ELSE)
    make_due(MigrationRow)
    migration.resume_pending()
    assert MigrationRow.get_by_id(WINDOW).state == "claimed"
    device = Device.get_by_id(WINDOW)
    assert device.owner_id == user.id and device.claim_state is None
    assert sim.device(WINDOW)["owner"] == customer_of(user)


# --- provisioning ----------------------------------------------------------------------------


def customers(sim):
    return [c["username"] for c in sim.state()["customers"]]


def test_a_customer_created_late_and_a_duplicate_error_of_another_shape_end_ready(app, sim):
    """§15.1: the exact duplicate-customer answer is not confirmed."""
    sim.configure(duplicate_customer_error={"status": 409, "body": {"ok": False, "error": "Customer exists"}})
    sim.add_fault("POST", "/v1/products/*/customers", count=1, status=None, latency=LATE)
    user = make_user("late.customer@example.com", PASSWORD, verified=True, provisioned=False)
    provisioning.resume_pending()
    pending = User.get_by_id(user.id)
    assert pending.provisioning_state == "pending" and pending.provisioning_attempts == 1
    wait_until(lambda: customers(sim) == [pending.particle_customer_id], "the late create")

    provisioning.resume_pending(now=utcnow() + datetime.timedelta(minutes=5))
    ready = User.get_by_id(user.id)
    assert ready.provisioning_state == "ready", ready.provisioning_error
    assert customers(sim) == [ready.particle_customer_id]  # created once


def test_a_refused_create_that_created_nothing_stays_pending(app, sim):
    sim.add_fault(
        "POST", "/v1/products/*/customers", count=1, status=400, body={"ok": False, "error": "Bad request"}
    )
    user = make_user("refused.customer@example.com", PASSWORD, verified=True, provisioned=False)
    provisioning.resume_pending()
    pending = User.get_by_id(user.id)
    assert pending.provisioning_state == "pending" and customers(sim) == []
    provisioning.resume_pending(now=utcnow() + datetime.timedelta(minutes=5))
    assert User.get_by_id(user.id).provisioning_state == "ready"


# --- rename ----------------------------------------------------------------------------------

RENAME = ("PUT", "/v1/devices/*")


def test_a_rename_that_lands_after_the_timeout_is_kept_on_both_sides(labels, owner, sim):
    device = claim(owner, labels)
    sim.add_fault(*RENAME, count=1, status=None, latency=LATE)
    renamed = devices.rename(owner, device, "Kitchen blind")
    assert renamed.name == "Kitchen blind" and Device.get_by_id(WINDOW).name == "Kitchen blind"
    wait_until(lambda: sim.device(WINDOW)["name"] == "Kitchen_blind", "the late rename")
    assert devices.push_pending_names() == 1
    assert sim.device(WINDOW)["name"] == "Kitchen_blind"
    assert devices.push_pending_names() == 0  # done


def test_a_rename_whose_answer_is_lost_and_never_lands_reaches_particle_later(labels, owner, sim):
    device = claim(owner, labels)
    before = sim.device(WINDOW)["name"]
    sim.add_fault(*RENAME, count=1, status=504, latency=LATE)
    devices.rename(owner, device, "Kitchen blind")
    wait_for_faults_to_finish(sim)
    assert sim.device(WINDOW)["name"] == before  # Particle doesn't have it (yet)
    assert Device.get_by_id(WINDOW).name == "Kitchen blind"
    # The cloud is down for the first push: it is postponed, then sent.
    sim.add_fault(*RENAME, count=1, status=503)
    assert devices.push_pending_names() == 1
    assert sim.device(WINDOW)["name"] == before
    make_due(NameSync)
    devices.push_pending_names()
    assert sim.device(WINDOW)["name"] == "Kitchen_blind"


def test_a_later_rename_wins_over_a_lost_one(labels, owner, sim):
    device = claim(owner, labels)
    sim.add_fault(*RENAME, count=1, status=504, latency=LATE)
    device = devices.rename(owner, device, "First name")
    wait_for_faults_to_finish(sim)
    devices.rename(owner, device, "Second name")
    devices.push_pending_names()
    assert sim.device(WINDOW)["name"] == "Second_name"
    assert Device.get_by_id(WINDOW).name == "Second name"


def test_a_rename_the_cloud_answered_as_failed_changes_nothing(labels, owner, sim):
    device = claim(owner, labels)
    sim.add_fault(*RENAME, count=1, status=503)
    with pytest.raises(devices.DeviceError) as error:
        devices.rename(owner, device, "Kitchen blind")
    assert error.value.kind == "cloud"
    assert Device.get_by_id(WINDOW).name is None
    assert devices.push_pending_names() == 0
