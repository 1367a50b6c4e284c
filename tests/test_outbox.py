"""The outbox (issue 9, "Mail that is never lost"; issue 13's alert mail): every email is a row
written with the change it reports and sent by the background sender, over SMTP to the real
sink. A mail server that is down delays mail and never fails a request; a refusal fails the
mail, visibly to support; a crash between queueing and sending sends it once; two senders
never send one row twice; "forgot password" does the same work for every address."""

import datetime
import re
import socket
import threading

import pytest
from helpers import PASSWORD
from helpers import count_queries
from helpers import csrf_token
from helpers import login
from helpers import make_user

from selfserve import background
from selfserve.models import AuditEvent
from selfserve.models import OutboxMail
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.services import accounts
from selfserve.services import outbox
from selfserve.services import staff


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(client, path, data=None, token_from=None):
    data = dict(data or {})
    data["csrf_token"] = csrf_token(client, token_from or path)
    return client.post(path, data=data)


def later(seconds=3600):
    return utcnow() + datetime.timedelta(seconds=seconds)


def rows(address):
    return list(OutboxMail.select().where(OutboxMail.to_address == address).order_by(OutboxMail.id))


# --- queued with the change, or not at all ----------------------------------------------------------


def test_a_rolled_back_change_sends_nothing_and_a_committed_one_is_queued(app, mailbox):
    with pytest.raises(RuntimeError), db.atomic():
        accounts.sign_up("rolled.back@example.com", PASSWORD)  # the account and its mail...
        raise RuntimeError("...and then the request failed")
    assert not User.select().where(User.email == "rolled.back@example.com").exists()
    assert rows("rolled.back@example.com") == []
    assert mailbox.to("rolled.back@example.com") == []

    accounts.sign_up("committed@example.com", PASSWORD)
    (queued,) = rows("committed@example.com")
    assert (queued.state, queued.kind, queued.sensitive) == ("pending", "verify_email", True)
    assert "/verify/" in queued.body  # rendered when queued: sending needs no request
    assert len(mailbox.to("committed@example.com")) == 1
    sent = OutboxMail.get_by_id(queued.id)
    assert sent.state == "sent" and sent.finished_at is not None and sent.body == ""  # link gone


# --- an SMTP server that is down, then back ----------------------------------------------------------


def test_requests_succeed_while_smtp_is_down_and_the_mail_arrives_after_in_order(app, client, mailbox):
    working_port = app.config["MAIL_PORT"]
    app.config["MAIL_PORT"] = closed_port()
    signed_up = post(client, "/signup", {"email": "outage@example.com", "password": PASSWORD})
    assert signed_up.status_code == 200 and "Check your email" in signed_up.get_data(as_text=True)
    forgot = post(app.test_client(), "/forgot", {"email": "outage@example.com"})
    assert forgot.status_code == 200
    login(client, "outage@example.com")
    resent = post(client, "/verify-email/resend", token_from="/verify-email")
    assert resent.status_code in (200, 302)

    # The sender runs while the server is down: every mail waits, nothing is lost.
    assert outbox.send_due() == {"pending": 1}  # the first; the others wait behind it (order)
    assert outbox.send_due(later(30)) == {"pending": 1}
    queued = rows("outage@example.com")
    assert [row.kind for row in queued] == ["verify_email", "reset_request", "verify_email"]
    assert queued[0].attempts == 2 and "ConnectionRefused" in queued[0].last_error
    assert all(row.state == "pending" for row in queued) and mailbox.received("outage@example.com") == []
    assert queued[0].next_attempt_at > utcnow() + datetime.timedelta(seconds=5)  # backing off

    app.config["MAIL_PORT"] = working_port
    assert outbox.send_due(later(60)) == {"sent": 3}
    first, reset, second = mailbox.to("outage@example.com")
    assert "/verify/" in mailbox.body(first) and "/reset/" in mailbox.body(reset)
    assert "/verify/" in mailbox.body(second)
    assert {row.state for row in rows("outage@example.com")} == {"sent"}


