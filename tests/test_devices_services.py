"""Device rules without HTTP: ownership check, claim, release, rename, functions, crash recovery."""

import logging
import threading
import time

import pytest
from helpers import OFFLINE_WINDOW
from helpers import PUMP
from helpers import WINDOW
from helpers import make_user
from werkzeug.exceptions import NotFound

from selfserve import passwords
from selfserve.models import AuditEvent
from selfserve.models import ClaimAttempt
from selfserve.models import Device
from selfserve.models import DeviceSnapshot
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.services import devices
from selfserve.services import live_values


@pytest.fixture
def owner(app, sim):
    return make_user("owner@example.com")


@pytest.fixture
def neighbour(app, sim):
    return make_user("neighbour@example.com")


def claim(user, labels, device_id):
    label = labels[device_id]
    return devices.claim(user, label["serial_number"], label["setup_code"])


def particle_calls(sim, route=None):
    counters = sim.counters()
    return counters["routes"].get(route, 0) if route else counters["total"]


# --- the ownership check ------------------------------------------------------------------------


def test_device_for_returns_only_the_owners_device_without_calling_particle(labels, owner, neighbour, sim):
    claim(owner, labels, WINDOW)
    sim.reset_counters()
    assert devices.device_for(owner, WINDOW).device_id == WINDOW
    assert devices.device_for(owner, WINDOW.upper()).device_id == WINDOW
    for user, device_id in [
        (neighbour, WINDOW),  # someone else's
        (owner, PUMP),  # nobody's
        (owner, "f" * 24),  # unknown
        (owner, "not-a-device"),  # malformed
        (owner, WINDOW + "0"),
        (owner, "../" + WINDOW[3:]),
        (owner, ""),
    ]:
        with pytest.raises(NotFound):
            devices.device_for(user, device_id)
    assert particle_calls(sim) == 0


# --- claim -----------------------------------------------------------------------------------


def test_claim_makes_the_device_ours_here_and_on_particle(labels, owner, sim, caplog):
    caplog.set_level(logging.DEBUG)
    label = labels[WINDOW]
    # Typed the way people type: lower case, spaces, dashes moved.
    device = devices.claim(
        owner,
        " " + label["serial_number"].lower() + " ",
        label["setup_code"].lower()[:4] + "-" + label["setup_code"][4:],
    )
    assert device.owner_id == owner.id
    assert device.claim_state is None
    assert device.claimed_at is not None
    assert sim.device(WINDOW)["owner"] == owner.particle_customer_id
    event = AuditEvent.get(AuditEvent.action == "device.claimed")
    assert event.user_id == owner.id and event.device_id == WINDOW
    assert label["serial_number"] in event.detail["name"]
    assert label["setup_code"] not in str(event.detail)
    assert label["setup_code"] not in caplog.text
    assert [d.device_id for d in devices.devices_of(owner)] == [WINDOW]


def test_claim_works_while_the_device_is_offline(labels, owner, sim):
    assert sim.device(OFFLINE_WINDOW)["online"] is False
    device = claim(owner, labels, OFFLINE_WINDOW)
    assert device.owner_id == owner.id
    assert sim.device(OFFLINE_WINDOW)["owner"] == owner.particle_customer_id


def test_wrong_code_and_unknown_serial_get_the_same_answer_and_the_same_work(labels, owner, sim, monkeypatch):
    checked = []
    real_check = passwords.check_password

    def counting_check(password_hash, password):
        checked.append(password_hash)
        return real_check(password_hash, password)

    monkeypatch.setattr(passwords, "check_password", counting_check)
    label = labels[WINDOW]
    with pytest.raises(devices.DeviceError) as wrong_code:
        devices.claim(owner, label["serial_number"], "WRONG123")
    with pytest.raises(devices.DeviceError) as unknown_serial:
        devices.claim(owner, "SSW-NOPE-999999", label["setup_code"])
    assert wrong_code.value.kind == unknown_serial.value.kind == "wrong"
    assert wrong_code.value.message == unknown_serial.value.message
    assert "serial number and setup code don't match" in wrong_code.value.message
    # One Argon2 verification each: against the device's hash, and against a dummy one.
    assert len(checked) == 2
    assert checked[0] == Device.get_by_id(WINDOW).setup_code_hash
    assert checked[1] is None
    assert Device.get_by_id(WINDOW).owner_id is None
    assert particle_calls(sim, "POST /v1/devices") == 0


