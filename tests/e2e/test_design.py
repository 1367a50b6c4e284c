"""The design in Chromium at a phone's width (390 px) and a desktop's (1280 px): every page of
the journeys passes axe (no serious or critical violation) and fits the screen (the document is
no wider than the viewport, a 64-character name without spaces included), with screenshots saved
in test-results/design/ (ignored by git). Then the journeys the design changes: the overpressure
warning, fault alert and reset; an offline device's controls; the confirmation dialog by
keyboard; the phone menu with and without JavaScript."""

import pathlib
import re

import pytest
from helpers import make_user
from helpers import seed_registry
from pages import check_page
from pages import open_menu
from playwright.sync_api import expect

from selfserve.services import devices

PASSWORD = "correct horse battery"
WINDOW = "e00fce68a1b2c3d4e5f60701"
OFFLINE_WINDOW = "e00fce68a1b2c3d4e5f60703"
RUNNING_PUMP = "e00fce68a1b2c3d4e5f60801"
PUMP = "e00fce68a1b2c3d4e5f60802"
LONG_NAME = "Wohnzimmerrollladenmotorsteuerungseinheitnordseiteobergeschoss64x"[:64]
SHOTS = pathlib.Path(__file__).resolve().parents[2] / "test-results" / "design"
WIDTHS = (390, 1280)


@pytest.fixture
def app_config(app_config):
    app_config["VALUES_POLL_SECONDS"] = 1
    return app_config


@pytest.fixture
def owner(app, sim):
    labels = {device["id"]: device for device in seed_registry()}
    user = make_user("design@example.com", PASSWORD)
    for device_id in (WINDOW, OFFLINE_WINDOW, RUNNING_PUMP, PUMP):
        devices.claim(user, labels[device_id]["serial_number"], labels[device_id]["setup_code"])
    return user


def sign_in(page, live_server):
    page.goto(live_server + "/login")
    page.fill("#email", "design@example.com")
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    expect(page).not_to_have_url(re.compile(r"/login"))


def fits_and_passes(page, name, width):
    """axe and the width check (check_page), the document no wider than the viewport, and a
    full-page screenshot as an artefact."""
    check_page(page)
    document_width = page.evaluate("document.documentElement.scrollWidth")
    assert document_width <= width, f"{page.url} is {document_width}px wide in a {width}px viewport"
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}-{width}.png"), full_page=True)


@pytest.mark.parametrize("width", WIDTHS)
def test_journey_pages_fit_and_pass_axe(live_server, browser, owner, sim, width):
    from selfserve.models import Device

    Device.update(name=LONG_NAME).where(Device.device_id == WINDOW).execute()
    context = browser.new_context(viewport={"width": width, "height": 900}, is_mobile=width < 600)
    page = context.new_page()
    try:
        for name, path in (("home", "/"), ("login", "/login"), ("signup", "/signup"), ("help", "/help")):
            page.goto(live_server + path)
            fits_and_passes(page, f"signed-out-{name}", width)
        sign_in(page, live_server)
        pages = {
            "dashboard": "/devices",
            "window": f"/devices/{WINDOW}",
            "offline-window": f"/devices/{OFFLINE_WINDOW}",
            "pump": f"/devices/{RUNNING_PUMP}",
            "claim": "/devices/claim",
            "release": f"/devices/{WINDOW}/release",
            "account": "/account",
            "activity": "/account/activity",
        }
        for name, path in pages.items():
            page.goto(live_server + path)
            if path.startswith("/devices/e00") and "/release" not in path:
                expect(page.locator("#values [data-freshness]")).to_have_count(1)
            fits_and_passes(page, name, width)
        if width < 600:
            open_menu(page)
            expect(page.locator("#site-nav button:has-text('Sign out')")).to_be_visible()
            fits_and_passes(page, "menu-open", width)
    finally:
        context.close()