def test_a_mail_that_keeps_failing_is_failed_after_the_configured_attempts(app, mailbox):
    app.config["MAIL_PORT"] = closed_port()
    app.config["OUTBOX_MAX_ATTEMPTS"] = 3
    make_user("never@example.com")
    accounts.request_email_change(User.get(User.email == "never@example.com"), "new@example.com", PASSWORD)
    for minutes in (0, 5, 10):
        outbox.send_due(later(minutes * 60))
    (row,) = rows("new@example.com")
    assert (
        row.state == "failed" and row.attempts == 3 and row.last_error.startswith("gave up after 3 attempts")
    )
    assert outbox.send_due(later(3600)) == {}  # never tried again


def test_a_temporary_refusal_4xx_is_retried(app, mailbox):
    mailbox.refusals["busy@example.com"] = "451 4.3.0 Try again later"
    make_user("busy@example.com")
    accounts.send_sign_in_link("busy@example.com")
    assert outbox.send_due() == {"pending": 1}
    (row,) = rows("busy@example.com")
    assert row.attempts == 1 and "451" in row.last_error
    del mailbox.refusals["busy@example.com"]
    assert outbox.send_due(later()) == {"sent": 1}
    assert "/login/link/" in mailbox.body(mailbox.wait_for("busy@example.com"))


# --- a permanent refusal; finding 9: signing up with an address the server refuses -----------------


def test_signing_up_with_a_refused_address_creates_the_account_and_fails_the_mail_visibly(
    app, client, mailbox
):
    mailbox.refusals["refused@example.com"] = "550 5.1.1 No such user here"
    response = post(client, "/signup", {"email": "refused@example.com", "password": PASSWORD})
    assert response.status_code == 200  # not a 503: the account is there, the mail is queued
    user = User.get(User.email == "refused@example.com")
    assert outbox.send_due() == {"failed": 1}  # refused for good: not retried
    (row,) = rows("refused@example.com")
    assert row.state == "failed" and row.attempts == 1 and "550" in row.last_error
    assert outbox.send_due(later()) == {}

    # The person is told on their "confirm your address" page; support sees it (not the link);
    # resending works once the address is accepted.
    login(client, "refused@example.com")
    told = client.get("/verify-email").get_data(as_text=True)
    assert "did not accept our email" in told
    console = _staff_console(app)
    page = console.get("/support/mail?address=refused@example.com").get_data(as_text=True)
    assert 'data-mail-state="failed"' in page and "550" in page and "/verify/" not in page
    del mailbox.refusals["refused@example.com"]
    assert accounts.resend_verification(user) is True
    assert "/verify/" in mailbox.body(mailbox.wait_for("refused@example.com"))
    assert "did not accept our email" not in client.get("/verify-email").get_data(as_text=True)


# --- a crash between queueing and sending; two senders -------------------------------------------


def test_a_sender_killed_between_taking_and_sending_leaves_the_mail_to_be_sent_once(app, mailbox):
    accounts.sign_up("crash@example.com", PASSWORD)
    (row,) = rows("crash@example.com")
    assert outbox.take(row)  # a worker took it ... and died before the server had it
    assert outbox.send_due() == {} and mailbox.received("crash@example.com") == []
    after_lease = later(outbox._lease_seconds() + 1)
    assert outbox.send_due(after_lease) == {"sent": 1}  # "after the restart": the lease ran out
    assert outbox.send_due(after_lease) == {}
    assert len(mailbox.to("crash@example.com")) == 1


