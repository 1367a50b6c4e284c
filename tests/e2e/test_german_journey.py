"""One full journey in German, as a homeowner whose browser speaks German (Playwright locale
de-DE, Berlin time): sign up, read the German verification mail, verify, sign in, add a window
covering, open it. German text on every step; the account keeps the browser's time zone; the
pages fit a 320 px screen with German's long words."""

import email.header

from conftest import PHONE
from conftest import PageProblems
from helpers import PASSWORD
from helpers import WINDOW
from helpers import seed_registry
from pages import check_page
from pages import open_menu
from playwright.sync_api import expect

from selfserve.models import User
from selfserve.services import outbox


def test_a_german_homeowner_signs_up_adds_and_opens_a_blind(app, live_server, browser, mailbox, sim):
    window = next(device for device in seed_registry() if device["id"] == WINDOW)
    context = browser.new_context(
        viewport=PHONE, is_mobile=True, has_touch=True, locale="de-DE", timezone_id="Europe/Berlin"
    )
    context.set_default_timeout(10_000)
    page = context.new_page()
    problems = PageProblems(page)
    try:
        page.goto(live_server + "/")
        expect(page.locator("html")).to_have_attribute("lang", "de")
        expect(page.locator("h1")).to_have_text("Betreuen Sie Ihre Steuerungen selbst")
        page.click("main >> text=Konto erstellen")
        expect(page.locator("h1")).to_have_text("Konto erstellen")
        check_page(page)
        page.fill("#email", "neu@example.com")
        page.fill("#password", PASSWORD)
        page.click("main button[type=submit]")
        expect(page.locator("h1")).to_have_text("Sehen Sie in Ihr Postfach")

        # The account took the browser's language (for emails) and time zone.
        user = User.get(User.email == "neu@example.com")
        assert (user.seen_locale, user.time_zone) == ("de", "Europe/Berlin")

        outbox.send_due()
        message = mailbox.wait_for("neu@example.com")
        subject = str(email.header.make_header(email.header.decode_header(message["Subject"])))
        assert subject == "Bestätigen Sie Ihre E-Mail-Adresse"
        link = next(url for url in mailbox.links(message) if "/verify/" in url)
        page.goto(link)
        page.click("text=E-Mail-Adresse bestätigen")
        expect(page.locator("#flashes")).to_contain_text("Melden Sie sich mit Ihrem Passwort an")
        page.fill("#email", "neu@example.com")
        page.fill("#password", PASSWORD)
        page.click("main button[type=submit]")
        expect(page.locator("#flashes")).to_contain_text("Ihre E-Mail-Adresse ist bestätigt")

        page.goto(live_server + "/devices")
        expect(page.locator("h1")).to_contain_text("Meine Geräte")
        page.click("main >> text=Gerät hinzufügen")
        check_page(page)
        page.fill("#serial", window["serial_number"])
        page.fill("#setup_code", "FALSCH99")
        page.click("button:has-text('Gerät hinzufügen')")
        expect(page.locator("main")).to_contain_text(
            "Seriennummer und Einrichtungscode passen nicht zusammen"
        )
        page.fill("#setup_code", window["setup_code"])
        page.click("button:has-text('Gerät hinzufügen')")
        expect(page).to_have_url(f"{live_server}/devices/{WINDOW}")
        expect(page.locator("#flashes")).to_contain_text("wurde Ihrem Konto hinzugefügt")
        expect(page.locator("#values [data-freshness=live]")).to_have_text("Live")
        expect(page.locator("#values")).to_contain_text("Zielposition")
        check_page(page)

        page.click("#main button:has-text('Öffnen')")
        expect(page.locator("#function-result")).to_contain_text("Wird geöffnet")
        # What the device then reports, in German (static/js/devices.js reads the page's texts).
        expect(page.locator("#function-result")).to_contain_text("Erledigt. Jetzt: Offen", timeout=20_000)

        open_menu(page)
        page.click("#site-nav >> text=Konto")
        expect(page.locator("#pref-time_zone")).to_have_value("Europe/Berlin")
        expect(page.locator("#pref-language option:checked")).to_contain_text("Wie mein Browser es wünscht")
        check_page(page)

        # German words are long: the pages still fit the narrowest phone, without sideways scroll.
        page.set_viewport_size({"width": 320, "height": 640})
        for path in ("/devices", f"/devices/{WINDOW}", "/account", "/account/alerts", "/account/activity"):
            page.goto(live_server + path)
            expect(page.locator("html")).to_have_attribute("lang", "de")
            overflow = page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 1, f"{path} is {overflow}px wider than a 320px screen in German"
        # The activity in German, the function it ran by its German name (recorded in English).
        expect(page.locator("main")).to_contain_text("Angemeldet")
        expect(page.locator("main")).to_contain_text(": Öffnen")
    finally:
        errors = [e for e in problems.errors if "favicon" not in e]
        context.close()
    assert not errors, "browser reported problems:\n" + "\n".join(errors)
