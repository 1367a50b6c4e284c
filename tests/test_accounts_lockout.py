"""Issue 9, finding 8: sign-in throttling must not be a weapon against the owner.

Failures count per typed address AND client address together (ten wrong passwords from one
place lock out that place only), under a slower ceiling per address from anywhere; an owner
caught by the ceiling gets a sign-in link by email (single purpose, 15 minutes, once; GET
shows a button, POST signs in).
"""

import re
import time
from urllib.parse import urlsplit

import pytest
from helpers import csrf_token
from helpers import make_user

from selfserve import tokens
from selfserve.models import User
from selfserve.services import accounts

PASSWORD = "correct horse battery"
OWNER = "owner@example.com"


def post_login(client, email, password, ip):
    data = {"email": email, "password": password, "csrf_token": csrf_token(client, "/login")}
    return client.post("/login", data=data, environ_base={"REMOTE_ADDR": ip})


def test_ten_wrong_passwords_from_one_place_do_not_lock_the_owner_out(app, mailbox):
    """The reported attack, with the default limits."""
    make_user(OWNER, PASSWORD, provisioned=False)
    attacker = app.test_client()
    statuses = [post_login(attacker, OWNER, f"wrong guess {n}", "10.9.0.66").status_code for n in range(11)]
    assert statuses == [401] * 10 + [429]
    # The attacker is paused, even with the right password; the owner, elsewhere, is not.
    assert post_login(attacker, OWNER, PASSWORD, "10.9.0.66").status_code == 429
    assert post_login(app.test_client(), OWNER, PASSWORD, "10.9.0.1").status_code == 302


@pytest.fixture
def tight_ceiling(app_config):
    app_config["RATE_LIMIT_LOGIN_EMAIL_SOURCE"] = "2 per minute"
    app_config["RATE_LIMIT_LOGIN_EMAIL"] = "3 per minute"
    return app_config


def _link_path(mailbox, count=1):
    message = mailbox.wait_for(OWNER, count=count)
    links = [link for link in mailbox.links(message) if "/login/link/" in link]
    assert links, mailbox.body(message)
    return urlsplit(links[-1]).path


def test_a_locked_owner_signs_in_with_an_emailed_link_once(tight_ceiling, app, mailbox):
    user = make_user(OWNER, PASSWORD, provisioned=False)
    for n in range(3):  # guessers in three places reach the ceiling for the address
        post_login(app.test_client(), OWNER, f"wrong guess {n}", f"10.9.1.{n}")
    owner = app.test_client()
    locked = post_login(owner, OWNER, PASSWORD, "10.9.1.200")
    assert locked.status_code == 429
    page = locked.get_data(as_text=True)
    assert "Email me a sign-in link" in page and f'value="{OWNER}"' in page

    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    sent = owner.post("/login/link", data={"email": OWNER, "csrf_token": token})
    assert sent.status_code == 200 and "Check your email" in sent.get_data(as_text=True)
    path = _link_path(mailbox)

    # GET shows a button and signs in nobody (mail scanners fetch links).
    shown = owner.get(path)
    assert shown.status_code == 200 and "Sign in" in shown.get_data(as_text=True)
    assert owner.get("/account").status_code == 302
    assert User.get_by_id(user.id).sign_in_link_used_at is None

    signed_in = owner.post(path, data={"csrf_token": csrf_token(owner, path)})
    assert signed_in.status_code == 302
    assert owner.get("/account").status_code == 200

    # Once: the same link in another browser is refused.
    other = app.test_client()
    assert other.get(path).status_code == 400
    assert other.post(path, data={"csrf_token": csrf_token(other, "/login")}).status_code == 400
    assert other.get("/account").status_code == 302


def test_the_link_answer_is_the_same_for_unknown_addresses_and_nothing_is_sent(app, mailbox):
    client = app.test_client()
    token = csrf_token(client, "/login")
    known = make_user(OWNER, PASSWORD, provisioned=False)
    unverified = make_user("new@example.com", PASSWORD, verified=False)
    pages = []
    for email in ("nobody@example.com", unverified.email, known.email):
        response = client.post("/login/link", data={"email": email, "csrf_token": token})
        assert response.status_code == 200
        pages.append(response.get_data(as_text=True).replace(email, "EMAIL"))
    pages = [re.sub(r'"X-CSRFToken": "[^"]+"', "", p) for p in pages]
    assert pages[0] == pages[1] == pages[2]
    mailbox.wait_for(OWNER)
    assert mailbox.to("nobody@example.com") == [] and mailbox.to("new@example.com") == []


def test_sign_in_links_are_single_purpose_expire_and_die_with_the_password(app, mailbox):
    user = make_user(OWNER, PASSWORD, provisioned=False)
    accounts.send_sign_in_link(OWNER)
    token = _link_path(mailbox).rsplit("/", 1)[1]
    assert accounts.check_sign_in_link(token).id == user.id
    payload = tokens.read("sign_in_link", token)

    # Another purpose's token with the same payload doesn't sign in, nor does this one elsewhere.
    with pytest.raises(tokens.TokenInvalid):
        accounts.use_sign_in_link(tokens.make("reset_password", payload))
    with pytest.raises(tokens.TokenInvalid):
        accounts.check_reset_link(token)
    old = tokens.make("sign_in_link", payload, issued_at=time.time() - 16 * 60)
    with pytest.raises(tokens.TokenExpired):
        accounts.use_sign_in_link(old)

    # A password change (the owner took control back) ends it.
    accounts.change_password(User.get_by_id(user.id), PASSWORD, "a brand new password 99")
    with pytest.raises(tokens.TokenInvalid):
        accounts.use_sign_in_link(token)


def test_two_links_then_one_used_spends_both(app, mailbox):
    make_user(OWNER, PASSWORD, provisioned=False)
    accounts.send_sign_in_link(OWNER)
    first = _link_path(mailbox).rsplit("/", 1)[1]
    time.sleep(0.01)
    accounts.send_sign_in_link(OWNER)
    second = _link_path(mailbox, count=2).rsplit("/", 1)[1]
    assert accounts.use_sign_in_link(second).email == OWNER
    for token in (first, second):
        with pytest.raises(tokens.TokenInvalid):
            accounts.use_sign_in_link(token)
