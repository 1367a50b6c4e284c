"""Account pages through the Flask test client: sign-up and verification journeys, links,
email change, settings, activity, the setup banner, CSRF and "GET changes nothing".

Real parts only: SMTP sink (`mailbox`), Particle simulator (`sim`).
"""

import datetime
import re
import socket
import time
from urllib.parse import urlsplit

import pytest
from helpers import PASSWORD
from helpers import count_queries
from helpers import csrf_token
from helpers import login
from helpers import make_user

from selfserve import passwords
from selfserve import tokens
from selfserve.models import AuditEvent
from selfserve.models import User
from selfserve.models import utcnow
from selfserve.services import audit
from selfserve.services import outbox
from selfserve.services import provisioning

# --- helpers ------------------------------------------------------------------------------------


def text(response):
    return response.get_data(as_text=True)


def link_path(mailbox, address, marker, count=1):
    """The path of the newest link containing `marker` mailed to `address`."""
    message = mailbox.wait_for(address, count=count)
    links = [link for link in mailbox.links(message) if marker in link]
    assert links, mailbox.body(message)
    assert links[-1].startswith("http://localhost/")  # absolute, from BASE_URL
    return urlsplit(links[-1]).path


def customers(sim):
    return [c["username"] for c in sim.state()["customers"]]


def comparable(response, *emails):
    """A page with the per-session CSRF token and the typed addresses blanked out."""
    page = re.sub(r'value="[^"]*"', 'value=""', text(response))
    page = re.sub(r'"X-CSRFToken": "[^"]+"', "", page)
    for email in emails:
        page = page.replace(email, "EMAIL")
    return response.status_code, page


def post(client, path, data=None, token_from=None, **kwargs):
    """POST with the session's CSRF token (read from `token_from`, default: `path`)."""
    data = dict(data or {})
    data["csrf_token"] = csrf_token(client, token_from or path)
    return client.post(path, data=data, **kwargs)


def sign_up(client, email, password=PASSWORD):
    return post(client, "/signup", {"email": email, "password": password})


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


NO_INLINE = re.compile(r"\sstyle=|<script(?![^>]*\bsrc=)|\son[a-z]+=", re.IGNORECASE)


# --- sign-up and verification --------------------------------------------------------------------


def test_sign_up_page_is_an_accessible_form(client):
    page = text(client.get("/signup"))
    assert '<label for="email">' in page and '<label for="password">' in page
    assert 'autocomplete="email"' in page and 'autocomplete="new-password"' in page
    assert 'name="csrf_token"' in page
    assert not NO_INLINE.search(page)


def test_sign_up_verify_journey_creates_one_opaque_customer(client, mailbox, sim):
    response = sign_up(client, "Journey@Example.com")
    assert response.status_code == 200
    assert "Check your email" in text(response)
    path = link_path(mailbox, "journey@example.com", "/verify/")

    # GET shows a button and verifies nothing (mail scanners fetch links).
    page = client.get(path)
    assert page.status_code == 200
    assert f'action="{path}"' in text(page) and "Confirm my email address" in text(page)
    user = User.get(User.email == "journey@example.com")
    assert not user.is_verified and customers(sim) == []

    # POST without the CSRF token is refused and changes nothing.
    assert client.post(path).status_code == 400
    assert not User.get_by_id(user.id).is_verified

    response = post(client, path)
    assert response.status_code == 302 and response.headers["Location"].endswith("/login")
    # The link proves the mailbox; signing in with the password, in this browser, finishes it.
    assert not User.get_by_id(user.id).is_verified and customers(sim) == []
    assert login(client, "journey@example.com").request.path == "/devices"
    user = User.get_by_id(user.id)
    assert user.is_verified and user.provisioning_state == "ready"
    assert re.fullmatch(r"c[0-9a-f]{24}", user.particle_customer_id)
    assert "journey" not in user.particle_customer_id
    assert customers(sim) == [user.particle_customer_id]

    again = post(client, path, follow_redirects=True)
    assert "already verified" in text(again)
    assert customers(sim) == [user.particle_customer_id]
    assert User.get_by_id(user.id).particle_customer_id == user.particle_customer_id


