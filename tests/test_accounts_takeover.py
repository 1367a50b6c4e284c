"""Issue 9, finding 1: pre-verification account takeover.

An attacker signs up with the victim's address and a password of their own, stays signed in
and asks for the verification again. Whoever proves the mailbox must end up the only one
holding the account: the attacker's session ends, their password no longer opens it.
"""

from helpers import csrf_token
from helpers import login
from test_accounts_views import PASSWORD
from test_accounts_views import link_path
from test_accounts_views import post
from test_accounts_views import text

from selfserve.models import LoginSession
from selfserve.models import User
from selfserve.services import accounts

VICTIM = "victim@example.com"
ATTACKERS_PASSWORD = "attacker chose this 123"


def _sign_up(client, email, password):
    return post(client, "/signup", {"email": email, "password": password})


def _signed_in_as(client):
    """The address the client is signed in as, or None."""
    response = client.get("/account")
    if response.status_code != 200:
        return None
    page = text(response)
    return VICTIM if VICTIM in page else "someone"


def test_the_reported_attack_leaves_the_attacker_with_nothing(app, mailbox, sim):
    attacker = app.test_client()
    assert _sign_up(attacker, VICTIM, ATTACKERS_PASSWORD).status_code == 200
    assert login(attacker, VICTIM, ATTACKERS_PASSWORD).status_code == 200
    assert post(attacker, "/verify-email/resend", token_from="/verify-email").status_code == 302
    attackers_link = link_path(mailbox, VICTIM, "/verify/", count=2)

    # The victim signs up: a fresh start with the victim's password, the attacker signed out.
    victim = app.test_client()
    assert _sign_up(victim, VICTIM, PASSWORD).status_code == 200
    victims_link = link_path(mailbox, VICTIM, "/verify/", count=3)
    assert attacker.get("/account").status_code == 302  # signed out

    # Whichever link the victim clicks, they finish by signing in with their own password.
    for link in (attackers_link, victims_link):
        response = post(victim, link, token_from=link)
        assert response.status_code == 302 and response.headers["Location"] == "/login"
        assert User.get(User.email == VICTIM).email_verified_at is None  # not yet
    assert login(victim, VICTIM, PASSWORD).status_code == 200
    user = User.get(User.email == VICTIM)
    assert user.is_verified
    assert _signed_in_as(victim) == VICTIM

    # The attacker's password opens nothing, and their old session is over.
    assert attacker.get("/account").status_code == 302
    assert login(app.test_client(), VICTIM, ATTACKERS_PASSWORD).status_code == 401
    live = LoginSession.select().where((LoginSession.user == user.id) & LoginSession.ended_at.is_null())
    assert live.count() == 1


def test_a_victim_who_never_signs_up_verifies_only_with_a_password_of_their_own(app, mailbox, sim):
    """The victim clicks the link the attacker's resend sent them, without signing up: the
    link alone verifies nothing; they can't sign in with a password they don't know; the
    reset link proves the mailbox, sets their password and verifies the address."""
    attacker = app.test_client()
    _sign_up(attacker, VICTIM, ATTACKERS_PASSWORD)
    assert login(attacker, VICTIM, ATTACKERS_PASSWORD).status_code == 200
    link = link_path(mailbox, VICTIM, "/verify/")

    victim = app.test_client()
    response = post(victim, link, token_from=link)
    assert response.headers["Location"] == "/login"
    page = text(victim.get("/login"))
    assert "choose a new one" in page  # the way in when the password isn't theirs
    assert User.get(User.email == VICTIM).email_verified_at is None
    assert attacker.get("/account").status_code == 200  # nothing changed yet

    post(victim, "/forgot", {"email": VICTIM})
    reset = link_path(mailbox, VICTIM, "/reset/", count=2)
    assert post(victim, reset, {"password": "the victims own 456"}, token_from=reset).status_code == 302
    assert User.get(User.email == VICTIM).is_verified
    assert attacker.get("/account").status_code == 302
    assert login(app.test_client(), VICTIM, ATTACKERS_PASSWORD).status_code == 401
    assert login(victim, VICTIM, "the victims own 456").status_code == 200


def test_verifying_in_the_signed_in_browser_ends_every_other_session(app, mailbox, sim):
    here, elsewhere = app.test_client(), app.test_client()
    _sign_up(here, "two@example.com", PASSWORD)
    login(here, "two@example.com", PASSWORD)
    login(elsewhere, "two@example.com", PASSWORD)
    link = link_path(mailbox, "two@example.com", "/verify/")
    response = post(here, link, token_from=link)
    assert response.status_code == 302 and response.headers["Location"] != "/login"
    assert User.get(User.email == "two@example.com").is_verified
    assert here.get("/account").status_code == 200
    assert elsewhere.get("/account").status_code == 302


def test_the_service_verifies_only_with_proof_of_the_password(app, mailbox, sim):
    import pytest

    accounts.sign_up("proof@example.com", PASSWORD)
    token = link_path(mailbox, "proof@example.com", "/verify/").rsplit("/", 1)[1]
    with pytest.raises(accounts.SignInToVerify):
        accounts.verify_email(token)
    with pytest.raises(accounts.SignInToVerify):
        accounts.verify_email(token, password="not the password at all")
    assert User.get(User.email == "proof@example.com").email_verified_at is None
    assert accounts.verify_email(token, password=PASSWORD).newly_verified


def test_a_second_sign_up_of_a_verified_address_changes_nothing(app, mailbox, sim):
    from helpers import make_user

    user = make_user("owned@example.com", PASSWORD)
    client = app.test_client()
    login(client, user.email, PASSWORD)
    _sign_up(app.test_client(), user.email, ATTACKERS_PASSWORD)
    assert "tried to sign up" in mailbox.wait_for(user.email)["Subject"]
    assert User.get_by_id(user.id).password_hash == user.password_hash
    assert client.get("/account").status_code == 200
    assert csrf_token(client, "/account")