def test_the_device_id_alone_claims_nothing(labels, owner, sim):
    with pytest.raises(devices.DeviceError) as error:
        devices.claim(owner, WINDOW, labels[WINDOW]["setup_code"])
    assert error.value.kind == "wrong"
    with pytest.raises(devices.DeviceError) as error:
        devices.claim(owner, labels[WINDOW]["serial_number"], WINDOW)
    assert error.value.kind == "wrong"
    assert Device.get_by_id(WINDOW).owner_id is None


def test_empty_fields_say_which_one(labels, owner):
    with pytest.raises(devices.DeviceError) as error:
        devices.claim(owner, "  ", "ABCD1234")
    assert error.value.field == "serial"
    with pytest.raises(devices.DeviceError) as error:
        devices.claim(owner, "SSW-24A-000101", " ")
    assert error.value.field == "setup_code"
    assert ClaimAttempt.select().count() == 0  # a blank form is not a guess


def test_too_many_wrong_codes_per_account(app, labels, owner, sim):
    label = labels[WINDOW]
    for attempt in range(app.config["CLAIM_MAX_FAILURES_PER_ACCOUNT"]):
        with pytest.raises(devices.DeviceError) as error:
            # Spread over serials, so only the per-account limit applies.
            devices.claim(owner, f"SSW-GUESS-{attempt}", "WRONG123")
        assert error.value.kind == "wrong"
    with pytest.raises(devices.DeviceError) as error:
        devices.claim(owner, label["serial_number"], label["setup_code"])  # even the right code
    assert error.value.kind == "too_many"
    assert error.value.status == 429
    assert "minutes" in error.value.message
    assert Device.get_by_id(WINDOW).owner_id is None
    assert particle_calls(sim, "POST /v1/devices") == 0

    # The window slides: once the failures are old enough, the account may try again.
    ClaimAttempt.update(at=utcnow().replace(year=2000)).execute()
    assert claim(owner, labels, WINDOW).owner_id == owner.id


def test_too_many_wrong_codes_per_serial_across_accounts(app, labels, sim):
    label = labels[PUMP]
    guessers = [
        make_user(f"guesser{n}@example.com", provisioned=False)
        for n in range(app.config["CLAIM_MAX_FAILURES_PER_SERIAL"])
    ]
    for guesser in guessers:
        User.update(provisioning_state="ready", particle_customer_id=f"cguesser{guesser.id}").where(
            User.id == guesser.id
        ).execute()
    for guesser in guessers:
        with pytest.raises(devices.DeviceError) as error:
            devices.claim(User.get_by_id(guesser.id), label["serial_number"], "WRONG123")
        assert error.value.kind == "wrong"
    fresh = make_user("fresh@example.com")
    with pytest.raises(devices.DeviceError) as error:
        devices.claim(fresh, label["serial_number"], label["setup_code"])
    assert error.value.kind == "too_many"
    # Other serials are not affected.
    assert claim(fresh, labels, WINDOW).owner_id == fresh.id


def test_already_yours(labels, owner):
    claim(owner, labels, WINDOW)
    with pytest.raises(devices.DeviceError) as error:
        claim(owner, labels, WINDOW)
    assert error.value.kind == "already_yours"
    assert error.value.device.device_id == WINDOW
    assert ClaimAttempt.select().count() == 0


def test_owned_by_someone_else_says_what_to_do(labels, owner, neighbour, sim):
    claim(owner, labels, WINDOW)
    sim.reset_counters()
    with pytest.raises(devices.DeviceError) as error:
        claim(neighbour, labels, WINDOW)
    assert error.value.kind == "owned_by_other"
    assert "previous owner must release it" in error.value.message
    assert "contact support" in error.value.message
    assert Device.get_by_id(WINDOW).owner_id == owner.id
    assert sim.device(WINDOW)["owner"] == owner.particle_customer_id
    assert particle_calls(sim, "POST /v1/devices") == 0


def test_account_still_being_set_up(labels, app, sim):
    pending = make_user("pending@example.com", provisioned=False)
    assert pending.provisioning_state == "pending"
    with pytest.raises(devices.DeviceError) as error:
        claim(pending, labels, WINDOW)
    assert error.value.kind == "not_ready"
    assert "still being set up" in error.value.message
    unverified = make_user("unverified@example.com", verified=False)
    with pytest.raises(devices.DeviceError) as error:
        claim(unverified, labels, WINDOW)
    assert error.value.kind == "not_ready"
    assert "verify your email" in error.value.message
    assert Device.get_by_id(WINDOW).owner_id is None
    assert ClaimAttempt.select().count() == 0