def test_overpressure_warning_fault_alert_and_reset(live_server, page, owner, sim):
    sign_in(page, live_server)
    page.goto(f"{live_server}/devices/{RUNNING_PUMP}")
    expect(page.locator("#state-line")).to_contain_text("Running at")

    # A value above the guard: a warning while typing, a question before it is sent.
    warning = page.locator("#warn-setPressure")
    page.fill("#arg-setPressure", "300")
    expect(warning).to_be_hidden()
    page.fill("#arg-setPressure", "395")
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("Above 380 kPa the pump's overpressure guard stops it")
    page.click("#controls button:has-text('Set pressure')")
    question = page.locator("#function-result .confirm")
    expect(question).to_contain_text("Above 380 kPa")
    check_page(page)
    question.locator("button:has-text('Yes, set pressure')").click()

    # The guard trips: an alert at the top of the page, in words with the fix; no raw codes.
    alert = page.locator("#device-alert [role=alert]")
    expect(alert).to_contain_text("Overpressure: the pump stopped itself", timeout=20_000)
    expect(alert).to_contain_text("Press Stop pump to reset it, then start it again at a lower pressure.")
    expect(page.locator("#function-result")).to_contain_text("Overpressure")
    expect(page.locator("#values")).not_to_contain_text("overpressure")  # the device's own code
    expect(page.locator("#controls button:has-text('Start pump')")).to_be_disabled()
    expect(page.locator("#why-start")).to_have_text("Reset the fault first: press Stop pump.")
    check_page(page)

    # The dashboard card carries the alert too.
    page.goto(f"{live_server}/devices")
    expect(page.locator(f"#summary-{RUNNING_PUMP} [role=alert]")).to_contain_text("Press Stop pump")
    check_page(page)

    # Stop resets it; the alert clears when the device reports no fault.
    page.goto(f"{live_server}/devices/{RUNNING_PUMP}")
    page.click("#controls button:has-text('Stop pump')")
    page.locator("#confirm-dialog button:has-text('Yes, stop pump')").click()
    expect(page.locator("#device-alert [role=alert]")).to_have_count(0, timeout=15_000)
    expect(page.locator("#controls button:has-text('Start pump')")).to_be_enabled()
    assert sim.device(RUNNING_PUMP)["variables"]["fault"] == ""

    page.goto(f"{live_server}/account/activity")
    expect(page.locator("main")).to_contain_text("Set pressure (395 kPa)")
    check_page(page)


def test_the_offline_device_s_controls_say_why_they_are_unavailable(live_server, page, owner, sim):
    sign_in(page, live_server)
    page.goto(f"{live_server}/devices/{OFFLINE_WINDOW}")
    expect(page.locator("#values [data-freshness=offline]")).to_contain_text("Offline")
    buttons = page.locator("#controls button")
    expect(buttons).to_have_count(4)
    for index in range(4):
        expect(buttons.nth(index)).to_be_disabled()
    expect(page.locator("#why-open")).to_have_text(
        "The device is offline. This will work again when it's back online."
    )
    check_page(page)
    # It comes back: the next values enable what applies (it is fully open, so not Open).
    sim.set_device(OFFLINE_WINDOW, online=True)
    from selfserve.models import DeviceSnapshot

    DeviceSnapshot.update(checked_at=None).where(DeviceSnapshot.device_id == OFFLINE_WINDOW).execute()
    expect(page.locator("#controls button:has-text('Close')")).to_be_enabled(timeout=15_000)
    expect(page.locator("#why-open")).to_have_text("Already open.")
    expect(page.locator("#controls button:has-text('Open')")).to_be_disabled()


def test_the_confirmation_dialog_by_keyboard(live_server, page, owner, sim):
    sign_in(page, live_server)
    page.goto(f"{live_server}/devices/{PUMP}")
    start = page.locator("#controls button:has-text('Start pump')")
    expect(start).to_be_enabled()
    start.focus()
    page.keyboard.press("Enter")
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    # Focus starts on the safe choice and stays in the dialog while tabbing.
    expect(dialog.locator("button:has-text('Cancel')")).to_be_focused()
    for _ in range(4):
        page.keyboard.press("Tab")
        assert page.evaluate("document.getElementById('confirm-dialog').contains(document.activeElement)")
    check_page(page)
    # Escape closes it, nothing is sent, focus goes back to the button.
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(start).to_be_focused()
    page.wait_for_timeout(300)
    assert sim.device(PUMP)["variables"]["running"] is False
    # Enter again, Tab to "Yes", Enter: the pump starts.
    page.keyboard.press("Enter")
    expect(dialog.locator("button:has-text('Cancel')")).to_be_focused()
    page.keyboard.press("Tab")
    expect(dialog.locator("button:has-text('Yes, start pump')")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#function-result")).to_contain_text(
        re.compile("The pump is starting|Done. Now: Running")
    )
    assert sim.device(PUMP)["variables"]["running"] is True


def test_the_phone_menu_works_with_and_without_javascript(live_server, browser, owner):
    for javascript in (False, True):
        context = browser.new_context(
            viewport={"width": 390, "height": 800}, is_mobile=True, java_script_enabled=javascript
        )
        page = context.new_page()
        try:
            sign_in(page, live_server)
            page.goto(f"{live_server}/devices")
            sign_out = page.locator("#site-nav button:has-text('Sign out')")
            expect(sign_out).to_be_hidden()
            page.click("[data-menu-toggle]")
            expect(sign_out).to_be_visible()
            expect(page.locator("#site-nav a:has-text('Activity')")).to_be_visible()
            if javascript:
                expect(page.locator("[data-menu-toggle]")).to_have_attribute("aria-expanded", "true")
                page.keyboard.press("Escape")
                expect(sign_out).to_be_hidden()
            # One line of header: brand and Menu side by side.
            boxes = [page.locator(s).bounding_box() for s in (".brand", "[data-menu-toggle]")]
            assert abs(boxes[0]["y"] - boxes[1]["y"]) < 20
        finally:
            context.close()
