"""Dealer at claim, in a real browser at phone width: a homeowner scans the label of a window
the registry says was sold through a dealer, sees what the dealer asks for before the device is
added, and gives it; the dealer's page is live; the homeowner revokes it and the dealer's open
page says at once that access ended (pushed: no reload). CSP holds and every page passes axe."""

import re

from helpers import PASSWORD
from helpers import make_user
from pages import check_page
from pages import sign_in
from playwright.sync_api import expect

DEALT = "e00fce68a1b2c3d4e5f60704"  # the demo registry names "Demo Window Dealer" for it


def test_a_homeowner_gives_the_dealer_access_at_claim_then_revokes_it_and_the_dealers_page_ends(
    live_server, page, second_page, labels, sim
):
    from selfserve.services import organisations

    boss = make_user("boss@dealer.example", PASSWORD, provisioned=False)
    organisations.create(boss, "Demo Window Dealer", kind="dealer")
    make_user("home@example.com", PASSWORD)
    label = labels[DEALT]

    page.goto(f"{live_server}/claim#serial={label['serial_number']}&code={label['setup_code']}")
    expect(page).to_have_url(re.compile(r"/login"))
    page.fill("#email", "home@example.com")
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    expect(page.locator("#setup_code")).to_have_value(label["setup_code"])
    page.click("button:has-text('Add device')")
    # Before the claim completes: who asks for what; no access is preselected.
    expect(page.locator("#dealer-heading")).to_be_visible(timeout=20_000)
    expect(page.locator("#claim-form")).to_contain_text("Demo Window Dealer")
    expect(page.locator("input[name=dealer_access][value=none]")).to_be_checked()
    assert sim.device(DEALT)["owner"] is None
    check_page(page)
    page.check("input[name=dealer_access][value=viewer]")
    page.click("button:has-text('Add device')")
    expect(page).to_have_url(f"{live_server}/devices/{DEALT}", timeout=20_000)
    expect(page.locator("#share-grants")).to_contain_text("organisation Demo Window Dealer")

    sign_in(second_page, live_server, "boss@dealer.example")
    second_page.goto(f"{live_server}/devices/{DEALT}")
    expect(second_page.locator("#values .value").first).to_be_visible()

    page.click("#share-grants button:has-text('Revoke')")
    page.locator("#confirm-dialog button[data-dialog-confirm]").click()
    expect(page.locator("#sharing")).to_contain_text("Nobody else has access")
    # The dealer's open page hears it at once: no values any more, a notice instead.
    expect(second_page.locator("[data-access-ended]")).to_be_visible()
    expect(second_page.locator("#values .value")).to_have_count(0)
    check_page(second_page)


def test_a_grantee_opts_in_to_a_shared_devices_alerts(live_server, page, labels, sim):
    from selfserve.services import access
    from selfserve.services import devices

    owner = make_user("home@example.com", PASSWORD)
    devices.claim(owner, labels[DEALT]["serial_number"], labels[DEALT]["setup_code"])
    make_user("family@example.com", PASSWORD, provisioned=False)
    from selfserve.models import User

    family = User.get(User.email == "family@example.com")
    access.give(devices.device_for(owner, DEALT), family, "viewer", owner)
    sign_in(page, live_server, "family@example.com")
    page.goto(f"{live_server}/account/alerts")
    box = page.locator(f"#shared-alerts ~ form input[name=device][value='{DEALT}']")
    expect(box).not_to_be_checked()
    check_page(page)
    box.check()
    page.click("#shared-alerts ~ form button:has-text('Save')")
    expect(page.locator(f"input[name=device][value='{DEALT}']")).to_be_checked()
    expect(page.locator("#flashes")).to_contain_text("1 of these shared devices")