def test_two_accounts_claiming_at_once_one_wins_and_particle_agrees(app, labels, sim):
    users = [make_user(f"racer{n}@example.com") for n in range(2)]
    # Slow the Particle claim down, so both requests are in flight at the same time.
    sim.add_fault("POST", "/v1/devices", count=2, status=None, latency=0.3)
    barrier = threading.Barrier(len(users))
    outcomes = {}

    def race(user):
        with app.app_context():
            db.connect(reuse_if_open=True)
            try:
                barrier.wait()
                try:
                    outcomes[user.id] = claim(user, labels, PUMP).owner_id
                except devices.DeviceError as exc:
                    outcomes[user.id] = exc.kind
            finally:
                db.close()

    threads = [threading.Thread(target=race, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    winners = [user for user in users if outcomes[user.id] == user.id]
    losers = [user for user in users if outcomes[user.id] != user.id]
    assert len(winners) == 1, outcomes
    assert outcomes[losers[0].id] in ("owned_by_other", "busy")
    device = Device.get_by_id(PUMP)
    assert device.owner_id == winners[0].id
    assert device.claim_state is None
    assert sim.device(PUMP)["owner"] == winners[0].particle_customer_id
    assert particle_calls(sim, "POST /v1/devices") == 1  # the loser never reached Particle


@pytest.mark.parametrize(
    "fault, message",
    [
        ({"status": 503}, "isn't answering"),
        ({"status": 500}, "isn't answering"),
        ({"status": 429, "headers": {"Retry-After": "30"}}, "busy"),
    ],
)
def test_cloud_trouble_during_claim_changes_nothing(labels, owner, sim, fault, message):
    sim.add_fault("POST", "/v1/devices", count=1, **fault)
    with pytest.raises(devices.DeviceError) as error:
        claim(owner, labels, WINDOW)
    assert error.value.kind == "cloud"
    assert message in error.value.message
    assert "Nothing was changed" in error.value.message
    device = Device.get_by_id(WINDOW)
    assert device.owner_id is None and device.claim_state is None
    assert sim.device(WINDOW)["owner"] is None
    assert ClaimAttempt.select().count() == 0  # not the homeowner's fault
    # Trying again works.
    assert claim(owner, labels, WINDOW).owner_id == owner.id


@pytest.fixture
def short_read_timeout(app_config):
    app_config["PARTICLE_READ_TIMEOUT"] = 0.3
    return app_config


def test_claim_timeout_is_checked_not_undone(short_read_timeout, labels, owner, sim):
    # The cloud takes longer than our read timeout: the claim may still land (it does here).
    sim.add_fault("POST", "/v1/devices", count=1, status=None, latency=1.0)
    with pytest.raises(devices.DeviceError) as error:
        claim(owner, labels, WINDOW)
    assert error.value.kind == "checking"
    device = Device.get_by_id(WINDOW)
    assert device.owner_id == owner.id and device.claim_state == "claiming"
    # The sweep reads it back and finishes: both sides agree (tests/test_uncertain_outcomes.py
    # covers the other cases).
    deadline = time.monotonic() + 10
    while sim.device(WINDOW)["owner"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert devices.resume_pending(grace_seconds=0)["claimed"] == 1
    assert Device.get_by_id(WINDOW).claim_state is None
    assert sim.device(WINDOW)["owner"] == owner.particle_customer_id


def test_claim_when_particle_lists_another_owner_is_refused_and_logged(labels, owner, sim, caplog):
    sim.set_device(WINDOW, owner="someone-else")
    with pytest.raises(devices.DeviceError) as error:
        claim(owner, labels, WINDOW)
    assert error.value.kind == "drift"
    assert "support" in error.value.message
    device = Device.get_by_id(WINDOW)
    assert device.owner_id is None and device.claim_state is None
    assert device.claim_error  # for staff
    assert sim.device(WINDOW)["owner"] == "someone-else"  # we don't "fix" it by guessing
    assert any(
        "drift" in record.getMessage().lower() and record.levelno >= logging.ERROR
        for record in caplog.records
    )


def test_device_missing_from_the_product_is_added_when_claimed(labels, owner, sim):
    Device.update(in_product=False).where(Device.device_id == WINDOW).execute()
    sim.set_device(WINDOW, in_product=False)
    device = claim(owner, labels, WINDOW)
    assert device.in_product is True
    assert sim.device(WINDOW)["in_product"] is True
    assert sim.device(WINDOW)["owner"] == owner.particle_customer_id


# --- crash recovery ---------------------------------------------------------------------------


def test_resume_finishes_a_claim_interrupted_after_the_database_step(labels, owner, sim):
    Device.update(owner=owner.id, claim_state="claiming").where(Device.device_id == PUMP).execute()
    assert sim.device(PUMP)["owner"] is None
    assert devices.device_for is not None
    with pytest.raises(NotFound):
        devices.device_for(owner, PUMP)  # not usable while half-done
    assert [d.device_id for d in devices.pending_of(owner)] == [PUMP]

    counts = devices.resume_pending()
    assert counts["claimed"] == 1
    device = Device.get_by_id(PUMP)
    assert device.owner_id == owner.id and device.claim_state is None and device.claimed_at
    assert sim.device(PUMP)["owner"] == owner.particle_customer_id
    assert AuditEvent.select().where(AuditEvent.action == "device.claimed").count() == 1
    assert devices.resume_pending() == {"claimed": 0, "released": 0, "undone": 0, "retry_later": 0}


def test_resume_finishes_a_claim_interrupted_after_the_particle_step(labels, owner, sim):
    claim(owner, labels, PUMP)
    Device.update(claim_state="claiming", claimed_at=None).where(Device.device_id == PUMP).execute()
    assert devices.resume_pending()["claimed"] == 1  # claiming again is idempotent
    device = Device.get_by_id(PUMP)
    assert device.owner_id == owner.id and device.claim_state is None
    assert sim.device(PUMP)["owner"] == owner.particle_customer_id


def test_resume_leaves_fresh_steps_alone(labels, owner, sim):
    Device.update(owner=owner.id, claim_state="claiming", claim_state_at=utcnow()).where(
        Device.device_id == PUMP
    ).execute()
    assert devices.resume_pending()["claimed"] == 0
    assert Device.get_by_id(PUMP).claim_state == "claiming"
    assert devices.resume_pending(grace_seconds=0)["claimed"] == 1


def test_resume_retries_later_when_the_cloud_is_down(labels, owner, sim):
    Device.update(owner=owner.id, claim_state="claiming").where(Device.device_id == PUMP).execute()
    sim.add_fault("POST", "/v1/devices", count=1, status=503)
    assert devices.resume_pending()["retry_later"] == 1
    device = Device.get_by_id(PUMP)
    assert device.owner_id == owner.id and device.claim_state == "claiming"
    assert devices.resume_pending(grace_seconds=0)["claimed"] == 1
    assert sim.device(PUMP)["owner"] == owner.particle_customer_id


def test_resume_undoes_a_claim_particle_refuses(labels, owner, sim):
    sim.set_device(PUMP, owner="someone-else")
    Device.update(owner=owner.id, claim_state="claiming").where(Device.device_id == PUMP).execute()
    assert devices.resume_pending()["undone"] == 1
    device = Device.get_by_id(PUMP)
    assert device.owner_id is None and device.claim_state is None and device.claim_error
    assert sim.device(PUMP)["owner"] == "someone-else"


def test_resume_finishes_an_interrupted_release(labels, owner, sim):
    claim(owner, labels, WINDOW)
    Device.update(claim_state="releasing").where(Device.device_id == WINDOW).execute()
    assert devices.resume_pending()["released"] == 1
    device = Device.get_by_id(WINDOW)
    assert device.owner_id is None and device.claim_state is None and device.name is None
    assert sim.device(WINDOW)["owner"] is None
    assert AuditEvent.select().where(AuditEvent.action == "device.released").count() == 1


def test_resume_finishes_a_release_whose_particle_step_was_done(labels, owner, sim):
    claim(owner, labels, WINDOW)
    sim.set_device(WINDOW, owner=None)
    Device.update(claim_state="releasing").where(Device.device_id == WINDOW).execute()
    assert devices.resume_pending()["released"] == 1
    assert Device.get_by_id(WINDOW).owner_id is None


def test_the_sweep_runs_the_resumer(app, labels, owner, sim):
    from selfserve import sweep

    Device.update(owner=owner.id, claim_state="claiming").where(Device.device_id == PUMP).execute()
    db.close()  # the sweep opens its own connection
    results = sweep.run_once(app)
    db.connect(reuse_if_open=True)
    assert results["selfserve.services.devices.resume_pending"]["claimed"] == 1
    assert sim.device(PUMP)["owner"] == owner.particle_customer_id


# --- release ---------------------------------------------------------------------------------------


def test_release_frees_the_device_for_the_next_owner(labels, owner, neighbour, sim):
    device = claim(owner, labels, WINDOW)
    devices.rename(owner, device, "Kitchen blind")
    DeviceSnapshot.create(device_id=WINDOW, values={"position": {"value": 40, "at": "2026-01-01T00:00:00Z"}})
    devices.release(owner, devices.device_for(owner, WINDOW))
    device = Device.get_by_id(WINDOW)
    assert device.owner_id is None and device.name is None and device.claimed_at is None
    assert sim.device(WINDOW)["owner"] is None
    assert sim.device(WINDOW)["in_product"] is True  # unclaimed, still in the product
    assert DeviceSnapshot.get_or_none(DeviceSnapshot.device_id == WINDOW) is None
    event = AuditEvent.get(AuditEvent.action == "device.released")
    assert event.detail["name"] == "Kitchen blind"
    assert devices.devices_of(owner) == []
    # The next holder of the label can claim it.
    assert claim(neighbour, labels, WINDOW).owner_id == neighbour.id
    assert sim.device(WINDOW)["owner"] == neighbour.particle_customer_id


@pytest.mark.parametrize("status", [503, 429])
def test_cloud_trouble_during_release_keeps_the_device(labels, owner, sim, status):
    claim(owner, labels, WINDOW)
    sim.add_fault("DELETE", "/v1/products/*/devices/*/owner", count=1, status=status)
    with pytest.raises(devices.DeviceError) as error:
        devices.release(owner, devices.device_for(owner, WINDOW))
    assert error.value.kind == "cloud"
    assert "still yours" in error.value.message
    device = Device.get_by_id(WINDOW)
    assert device.owner_id == owner.id and device.claim_state is None
    assert sim.device(WINDOW)["owner"] == owner.particle_customer_id
    devices.release(owner, devices.device_for(owner, WINDOW))
    assert sim.device(WINDOW)["owner"] is None


# --- rename ------------------------------------------------------------------------------------------


def test_rename_here_and_on_particle(labels, owner, sim):
    device = claim(owner, labels, WINDOW)
    renamed = devices.rename(owner, device, "  Living   room blind ")
    assert renamed.name == "Living room blind"
    assert Device.get_by_id(WINDOW).name == "Living room blind"
    assert sim.device(WINDOW)["name"] == "Living_room_blind"
    event = AuditEvent.get(AuditEvent.action == "device.renamed")
    assert event.detail["new"] == "Living room blind"
    assert labels[WINDOW]["serial_number"] in event.detail["old"]


@pytest.mark.parametrize(
    "name, message",
    [("", "Enter a name"), ("   ", "Enter a name"), ("x" * 65, "at most 64"), ("a\x00b", "letters")],
)
def test_rename_validation(labels, owner, sim, name, message):
    device = claim(owner, labels, WINDOW)
    sim.reset_counters()
    with pytest.raises(devices.DeviceError) as error:
        devices.rename(owner, device, name)
    assert message in error.value.message
    assert error.value.field == "name"
    assert Device.get_by_id(WINDOW).name is None
    assert particle_calls(sim) == 0


def test_rename_accepts_64_characters(labels, owner):
    device = claim(owner, labels, WINDOW)
    assert devices.rename(owner, device, "y" * 64).name == "y" * 64


def test_rename_when_the_cloud_is_down_changes_nothing(labels, owner, sim):
    device = claim(owner, labels, WINDOW)
    sim.add_fault("PUT", "/v1/devices/*", count=1, status=503)
    with pytest.raises(devices.DeviceError) as error:
        devices.rename(owner, device, "Kitchen")
    assert error.value.kind == "cloud"
    assert Device.get_by_id(WINDOW).name is None


# --- functions ----------------------------------------------------------------------------------------


def test_call_function_with_a_valid_argument(labels, owner, sim):
    device = claim(owner, labels, WINDOW)
    DeviceSnapshot.create(device_id=WINDOW, values={}, checked_at=utcnow(), online=True)
    result = devices.call_function(owner, device, "setPosition", " 40 ")
    assert result.ok and result.return_value >= 0
    assert sim.device(WINDOW)["variables"]["target"] == 40
    # The cached values are stale now: the next poll reads the device again.
    assert DeviceSnapshot.get_by_id(WINDOW).checked_at is None
    event = AuditEvent.get(AuditEvent.action == "device.function_called")
    assert event.detail == {
        "function": "Set position",
        "name": devices.display_name(device),
        "arg": "40",
        "result": "done",
        "answer": "Moving to 40%…",
    }


@pytest.mark.parametrize("arg", ["", "abc", "101", "-1", "4.5", "1e2", "50; reboot"])
def test_bad_arguments_never_reach_the_device(labels, owner, sim, arg):
    device = claim(owner, labels, WINDOW)
    sim.reset_counters()
    with pytest.raises(devices.DeviceError) as error:
        devices.call_function(owner, device, "setPosition", arg)
    assert error.value.kind == "invalid"
    assert "0 to 100%" in error.value.message
    assert particle_calls(sim) == 0


def test_functions_outside_the_catalogue_are_refused(labels, owner, sim):
    device = claim(owner, labels, WINDOW)
    sim.reset_counters()
    for name in ("reset", "start", "setPressure", "OPEN"):
        with pytest.raises(devices.DeviceError) as error:
            devices.call_function(owner, device, name)
        assert error.value.kind == "unknown_function"
    assert particle_calls(sim) == 0


def test_pump_start_needs_confirmation(labels, owner, sim):
    device = claim(owner, labels, "e00fce68a1b2c3d4e5f60802")
    sim.reset_counters()
    with pytest.raises(devices.DeviceError) as error:
        devices.call_function(owner, device, "start")
    assert error.value.kind == "confirm"
    assert "Start the pump?" in error.value.message
    assert particle_calls(sim) == 0
    result = devices.call_function(owner, device, "start", confirmed=True)
    assert result.ok
    assert sim.device("e00fce68a1b2c3d4e5f60802")["variables"]["running"] is True


def test_a_negative_return_value_means_the_device_refused(labels, owner, sim):
    device = claim(owner, labels, PUMP)
    sim.set_device(PUMP, fault="overpressure")
    result = devices.call_function(owner, device, "start", confirmed=True)
    assert not result.ok
    # The catalogue's sentence with the fix, never the raw return code.
    assert result.message.startswith("The pump didn't start: it stopped itself because of a fault.")
    assert "Press Stop pump to reset it" in result.message
    assert "code" not in result.message and str(result.return_value) not in result.message
    assert result.return_value < 0
    event = AuditEvent.get(AuditEvent.action == "device.function_called")
    assert event.detail["result"] == "refused"
    assert event.detail["answer"] == result.message


def test_a_pressure_above_the_guard_limit_is_warned_about_first(labels, owner, sim):
    device = claim(owner, labels, PUMP)
    sim.reset_counters()
    with pytest.raises(devices.DeviceError) as error:
        devices.call_function(owner, device, "setPressure", "395")
    assert error.value.kind == "confirm"
    assert "Above 380 kPa the pump's overpressure guard stops it" in error.value.message
    assert particle_calls(sim) == 0
    # At the limit itself no question; confirmed above it, the value is sent.
    assert devices.call_function(owner, device, "setPressure", "380").ok
    assert devices.call_function(owner, device, "setPressure", "395", confirmed=True).ok


def test_function_on_an_offline_device(labels, owner, sim):
    device = claim(owner, labels, OFFLINE_WINDOW)
    result = devices.call_function(owner, device, "open")
    assert not result.ok
    assert "offline" in result.message
    snapshot = DeviceSnapshot.get_by_id(OFFLINE_WINDOW)
    assert snapshot.online is False and snapshot.offline_since is not None  # remembered for polls
    assert AuditEvent.select().where(AuditEvent.action == "device.function_called").count() == 0


@pytest.mark.parametrize(
    "fault, expected",
    [
        ({"status": 503}, "isn't answering"),
        ({"status": 429}, "busy"),
        ({"status": 200, "body": {"ok": False, "error": "nope"}}, "did not carry out"),
        ({"status": 404, "body": {"ok": False, "error": "Function open not found"}}, "doesn't know"),
    ],
)
def test_function_errors_are_explained(labels, owner, sim, fault, expected):
    device = claim(owner, labels, WINDOW)
    sim.add_fault("POST", f"/v1/devices/{WINDOW}/open", count=1, **fault)
    result = devices.call_function(owner, device, "open")
    assert not result.ok
    assert expected in result.message


def test_live_values_cache_is_dropped_on_release(labels, owner, sim):
    device = claim(owner, labels, WINDOW)
    live_values.current(device)
    assert DeviceSnapshot.get_or_none(DeviceSnapshot.device_id == WINDOW) is not None
    devices.release(owner, device)
    assert DeviceSnapshot.get_or_none(DeviceSnapshot.device_id == WINDOW) is None
