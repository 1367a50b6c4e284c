"""Support services without HTTP: staff accounts and TOTP, view-as rules and expiry, the
reconciliation (each drift type, never a fix), the operator commands."""

import datetime

import pyotp
import pytest
from helpers import PASSWORD
from helpers import PUMP
from helpers import WINDOW
from helpers import make_user

from selfserve import sweep
from selfserve.models import AuditEvent
from selfserve.models import Device
from selfserve.models import LoginSession
from selfserve.models import ReconcileFinding
from selfserve.models import StaffView
from selfserve.models import User
from selfserve.models import utcnow
from selfserve.services import devices
from selfserve.services import impersonation
from selfserve.services import reconcile
from selfserve.services import staff
from selfserve.services import support
from selfserve.services.accounts import FormErrors

WINDOW_2 = "e00fce68a1b2c3d4e5f60702"
WINDOW_3 = "e00fce68a1b2c3d4e5f60703"


def own(user, labels, device_id):
    label = labels[device_id]
    return devices.claim(user, label["serial_number"], label["setup_code"])


def utc(moment):
    return moment.replace(tzinfo=datetime.UTC)


def signed_in(user, verified=True):
    """A login session for `user` (second factor passed unless told otherwise)."""
    row = LoginSession.create(
        id=f"s-{user.id}-{LoginSession.select().count()}",
        user=user,
        mfa_verified_at=utcnow() if verified else None,
    )
    user.login_session = row
    return user


# --- staff accounts and TOTP ----------------------------------------------------------------


def test_create_staff_makes_a_verified_staff_account_and_refuses_customers(app):
    user = staff.create_staff("  Helper@Support.Example ", PASSWORD, role="admin")
    assert user.email == "helper@support.example" and user.role == "admin" and user.is_verified
    assert user.particle_customer_id is None
    customer = make_user("home@example.com", PASSWORD, verified=False)
    with pytest.raises(staff.StaffError):
        staff.create_staff("home@example.com", PASSWORD)
    assert User.get_by_id(customer.id).role == "customer"
    with pytest.raises(staff.StaffError):
        staff.create_staff("other@support.example", PASSWORD, role="owner")
    with pytest.raises(FormErrors) as caught:
        staff.create_staff("not-an-email", "short")
    assert set(caught.value.errors) == {"email", "password"}


def test_totp_enrolment_and_codes_work_once(app):
    user = signed_in(staff.create_staff("helper@support.example", PASSWORD))
    secret, sealed = staff.enrolment_secret(user)
    assert secret not in sealed
    assert staff.enrolment_secret(user, sealed) == (secret, sealed)  # stable until confirmed
    assert User.get_by_id(user.id).totp_secret_encrypted is None  # nothing stored yet
    assert "otpauth://totp/" in staff.provisioning_uri(user, secret)
    assert staff.qr_data_uri("otpauth://x").startswith("data:image/svg+xml;base64,")
    now = utcnow()
    totp = pyotp.TOTP(secret)
    with pytest.raises(FormErrors):
        staff.confirm_enrolment(user, sealed, "12345", user.login_session, now)
    staff.confirm_enrolment(user, sealed, totp.at(utc(now)), user.login_session, now)
    user = User.get_by_id(user.id)
    assert staff.is_enrolled(user) and staff._secret(user) == secret
    assert secret not in user.totp_secret_encrypted
    assert LoginSession.get_by_id(signed_in_id(user)).mfa_verified_at is not None
    with pytest.raises(staff.StaffError):
        staff.enrolment_secret(user)
    # The enrolment code again (replay) is refused; the next step's code works; far-off codes don't.
    session = signed_in(user, verified=False).login_session
    with pytest.raises(FormErrors):
        staff.verify_code(user, totp.at(utc(now)), session, now)
    with pytest.raises(FormErrors):
        staff.verify_code(user, totp.at(utc(now) + datetime.timedelta(minutes=5)), session, now)
    staff.verify_code(user, totp.at(utc(now) + datetime.timedelta(seconds=30)), session, now)
    assert LoginSession.get_by_id(session.id).mfa_verified_at is not None


