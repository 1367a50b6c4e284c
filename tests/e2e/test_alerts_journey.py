"""History and alerts in a real browser at phone width: the device page shows the pump's
history chart (with its table), the pump faults while the page is open, the alert mail arrives
in the SMTP sink, and the person turns that alert off from the mail's one-click link."""

import datetime

import pytest
from helpers import make_user
from helpers import seed_registry
from pages import check_page
from playwright.sync_api import expect

from selfserve.models import AlertNotice
from selfserve.models import Device
from selfserve.models import utcnow
from selfserve.services import alerts
from selfserve.services import devices
from selfserve.services import history

PASSWORD = "correct horse battery"
EMAIL = "alerts.journey@example.com"
PUMP = "e00fce68a1b2c3d4e5f60801"


@pytest.fixture
def app_config(app_config):
    app_config["VALUES_POLL_SECONDS"] = 1
    return app_config


@pytest.fixture
def pump_owner(app, sim):
    labels = {device["id"]: device for device in seed_registry()}
    user = make_user(EMAIL, PASSWORD)
    devices.claim(user, labels[PUMP]["serial_number"], labels[PUMP]["setup_code"])
    now = utcnow()
    # Added yesterday, so the hours before now belong to this owner's period.
    Device.update(claimed_at=now - datetime.timedelta(days=1)).where(Device.device_id == PUMP).execute()
    history.record(
        PUMP,
        {"pressure_kpa": 180, "flow_lpm": 9.5, "runtime_h": 12.0},
        at=now - datetime.timedelta(hours=3),
        online=True,
    )
    history.record(PUMP, {"pressure_kpa": 240, "flow_lpm": 11.0}, at=now - datetime.timedelta(hours=2))
    return user


def test_pump_fault_alert_mail_and_unsubscribe_from_the_link(live_server, page, pump_owner, sim, mailbox):
    page.goto(f"{live_server}/login")
    page.fill("#email", EMAIL)
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    page.goto(f"{live_server}/devices/{PUMP}")

    # The history chart shows what was recorded, with its table alternative.
    charts = page.locator("#history")
    expect(charts.locator("figure.chart").first).to_contain_text("Pressure")
    expect(charts.locator(".chart-line path").first).to_be_attached()
    charts.locator("summary").first.click()
    expect(charts.locator("table").first).to_contain_text("240")
    check_page(page)
    page.click("#history a:has-text('7 days')")
    expect(page.locator("#history a[aria-current=true]")).to_have_text("7 days")

    # The pump trips its overpressure guard while the page is open.
    sim.set_device(PUMP, fault="overpressure")
    # The fault shows as an alert in words at the top of the page (not the device's raw code).
    expect(page.locator("#device-alert")).to_contain_text(
        "Overpressure: the pump stopped itself", timeout=15_000
    )
    deadline = utcnow() + datetime.timedelta(seconds=15)
    while not AlertNotice.select().where(AlertNotice.kind == "fault").exists() and utcnow() < deadline:
        page.wait_for_timeout(200)
    alerts.send_due()  # the sender thread's job (no background threads in tests)
    message = mailbox.wait_for(EMAIL)
    assert "fault" in message["Subject"]
    link = message["List-Unsubscribe"].strip("<>")
    assert link.startswith(live_server) and link in mailbox.body(message)

    # One click from the mail turns that alert off (no sign-in needed).
    page.goto(link)
    expect(page.locator("h1")).to_have_text("Unsubscribe from alerts")
    check_page(page)
    page.click("button:has-text('Unsubscribe')")
    expect(page.locator("[role=status]")).to_contain_text("no longer get these alerts")
    check_page(page)
    assert alerts.mode_of(alerts.settings_of(pump_owner), "fault") == "off"
