"""Account rules without HTTP: sign-up, verification, provisioning, sign-in, reset, changes.

Real parts only: mail goes over SMTP to the `mailbox` sink, Particle calls go over HTTP to the
simulator (`sim`).
"""

import datetime
import re
import socket
import threading
import time

import pytest
from helpers import PASSWORD
from helpers import make_user

from selfserve import background
from selfserve import passwords
from selfserve import tokens
from selfserve.models import AuditEvent
from selfserve.models import LoginSession
from selfserve.models import OutboxMail
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.services import accounts
from selfserve.services import outbox
from selfserve.services import provisioning
from selfserve.services import steps
from selfserve.services.accounts import FormErrors

CUSTOMER_ID = re.compile(r"^c[0-9a-f]{24}$")


def verify_token_from(mailbox, address, count=1):
    message = mailbox.wait_for(address, count=count)
    links = [link for link in mailbox.links(message) if "/verify/" in link]
    assert links, mailbox.body(message)
    return links[-1].rsplit("/verify/", 1)[1]


def token_in(mailbox, address, marker, count=1):
    message = mailbox.wait_for(address, count=count)
    links = [link for link in mailbox.links(message) if marker in link]
    assert links, mailbox.body(message)
    return links[-1].rsplit(marker, 1)[1]


def customers(sim):
    return [c["username"] for c in sim.state()["customers"]]


def actions(user):
    return [e.action for e in AuditEvent.select().where(AuditEvent.user == user).order_by(AuditEvent.id)]


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def in_thread_with_db(app, function, *args):
    """Run `function` in the current thread under an app context with its own connection."""
    with app.app_context():
        db.connect(reuse_if_open=True)
        try:
            return function(*args)
        finally:
            db.close()


# --- sign-up ------------------------------------------------------------------------------------


def test_sign_up_creates_an_unverified_account_and_mails_a_verify_link(app, mailbox, sim):
    accounts.sign_up("  New.Person@Example.COM ", PASSWORD)

    user = User.get(User.email == "new.person@example.com")
    assert not user.is_verified
    assert user.provisioning_state is None and user.particle_customer_id is None
    assert passwords.check_password(user.password_hash, PASSWORD)
    assert user.password_hash != PASSWORD
    token = verify_token_from(mailbox, "new.person@example.com")
    assert accounts.check_verify_link(token).id == user.id
    assert customers(sim) == []  # nothing in Particle before verification
    assert actions(user) == ["account.signed_up"]


def test_sign_up_with_a_registered_address_creates_nothing_and_tells_the_owner(app, mailbox, sim):
    # A verified account (an unverified one is replaced: tests/test_accounts_takeover.py).
    owner = make_user("owner@example.com")

    accounts.sign_up("Owner@example.com", "another long password")

    assert User.select().count() == 1
    message = mailbox.wait_for("owner@example.com")
    body = mailbox.body(message)
    assert "tried to create" in body
    assert "/login" in body and "/forgot" in body
    assert "/verify/" not in body
    assert passwords.check_password(User.get_by_id(owner.id).password_hash, PASSWORD)
    assert "account.signup_attempted" in actions(owner)


def test_sign_up_rejects_bad_input_and_saves_nothing(app, mailbox):
    with pytest.raises(FormErrors) as caught:
        accounts.sign_up("not-an-address", "short")
    assert set(caught.value.errors) == {"email", "password"}
    assert "10 characters" in caught.value.errors["password"]
    with pytest.raises(FormErrors):
        accounts.sign_up("", PASSWORD)
    # Length is the only rule: a long password without digits or symbols is fine.
    accounts.sign_up("words@example.com", "just some lowercase words")
    assert User.select().count() == 1
    assert len(mailbox.messages) == 1