def test_sign_up_does_not_reveal_registered_addresses(client, mailbox):
    make_user("taken@example.com", provisioned=False)

    fresh = sign_up(client, "fresh@example.com")
    taken = sign_up(client, "taken@example.com")

    assert comparable(fresh, "fresh@example.com") == comparable(taken, "taken@example.com")
    assert "/verify/" in mailbox.body(mailbox.wait_for("fresh@example.com"))
    owner_mail = mailbox.body(mailbox.wait_for("taken@example.com"))
    assert "/verify/" not in owner_mail and "/forgot" in owner_mail


def test_sign_up_with_bad_input_explains_each_field(client):
    response = sign_up(client, "nope", "short")
    page = text(response)
    assert response.status_code == 400
    assert 'class="error-summary"' in page and 'href="#email"' in page and 'href="#password"' in page
    assert re.search(r'id="email"[^>]*aria-invalid="true"[^>]*aria-describedby="[^"]*email-error', page)
    assert 'id="password-error"' in page
    assert 'value="nope"' in page  # the address is kept, the password is not
    assert User.select().count() == 0


def test_sign_up_when_the_mail_server_is_down_succeeds_and_the_mail_goes_later(app, client, mailbox):
    working_port = app.config["MAIL_PORT"]
    app.config["MAIL_PORT"] = closed_port()
    response = sign_up(client, "nomail@example.com")
    assert response.status_code == 200 and "Check your email" in text(response)
    assert User.select().where(User.email == "nomail@example.com").exists()
    assert mailbox.to("nomail@example.com") == []  # the sender tried: the server is down

    app.config["MAIL_PORT"] = working_port
    outbox.send_due(now=utcnow() + datetime.timedelta(minutes=1))  # its retry is due
    assert "/verify/" in mailbox.body(mailbox.wait_for("nomail@example.com"))
    login(client, "nomail@example.com")
    resent = post(client, "/verify-email/resend", token_from="/verify-email", follow_redirects=True)
    assert "We sent a new link" in text(resent)
    assert "/verify/" in mailbox.body(mailbox.wait_for("nomail@example.com", count=2))


def test_expired_tampered_and_outdated_verify_links_explain_themselves(client, mailbox, sim):
    user = make_user("oldlink@example.com", verified=False)
    payload = {"u": user.id, "e": tokens.fingerprint(user.email)}
    expired = tokens.make("verify_email", payload, issued_at=time.time() - 49 * 3600)

    response = client.get(f"/verify/{expired}")
    assert response.status_code == 410 and "expired" in text(response)
    assert post(client, f"/verify/{expired}", token_from="/login").status_code == 410

    good = tokens.make("verify_email", payload)
    tampered = good[:10] + ("x" if good[10] != "x" else "y") + good[11:]
    assert client.get(f"/verify/{tampered}").status_code == 400

    User.update(email="renamed@example.com").where(User.id == user.id).execute()
    outdated = client.get(f"/verify/{good}")
    assert outdated.status_code == 400 and "no longer on the account" in text(outdated)
    assert post(client, f"/verify/{good}", token_from="/login").status_code == 400
    assert not User.get_by_id(user.id).is_verified
    assert customers(sim) == []


def test_unverified_accounts_sign_in_to_a_page_with_resend(client, mailbox):
    make_user("pending@example.com", verified=False)

    response = login(client, "pending@example.com")
    assert response.request.path == "/verify-email"
    assert "Send a new link" in text(response)

    resent = post(client, "/verify-email/resend", token_from="/verify-email", follow_redirects=True)
    assert "We sent a new link to pending@example.com" in text(resent)
    assert "/verify/" in mailbox.body(mailbox.wait_for("pending@example.com"))
    assert client.post("/verify-email/resend").status_code == 400  # CSRF


def test_verify_while_particle_is_down_shows_setting_up_until_it_finishes(client, mailbox, sim):
    user = make_user("patience@example.com", verified=False)
    login(client, "patience@example.com")
    post(client, "/verify-email/resend", token_from="/verify-email")
    path = link_path(mailbox, "patience@example.com", "/verify/")
    sim.add_fault("POST", "/v1/products/*/customers", count=3, status=503)

    response = post(client, path)
    assert response.headers["Location"].endswith("/account")
    user = User.get_by_id(user.id)
    assert user.is_verified and user.provisioning_state == "pending"

    page = text(client.get("/account"))
    assert "Setting up your account" in page
    assert 'hx-get="/account/status"' in page
    assert "not reachable" in page  # the user-safe error, not a stack trace

    # Polling before the backoff has passed doesn't call Particle again.
    polled = client.get("/account/status", headers={"HX-Request": "true"})
    assert "Setting up your account" in text(polled)
    assert User.get_by_id(user.id).provisioning_attempts == 1

    # The sweep finishes it later, by itself.
    later = utcnow()
    for _ in range(5):
        later += datetime.timedelta(minutes=11)
        provisioning.resume_pending(now=later)
    user = User.get_by_id(user.id)
    assert user.provisioning_state == "ready"
    assert customers(sim) == [user.particle_customer_id]

    done = text(client.get("/account/status", headers={"HX-Request": "true"}))
    assert "Your account is ready" in done and "hx-get" not in done  # polling stops
    assert "Setting up" not in text(client.get("/account"))


