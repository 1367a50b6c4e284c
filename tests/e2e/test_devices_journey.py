"""The device journey in a real browser at phone width: open a label's QR link while signed
out, sign in, find the form filled (and the code gone from the address bar), add the device,
watch live values, run functions (with a confirmation for the pump), rename, release. Polling
pauses in a hidden tab. CSP holds throughout and every page passes axe."""

import re

import pytest
from helpers import PASSWORD
from helpers import WINDOW
from helpers import make_user
from pages import check_page
from playwright.sync_api import expect

PUMP = "e00fce68a1b2c3d4e5f60802"


@pytest.fixture
def app_config(app_config):
    app_config["VALUES_POLL_SECONDS"] = 1
    return app_config


def sign_in(page):
    page.fill("#email", "journey@example.com")
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")


def test_claim_from_label_watch_control_rename_release(live_server, page, labels, sim):
    make_user("journey@example.com", PASSWORD)
    window = labels[WINDOW]
    requests = []
    page.on("request", lambda request: requests.append(request.url))

    page.goto(f"{live_server}/claim#serial={window['serial_number']}&code={window['setup_code']}")
    expect(page).to_have_url(re.compile(r"/login"))
    assert "#" not in page.url  # the code left the address bar at once
    sign_in(page)
    expect(page).to_have_url(live_server + "/claim")
    expect(page.locator("#serial")).to_have_value(window["serial_number"])
    expect(page.locator("#setup_code")).to_have_value(window["setup_code"])
    expect(page.locator("#label-note")).to_be_visible()
    check_page(page)
    # The code never went to the server in any URL.
    assert not any(window["setup_code"] in url for url in requests)

    page.click("button:has-text('Add device')")
    expect(page).to_have_url(
        f"{live_server}/devices/{WINDOW}", timeout=20_000
    )  # a claim hashes the setup code: slow on a busy machine
    expect(page.locator("#flashes")).to_contain_text("was added to your account")
    values = page.locator("#values")
    # One freshness indicator for the device, not a time on every value.
    expect(values.locator("[data-freshness]")).to_have_count(1)
    expect(values.locator("[data-freshness=live]")).to_have_text("Live")
    check_page(page)

    page.fill("#arg-setPosition", "30")
    page.click("button:has-text('Set position')")
    expect(values.locator("dd").nth(1)).to_contain_text("30%")  # target position, re-read at once
    # "Moving to 30%…" follows the device: once it has arrived it says where it is.
    expect(page.locator("#function-result")).to_contain_text("Done. Now: Open 30%.", timeout=15_000)
    expect(page.locator(".blind")).to_have_attribute("aria-label", "Blind 30% open")

    page.click("summary:has-text('Rename')")
    page.fill("#device-name-input", "Living room blind")
    page.click("text=Save name")
    expect(page.locator("h1")).to_have_text("Living room blind")
    assert sim.device(WINDOW)["name"] == "Living_room_blind"
    # Focus moves to the new heading (not the page body) and the tab shows the new name.
    expect(page.locator("h1")).to_be_focused()
    expect(page).to_have_title(re.compile(r"^Living room blind · "))

    # Polling stops while the tab is hidden and resumes when it is shown again.
    page.evaluate("""() => {
        Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});
        document.dispatchEvent(new Event('visibilitychange'));
    }""")
    page.wait_for_timeout(300)  # let a request already in flight finish
    before = len([url for url in requests if url.endswith("/values")])
    page.wait_for_timeout(2500)
    assert len([url for url in requests if url.endswith("/values")]) == before
    with page.expect_request(lambda request: request.url.endswith("/values")):
        page.evaluate("""() => {
            Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});
            document.dispatchEvent(new Event('visibilitychange'));
        }""")

    page.click("text=Release this device")
    expect(page.locator("h1")).to_contain_text("Release Living room blind?")
    check_page(page)
    page.click("button:has-text('Release device')")
    expect(page).to_have_url(live_server + "/devices")
    expect(page.locator("#flashes")).to_contain_text("was released")
    expect(page.locator("main")).to_contain_text("No devices yet")
    check_page(page)
    assert sim.device(WINDOW)["owner"] is None


def test_typed_claim_and_pump_confirmation(live_server, page, labels, sim):
    make_user("journey@example.com", PASSWORD)
    pump = labels[PUMP]
    page.goto(live_server + "/login")
    sign_in(page)
    page.goto(live_server + "/devices")
    check_page(page)
    page.click("text=Add a device")
    page.fill("#serial", pump["serial_number"].lower())
    page.fill("#setup_code", "WRONG-123")
    page.click("button:has-text('Add device')")
    expect(page.locator("#claim-form")).to_contain_text("don't match")
    expect(page.locator("#setup_code")).to_have_value("")
    check_page(page)
    page.fill("#setup_code", pump["setup_code"])
    page.click("button:has-text('Add device')")
    expect(page).to_have_url(f"{live_server}/devices/{PUMP}", timeout=20_000)
    expect(page.locator("#values")).to_contain_text("Pressure")

    # The question comes in the page's own dialog (no browser confirm() box).
    page.on("dialog", lambda dialog: pytest.fail(f"a browser dialog appeared: {dialog.message}"))
    dialog = page.locator("#confirm-dialog")
    page.click("#controls button:has-text('Start pump')")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("Start the pump?")
    check_page(page)
    dialog.locator("button:has-text('Cancel')").click()  # cancelled: nothing happens
    expect(dialog).to_be_hidden()
    page.wait_for_timeout(300)
    assert sim.device(PUMP)["variables"]["running"] is False
    # The device answers slowly: the page says what is being sent and every control waits.
    sim.add_fault("POST", f"/v1/devices/{PUMP}/start", count=1, status=None, latency=2)
    page.click("#controls button:has-text('Start pump')")
    dialog.locator("button:has-text('Yes, start pump')").click()  # accepted
    expect(page.locator("#function-result")).to_contain_text("Sending ‘Start pump’ to the device…")
    expect(page.locator("#controls button:has-text('Stop pump')")).to_be_disabled()
    expect(page.locator("#controls button:has-text('Set pressure')")).to_be_disabled()
    expect(page.locator("#function-result")).to_contain_text(
        re.compile("The pump is starting|Done. Now: Running")
    )
    expect(page.locator("#controls button:has-text('Stop pump')")).to_be_enabled()
    # Running now: Start can't apply, and says so.
    expect(page.locator("#controls button:has-text('Start pump')")).to_be_disabled()
    expect(page.locator("#why-start")).to_have_text("Already running.")
    assert sim.device(PUMP)["variables"]["running"] is True

    page.goto(live_server + "/devices")
    expect(page.locator(f"#summary-{PUMP}")).to_contain_text("Running")
    check_page(page)
