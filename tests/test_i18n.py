"""The person's language and time zone: chosen from Accept-Language, overridden by the choice
stored on the account, changeable in settings; dates in the person's zone; emails in the
recipient's language."""

import datetime
import email.header
import re

from helpers import PASSWORD
from helpers import WINDOW
from helpers import csrf_token
from helpers import login
from helpers import make_user
from helpers import owner_of
from helpers import signed_in

from selfserve import i18n
from selfserve.models import AuditEvent
from selfserve.models import Grant
from selfserve.models import User
from selfserve.services import devices
from selfserve.services import organisations
from selfserve.services import outbox
from selfserve.services import sharing

GERMAN = {"Accept-Language": "de-DE,de;q=0.9,en;q=0.5"}


def _subject(message):
    return str(email.header.make_header(email.header.decode_header(message["Subject"])))


def _lang(page):
    return re.search(r'<html lang="([a-z]+)"', page).group(1)


def test_accept_language_picks_german_and_english_stays_the_default(client):
    german = client.get("/login", headers=GERMAN).get_data(as_text=True)
    assert _lang(german) == "de"
    assert '<h1 id="login-title">Anmelden</h1>' in german and "Passwort vergessen?" in german
    english = client.get("/login").get_data(as_text=True)
    assert _lang(english) == "en" and "Forgot your password?" in english
    # A language we don't speak falls back to English; Spanish is offered too.
    assert _lang(client.get("/login", headers={"Accept-Language": "fr-FR"}).get_data(as_text=True)) == "en"
    spanish = client.get("/login", headers={"Accept-Language": "es-MX,es"}).get_data(as_text=True)
    assert _lang(spanish) == "es"
    assert '<h1 id="login-title">Iniciar sesión</h1>' in spanish and "¿Ha olvidado su contraseña?" in spanish


def test_the_stored_choice_overrides_the_browser_and_settings_change_it(app, client):
    make_user("lang@example.com")
    login(client, "lang@example.com")
    assert _lang(client.get("/account", headers=GERMAN).get_data(as_text=True)) == "de"

    token = csrf_token(client, "/account")
    response = client.post(
        "/account/preferences",
        data={"csrf_token": token, "language": "en", "time_zone": "America/New_York"},
        headers=GERMAN,
        follow_redirects=True,
    )
    page = response.get_data(as_text=True)
    assert _lang(page) == "en" and "Your language and time zone are saved." in page
    user = User.get(User.email == "lang@example.com")
    assert (user.locale, user.time_zone) == ("en", "America/New_York")
    # The German browser no longer decides.
    assert _lang(client.get("/devices", headers=GERMAN).get_data(as_text=True)) == "en"

    # A zone that doesn't exist is refused next to its field, and nothing is saved.
    bad = client.post(
        "/account/preferences", data={"csrf_token": token, "language": "de", "time_zone": "Mars/Olympus"}
    )
    assert bad.status_code == 400 and 'href="#pref-time_zone"' in bad.get_data(as_text=True)
    assert User.get_by_id(user.id).locale == "en"

    # "As my browser asks" forgets the choice.
    client.post("/account/preferences", data={"csrf_token": token, "language": "", "time_zone": "UTC"})
    assert User.get_by_id(user.id).locale is None
    assert _lang(client.get("/devices", headers=GERMAN).get_data(as_text=True)) == "de"


def test_dates_show_in_the_persons_time_zone_and_locale(app, client):
    user = make_user("zone@example.com")
    User.update(time_zone="America/New_York").where(User.id == user.id).execute()
    login(client, "zone@example.com")
    # 15 Jan 2026 12:00 UTC is 07:00 in New York.
    AuditEvent.create(action="account.password_changed", user=user, at=datetime.datetime(2026, 1, 15, 12, 0))
    page = client.get("/account/activity").get_data(as_text=True)
    assert ">Jan 15, 2026, 7:00\u202fAM</time>" in page and "12:00\u202fPM" not in page
    german = client.get("/account/activity", headers=GERMAN).get_data(as_text=True)
    assert ">15.01.2026, 07:00</time>" in german and "Passwort geändert" in german


def test_sign_up_stores_the_browsers_language_and_time_zone(app, client, mailbox):
    token = csrf_token(client, "/signup")
    client.post(
        "/signup",
        data={
            "csrf_token": token,
            "email": "neu@example.com",
            "password": PASSWORD,
            "browser_time_zone": "Europe/Berlin",
        },
        headers=GERMAN,
    )
    user = User.get(User.email == "neu@example.com")
    assert (user.locale, user.seen_locale, user.time_zone) == (None, "de", "Europe/Berlin")
    # The verification email is in German: the language the person's browser asked for.
    outbox.send_due()
    message = mailbox.wait_for("neu@example.com")
    assert _subject(message) == "Bestätigen Sie Ihre E-Mail-Adresse"
    assert "Bitte bestätigen Sie, dass dies Ihre E-Mail-Adresse für Tidewell ist" in mailbox.body(message)
    # A zone the browser made up is not stored.
    token = csrf_token(client, "/signup")
    client.post(
        "/signup",
        data={
            "csrf_token": token,
            "email": "x@example.com",
            "password": PASSWORD,
            "browser_time_zone": "Nowhere",
        },
    )
    assert User.get(User.email == "x@example.com").time_zone is None