def test_the_status_poll_itself_finishes_setup_once_the_backoff_passed(client, sim):
    user = make_user("poller@example.com", verified=True, provisioned=False)
    User.update(provisioning_next_at=utcnow() - datetime.timedelta(seconds=1)).where(
        User.id == user.id
    ).execute()
    login(client, "poller@example.com")

    done = client.get("/account/status", headers={"HX-Request": "true"})

    assert "Your account is ready" in text(done)
    assert User.get_by_id(user.id).provisioning_state == "ready"
    assert customers(sim) == [User.get_by_id(user.id).particle_customer_id]


# --- forgotten password -----------------------------------------------------------------------


def test_forgot_and_reset_work_once_and_sign_out_everywhere(app, client, mailbox):
    make_user("forgetful@example.com", provisioned=False)
    elsewhere = app.test_client()
    login(elsewhere, "forgetful@example.com")
    assert elsewhere.get("/account").status_code == 200

    response = post(client, "/forgot", {"email": "Forgetful@example.com"})
    assert response.status_code == 200 and "If" in text(response)
    path = link_path(mailbox, "forgetful@example.com", "/reset/")

    page = client.get(path)
    assert page.status_code == 200 and 'autocomplete="new-password"' in text(page)
    assert client.post(path, data={"password": "a brand new passphrase"}).status_code == 400  # CSRF
    short = post(client, path, {"password": "short"})
    assert short.status_code == 400 and 'aria-invalid="true"' in text(short)

    done = post(client, path, {"password": "a brand new passphrase"})
    assert done.status_code == 302 and done.headers["Location"].endswith("/login")
    assert elsewhere.get("/account").status_code == 302  # the other session ended

    reused = post(client, path, {"password": "a third passphrase!"}, token_from="/login")
    assert reused.status_code == 400 and "already been used" in text(reused)
    assert client.get(path).status_code == 400
    assert login(client, "forgetful@example.com", "a brand new passphrase").request.path != "/login"


def test_forgot_does_not_reveal_registered_addresses(client, mailbox):
    make_user("known@example.com", provisioned=False)
    known = post(client, "/forgot", {"email": "known@example.com"})
    unknown = post(client, "/forgot", {"email": "unknown@example.com"})
    assert comparable(known, "known@example.com") == comparable(unknown, "unknown@example.com")
    mailbox.wait_for("known@example.com")
    assert mailbox.to("unknown@example.com") == []


def test_forgot_when_the_mail_server_is_down_answers_as_usual_and_sends_later(app, client, mailbox):
    make_user("lostmail@example.com", provisioned=False)
    working_port = app.config["MAIL_PORT"]
    app.config["MAIL_PORT"] = closed_port()
    response = post(client, "/forgot", {"email": "lostmail@example.com"})
    assert response.status_code == 200 and "Check your email" in text(response)
    assert mailbox.to("lostmail@example.com") == []
    app.config["MAIL_PORT"] = working_port
    outbox.send_due(now=utcnow() + datetime.timedelta(minutes=1))
    assert "/reset/" in mailbox.body(mailbox.wait_for("lostmail@example.com"))


# --- settings -------------------------------------------------------------------------------------


def test_settings_shows_the_account_and_both_forms(client):
    make_user("settings@example.com")
    login(client, "settings@example.com")
    page = text(client.get("/account"))
    assert "settings@example.com" in page and "Confirmed" in page
    for field in ("current_password", "new_password", "new_email", "email_password"):
        assert f'<label for="{field}">' in page
    assert not NO_INLINE.search(page)