def test_enrolment_in_two_windows_keeps_the_first(app):
    user = signed_in(staff.create_staff("helper@support.example", PASSWORD))
    first, first_sealed = staff.enrolment_secret(user)
    second, second_sealed = staff.enrolment_secret(user)
    assert first != second
    staff.confirm_enrolment(user, first_sealed, pyotp.TOTP(first).now(), user.login_session)
    with pytest.raises(staff.StaffError):
        staff.confirm_enrolment(
            User.get_by_id(user.id), second_sealed, pyotp.TOTP(second).now(), user.login_session
        )
    assert staff._secret(User.get_by_id(user.id)) == first


def signed_in_id(user):
    return (
        LoginSession.select().where(LoginSession.user == user.id).order_by(LoginSession.created_at).first().id
    )


def test_reset_second_factor_forgets_the_app_and_signs_out(app):
    user = signed_in(staff.create_staff("helper@support.example", PASSWORD))
    secret, sealed = staff.enrolment_secret(user)
    staff.confirm_enrolment(user, sealed, pyotp.TOTP(secret).now(), user.login_session)
    staff.reset_second_factor("helper@support.example")
    user = User.get_by_id(user.id)
    assert not staff.is_enrolled(user) and user.totp_secret_encrypted is None
    assert (
        not LoginSession.select()
        .where((LoginSession.user == user.id) & LoginSession.ended_at.is_null())
        .exists()
    )
    with pytest.raises(staff.StaffError):
        staff.reset_second_factor("nobody@example.com")


# --- view as customer -----------------------------------------------------------------------


@pytest.fixture
def helper(app):
    return signed_in(staff.create_staff("helper@support.example", PASSWORD))


@pytest.fixture
def customer(app, sim):
    return make_user("home@example.com", PASSWORD)


def start(app, helper, customer_id, reason="ticket 12"):
    """start_view inside a request (it rotates the session)."""
    from flask_login import login_user

    with app.test_request_context("/support"):
        login_user(helper)
        return impersonation.start_view(helper, customer_id, reason)


def test_start_view_rules(app, helper, customer):
    other_staff = signed_in(staff.create_staff("other@support.example", PASSWORD))
    for target, status in ((helper.id, 403), (other_staff.id, 403), (999999, 404), ("1", 404)):
        with pytest.raises(impersonation.ViewRefused) as caught:
            start(app, helper, target)
        assert caught.value.status == status
    with pytest.raises(impersonation.ViewRefused) as caught:
        start(app, helper, customer.id, reason="  ")
    assert caught.value.status == 422
    with pytest.raises(impersonation.ViewRefused):
        start(app, signed_in(customer), customer.id)
    no_factor = signed_in(staff.create_staff("third@support.example", PASSWORD), verified=False)
    with pytest.raises(impersonation.ViewRefused) as caught:
        start(app, no_factor, customer.id)
    assert caught.value.status == 403
    assert not StaffView.select().exists()


def test_views_do_not_nest_and_are_bound_to_a_rotated_session(app, helper, customer):
    first_session = helper.login_session
    view = start(app, helper, customer.id)
    assert view.login_session_id != first_session.id
    assert LoginSession.get_by_id(first_session.id).ended_at is not None
    new_session = LoginSession.get_by_id(view.login_session_id)
    assert new_session.mfa_verified_at is not None and new_session.created_at == first_session.created_at
    helper.login_session = new_session
    with pytest.raises(impersonation.ViewRefused) as caught:
        start(app, helper, make_user("third@example.com", PASSWORD).id)
    assert caught.value.status == 409


def test_effective_user_is_the_customer_until_the_view_expires(app, helper, customer):
    view = start(app, helper, customer.id)
    session = LoginSession.get_by_id(view.login_session_id)
    staff_user = User.get_by_id(helper.id)
    seen = impersonation.effective_user(staff_user, session)
    assert seen.id == customer.id and seen.viewed_by.id == helper.id and seen.staff_view.id == view.id
    assert 29 * 60 < impersonation.seconds_left(seen.staff_view) <= 30 * 60
    StaffView.update(expires_at=utcnow() - datetime.timedelta(seconds=1)).where(
        StaffView.id == view.id
    ).execute()
    with app.test_request_context("/devices"):
        assert impersonation.effective_user(staff_user, session).id == helper.id
    ended = StaffView.get_by_id(view.id)
    assert ended.end_cause == "expired"
    rows = AuditEvent.select().where(AuditEvent.action == "support.view_ended")
    assert [(r.user_id, r.actor_id, r.detail["cause"]) for r in rows] == [(customer.id, helper.id, "expired")]
    # Ending again records nothing more.
    assert impersonation.end_view(ended, "ended") is False


