"""Signing in and out through the Flask test client: server-side logout, session rotation,
idle and absolute timeouts, safe `next`, no enumeration, and rate limits."""

import datetime
import re
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import pytest
from helpers import PASSWORD
from helpers import csrf_token
from helpers import login
from helpers import make_user

from selfserve.models import AuditEvent
from selfserve.models import LoginSession
from selfserve.models import User

COOKIE = "selfserve_session"


def text(response):
    return response.get_data(as_text=True)


def cookie(client):
    found = client.get_cookie(COOKIE)
    return found.value if found else None


def post_login(client, email, password=PASSWORD, next_url=None, **environ):
    data = {"email": email, "password": password, "csrf_token": csrf_token(client, "/login")}
    if next_url is not None:
        data["next"] = next_url
    return client.post("/login", data=data, environ_base=environ)


def redirected_to_login(response):
    return response.status_code == 302 and urlsplit(response.headers["Location"]).path == "/login"


def live_session(user):
    return LoginSession.get((LoginSession.user == user) & LoginSession.ended_at.is_null())


# --- sign-in, sign-out ----------------------------------------------------------------------------


def test_login_rotates_the_session_and_logout_ends_it_on_the_server(app, client):
    user = make_user("door@example.com", provisioned=False)
    client.get("/login")
    anonymous_cookie = cookie(client)
    assert anonymous_cookie

    response = post_login(client, "door@example.com")
    assert response.status_code == 302
    signed_in_cookie = cookie(client)
    assert signed_in_cookie != anonymous_cookie
    assert client.get("/account").status_code == 200
    assert "account.signed_in" in [e.action for e in AuditEvent.select().where(AuditEvent.user == user)]
    # The cookie from before the login never becomes a signed-in session.
    before = app.test_client()
    before.set_cookie(COOKIE, anonymous_cookie)
    assert redirected_to_login(before.get("/account"))

    session_row = live_session(user)
    response = client.post("/logout", data={"csrf_token": csrf_token(client, "/account")})
    assert redirected_to_login(response)
    assert LoginSession.get_by_id(session_row.id).ended_at is not None
    assert redirected_to_login(client.get("/account"))

    # Replaying the signed-in cookie after logout doesn't work: the session ended on the server.
    replay = app.test_client()
    replay.set_cookie(COOKIE, signed_in_cookie)
    assert redirected_to_login(replay.get("/account"))
    assert "account.signed_out" in [e.action for e in AuditEvent.select().where(AuditEvent.user == user)]


def test_the_session_id_is_not_in_the_page(client):
    user = make_user("secret@example.com", provisioned=False)
    login(client, "secret@example.com")
    session_id = live_session(user).id
    for path in ("/account", "/account/activity"):
        assert session_id not in text(client.get(path))


def test_wrong_password_and_unknown_address_get_the_same_answer(client):
    make_user("real@example.com", provisioned=False)
    wrong = post_login(client, "real@example.com", "not the password")
    unknown = post_login(client, "ghost@example.com", "not the password")
    assert wrong.status_code == unknown.status_code == 401

    def comparable(response, email):
        page = re.sub(r'value="[^"]*"', 'value=""', text(response))
        return re.sub(r'"X-CSRFToken": "[^"]+"', "", page).replace(email, "EMAIL")

    assert comparable(wrong, "real@example.com") == comparable(unknown, "ghost@example.com")
    assert "match an account" in text(wrong)
    assert 'aria-invalid="true"' in text(wrong) and 'role="alert"' in text(wrong)


def test_next_is_honoured_only_for_paths_on_this_site(app):
    make_user("next@example.com", provisioned=False)
    anonymous = app.test_client().get("/account/activity")
    assert redirected_to_login(anonymous)
    assert "next=%2Faccount%2Factivity" in anonymous.headers["Location"]

    response = post_login(app.test_client(), "next@example.com", next_url="/account/activity")
    assert response.headers["Location"] == "/account/activity"
    for evil in (
        "//evil.example/x",
        "https://evil.example/",
        "/\\evil.example",
        "javascript:alert(1)",
        "account",
    ):
        response = post_login(app.test_client(), "next@example.com", next_url=evil)
        assert response.status_code == 302
        assert "evil" not in response.headers["Location"]
        assert response.headers["Location"].startswith("/")


def test_login_page_keeps_next_in_the_form(client):
    page = text(client.get("/login?next=/account/activity"))
    assert 'name="next" value="/account/activity"' in page
    assert 'name="next"' not in text(client.get("/login?next=https://evil.example/"))
    assert 'autocomplete="current-password"' in page and '<label for="email">' in page


# --- timeouts -----------------------------------------------------------------------------------------