def test_sign_up_when_smtp_is_down_keeps_the_account_and_the_mail_goes_later(app, mailbox):
    working_port = app.config["MAIL_PORT"]
    app.config["MAIL_PORT"] = closed_port()
    accounts.sign_up("late@example.com", PASSWORD)  # no error: the mail waits in the outbox
    user = User.get(User.email == "late@example.com")
    assert mailbox.messages == []  # (the sender ran, and the server was down)
    queued = OutboxMail.get(OutboxMail.to_address == "late@example.com")
    assert (queued.state, queued.attempts) == ("pending", 1) and "ConnectionRefused" in queued.last_error

    app.config["MAIL_PORT"] = working_port
    outbox.send_due(now=utcnow() + datetime.timedelta(seconds=steps.backoff_seconds(1)))
    token = verify_token_from(mailbox, "late@example.com")
    assert accounts.check_verify_link(token).id == user.id
    assert OutboxMail.get_by_id(queued.id).state == "sent"
    # Resending works too (another link, another mail).
    assert accounts.resend_verification(user) is True
    verify_token_from(mailbox, "late@example.com", count=2)


# --- verification and provisioning ------------------------------------------------------------


def test_verify_creates_one_opaque_customer_and_a_second_click_creates_nothing(app, mailbox, sim):
    accounts.sign_up("verify.me@example.com", PASSWORD)
    token = verify_token_from(mailbox, "verify.me@example.com")

    first = accounts.verify_email(token, password=PASSWORD)

    assert first.newly_verified
    user = User.get_by_id(first.user.id)
    assert user.is_verified
    assert user.provisioning_state == "ready"
    assert CUSTOMER_ID.match(user.particle_customer_id)
    assert "verify" not in user.particle_customer_id and "example" not in user.particle_customer_id
    assert customers(sim) == [user.particle_customer_id]

    second = accounts.verify_email(token, password=PASSWORD)
    assert not second.newly_verified
    assert customers(sim) == [user.particle_customer_id]
    assert User.get_by_id(user.id).particle_customer_id == user.particle_customer_id
    assert actions(user).count("account.email_verified") == 1
    assert actions(user).count("account.provisioned") == 1


def test_checking_a_verify_link_changes_nothing(app, mailbox, sim):
    user = make_user("look@example.com", verified=False)
    accounts.send_verification(user)
    token = verify_token_from(mailbox, "look@example.com")

    assert accounts.check_verify_link(token).id == user.id

    assert not User.get_by_id(user.id).is_verified
    assert customers(sim) == []


def test_expired_tampered_and_misdirected_verify_links_are_refused(app, mailbox, sim):
    user = make_user("links@example.com", verified=False)
    payload = {"u": user.id, "e": tokens.fingerprint(user.email)}

    old = tokens.make("verify_email", payload, issued_at=time.time() - 48 * 3600 - 60)
    with pytest.raises(tokens.TokenExpired):
        accounts.verify_email(old, password=PASSWORD)
    fresh_enough = tokens.make("verify_email", payload, issued_at=time.time() - 47 * 3600)
    assert accounts.check_verify_link(fresh_enough).id == user.id

    good = tokens.make("verify_email", payload)
    tampered = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
    with pytest.raises(tokens.TokenInvalid):
        accounts.verify_email(tampered, password=PASSWORD)
    with pytest.raises(tokens.TokenInvalid):
        accounts.verify_email("not a token at all", password=PASSWORD)
    # A token signed for another purpose, same payload: the salt differs.
    with pytest.raises(tokens.TokenInvalid):
        accounts.verify_email(tokens.make("reset_password", payload), password=PASSWORD)
    # Someone else's account id in an otherwise well-formed payload doesn't verify.
    with pytest.raises(tokens.TokenInvalid):
        accounts.verify_email(
            tokens.make("verify_email", {"u": user.id + 1000, "e": payload["e"]}), password=PASSWORD
        )

    assert not User.get_by_id(user.id).is_verified
    assert customers(sim) == []


def test_a_verify_link_dies_when_the_email_changes(app, mailbox, sim):
    user = make_user("before@example.com", verified=False)
    accounts.send_verification(user)
    token = verify_token_from(mailbox, "before@example.com")

    User.update(email="after@example.com").where(User.id == user.id).execute()

    with pytest.raises(tokens.TokenInvalid) as caught:
        accounts.verify_email(token, password=PASSWORD)
    assert "no longer on the account" in caught.value.message
    assert not User.get_by_id(user.id).is_verified
    assert customers(sim) == []