def test_an_email_to_a_german_speaking_recipient_is_in_german(app, client, mailbox):
    """The sender's language doesn't matter: the recipient chose German (an English request)."""
    user = make_user("empfaenger@example.com")
    User.update(locale="de", time_zone="Europe/Berlin").where(User.id == user.id).execute()
    token = csrf_token(client, "/forgot")
    client.post("/forgot", data={"csrf_token": token, "email": "empfaenger@example.com"})
    outbox.send_due()
    message = mailbox.wait_for("empfaenger@example.com")
    assert _subject(message) == "Passwort zurücksetzen"
    body = mailbox.body(message)
    assert "Jemand (hoffentlich Sie) möchte das Passwort Ihres Tidewell-Kontos zurücksetzen" in body
    assert "Guten Tag," in body and "Hello" not in body
    # ...and the page that request got stayed English.
    assert _lang(client.get("/login").get_data(as_text=True)) == "en"


def test_recipient_preferences_fall_back_to_the_browser_language_seen_at_sign_in(app):
    with app.test_request_context():
        user = make_user("seen@example.com")
        User.update(seen_locale="es").where(User.id == user.id).execute()
        assert i18n.recipient_preferences("seen@example.com") == ("es", None)
    with app.test_request_context(headers=GERMAN):
        # No account: the language of the request that sends it (an invitation from a German page).
        assert i18n.recipient_preferences("nobody@example.com") == ("de", None)


def test_another_app_does_not_register_the_lazy_text_session_tag_again(app, app_config):
    # Flask's session serializer is one object for the process: each create_app used to add
    # its own tag to it, so the list of tags grew with every app built.
    from selfserve import create_app

    serializer = app.session_interface.serializer
    tags_before = len(serializer.order)
    second = create_app(app_config)
    assert second.session_interface.serializer is serializer
    assert len(serializer.order) == tags_before


def test_who_can_see_and_the_sharing_trail_read_in_german(app, labels, mailbox):
    """An organisation holding access, its grant's end date and an erased person's label are
    put into words when shown: in the reader's language, never stored English."""
    owner = owner_of(labels, WINDOW, "owner@example.com")
    week = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=7)).date().isoformat()
    dealer = organisations.create(make_user("boss@dealer.example"), "Blinds & Co", kind="dealer")
    sharing.grant_dealer(owner, devices.device_for(owner, WINDOW), dealer.name, "operator", week)
    ends = Grant.get(Grant.grantee_org == dealer.id).expires_at
    stored = AuditEvent.get(AuditEvent.action == "sharing.granted").detail
    assert stored["to_organisation"] == "Blinds & Co" and "to" not in stored
    assert datetime.datetime.fromisoformat(stored["until"]) == ends  # ISO text, not English words
    # A row written before (English words) still reads, and an erased person gets a German label.
    AuditEvent.create(
        action="sharing.granted",
        user=owner,
        detail={
            "name": "Old",
            "role": "viewer",
            "to": "deleted account #7",
            "until": "02 Jan 2099 00:00 UTC",
        },
    )

    client = signed_in(app, owner)
    who = client.get(f"/devices/{WINDOW}/access", headers=GERMAN).get_data(as_text=True)
    assert "Organisation Blinds &amp; Co" in who and "organisation Blinds" not in who
    activity = client.get("/account/activity", headers=GERMAN).get_data(as_text=True)
    assert "Organisation Blinds &amp; Co" in activity and "organisation Blinds" not in activity
    assert f" bis {ends:%d.%m.%Y}, {ends:%H:%M}" in activity  # the German medium date, in UTC
    assert "gelöschtes Konto Nr. 7" in activity and " bis 02 Jan 2099 00:00 UTC" in activity
    english = client.get("/account/activity").get_data(as_text=True)
    assert "Gave organisation Blinds &amp; Co operator access" in english


def test_an_invitation_to_an_organisation_reads_as_one_sentence(app, labels, mailbox):
    """The invitation (page and email) says "for an organisation" and its end date inside one
    translated sentence, which German reorders (the verb's prefix goes to the end)."""
    owner = owner_of(labels, WINDOW, "owner@example.com")
    week = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=7)).date().isoformat()
    sharing.invite(
        owner,
        devices.device_for(owner, WINDOW),
        "boss@dealer.example",
        "operator",
        week,
        to_organisation=True,
    )
    body = mailbox.body(mailbox.wait_for("boss@dealer.example"))
    assert re.search(
        r"owner@example\.com shared a .+ with your organisation on Tidewell, as .+, until .+\.", body
    )
    link = next(link for link in mailbox.links(mailbox.wait_for("boss@dealer.example")) if "/share/" in link)
    path = link.split("http://localhost", 1)[1]
    german = app.test_client().get(path, headers=GERMAN).get_data(as_text=True)
    sentence = re.search(r"<p><strong[^>]*>owner@example\.com</strong>(.*?)</p>", german, re.S).group(1)
    assert " ".join(sentence.split()).startswith(
        'lädt <strong class="break-anywhere">boss@dealer.example</strong> für eine Organisation, die er leitet, zu'
    )
    assert "ein, bis <time datetime=" in sentence
