"""The whole homeowner journey in one go, as a newcomer would click it at phone width: sign up,
read the verification mail, verify, sign in, add a window covering by typing its label, open
it and watch the position value change, then release it. Also: a command sent to an offline
device shows its error message in the page (an htmx error fragment, swapped on purpose)."""

import re

from helpers import OFFLINE_WINDOW
from helpers import PASSWORD
from helpers import WINDOW
from helpers import make_user
from helpers import seed_registry
from pages import check_page
from playwright.sync_api import expect


def _labels():
    return {device["id"]: device for device in seed_registry()}


def _sign_in(page, email):
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")


def _add_device(page, label):
    page.fill("#serial", label["serial_number"])
    page.fill("#setup_code", label["setup_code"])
    page.click("button:has-text('Add device')")


def _position(page):
    text = page.locator("#values dd").first.locator(".value").inner_text()
    return int(re.match(r"(\d+)", text).group(1))


def test_sign_up_verify_claim_watch_a_value_change_and_release(app, live_server, page, mailbox, sim):
    window = _labels()[WINDOW]

    page.goto(live_server + "/")
    page.click("main >> text=Create an account")
    page.fill("#email", "newcomer@example.com")
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    expect(page.locator("h1")).to_have_text("Check your email")

    link = next(u for u in mailbox.links(mailbox.wait_for("newcomer@example.com")) if "/verify/" in u)
    page.goto(link)
    page.click("text=Confirm my email address")
    expect(page.locator("#flashes")).to_contain_text("verified")
    _sign_in(page, "newcomer@example.com")
    # The Particle customer now exists, under an opaque id that is not the email.
    customers = [c["username"] for c in sim.state()["customers"]]
    assert customers and not any("newcomer" in c for c in customers)

    page.goto(live_server + "/devices")
    page.click("text=Add a device")
    check_page(page)
    _add_device(page, window)
    expect(page).to_have_url(f"{live_server}/devices/{WINDOW}")
    expect(page.locator("#values [data-freshness=live]")).to_have_text("Live")
    assert _position(page) == 0
    check_page(page)

    page.click("#main button:has-text('Open')")
    expect(page.locator("#function-result")).to_contain_text("Opening")
    # The covering moves at about 10 %/s; the polled values follow without a reload.
    expect(page.locator("#values dd").first).not_to_contain_text(re.compile(r"^\s*0%"), timeout=15_000)
    page.wait_for_function(
        "() => parseInt(document.querySelector('#values dd .value').textContent) >= 20", timeout=15_000
    )
    assert sim.device(WINDOW)["owner"] is not None

    page.click("text=Release this device")
    check_page(page)
    page.click("button:has-text('Release device')")
    expect(page.locator("#flashes")).to_contain_text("was released")
    assert sim.device(WINDOW)["owner"] is None

    page.goto(live_server + "/account/activity")
    activity = page.locator("main")
    expect(activity).to_contain_text("Released device")
    expect(activity).to_contain_text("The device answered: Opening…")
    check_page(page)


def test_an_offline_device_s_controls_are_unavailable_with_the_reason(app, live_server, page, sim):
    offline = _labels()[OFFLINE_WINDOW]
    make_user("offline@example.com", PASSWORD)
    page.goto(live_server + "/login")
    _sign_in(page, "offline@example.com")
    page.goto(live_server + "/devices/claim")
    _add_device(page, offline)  # product devices can be claimed while offline
    expect(page).to_have_url(f"{live_server}/devices/{OFFLINE_WINDOW}")
    expect(page.locator("#values")).to_contain_text("Offline")

    # Every action says why it can't be used now, instead of failing after a press.
    for name in ("open", "close", "stop", "setPosition"):
        form = page.locator(f"#controls form[data-function={name}]")
        expect(form.locator("button")).to_be_disabled()
        expect(form.locator(".why")).to_have_text(
            "The device is offline. This will work again when it's back online."
        )
    expect(page.locator("#offline-note")).to_contain_text("will work again when it's back online")
    check_page(page)
    # Sent anyway (an old page, no JavaScript): the server still answers with a clear message.
    page.evaluate("document.querySelector('#controls form[data-function=close] button').disabled = false")
    page.click("#main button:has-text('Close')")
    expect(page.locator("#function-result")).to_contain_text(re.compile("offline|not answering", re.I))


def test_an_htmx_error_answer_is_shown_in_the_flash_region(app, live_server, page, sim):
    """Error fragments come back 4xx with HX-Retarget: #flashes, which htmx 2 would not swap
    by itself (static/js/site.js lets them through)."""
    window = _labels()[WINDOW]
    make_user("expired@example.com", PASSWORD)
    page.goto(live_server + "/login")
    _sign_in(page, "expired@example.com")
    page.goto(live_server + "/devices/claim")
    _add_device(page, window)
    expect(page).to_have_url(f"{live_server}/devices/{WINDOW}")
    # As if the session's CSRF token had expired while the page was open.
    page.evaluate("""() => {
        document.body.setAttribute('hx-headers', '{"X-CSRFToken": "expired"}');
        document.querySelectorAll('input[name=csrf_token]').forEach(i => { i.value = 'expired'; });
    }""")
    page.click("#main button:has-text('Open')")  # the blind is closed: Open is the one that applies
    expect(page.locator("#flashes")).to_contain_text("This form has expired")
    assert sim.device(WINDOW)["variables"]["moving"] is False
    # The 400 is deliberate; Chromium logs any 4xx answer as a console error.
    page.problems.errors[:] = [e for e in page.problems.errors if "status of 400" not in e]