def test_sweep_ends_expired_views_and_views_of_ended_sessions(app, helper, customer):
    view = start(app, helper, customer.id)
    second = make_user("second@example.com", PASSWORD)
    other_helper = signed_in(staff.create_staff("other@support.example", PASSWORD))
    other_view = start(app, other_helper, second.id)
    StaffView.update(expires_at=utcnow() - datetime.timedelta(minutes=1)).where(
        StaffView.id == view.id
    ).execute()
    LoginSession.update(ended_at=utcnow()).where(LoginSession.id == other_view.login_session_id).execute()
    results = sweep.run_once(app)
    assert results["selfserve.services.impersonation.end_stale_views"] == 2
    assert StaffView.get_by_id(view.id).end_cause == "expired"
    assert StaffView.get_by_id(other_view.id).end_cause == "signed_out"
    assert sweep.run_once(app)["selfserve.services.impersonation.end_stale_views"] == 0


# --- reconciliation -------------------------------------------------------------------------


def test_reconciliation_finds_each_drift_type_and_fixes_nothing(app, sim, labels, customer):
    other = make_user("other@example.com", PASSWORD)
    own(customer, labels, WINDOW)
    own(customer, labels, WINDOW_2)
    own(customer, labels, WINDOW_3)
    sim.set_device(WINDOW, owner=None)  # owned here, unclaimed there
    sim.set_device(PUMP, owner="stranger")  # free here, claimed there
    sim.set_device(WINDOW_2, owner=other.particle_customer_id)  # someone else there
    sim.set_device(WINDOW_3, in_product=False)  # not in the product
    sim.add_device("0123456789abcdef01234567", model="window", serial_number="ZZZ-1", in_product=True)
    before = {d.device_id: (d.owner_id, d.claim_state) for d in Device.select()}
    sim.reset_counters()

    run = reconcile.run(trigger="cli")

    assert run.status == "done" and run.devices_checked == len(labels)
    kinds = {(f.device_id, f.kind) for f in ReconcileFinding.select()}
    assert kinds == {
        (WINDOW, "unclaimed_on_particle"),
        (PUMP, "claimed_not_in_db"),
        (WINDOW_2, "owner_mismatch"),
        (WINDOW_3, "not_in_product"),
        ("0123456789abcdef01234567", "not_in_registry"),
    }
    mismatch = ReconcileFinding.get(ReconcileFinding.kind == "owner_mismatch")
    assert mismatch.detail["db_owner"] == "home@example.com"
    assert mismatch.detail["particle_owner_account"] == "other@example.com"
    assert run.findings_count == 5
    assert run.particle_status[WINDOW]["online"] is True
    assert WINDOW_3 not in run.particle_status  # not in the product
    # Nothing was changed on either side.
    assert {d.device_id: (d.owner_id, d.claim_state) for d in Device.select()} == before
    assert all(route.startswith("GET ") or route == "POST /oauth/token" for route in sim.counters()["routes"])
    assert sim.device(WINDOW)["owner"] is None and sim.device(PUMP)["owner"] == "stranger"


def test_reconciliation_pages_through_the_product_and_skips_steps_in_flight(
    app, sim, labels, customer, monkeypatch
):
    monkeypatch.setattr(reconcile, "PAGE_SIZE", 2)
    own(customer, labels, WINDOW)
    sim.set_device(WINDOW, owner=None)
    Device.update(claim_state="releasing", claim_state_at=utcnow()).where(
        Device.device_id == WINDOW
    ).execute()
    run = reconcile.run()
    assert run.status == "done" and run.findings_count == 0
    assert run.particle_devices == len(labels)
    assert sim.counters()["routes"]["GET /v1/products/:p/devices"] >= len(labels) // 2


def test_reconciliation_reports_a_cloud_failure_without_findings(app, sim, labels):
    sim.add_fault("GET", "/v1/products/*/devices", count=None, status=503)
    run = reconcile.run()
    assert run.status == "failed" and run.error
    assert not ReconcileFinding.select().exists()
    assert reconcile.drift_by_device(run) == {}


