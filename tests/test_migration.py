"""Migrating devices already in the field: the CSV command (dry run, per-row report, re-runs),
invitations claimed on verification, crash recovery, Particle rate limits, against the
simulator and a real SMTP sink."""

import datetime

import pytest
from helpers import PUMP
from helpers import WINDOW
from helpers import make_user
from helpers import seed_registry

from selfserve import tokens
from selfserve.models import AuditEvent
from selfserve.models import Device
from selfserve.models import MigrationRow
from selfserve.models import User
from selfserve.models import utcnow
from selfserve.services import accounts
from selfserve.services import devices
from selfserve.services import migration

COMPANY = "company-account@maker.example"


class Crash(BaseException):
    pass


@pytest.fixture
def app_config(app_config):
    app_config["MIGRATION_REQUESTS_PER_SECOND"] = 0  # no pacing unless a test asks
    return app_config


@pytest.fixture
def field(app, sim):
    """The demo devices in the registry, each claimed on Particle to the company's own account."""
    labels = {device["id"]: device for device in seed_registry()}
    for device_id in labels:
        sim.set_device(device_id, owner=COMPANY)
    return labels


def write_csv(tmp_path, lines, name="owners.csv"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def run_command(app, *args):
    return app.test_cli_runner().invoke(args=["migrate-devices", *args])


def verify_new_account(email):
    """Sign up and click the verification link, as the invited owner does."""
    accounts.sign_up(email, "correct horse battery")
    user = User.get(User.email == email)
    link = tokens.make("verify_email", {"u": user.id, "e": tokens.fingerprint(email)})
    return accounts.verify_email(link, password="correct horse battery").user


def test_dry_run_reports_and_changes_nothing(app, field, sim, tmp_path, mailbox):
    make_user("existing@example.com")
    path = write_csv(
        tmp_path,
        [
            "device_id,email",
            f"{WINDOW},new.owner@example.com",
            f"{PUMP},Existing@Example.com",
            "not-a-device,someone@example.com",
            "e00fce68a1b2c3d4e5f6ffff,someone@example.com",
            f"{WINDOW[:-1]}2,not-an-email",
        ],
    )
    sim.reset_counters()
    result = run_command(app, path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"line 2: {WINDOW} new.owner@example.com: would invite" in result.output
    assert f"line 3: {PUMP} existing@example.com: would claim" in result.output
    assert "line 4: not-a-device someone@example.com: skipped: the device id must be 24" in result.output
    assert (
        "line 5: e00fce68a1b2c3d4e5f6ffff someone@example.com: skipped: not in the device registry"
        in result.output
    )
    assert "line 6:" in result.output and "the email address is not valid" in result.output
    assert "Dry run, nothing changed." in result.output
    assert MigrationRow.select().count() == 0
    assert sim.counters()["total"] == 0
    assert mailbox.messages == []
    assert sim.device(WINDOW)["owner"] == COMPANY


def test_existing_owner_gets_the_device_now_and_new_owner_on_verification(app, field, sim, tmp_path, mailbox):
    existing = make_user("existing@example.com")
    path = write_csv(tmp_path, [f"{WINDOW},new.owner@example.com", f"{PUMP},existing@example.com"])
    result = run_command(app, path)
    assert result.exit_code == 0, result.output
    assert f"{PUMP} existing@example.com: done" in result.output
    assert f"{WINDOW} new.owner@example.com: invited" in result.output
    # Existing account: claimed on Particle (off the company's account) and here.
    assert sim.device(PUMP)["owner"] == existing.particle_customer_id
    assert devices.device_for(existing, PUMP)
    assert "in your Tidewell account" in mailbox.body(mailbox.wait_for("existing@example.com"))
    assert (
        AuditEvent.select()
        .where((AuditEvent.action == "device.migrated_in") & (AuditEvent.user == existing.id))
        .count()
        == 1
    )
    # New owner: invited, and the device stays on the company's account until they verify.
    invite = mailbox.wait_for("new.owner@example.com")
    assert "/signup" in mailbox.body(invite)
    assert sim.device(WINDOW)["owner"] == COMPANY
    assert Device.get_by_id(WINDOW).owner_id is None
    user = verify_new_account("new.owner@example.com")
    assert user.provisioning_state == "ready"
    assert sim.device(WINDOW)["owner"] == user.particle_customer_id
    assert devices.device_for(user, WINDOW)
    assert MigrationRow.get_by_id(WINDOW).state == "claimed"

    # A second run changes nothing and says so.
    sim.reset_counters()
    mailbox.clear()
    again = run_command(app, path)
    assert again.exit_code == 0
    assert again.output.count("already done") == 2
    assert sim.counters()["total"] == 0 and mailbox.messages == []


def test_rerun_while_waiting_does_not_invite_twice(app, field, sim, tmp_path, mailbox):
    path = write_csv(tmp_path, [f"{WINDOW},new.owner@example.com"])
    run_command(app, path)
    again = run_command(app, path)
    assert "already invited" in again.output
    assert len(mailbox.to("new.owner@example.com")) == 1
    other = write_csv(tmp_path, [f"{WINDOW},someone.else@example.com"], name="other.csv")
    assert "already being migrated to another address" in run_command(app, other).output


def test_device_owned_here_by_someone_else_is_skipped(app, field, sim, tmp_path):
    owner = make_user("owner@example.com")
    label = field[WINDOW]
    sim.set_device(WINDOW, owner=None)
    devices.claim(owner, label["serial_number"], label["setup_code"])
    make_user("claimant@example.com")
    result = run_command(app, write_csv(tmp_path, [f"{WINDOW},claimant@example.com"]))
    assert "skipped: owned here by another account" in result.output
    assert sim.device(WINDOW)["owner"] == owner.particle_customer_id


def test_the_sweep_claims_if_the_callback_was_missed(app, field, sim, tmp_path, monkeypatch):
    run_command(app, write_csv(tmp_path, [f"{WINDOW},new.owner@example.com"]))
    monkeypatch.setattr(migration, "claim_for_new_account", lambda user: 0)
    from selfserve.services import provisioning

    monkeypatch.setattr(provisioning, "READY_CALLBACKS", [])
    user = verify_new_account("new.owner@example.com")
    assert MigrationRow.get_by_id(WINDOW).state == "invited"
    assert migration.resume_pending()["started"] == 1
    assert sim.device(WINDOW)["owner"] == user.particle_customer_id
    assert Device.get_by_id(WINDOW).owner_id == user.id


@pytest.mark.parametrize("method", ["remove_device_owner", "claim_device"])
def test_a_crash_mid_claim_resumes_in_the_sweep(app, field, sim, tmp_path, particle, monkeypatch, method):
    user = make_user("existing@example.com")
    original = getattr(particle, method)
    fired = {"n": 0}

    def crash_after(*args):
        result = original(*args)
        fired["n"] += 1
        if fired["n"] == 1:
            raise Crash()
        return result

    monkeypatch.setattr(particle, method, crash_after)
    with pytest.raises(Crash):
        migration.migrate([migration.Row(1, WINDOW, "existing@example.com")])
    device = Device.get_by_id(WINDOW)
    assert device.owner_id == user.id and device.claim_state == "migrating"
    # Hidden from the owner's device pages until it is finished, and left alone by the devices sweep.
    devices.resume_pending(grace_seconds=0)
    assert Device.get_by_id(WINDOW).claim_state == "migrating"
    MigrationRow.update(lease_until=utcnow() - datetime.timedelta(seconds=1)).execute()
    migration.resume_pending()
    assert MigrationRow.get_by_id(WINDOW).state == "claimed"
    assert sim.device(WINDOW)["owner"] == user.particle_customer_id
    assert Device.get_by_id(WINDOW).claim_state is None


def test_rate_limits_wait_and_retry(app, field, sim, tmp_path):
    user = make_user("existing@example.com")
    app.config["MIGRATION_REQUESTS_PER_SECOND"] = 50
    sim.add_fault("POST", "/v1/devices", count=2, status=429, headers={"Retry-After": "0"})
    results = migration.migrate([migration.Row(1, WINDOW, "existing@example.com")])
    assert results[0].outcome == "claimed"
    assert sim.device(WINDOW)["owner"] == user.particle_customer_id


def test_persistent_rate_limit_is_left_to_the_sweep(app, field, sim, tmp_path):
    user = make_user("existing@example.com")
    app.config["MIGRATION_MAX_INLINE_RATE_WAITS"] = 1
    sim.add_fault("POST", "/v1/devices", count=2, status=429, headers={"Retry-After": "0"})
    results = migration.migrate([migration.Row(1, WINDOW, "existing@example.com")])
    assert results[0].outcome == "postponed"
    row = MigrationRow.get_by_id(WINDOW)
    assert row.step == "claim" and row.next_attempt_at is not None
    MigrationRow.update(next_attempt_at=utcnow()).execute()
    migration.resume_pending()
    assert MigrationRow.get_by_id(WINDOW).state == "claimed"
    assert sim.device(WINDOW)["owner"] == user.particle_customer_id


def test_permanent_refusal_fails_the_row_and_alerts_staff(app, field, sim, tmp_path):
    make_user("existing@example.com")
    sim.add_fault(
        "POST", "/v1/devices", count=1, status=403, body={"ok": False, "error": "Permission Denied"}
    )
    result = run_command(app, write_csv(tmp_path, [f"{WINDOW},existing@example.com"]))
    assert result.exit_code != 0
    assert "failed: claim refused: PermissionDenied" in result.output
    device = Device.get_by_id(WINDOW)
    assert device.owner_id is None and device.claim_state is None
    assert MigrationRow.get_by_id(WINDOW).state == "failed"
    assert AuditEvent.select().where(AuditEvent.action == "staff.alert").count() == 1


def test_pacer_spaces_calls_after_a_one_second_burst(monkeypatch):
    clock = {"now": 100.0, "slept": []}

    class FakeTime:
        @staticmethod
        def monotonic():
            return clock["now"]

        @staticmethod
        def sleep(seconds):
            clock["slept"].append(round(seconds, 6))
            clock["now"] += seconds

    monkeypatch.setattr(migration, "time", FakeTime)
    pacer = migration.Pacer(rate=10)
    for _ in range(30):
        pacer.wait()
    # One call every 0.1 s.
    assert len(clock["slept"]) == 29
    assert all(abs(s - 0.1) < 1e-6 for s in clock["slept"])
    # After an idle spell, at most one second's worth of calls goes at once.
    clock["now"] += 60
    clock["slept"].clear()
    for _ in range(15):
        pacer.wait()
    assert len(clock["slept"]) == 5
