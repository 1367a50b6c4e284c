"""Reaching support: the public Help page, the footer link on every page, "contact support"
linked to it, the support address in emails (SUPPORT_EMAIL / SUPPORT_PHONE), and a 404 page
that says what probably happened and where to go next."""

import html
import re

import pytest
from helpers import PASSWORD
from helpers import login
from helpers import make_user

from selfserve import config as config_module
from selfserve import htmx
from selfserve import mail
from selfserve.services import outbox

FOOTER_HELP = re.compile(r'<footer class="site-footer">.*<a href="/help">Help & support</a>.*</footer>', re.S)


def text(response):
    """The response body with HTML entities decoded ("couldn&#39;t" reads "couldn't")."""
    return html.unescape(response.get_data(as_text=True))


# --- settings -------------------------------------------------------------------------------------


def test_support_settings_default_and_come_from_the_environment():
    defaults = config_module.from_env({})
    assert defaults["SUPPORT_EMAIL"] == "support@selfserve.example"
    assert defaults["SUPPORT_PHONE"] == ""
    configured = config_module.from_env(
        {"SELFSERVE_SUPPORT_EMAIL": "help@homes.example", "SELFSERVE_SUPPORT_PHONE": "+44 20 7946 0000"}
    )
    assert configured["SUPPORT_EMAIL"] == "help@homes.example"
    assert configured["SUPPORT_PHONE"] == "+44 20 7946 0000"


# --- the Help page ----------------------------------------------------------------------------------


def test_help_page_is_public_and_says_how_to_reach_support(client):
    response = client.get("/help")
    assert response.status_code == 200
    page = text(response)
    assert '<a href="mailto:support@selfserve.example"' in page
    assert "serial number" in page
    assert "Never send us the setup code" in page
    assert "tel:" not in page and "Phone:" not in page  # no phone configured


@pytest.mark.parametrize(
    "phone, link",
    [("+44 (20) 7946 0000", "tel:+442079460000"), ("0800 123 456", "tel:0800123456")],
)
def test_help_page_shows_a_configured_address_and_phone(app_config, phone, link):
    from selfserve import create_app

    app_config.update(SUPPORT_EMAIL="help@homes.example", SUPPORT_PHONE=phone)
    page = text(create_app(app_config).test_client().get("/help"))
    assert '<a href="mailto:help@homes.example"' in page
    assert "support@selfserve.example" not in page
    assert f'<a href="{link}">{phone}</a>' in page


def test_help_page_without_any_contact_settings_still_says_something(app_config):
    from selfserve import create_app

    app_config.update(SUPPORT_EMAIL="", SUPPORT_PHONE="")
    page = text(create_app(app_config).test_client().get("/help"))
    assert "mailto:" not in page and "tel:" not in page
    assert "Reply to any email we sent you" in page


def test_footer_links_to_help_on_every_kind_of_page(client):
    for path in ("/", "/login", "/signup", "/help", "/no-such-page"):
        assert FOOTER_HELP.search(text(client.get(path))), path
    make_user("footer@example.com", PASSWORD)
    login(client, "footer@example.com", PASSWORD)
    for path in ("/account", "/account/activity", "/devices", "/no-such-page"):
        response = client.get(path)
        assert FOOTER_HELP.search(text(response)), (path, response.status_code)


# --- "contact support" is a link --------------------------------------------------------------------


def test_flash_messages_that_say_contact_support_link_to_help(app):
    from flask import render_template

    with app.test_request_context("/"):
        page = render_template(
            "_flashes.html",
            messages=[
                ("error", "The device cloud refused the new name. Please try again or contact support."),
                ("info", "Your email address is verified."),
            ],
        )
    messages = re.findall(r'<div class="flash[^"]*"[^>]*>(.*?)</div>', page, re.S)
    assert len(messages) == 2
    assert '<a href="/help">How to contact support</a>' in messages[0]
    assert "/help" not in messages[1]


def test_error_pages_that_say_contact_support_link_to_help(app):
    with app.test_request_context("/"):
        page = htmx.error_response("The device cloud refused this. Please contact support.", 502).get_data(
            as_text=True
        )
    main = page.split("<main", 1)[1].split("</main>", 1)[0]
    assert 'Please contact support. <a href="/help">How to contact support</a>' in main


# --- emails -----------------------------------------------------------------------------------------


def test_emails_that_say_contact_support_carry_the_address(app, mailbox):
    # Sent outside any request, as the sweep does: the address comes from the settings anyway.
    mail.send(
        "owner@example.com",
        "Objected",
        "transfer_objected",
        device_label="window controller",
        device={"serial_number": "SSW-24A-000101"},
    )
    body = " ".join(mailbox.body(mailbox.wait_for("owner@example.com")).split())
    assert (
        "contact our support team at support@selfserve.example with its serial number (SSW-24A-000101)"
        in body
    )


def test_emails_carry_a_configured_phone_and_read_well_without_any_contact(app_config, mailbox):
    from selfserve import create_app

    app_config.update(SUPPORT_EMAIL="help@homes.example", SUPPORT_PHONE="+44 20 7946 0000")
    with create_app(app_config).app_context():
        mail.send("moved@example.com", "Changed", "email_changed", new_email="new@example.com")
        outbox.send_due()  # no `app` fixture here to run the sender for the mailbox
    body = " ".join(mailbox.body(mailbox.wait_for("moved@example.com")).split())
    assert "contact our support team at help@homes.example or on +44 20 7946 0000 right away." in body
    assert "reply to this email" not in body  # mail comes from a no-reply address

    app_config.update(SUPPORT_EMAIL="", SUPPORT_PHONE="")
    with create_app(app_config).app_context():
        mail.send("stuck@example.com", "Returned", "transfer_returned_buyer", device_label="pump controller")
        outbox.send_due()
    body = " ".join(mailbox.body(mailbox.wait_for("stuck@example.com")).split())
    assert "Our support team has been told and will be in touch." in body


# --- the 404 page -----------------------------------------------------------------------------------


def test_not_found_page_explains_expired_links_and_offers_a_way_on(client):
    response = client.get("/devices/e00fce68ffffffffffffffff/nothing-here")
    assert response.status_code == 404
    page = text(response)
    assert '<h1 id="error-title">Page not found</h1>' in page
    assert "We couldn't find that page." in page
    assert "If you followed a link from an email, it may have expired or been used already." in page
    main = page.split("<main", 1)[1].split("</main>", 1)[0]
    assert '<a href="/">Go to the start page</a>' in main and '<a href="/help">' in main
    assert "My devices" not in main


def test_not_found_page_for_a_signed_in_homeowner_links_to_their_devices(client):
    make_user("lost@example.com", PASSWORD)
    login(client, "lost@example.com", PASSWORD)
    response = client.get("/no-such-page")
    assert response.status_code == 404
    main = text(response).split("<main", 1)[1].split("</main>", 1)[0]
    assert '<a href="/devices">Go to My devices</a>' in main and '<a href="/help">' in main


def test_not_found_for_htmx_stays_a_short_message(client):
    response = client.get("/no-such-page", headers={"HX-Request": "true"})
    assert response.status_code == 404 and response.headers["HX-Retarget"] == "#flashes"
    assert "We couldn't find that page." in text(response)
    assert "<main" not in text(response)