def test_a_row_is_taken_by_one_sender_only_and_two_senders_never_double(app, mailbox):
    for number in range(12):
        outbox.enqueue(f"many{number % 4}@example.com", f"Mail {number}", "hello", kind="test")
    row = OutboxMail.select().order_by(OutboxMail.id).first()
    assert outbox.take(row) is True
    assert outbox.take(row) is False  # the lease is held
    OutboxMail.update(lease_until=None).execute()

    results, barrier = [], threading.Barrier(2)

    def sender():
        with app.app_context():
            db.connect(reuse_if_open=True)
            try:
                barrier.wait()
                results.append(outbox.send_due())
            finally:
                db.close()

    threads = [threading.Thread(target=sender) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sum(result.get("sent", 0) for result in results) == 12
    subjects = [message["Subject"] for message in mailbox.received("@example.com")]
    assert sorted(subjects) == sorted(f"Mail {number}" for number in range(12))  # each once
    for address in range(4):  # and each recipient's in the order queued
        mine = [int(message["Subject"].split()[1]) for message in mailbox.received(f"many{address}@")]
        assert mine == sorted(mine)


def test_a_step_that_runs_twice_queues_its_mail_once(app, mailbox):
    from selfserve.services import steps

    for _ in range(2):
        steps.send_mail(
            "twice@example.com", "Once", "signup_attempt", {"login_url": "x", "forgot_url": "y"}, key="k:1"
        )
    assert len(rows("twice@example.com")) == 1


# --- finding 6: "forgot password" does the same work for known and unknown addresses -----------


def _forgot(app, address):
    client = app.test_client()
    token = csrf_token(client, "/forgot")
    with count_queries() as queries:
        response = client.post("/forgot", data={"email": address, "csrf_token": token})
    assert response.status_code == 200
    # The statements without their parameters (the address itself differs).
    return response, [re.sub(r"', \[.*$", "", query, flags=re.S) for query in queries]


def _page(response, address):
    page = re.sub(r'"X-CSRFToken": "[^"]+"', "", response.get_data(as_text=True))
    return re.sub(r'name="csrf_token" value="[^"]+"', "", page).replace(address, "EMAIL")


def test_forgot_password_does_the_same_work_for_known_and_unknown_addresses(app, mailbox):
    make_user("known@example.com")
    known_page, known_queries = _forgot(app, "known@example.com")
    unknown_page, unknown_queries = _forgot(app, "unknown@example.com")
    # Same statements (one INSERT into the outbox, no account lookup), same page, and no SMTP
    # conversation in the request: nothing reached the sink yet.
    assert known_queries == unknown_queries
    assert [query for query in known_queries if "INSERT" in query] == [
        query for query in known_queries if "outboxmail" in query
    ]
    assert not any('FROM "user"' in query for query in known_queries)
    assert _page(known_page, "known@example.com") == _page(unknown_page, "unknown@example.com")
    assert mailbox.received("known@example.com") == []
    assert [row.kind for row in rows("known@example.com")] == ["reset_request"]
    assert [row.kind for row in rows("unknown@example.com")] == ["reset_request"]

    # The sender decides: the account gets its link, the unknown address nothing.
    assert outbox.send_due() == {"sent": 1, "skipped": 1}
    assert "/reset/" in mailbox.body(mailbox.wait_for("known@example.com"))
    assert mailbox.to("unknown@example.com") == []
    assert rows("unknown@example.com") == []  # the address of someone with no account: gone
    assert AuditEvent.select().where(AuditEvent.action == "account.password_reset_requested").count() == 1


def test_a_reset_link_is_made_when_sent_and_dies_with_the_password(app, client, mailbox):
    user = make_user("fresh.link@example.com")
    accounts.request_password_reset("fresh.link@example.com")
    link = next(u for u in mailbox.links(mailbox.wait_for("fresh.link@example.com")) if "/reset/" in u)
    token = link.rsplit("/reset/", 1)[1]
    assert accounts.check_reset_link(token).id == user.id
    accounts.reset_password(token, "another long password 1")
    with pytest.raises(Exception):  # noqa: B017 - tokens.TokenInvalid: used once already
        accounts.check_reset_link(token)


def test_a_dedupe_key_queues_its_mail_once(app):
    # On SQLite an ignored INSERT reports the previous insert's id: it must not pass for new.
    first = outbox.enqueue("once@example.com", "Hello", "body", kind="test", dedupe_key="step:1")
    assert first is not None
    assert outbox.enqueue("once@example.com", "Hello", "body", kind="test", dedupe_key="step:1") is None
    assert OutboxMail.select().where(OutboxMail.to_address == "once@example.com").count() == 1


def test_a_send_lease_outlasts_a_whole_smtp_conversation(app):
    # MAIL_TIMEOUT bounds each SMTP operation; a conversation is about a dozen of them. A lease
    # that ran out mid-conversation would let a second worker send the same mail.
    app.config["MAIL_TIMEOUT"] = 30
    row = outbox.enqueue("lease@example.com", "Hello", "body", kind="test")
    now = utcnow()
    assert outbox.take(row, now)
    lease = OutboxMail.get_by_id(row.id).lease_until - now
    assert lease >= datetime.timedelta(seconds=10 * 30)


def test_finished_mail_is_deleted_after_the_retention_and_pending_mail_never(app, mailbox):
    app.config["OUTBOX_KEEP_DAYS"] = 30
    outbox.enqueue("old@example.com", "Old", "body", kind="test")
    outbox.enqueue("recent@example.com", "Recent", "body", kind="test")
    mailbox.refusals["refused@example.com"] = "550 5.1.1 Mailbox unavailable"
    outbox.enqueue("refused@example.com", "Refused", "body", kind="test")
    assert outbox.send_due() == {"sent": 2, "failed": 1}
    app.config["MAIL_PORT"] = 1  # nothing listens there: this one stays pending
    outbox.enqueue("waiting@example.com", "Waiting", "body", kind="test")
    outbox.send_due()
    long_ago = utcnow() - datetime.timedelta(days=31)
    OutboxMail.update(finished_at=long_ago, created_at=long_ago).where(
        OutboxMail.to_address.in_(["old@example.com", "refused@example.com"])
    ).execute()
    OutboxMail.update(created_at=long_ago).where(OutboxMail.to_address == "waiting@example.com").execute()

    assert outbox.purge_finished() == 2
    left = {row.to_address: row.state for row in OutboxMail.select()}
    assert left == {"recent@example.com": "sent", "waiting@example.com": "pending"}
    assert outbox.purge_finished() == 0


# --- support's view ---------------------------------------------------------------------------------


def _staff_console(app):
    from test_support_views import sign_in_staff

    person = staff.create_staff("mail.desk@support.example", PASSWORD)
    return sign_in_staff(app.test_client(), person)


def test_support_lists_mail_with_state_attempts_and_error_and_never_a_security_mails_body(app, mailbox):
    user = make_user("shown@example.com")
    accounts.change_password(user, PASSWORD, "a new long password 12")  # a courtesy notice
    accounts.send_sign_in_link("shown@example.com")  # a security mail
    mailbox.refusals["gone@example.com"] = "550 5.1.1 Mailbox unavailable"
    outbox.enqueue("gone@example.com", "Hello", "plain text", kind="test")
    outbox.send_due()
    console = _staff_console(app)

    page = console.get("/support/mail").get_data(as_text=True)
    assert page.count('data-mail-state="sent"') == 2 and page.count('data-mail-state="failed"') == 1
    assert "Your password was changed" in page and "Your sign-in link" in page
    assert "/login/link/" not in page and "security mail: not shown" in page
    assert "plain text" in page and "recipient refused: 550" in page

    mine = console.get("/support/mail?address=Shown@example.com").get_data(as_text=True)
    assert "gone@example.com" not in mine and mine.count("data-mail-state=") == 2
    failed = console.get("/support/mail?state=failed").get_data(as_text=True)
    assert failed.count("data-mail-state=") == 1


def test_looking_at_a_customers_mail_is_on_their_activity(app, mailbox):
    from selfserve.services import audit

    user = make_user("watched@example.com")
    console = _staff_console(app)
    console.get("/support/mail")
    console.get("/support/mail?address=nobody@example.com")
    assert not AuditEvent.select().where(AuditEvent.action == "support.mail_viewed").exists()

    assert console.get("/support/mail?address=Watched@example.com").status_code == 200
    (event,) = AuditEvent.select().where(AuditEvent.action == "support.mail_viewed")
    assert event.user_id == user.id and event.actor.email == "mail.desk@support.example"
    assert audit.describe(event) == "Support looked at the emails sent to your email address"
    assert audit.describe(event, for_staff=True).endswith("sent to the customer's email address")


def test_the_mail_page_is_for_staff_only(app, client):
    make_user("customer@example.com")
    login(client, "customer@example.com")
    assert client.get("/support/mail").status_code == 403
    assert app.test_client().get("/support/mail").status_code in (302, 401)


def test_one_address_with_a_long_queue_behind_a_retry_holds_back_only_its_own_mail(app, mailbox):
    mailbox.refusals["flooded@example.com"] = "452 4.2.2 Mailbox full"
    for number in range(150):  # more than one round of the sender takes
        outbox.enqueue("flooded@example.com", f"Alert {number}", "text", kind="alert")
    outbox.enqueue("calm@example.com", "Hello", "text", kind="alert")
    assert outbox.send_due(limit=100) == {"pending": 1, "sent": 1}  # the head retried, calm sent
    assert len(mailbox.received("calm@example.com")) == 1
    assert OutboxMail.select().where(OutboxMail.attempts > 0).count() == 1  # only the head was tried


# --- alerts (issue 13): deciding and queueing are one transaction ----------------------------------


class _Killed(BaseException):
    """The worker dies (not an error anything catches)."""


def test_an_alert_worker_killed_after_queueing_but_before_commit_neither_loses_nor_doubles(
    app, mailbox, monkeypatch
):
    from test_alerts import add_device
    from test_alerts import fault

    from selfserve.models import AlertNotice
    from selfserve.services import alerts

    owner = make_user("alerted@example.com", provisioned=False)
    add_device("e00fce68a1b2c3d4e5f6a001", owner)
    fault("overpressure")
    real_enqueue = outbox.enqueue

    def enqueue_then_die(*args, **kwargs):
        real_enqueue(*args, **kwargs)
        raise _Killed()

    monkeypatch.setattr(outbox, "enqueue", enqueue_then_die)
    with pytest.raises(_Killed):
        alerts.send_due()
    monkeypatch.setattr(outbox, "enqueue", real_enqueue)
    # Rolled back together: no mail queued, the notice not marked sent (its lease runs out).
    assert rows("alerted@example.com") == []
    assert AlertNotice.get().sent_at is None
    assert alerts.send_due(later(600)) == 1
    assert alerts.send_due(later(600)) == 0
    assert len(mailbox.to("alerted@example.com")) == 1
    assert AlertNotice.get().sent_at is not None


# --- timeouts; the sender thread of a web worker ------------------------------------------------------


def test_a_server_that_never_answers_is_a_temporary_failure(app, mailbox):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections, never says a word
        app.config["MAIL_PORT"] = silent.getsockname()[1]
        app.config["MAIL_TIMEOUT"] = 0.3
        outbox.enqueue("slow@example.com", "Hello", "text", kind="test")
        assert outbox.send_due() == {"pending": 1}
    (row,) = rows("slow@example.com")
    assert row.attempts == 1 and "timed out" in row.last_error and row.next_attempt_at is not None


def test_a_web_workers_sender_thread_sends_as_soon_as_the_request_that_queued_mail_ends(app, client, mailbox):
    import time

    assert outbox.start_sender(app, interval=3600) is not None  # woken by the request, not its timer
    try:
        response = post(client, "/signup", {"email": "threaded@example.com", "password": PASSWORD})
        assert response.status_code == 200
        deadline = time.monotonic() + 10
        while not mailbox.received("threaded@example.com") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(mailbox.received("threaded@example.com")) == 1
    finally:
        background.stop_all(app)


def test_the_mail_page_refuses_control_characters_and_ignores_unknown_filters(app):
    console = _staff_console(app)
    assert console.get("/support/mail?address=a%00b").status_code == 400
    assert console.get("/support/mail?state=%00").status_code == 400
    assert console.get("/support/mail?address=" + "x" * 5000).status_code == 200  # cut to 254
    assert console.get("/support/mail?state=bogus").status_code == 200  # any state


def test_the_customer_page_links_to_the_mail_sent_to_the_customer(app):
    customer = make_user("linked@example.com")
    page = _staff_console(app).get(f"/support/customers/{customer.id}").get_data(as_text=True)
    assert "/support/mail?address=linked@example.com" in page