def test_change_password_needs_the_current_one_and_signs_out_other_sessions(app, client):
    make_user("rotate@example.com", provisioned=False)
    other = app.test_client()
    login(client, "rotate@example.com")
    login(other, "rotate@example.com")

    assert (
        client.post(
            "/account/password", data={"current_password": PASSWORD, "new_password": "x" * 12}
        ).status_code
        == 400
    )
    wrong = post(
        client,
        "/account/password",
        {"current_password": "nope nope nope", "new_password": "new passphrase ok"},
        token_from="/account",
    )
    assert wrong.status_code == 400
    assert re.search(r'id="current_password"[^>]*aria-invalid="true"', text(wrong))
    assert other.get("/account").status_code == 200

    done = post(
        client,
        "/account/password",
        {"current_password": PASSWORD, "new_password": "new passphrase ok"},
        token_from="/account",
    )
    assert done.status_code == 302
    assert client.get("/account").status_code == 200  # this session stays
    assert other.get("/account").status_code == 302  # the other one ended
    assert passwords.check_password(
        User.get(User.email == "rotate@example.com").password_hash, "new passphrase ok"
    )


def test_change_email_through_a_link_to_the_new_address(client, mailbox):
    user = make_user("before@example.com")
    login(client, "before@example.com")

    response = post(
        client,
        "/account/email",
        {"new_email": "after@example.com", "email_password": PASSWORD},
        token_from="/account",
    )
    assert response.status_code == 302
    assert "after@example.com" in text(client.get("/account"))  # shown as pending
    assert User.get_by_id(user.id).email == "before@example.com"
    path = link_path(mailbox, "after@example.com", "/confirm-email/")

    page = client.get(path)
    assert page.status_code == 200 and "Use this address" in text(page)
    assert User.get_by_id(user.id).email == "before@example.com"  # GET changed nothing
    assert client.post(path).status_code == 400  # CSRF

    done = post(client, path)
    assert done.status_code == 302 and done.headers["Location"].endswith("/account")
    assert User.get_by_id(user.id).email == "after@example.com"
    assert "after@example.com" in mailbox.body(mailbox.wait_for("before@example.com"))
    assert post(client, path, token_from="/account").status_code == 400  # works once


def test_change_email_errors_are_shown_on_the_form(client):
    make_user("stay@example.com", provisioned=False)
    login(client, "stay@example.com")
    response = post(
        client, "/account/email", {"new_email": "bad", "email_password": "wrong"}, token_from="/account"
    )
    page = text(response)
    assert response.status_code == 400
    assert 'href="#new_email"' in page and 'href="#email_password"' in page
    assert 'value="bad"' in page
    assert User.get(User.email == "stay@example.com").pending_email is None


def test_a_verify_link_is_dead_after_the_email_changed(client, mailbox, sim):
    make_user("first@example.com", verified=False)
    login(client, "first@example.com")
    post(client, "/verify-email/resend", token_from="/verify-email")
    verify_path = link_path(mailbox, "first@example.com", "/verify/")
    post(
        client,
        "/account/email",
        {"new_email": "second@example.com", "email_password": PASSWORD},
        token_from="/account",
    )
    post(client, link_path(mailbox, "second@example.com", "/confirm-email/"))

    response = client.get(verify_path)

    assert response.status_code == 400 and "no longer on the account" in text(response)
    # The confirmation proved the new address, so the account is verified and set up anyway.
    user = User.get(User.email == "second@example.com")
    assert user.is_verified and customers(sim) == [user.particle_customer_id]


# --- activity ---------------------------------------------------------------------------------------


def test_activity_lists_the_accounts_own_events_newest_first_with_paging(client):
    user = make_user("busy@example.com", provisioned=False)
    stranger = make_user("stranger@example.com", provisioned=False)
    for _ in range(30):
        audit.record("account.sign_in_failed", user=user)
    audit.record("account.password_changed", user=stranger)
    login(client, "busy@example.com")
    post(
        client,
        "/account/password",
        {"current_password": PASSWORD, "new_password": "fresh passphrase!"},
        token_from="/account",
    )

    page = text(client.get("/account/activity"))
    assert page.index("Changed password") < page.index("Signed in") < page.index("Failed sign-in attempt")
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ">', page)
    assert page.count("<tr>") == 1 + 25  # header + one page
    older = re.search(r'href="(/account/activity\?before=\d+)">Older', page)
    assert older
    second = text(client.get(older.group(1).replace("&amp;", "&")))
    assert second.count("Failed sign-in attempt") == 32 - 25  # 30 + 2 events on page one
    assert "Older" not in second
    assert client.get("/account/activity?before=abc").status_code == 400
    assert not NO_INLINE.search(page)