def test_idle_sessions_end(app, client):
    user = make_user("idle@example.com", provisioned=False)
    login(client, "idle@example.com")
    idle = app.config["SESSION_IDLE_SECONDS"]
    row = live_session(user)

    LoginSession.update(last_seen_at=row.last_seen_at - datetime.timedelta(seconds=idle - 120)).where(
        LoginSession.id == row.id
    ).execute()
    assert client.get("/account").status_code == 200  # not idle long enough yet

    LoginSession.update(last_seen_at=row.last_seen_at - datetime.timedelta(seconds=idle + 5)).where(
        LoginSession.id == row.id
    ).execute()
    assert redirected_to_login(client.get("/account"))
    assert LoginSession.get_by_id(row.id).ended_at is not None


def test_sessions_end_after_the_absolute_limit_even_when_active(app, client):
    user = make_user("marathon@example.com", provisioned=False)
    login(client, "marathon@example.com")
    row = live_session(user)
    absolute = app.config["SESSION_ABSOLUTE_SECONDS"]
    LoginSession.update(created_at=row.created_at - datetime.timedelta(seconds=absolute + 5)).where(
        LoginSession.id == row.id
    ).execute()
    assert redirected_to_login(client.get("/account"))


# --- rate limits -------------------------------------------------------------------------------------


@pytest.fixture
def tight_limits(app_config):
    app_config.update(
        RATE_LIMIT_LOGIN="4 per minute",
        RATE_LIMIT_LOGIN_EMAIL="2 per minute",
        RATE_LIMIT_SIGNUP_EMAIL="2 per hour",
        RATE_LIMIT_FORGOT_EMAIL="2 per hour",
    )
    return app_config


def test_login_is_limited_per_address_for_failures_only(tight_limits, app, client):
    make_user("target@example.com", provisioned=False)
    assert post_login(client, "target@example.com", "guess one!!", REMOTE_ADDR="10.0.0.1").status_code == 401
    assert post_login(client, "target@example.com", "guess two!!", REMOTE_ADDR="10.0.0.2").status_code == 401
    # A third guess at the same address is refused even from another address.
    blocked = post_login(client, "target@example.com", PASSWORD, REMOTE_ADDR="10.0.0.3")
    assert blocked.status_code == 429
    assert "Too many attempts" in text(blocked)
    # Other accounts are unaffected.
    assert post_login(client, "other@example.com", "whatever!!", REMOTE_ADDR="10.0.0.3").status_code == 401


def test_successful_logins_do_not_use_up_the_per_address_limit(tight_limits, app):
    make_user("regular@example.com", provisioned=False)
    for n in range(3):
        assert (
            post_login(app.test_client(), "regular@example.com", REMOTE_ADDR=f"10.0.1.{n}").status_code == 302
        )


def test_login_is_limited_per_client_address(tight_limits, app, client):
    for n in range(4):
        assert post_login(client, f"someone{n}@example.com", "whatever!!").status_code == 401
    assert post_login(client, "someone9@example.com", "whatever!!").status_code == 429


def test_signup_and_forgot_are_limited_per_address(tight_limits, app, client, mailbox):
    def signup(ip):
        data = {
            "email": "flood@example.com",
            "password": PASSWORD,
            "csrf_token": csrf_token(client, "/signup"),
        }
        return client.post("/signup", data=data, environ_base={"REMOTE_ADDR": ip})

    def forgot(ip):
        data = {"email": "flood@example.com", "csrf_token": csrf_token(client, "/forgot")}
        return client.post("/forgot", data=data, environ_base={"REMOTE_ADDR": ip})

    assert [signup(f"10.0.2.{n}").status_code for n in range(3)] == [200, 200, 429]
    assert [forgot(f"10.0.3.{n}").status_code for n in range(3)] == [200, 200, 429]
    assert User.select().count() == 1


def test_resend_is_limited_per_account(client, mailbox):
    make_user("eager@example.com", verified=False)
    login(client, "eager@example.com")
    statuses = [
        client.post(
            "/verify-email/resend", data={"csrf_token": csrf_token(client, "/verify-email")}
        ).status_code
        for _ in range(4)
    ]
    assert statuses == [302, 302, 302, 429]
    assert len(mailbox.to("eager@example.com")) == 3


def test_an_htmx_poll_after_the_session_ended_sends_the_whole_page_to_sign_in(app, client):
    user = make_user("poll@example.com", verified=True, provisioned=False)
    login(client, "poll@example.com")
    assert client.get("/account/status", headers={"HX-Request": "true"}).status_code == 200
    LoginSession.update(ended_at=LoginSession.created_at).where(LoginSession.user == user).execute()

    response = client.get(
        "/account/status", headers={"HX-Request": "true", "HX-Current-URL": "http://localhost/account?tab=1"}
    )

    assert response.status_code == 200 and response.get_data() == b""  # nothing swapped in
    target = urlsplit(response.headers["HX-Redirect"])
    assert target.path == "/login" and parse_qs(target.query) == {"next": ["/account?tab=1"]}
    foreign = client.get(
        "/account/status", headers={"HX-Request": "true", "HX-Current-URL": "https://evil.example/x"}
    )
    assert foreign.headers["HX-Redirect"] == "/login"
