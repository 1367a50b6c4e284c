"""The support journey in a real browser at phone width: a staff member signs in with a
password and sets up TOTP from the QR page, searches for a customer, views as them (banner
with the time left on every page, live values load), is refused a release, ends the view.
The customer's activity then says support viewed the account. CSP holds and every page
passes axe."""

import re

import pyotp
import pytest
from helpers import PASSWORD
from helpers import WINDOW
from helpers import make_user
from helpers import seed_registry
from pages import check_page
from pages import open_menu
from pages import sign_in
from playwright.sync_api import expect

from selfserve.models import Device
from selfserve.models import StaffView
from selfserve.services import devices
from selfserve.services import staff


@pytest.fixture
def app_config(app_config):
    app_config["VALUES_POLL_SECONDS"] = 1
    return app_config


@pytest.fixture
def homeowner(app, sim):
    labels = {device["id"]: device for device in seed_registry()}
    user = make_user("stuck.homeowner@example.com", PASSWORD)
    devices.claim(user, labels[WINDOW]["serial_number"], labels[WINDOW]["setup_code"])
    return user


def test_staff_views_as_customer_read_only_and_ends_the_view(live_server, page, homeowner, sim):
    staff.create_staff("desk@support.example", PASSWORD)

    # Password, then the authenticator set-up page with a QR code and the key as text.
    sign_in(page, live_server, "desk@support.example")
    expect(page).to_have_url(re.compile(r"/support/second-factor"))
    expect(page.locator("h1")).to_have_text("Set up your authenticator app")
    expect(page.locator(".qr img")).to_be_visible()
    check_page(page)
    secret = page.locator("#totp-secret").inner_text().strip()
    page.fill("#code", "000000" if pyotp.TOTP(secret).now() != "000000" else "111111")
    page.click("main button:has-text('Finish setup')")
    expect(page.locator(".error-summary")).to_contain_text("That code is not right")
    assert all("401" in e for e in page.problems.errors)
    page.problems.errors.clear()
    page.fill("#code", pyotp.TOTP(secret).now())
    page.click("main button:has-text('Finish setup')")
    expect(page).to_have_url(live_server + "/support")
    expect(page.locator("#flashes")).to_contain_text("Signed in to the support console")
    check_page(page)

    # Search by part of the address, open the customer.
    page.fill("#q", "stuck.home")
    page.click("main button:has-text('Search')")
    expect(page.locator("#results-title")).to_contain_text("stuck.home")
    check_page(page)
    page.click("text=stuck.homeowner@example.com")
    expect(page.locator("h1")).to_have_text("stuck.homeowner@example.com")
    check_page(page)

    # View as the customer, with a reason.
    page.fill("#view-reason", "ticket 4411: values look wrong")
    page.click("main button:has-text('View as customer')")
    expect(page).to_have_url(live_server + "/devices")
    banner = page.locator("[data-staff-view]")
    expect(banner).to_contain_text("desk@support.example is viewing as stuck.homeowner@example.com")
    expect(banner).to_contain_text("ticket 4411")
    time_left = page.locator("#staff-view-time-left")
    expect(time_left).to_have_text(re.compile(r"^(29|30) min \d\d s$"))
    first = time_left.inner_text()
    expect(time_left).not_to_have_text(first)  # the countdown runs
    check_page(page)

    # The device page with live values (reads are allowed), banner still there.
    page.click(f"a[href='/devices/{WINDOW}']")
    expect(page).to_have_url(f"{live_server}/devices/{WINDOW}")
    expect(page.locator("[data-staff-view]")).to_be_visible()
    expect(page.locator("#values [data-freshness]")).to_be_visible()
    check_page(page)

    # A release is refused, and nothing is sent to Particle.
    sim.reset_counters()
    page.goto(f"{live_server}/devices/{WINDOW}/release")
    expect(page.locator("[data-staff-view]")).to_be_visible()
    release = page.locator("main button:has-text('Release device')")
    expect(release).to_be_disabled()  # the page says so before anyone tries
    expect(page.locator("[data-read-only-hint]")).to_contain_text("read-only")
    # And the server refuses it anyway: submit the form as if the button were enabled.
    page.evaluate("document.querySelector('main form[method=post]').submit()")
    expect(page.locator("main")).to_contain_text("read-only")
    assert all("403" in e for e in page.problems.errors), page.problems.errors
    page.problems.errors.clear()
    assert Device.get_by_id(WINDOW).owner_id == homeowner.id
    assert not [
        r
        for r, n in sim.counters()["routes"].items()
        if n and not r.startswith("GET ") and r != "POST /oauth/token"
    ]

    # End the view: back on the customer's support page, no banner.
    page.click("[data-staff-view] button:has-text('End view')")
    expect(page).to_have_url(f"{live_server}/support/customers/{homeowner.id}")
    expect(page.locator("#flashes")).to_contain_text("The view has ended")
    expect(page.locator("[data-staff-view]")).to_have_count(0)
    expect(page.locator("#activity-title")).to_be_visible()
    expect(page.locator("main")).to_contain_text("Support viewed the customer's account")
    check_page(page)
    assert StaffView.get().end_cause == "ended"

    # The fleet: run a reconciliation from the console; drift is reported, nothing changes.
    sim.set_device(WINDOW, owner=None)
    open_menu(page)  # staff have their own navigation (behind "Menu" on a phone)
    page.click("#site-nav a:has-text('Fleet')")
    expect(page.locator("h1")).to_have_text("Fleet")
    check_page(page)
    page.click("main button:has-text('Run reconciliation now')")
    expect(page.locator("#flashes")).to_contain_text("Reconciliation finished: 1 finding(s)")
    expect(page.locator("tr[data-drift='unclaimed_on_particle']")).to_contain_text(WINDOW)
    check_page(page)
    page.click(f"tr[data-drift='unclaimed_on_particle'] a:has-text('{WINDOW}')")
    expect(page.locator("[data-drift='unclaimed_on_particle']")).to_be_visible()
    expect(page.locator("#release-title")).to_be_visible()
    check_page(page)
    assert Device.get_by_id(WINDOW).owner_id == homeowner.id