def test_the_activity_page_costs_the_same_queries_for_3_or_20_rows(client):
    """Who acted is loaded with the events, not by the template row by row."""
    user = make_user("busy@example.com", provisioned=False)
    helper = make_user("helper@support.example", provisioned=False)
    User.update(role="staff").where(User.id == helper.id).execute()
    login(client, "busy@example.com")

    def queries_with(rows):
        AuditEvent.delete().where(AuditEvent.user == user.id).execute()
        for n in range(rows):
            audit.record(
                "support.console_viewed" if n % 2 else "account.sign_in_failed", user=user, actor=helper
            )
        with count_queries() as queries:
            page = text(client.get("/account/activity"))
        assert page.count("Support") >= rows // 2
        return len(queries)

    assert queries_with(3) == queries_with(20)


# --- deny by default, CSRF, no state change on GET ---------------------------------------------


@pytest.mark.parametrize("path", ["/account", "/account/activity", "/account/status", "/verify-email"])
def test_account_pages_need_a_sign_in(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert urlsplit(response.headers["Location"]).path == "/login"


@pytest.mark.parametrize(
    "path",
    [
        "/signup",
        "/login",
        "/forgot",
        "/logout",
        "/account/password",
        "/account/email",
        "/verify-email/resend",
    ],
)
def test_posts_without_csrf_are_refused(client, path):
    make_user("csrf@example.com", provisioned=False)
    login(client, "csrf@example.com")
    before = User.get(User.email == "csrf@example.com")
    response = client.post(
        path,
        data={
            "email": "csrf@example.com",
            "password": PASSWORD,
            "current_password": PASSWORD,
            "new_password": "something new!!",
            "new_email": "x@example.com",
            "email_password": PASSWORD,
        },
    )
    assert response.status_code == 400
    after = User.get(User.email == "csrf@example.com")
    assert (after.password_hash, after.pending_email) == (before.password_hash, before.pending_email)
    assert client.get("/account").status_code == 200  # still signed in: logout didn't happen


def test_logout_is_not_a_get(client):
    make_user("stays@example.com", provisioned=False)
    login(client, "stays@example.com")
    assert client.get("/logout").status_code == 405
    assert client.get("/account").status_code == 200


# --- UX: focus on errors, distinct labels, the sign-in form after verifying -----------------------


def test_error_summaries_can_take_the_focus(client):
    # site.js focuses `.error-summary` on load; a div takes focus only with a tabindex.
    summary = re.compile(r'<div class="error-summary"[^>]*\btabindex="-1"')
    assert summary.search(text(sign_up(client, "nope", "short")))
    assert summary.search(
        text(post(client, "/login", {"email": "who@example.com", "password": "wrong password"}))
    )
    make_user("focus@example.com", provisioned=False)
    login(client, "focus@example.com")
    assert summary.search(
        text(
            post(client, "/account/email", {"new_email": "bad", "email_password": "x"}, token_from="/account")
        )
    )
    assert summary.search(
        text(
            post(
                client,
                "/account/password",
                {"current_password": "x", "new_password": "y"},
                token_from="/account",
            )
        )
    )
    assert "error-summary" not in text(client.get("/account"))


def test_the_account_pages_password_fields_have_distinct_labels(client):
    make_user("labels@example.com", provisioned=False)
    login(client, "labels@example.com")
    page = text(client.get("/account"))
    labels = dict(re.findall(r'<label for="([^"]+)">([^<]+)</label>', page))
    assert labels["current_password"] == "Current password"
    assert labels["email_password"] == "Your password (to confirm)"
    assert len(set(labels.values())) == len(labels)  # no two fields read the same to a screen reader
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))


def test_after_verifying_the_sign_in_form_fills_in_the_address(client, mailbox, sim):
    sign_up(client, "Prefill@Example.com")
    path = link_path(mailbox, "prefill@example.com", "/verify/")
    response = post(client, path)
    assert response.status_code == 302 and response.headers["Location"] == "/login"  # nothing in the URL

    page = text(client.get("/login"))
    assert re.search(r'<input type="email" id="email" name="email" value="prefill@example.com"', page)
    assert re.search(r'<input type="password" id="password"[^>]*\bautofocus', page)
    # Read once: the next visit to the sign-in page starts empty.
    again = text(client.get("/login"))
    assert re.search(r'id="email" name="email" value=""', again) and "prefill@example.com" not in again
    assert "autofocus" not in again

    assert login(client, "prefill@example.com").request.path != "/login"
