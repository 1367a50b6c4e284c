"""The account journey in a real browser at phone width: sign up (with a typo first), confirm
the address through the emailed link, sign in, watch "setting up your account" finish by
itself after a Particle outage, then the settings and activity pages. CSP holds throughout
and every page passes axe. Along the way: focus moves to the error summary, the sign-in form
fills in the address just confirmed, and tap targets are big enough for a finger."""

import re

import pyotp
from helpers import PASSWORD
from helpers import make_user
from helpers import seed_registry
from pages import check_page
from playwright.sync_api import expect

from selfserve.services import devices
from selfserve.services import staff

TAP = 44  # px: the smallest comfortable touch target


def heights(page, selector):
    """{text: rendered height in px} of the visible elements matching `selector`."""
    return page.eval_on_selector_all(
        selector,
        "els => Object.fromEntries(els.filter(e => e.offsetParent !== null)"
        ".map(e => [e.textContent.trim(), e.getBoundingClientRect().height]))",
    )


def assert_big_enough_to_tap(page):
    targets = {**heights(page, ".site-header a, .site-header button"), **heights(page, ".site-footer a")}
    assert targets and all(h >= TAP for h in targets.values()), targets


def test_sign_up_verify_and_watch_setup_finish(live_server, page, mailbox, sim):
    page.goto(live_server + "/signup")
    check_page(page)
    page.fill("#email", "browser@example.com")
    page.fill("#password", "short")
    page.click("main button[type=submit]")
    expect(page.locator(".error-summary")).to_contain_text("at least 10 characters")
    expect(page.locator(".error-summary")).to_be_focused()  # not left on the page body
    expect(page.locator("#password")).to_have_attribute("aria-invalid", "true")
    check_page(page)
    # The form came back with 400 on purpose; Chromium logs that status as a console error.
    assert all("400" in e for e in page.problems.errors)
    page.problems.errors.clear()

    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    expect(page.locator("h1")).to_have_text("Check your email")
    check_page(page)

    message = mailbox.wait_for("browser@example.com")
    link = next(url for url in mailbox.links(message) if "/verify/" in url)
    # The cloud fails once: the account must show setup in progress, then finish by itself.
    sim.add_fault("POST", "/v1/products/*/customers", count=1, status=503)
    page.goto(link)
    check_page(page)
    page.click("text=Confirm my email address")
    expect(page.locator("#flashes")).to_contain_text("verified")
    # The form knows who just confirmed their address; only the password is left to type.
    expect(page.locator("#email")).to_have_value("browser@example.com")
    expect(page.locator("#password")).to_be_focused()
    assert "browser" not in page.url
    assert_big_enough_to_tap(page)

    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    expect(page).to_have_url(live_server + "/account")
    banner = page.locator("#account-status")
    expect(banner).to_contain_text("Setting up your account")
    check_page(page)
    expect(banner).to_contain_text("Your account is ready", timeout=30_000)
    assert [c["username"] for c in sim.state()["customers"]] != []
    assert_big_enough_to_tap(page)  # signed in: the nav, "Sign out" and the footer
    fonts = page.eval_on_selector_all(
        ".site-header nav a, .site-header nav button",
        "els => els.map(e => [getComputedStyle(e).fontFamily, getComputedStyle(e).fontSize])",
    )
    assert len(fonts) >= 3 and len(set(map(tuple, fonts))) == 1, fonts  # "Sign out" looks like the links
    # Two password fields on this page, told apart by their labels.
    expect(page.get_by_label("Current password")).to_have_count(1)
    expect(page.get_by_label("Your password (to confirm)")).to_have_count(1)

    page.goto(live_server + "/account/activity")
    expect(page.locator("table")).to_contain_text("Verified email address")
    check_page(page)


def test_support_viewing_an_account_sees_its_controls_disabled(live_server, page, sim):
    window = "e00fce68a1b2c3d4e5f60701"
    labels = {device["id"]: device for device in seed_registry()}
    homeowner = make_user("viewed@example.com", PASSWORD)
    devices.claim(homeowner, labels[window]["serial_number"], labels[window]["setup_code"])
    staff.create_staff("desk@support.example", PASSWORD)

    page.goto(live_server + "/login")
    page.fill("#email", "desk@support.example")
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    secret = page.locator("#totp-secret").inner_text().strip()
    page.fill("#code", pyotp.TOTP(secret).now())
    page.click("main button:has-text('Finish setup')")
    expect(page).to_have_url(live_server + "/support")
    # The staff's own console is not read-only (a GET search form stays usable anyway).
    expect(page.locator("body[data-read-only]")).to_have_count(0)
    page.goto(f"{live_server}/support/customers/{homeowner.id}")
    page.fill("#view-reason", "ticket 5150: checking the account page")
    page.click("main button:has-text('View as customer')")
    expect(page).to_have_url(live_server + "/devices")

    # One notice, in the banner (not a second one in the page).
    hint = page.locator("[data-read-only-hint]")
    for path in ("/account", f"/devices/{window}", "/devices/claim"):
        page.goto(live_server + path)
        expect(hint).to_have_text("You're viewing this account read-only: controls are disabled.")
        if path.startswith("/devices/e00"):
            expect(page.locator("#values [data-freshness]")).to_be_visible()  # swapped in by htmx
            # Links that lead to a change look and act unavailable too.
            expect(page.locator("a:has-text('Release this device')")).to_have_attribute(
                "aria-disabled", "true"
            )
            # Swap the values again and wait until htmx has settled them: still nothing live.
            page.locator("#values").evaluate(
                "el => new Promise(done => {"
                " document.addEventListener('htmx:afterSettle', done, {once: true});"
                " htmx.trigger(el, 'refresh'); })"
            )
        live = page.eval_on_selector_all(
            "main button, main input:not([type=hidden]), main select, main textarea",
            "els => els.filter(e => !e.disabled).map(e => e.outerHTML)",
        )
        assert live == [], (path, live)
        expect(hint).to_have_count(1)
        check_page(page)
    # Still a way out: End view works, and the controls come back.
    page.click("[data-staff-view] button:has-text('End view')")
    expect(page).to_have_url(re.compile(rf"/support/customers/{homeowner.id}$"))
    expect(page.locator("body[data-read-only]")).to_have_count(0)
    page.goto(live_server + "/devices/claim")
    expect(page.locator("main button[type=submit]").first).to_be_enabled()
    expect(hint).to_have_count(0)