def test_two_simultaneous_verifications_make_one_customer(app, mailbox, sim):
    user = make_user("twice@example.com", verified=False)
    accounts.send_verification(user)
    token = verify_token_from(mailbox, "twice@example.com")
    start = threading.Barrier(2)
    results = []

    def click():
        def work():
            start.wait(timeout=10)
            return accounts.verify_email(token, password=PASSWORD)

        results.append(in_thread_with_db(app, work))

    threads = [threading.Thread(target=click) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(results) == 2
    assert sorted(r.newly_verified for r in results) == [False, True]
    user = User.get_by_id(user.id)
    assert user.provisioning_state == "ready"
    assert customers(sim) == [user.particle_customer_id]
    assert User.select().where(User.particle_customer_id.is_null(False)).count() == 1


def test_particle_down_during_verify_leaves_the_account_pending_and_resume_finishes_it(app, mailbox, sim):
    user = make_user("outage@example.com", verified=False)
    accounts.send_verification(user)
    token = verify_token_from(mailbox, "outage@example.com")
    sim.add_fault("POST", "/v1/products/*/customers", count=3, status=503)

    result = accounts.verify_email(token, password=PASSWORD)

    user = User.get_by_id(user.id)
    assert result.newly_verified and user.is_verified
    assert user.provisioning_state == "pending"
    assert CUSTOMER_ID.match(user.particle_customer_id)  # saved before Particle was called
    assert user.provisioning_attempts == 1
    assert "not reachable" in user.provisioning_error
    assert customers(sim) == []
    # Backoff: an immediate retry does nothing.
    assert provisioning.resume_pending() == 0
    assert User.get_by_id(user.id).provisioning_attempts == 1

    later = utcnow()
    for _ in range(6):
        later += datetime.timedelta(minutes=11)
        provisioning.resume_pending(now=later)
        if User.get_by_id(user.id).provisioning_state == "ready":
            break
    user = User.get_by_id(user.id)
    assert user.provisioning_state == "ready"
    assert user.provisioning_error is None
    assert user.provisioning_attempts == 3
    assert customers(sim) == [user.particle_customer_id]
    assert actions(user).count("account.provisioned") == 1


def test_resume_after_a_crash_before_and_after_the_particle_call(app, sim, particle):
    # Crash after saving the id, before Particle heard of it.
    before = make_user("before.call@example.com", verified=True, provisioned=False)
    User.update(particle_customer_id="c" + "1" * 24).where(User.id == before.id).execute()
    # Crash after Particle created the customer, before we wrote "ready".
    after = make_user("after.call@example.com", verified=True, provisioned=False)
    User.update(particle_customer_id="c" + "2" * 24).where(User.id == after.id).execute()
    particle.create_customer("c" + "2" * 24)
    # A pending account whose id was never saved (the helper's "verified, not provisioned").
    no_id = make_user("no.id@example.com", verified=True, provisioned=False)

    assert provisioning.resume_pending() == 3

    for user in (before, after, no_id):
        fresh = User.get_by_id(user.id)
        assert fresh.provisioning_state == "ready", fresh.provisioning_error
        assert CUSTOMER_ID.match(fresh.particle_customer_id)
    assert sorted(customers(sim)) == sorted(
        User.get_by_id(u.id).particle_customer_id for u in (before, after, no_id)
    )


def test_a_lease_gives_the_work_to_one_worker_until_it_runs_out(app):
    user = make_user("lease@example.com", verified=True, provisioned=False)
    now = utcnow()
    assert provisioning.take(user.id, now) is True
    assert provisioning.take(user.id, now) is False
    assert provisioning.take(user.id, now + datetime.timedelta(seconds=60)) is False
    # A worker that died lets the lease run out; then someone else takes over.
    assert provisioning.take(user.id, now + datetime.timedelta(minutes=10)) is True


def test_concurrent_sweeps_create_each_customer_once(app, sim):
    users = [make_user(f"sweep{i}@example.com", verified=True, provisioned=False) for i in range(4)]
    sim.reset_counters()
    start = threading.Barrier(3)
    results = []

    def sweep_worker():
        def work():
            start.wait(timeout=10)
            return provisioning.resume_pending()

        results.append(in_thread_with_db(app, work))

    threads = [threading.Thread(target=sweep_worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sum(results) == 4
    ids = [User.get_by_id(u.id).particle_customer_id for u in users]
    assert all(User.get_by_id(u.id).provisioning_state == "ready" for u in users)
    assert sorted(customers(sim)) == sorted(ids)
    posts = sum(
        count for route, count in sim.counters()["routes"].items() if "POST" in route and "customers" in route
    )
    assert posts == 4  # one create per account: no worker repeated another's call


def test_resume_user_respects_the_backoff(app, sim):
    user = make_user("backoff@example.com", verified=True, provisioned=False)
    sim.add_fault("POST", "/v1/products/*/customers", count=1, status=503)
    user = provisioning.resume_user(User.get_by_id(user.id))
    assert user.provisioning_state == "pending" and user.provisioning_attempts == 1

    # Polling right away doesn't call Particle again...
    assert provisioning.resume_user(user).provisioning_attempts == 1
    # ...after the backoff it does, and finishes.
    done = provisioning.resume_user(user, now=utcnow() + datetime.timedelta(seconds=30))
    assert done.provisioning_state == "ready"


def test_backoff_grows_and_is_capped():
    assert [steps.backoff_seconds(n) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert steps.backoff_seconds(50) == steps.BACKOFF_MAX_SECONDS


def test_sweep_runs_the_provisioning_resumer(app, sim):
    from selfserve import sweep

    user = make_user("swept@example.com", verified=True, provisioned=False)
    assert provisioning.resume_pending in [job.run for job in sweep.jobs(app)]

    results = sweep.run_once(app)

    assert results["selfserve.services.provisioning.resume_pending"] == 1
    assert User.get_by_id(user.id).provisioning_state == "ready"


def test_sweep_thread_finishes_pending_work_and_zero_disables_it(app, sim):
    from selfserve import sweep

    assert sweep.start(app) is None  # SWEEP_SECONDS = 0 in tests
    user = make_user("thread@example.com", verified=True, provisioned=False)
    app.config["SWEEP_SECONDS"] = 0.05
    thread = sweep.start(app)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if User.get_by_id(user.id).provisioning_state == "ready":
                break
            time.sleep(0.05)
        assert User.get_by_id(user.id).provisioning_state == "ready"
        assert sweep.start(app) is thread  # one thread per app
    finally:
        background.stop_all(app)


# --- signing in -------------------------------------------------------------------------------------


def test_authenticate_answers_the_same_for_unknown_address_and_wrong_password(app):
    user = make_user("signin@example.com", provisioned=False)

    assert accounts.authenticate("SignIn@Example.com", PASSWORD).id == user.id
    assert accounts.authenticate("signin@example.com", "wrong password!!") is None
    assert accounts.authenticate("nobody@example.com", PASSWORD) is None
    assert accounts.authenticate("", "") is None

    assert actions(user) == ["account.signed_in", "account.sign_in_failed"]
    anonymous_failures = AuditEvent.select().where(
        AuditEvent.user.is_null() & (AuditEvent.action == "account.sign_in_failed")
    )
    assert anonymous_failures.count() == 2
    assert all(e.detail is None for e in anonymous_failures)  # the typed address isn't kept


# --- forgotten password --------------------------------------------------------------------------


def _sessions(user, count):
    return [
        LoginSession.create(id=f"session-{user.id}-{i}-{time.monotonic_ns()}", user=user)
        for i in range(count)
    ]


def test_password_reset_works_once_and_ends_every_session(app, mailbox):
    user = make_user("reset@example.com", provisioned=False)
    _sessions(user, 2)
    accounts.request_password_reset("Reset@Example.com")
    token = token_in(mailbox, "reset@example.com", "/reset/")

    assert accounts.check_reset_link(token).id == user.id
    with pytest.raises(FormErrors):
        accounts.reset_password(token, "short")
    accounts.reset_password(token, "a brand new passphrase")  # still usable after a typo

    fresh = User.get_by_id(user.id)
    assert passwords.check_password(fresh.password_hash, "a brand new passphrase")
    assert (
        LoginSession.select().where((LoginSession.user == user) & LoginSession.ended_at.is_null()).count()
        == 0
    )
    with pytest.raises(tokens.TokenInvalid):
        accounts.reset_password(token, "yet another passphrase")
    assert passwords.check_password(User.get_by_id(user.id).password_hash, "a brand new passphrase")
    assert "account.password_reset" in actions(user)
    notice = mailbox.wait_for("reset@example.com", count=2)
    assert "password" in notice["Subject"].lower()


def test_password_reset_for_unknown_address_sends_nothing_and_says_nothing(app, mailbox):
    accounts.request_password_reset("ghost@example.com")
    time.sleep(0.2)
    assert mailbox.messages == []
    with pytest.raises(FormErrors):
        accounts.request_password_reset("not an address")


def test_reset_links_expire_after_an_hour_and_die_when_the_email_changes(app):
    user = make_user("expire@example.com", provisioned=False)
    payload = {"u": user.id, "e": tokens.fingerprint(user.email), "p": tokens.fingerprint(user.password_hash)}
    with pytest.raises(tokens.TokenExpired):
        accounts.check_reset_link(tokens.make("reset_password", payload, issued_at=time.time() - 3660))
    live = tokens.make("reset_password", payload)
    User.update(email="moved@example.com").where(User.id == user.id).execute()
    with pytest.raises(tokens.TokenInvalid):
        accounts.reset_password(live, "a brand new passphrase")


# --- settings ----------------------------------------------------------------------------------


def test_change_password_needs_the_current_one_and_ends_other_sessions(app, mailbox):
    user = make_user("change@example.com", provisioned=False)
    mine, other = _sessions(user, 2)

    with pytest.raises(FormErrors) as caught:
        accounts.change_password(user, "not my password", "short", keep_session=mine)
    assert set(caught.value.errors) == {"current_password", "new_password"}
    assert LoginSession.get_by_id(other.id).ended_at is None

    accounts.change_password(user, PASSWORD, "an even better passphrase", keep_session=mine)

    assert passwords.check_password(User.get_by_id(user.id).password_hash, "an even better passphrase")
    assert LoginSession.get_by_id(mine.id).ended_at is None
    assert LoginSession.get_by_id(other.id).ended_at is not None
    assert "account.password_changed" in actions(user)
    assert "/forgot" in mailbox.body(mailbox.wait_for("change@example.com"))


def _failing_session_end(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(accounts, "end_all_login_sessions", fail)


def test_a_failure_after_the_password_update_keeps_the_old_password(app, mailbox, monkeypatch):
    # The new password must not stand without the other sessions ended, the audit and the mail.
    user = make_user("atomic@example.com", provisioned=False)
    accounts.request_password_reset("atomic@example.com")
    token = token_in(mailbox, "atomic@example.com", "/reset/")
    _failing_session_end(monkeypatch)
    with pytest.raises(RuntimeError):
        accounts.reset_password(token, "a brand new passphrase")
    with pytest.raises(RuntimeError):
        accounts.change_password(user, PASSWORD, "an even better passphrase")
    assert passwords.check_password(User.get_by_id(user.id).password_hash, PASSWORD)
    monkeypatch.undo()
    accounts.reset_password(token, "a brand new passphrase")  # the link still works
    assert passwords.check_password(User.get_by_id(user.id).password_hash, "a brand new passphrase")


def test_email_change_happens_only_when_the_new_address_confirms(app, mailbox):
    user = make_user("old@example.com")
    customer_id = user.particle_customer_id

    with pytest.raises(FormErrors) as caught:
        accounts.request_email_change(user, "old@example.com", "wrong password!")
    assert set(caught.value.errors) == {"new_email", "email_password"}

    accounts.request_email_change(user, "New@Example.com", PASSWORD)
    assert User.get_by_id(user.id).email == "old@example.com"
    assert User.get_by_id(user.id).pending_email == "new@example.com"
    token = token_in(mailbox, "new@example.com", "/confirm-email/")
    assert mailbox.to("old@example.com") == []

    assert accounts.check_email_change_link(token).pending_email == "new@example.com"
    changed = accounts.confirm_email_change(token)

    assert changed.email == "new@example.com" and changed.pending_email is None
    assert changed.particle_customer_id == customer_id  # Particle never sees the email
    notice = mailbox.body(mailbox.wait_for("old@example.com"))
    assert "new@example.com" in notice
    with pytest.raises(tokens.TokenInvalid):
        accounts.confirm_email_change(token)
    assert accounts.authenticate("new@example.com", PASSWORD) is not None
    assert accounts.authenticate("old@example.com", PASSWORD) is None
    assert {"account.email_change_requested", "account.email_changed"} <= set(actions(user))


def test_email_change_to_a_taken_address_reveals_nothing_and_changes_nothing(app, mailbox):
    user = make_user("mover@example.com", provisioned=False)
    make_user("taken@example.com", provisioned=False)

    accounts.request_email_change(user, "taken@example.com", PASSWORD)  # no error: same answer

    message = mailbox.wait_for("taken@example.com")
    assert "/confirm-email/" not in mailbox.body(message)
    assert User.get_by_id(user.id).email == "mover@example.com"


def test_a_newer_email_change_kills_the_older_link(app, mailbox):
    user = make_user("twochanges@example.com", provisioned=False)
    accounts.request_email_change(user, "first@example.com", PASSWORD)
    first = token_in(mailbox, "first@example.com", "/confirm-email/")
    accounts.request_email_change(user, "second@example.com", PASSWORD)

    with pytest.raises(tokens.TokenInvalid):
        accounts.confirm_email_change(first)
    assert User.get_by_id(user.id).email == "twochanges@example.com"


def test_confirming_a_new_address_verifies_an_unverified_account(app, mailbox, sim):
    user = make_user("typo@exampel.com", verified=False)
    accounts.send_verification(user)
    old_verify = verify_token_from(mailbox, "typo@exampel.com")
    accounts.request_email_change(user, "fixed@example.com", PASSWORD)
    token = token_in(mailbox, "fixed@example.com", "/confirm-email/")

    changed = accounts.confirm_email_change(token)

    assert changed.is_verified and changed.provisioning_state == "ready"
    assert customers(sim) == [changed.particle_customer_id]
    with pytest.raises(tokens.TokenInvalid):
        accounts.verify_email(old_verify, password=PASSWORD)


# --- activity ----------------------------------------------------------------------------------


def test_activity_pages_newest_first(app):
    user = make_user("history@example.com", provisioned=False)
    other = make_user("someone.else@example.com", provisioned=False)
    from selfserve.services import audit

    for _i in range(30):
        audit.record("account.signed_in", user=user)
    audit.record("account.signed_in", user=other)

    first, older = accounts.activity(user)
    assert len(first) == accounts.ACTIVITY_PAGE_SIZE
    ids = [e.id for e in first]
    assert ids == sorted(ids, reverse=True)
    assert older == first[-1].id
    rest, older_still = accounts.activity(user, before=older)
    assert len(rest) == 30 - accounts.ACTIVITY_PAGE_SIZE
    assert older_still is None
    assert all(e.user_id == user.id for e in first + rest)


# --- tokens --------------------------------------------------------------------------------------


def test_token_paths_are_redacted_from_access_logs():
    import logging

    record = logging.LogRecord(
        "werkzeug",
        logging.INFO,
        __file__,
        1,
        '127.0.0.1 - - "%s %s HTTP/1.1" 200 -',
        ("GET", "/verify/eyJ1IjoxfQ.aBc-_9.sig?x=1"),
        None,
    )
    tokens.RedactTokenPaths().filter(record)
    assert "eyJ1" not in record.getMessage()
    assert "/verify/<redacted>" in record.getMessage()