def test_reconcile_command_prints_findings(app, sim, labels, customer):
    own(customer, labels, WINDOW)
    sim.set_device(WINDOW, owner=None)
    result = app.test_cli_runner().invoke(args=["reconcile"])
    assert result.exit_code == 0, result.output
    assert "1 finding(s)" in result.output and f"{WINDOW}  unclaimed_on_particle" in result.output
    assert "Nothing was changed" in result.output
    sim.add_fault("GET", "/v1/products/*/devices", count=None, status=503)
    result = app.test_cli_runner().invoke(args=["reconcile"])
    assert result.exit_code == 2


def test_create_staff_command(app):
    runner = app.test_cli_runner()
    result = runner.invoke(
        args=["create-staff", "desk@support.example", "--role", "admin"], input=f"{PASSWORD}\n{PASSWORD}\n"
    )
    assert result.exit_code == 0, result.output
    assert User.get(User.email == "desk@support.example").role == "admin"
    assert PASSWORD not in result.output
    result = runner.invoke(args=["create-staff", "desk@support.example", "--password", PASSWORD])
    assert result.exit_code != 0 and "already has an account" in result.output
    result = runner.invoke(args=["reset-staff-second-factor", "desk@support.example"])
    assert result.exit_code == 0


# --- console queries ----------------------------------------------------------------------------


def test_stuck_lists_provisioning_and_device_steps_and_empty_extension_points(app, sim, labels, customer):
    waiting = make_user("pending@example.com", PASSWORD, provisioned=False)
    User.update(provisioning_attempts=2).where(User.id == waiting.id).execute()
    own(customer, labels, WINDOW)
    Device.update(claim_state="claiming", claim_state_at=utcnow() - datetime.timedelta(hours=1)).where(
        Device.device_id == WINDOW
    ).execute()
    found = support.stuck()
    assert [u.email for u in found["provisioning"]] == ["pending@example.com"]
    assert [d.device_id for d in found["device_steps"]] == [WINDOW]
    assert found["transfers"] == [] and found["migrations"] == []
    assert support.transfers_of(customer) == []


def test_support_release_calls_the_devices_service_and_audits_both(app, sim, labels, customer, helper):
    own(customer, labels, WINDOW)
    device = Device.get_by_id(WINDOW)
    with pytest.raises(support.SupportError):
        support.release_device(helper, device, "")
    support.release_device(helper, device, "returned, RMA 5")
    assert Device.get_by_id(WINDOW).owner_id is None and sim.device(WINDOW)["owner"] is None
    actions = [
        e.action for e in AuditEvent.select().where(AuditEvent.user == customer.id).order_by(AuditEvent.id)
    ]
    assert actions[-2:] == ["device.released", "support.released_device"]
    with pytest.raises(support.SupportError):
        support.release_device(helper, Device.get_by_id(WINDOW), "again 1")


def test_staff_alerts_are_listed_as_stuck(app, sim, labels):
    from selfserve.services import audit

    audit.record("staff.alert", user=None, device_id=WINDOW, reason="the move failed for good")
    alerts = support.stuck()["alerts"]
    assert [(a.device_id, a.detail["reason"]) for a in alerts] == [(WINDOW, "the move failed for good")]


def test_transfers_and_migrations_needing_staff_are_listed(app, sim, labels, customer, mailbox):
    from selfserve import models
    from selfserve.services import transfers

    own(customer, labels, WINDOW)
    transfer = transfers.offer(customer, Device.get_by_id(WINDOW), "buyer@example.com")
    assert [t.id for t in support.transfers_of(customer)] == [transfer.id]
    # An offer inside its answer window is waiting on the buyer, not stuck.
    assert support.stuck()["transfers"] == []
    # An objected request needs staff; so does a move running far longer than a sweep.
    models.Transfer.update(state="objected").where(models.Transfer.id == transfer.id).execute()
    assert [t.id for t in support.stuck()["transfers"]] == [transfer.id]
    models.Transfer.update(state="moving", decided_at=utcnow()).where(
        models.Transfer.id == transfer.id
    ).execute()
    assert support.stuck()["transfers"] == []
    later = utcnow() + datetime.timedelta(seconds=support.TRANSFER_STUCK_SECONDS + 1)
    assert [t.id for t in support.stuck(now=later)["transfers"]] == [transfer.id]
    models.MigrationRow.create(
        device_id=PUMP, email="field@example.com", state="failed", last_error="refused"
    )
    assert [row.device_id for row in support.stuck()["migrations"]] == [PUMP]
