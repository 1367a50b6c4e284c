"""End to end in Chromium: a value the simulated device publishes appears on the open device
page by itself, with polling switched off (the product event stream -> the cache -> a
server-sent event -> htmx's SSE extension)."""

import datetime

import pytest
from helpers import make_user
from helpers import seed_registry
from playwright.sync_api import expect

from selfserve import event_stream
from selfserve.models import Device
from selfserve.models import utcnow
from selfserve.services import devices

PASSWORD = "correct horse battery"
WINDOW = "e00fce68a1b2c3d4e5f60701"


@pytest.fixture
def app_config(app_config):
    app_config.update(
        PUSH_FALLBACK_POLL_SECONDS=0,  # the page never polls while pushed
        PUSH_STREAM_MAX_SECONDS=60.0,
        EVENT_STREAM_MIN_OPEN_SECONDS=0.2,
    )
    return app_config


def test_a_published_value_appears_on_the_open_device_page_without_polling(live_server, page, app, sim):
    labels = {device["id"]: device for device in seed_registry()}
    user = make_user("watcher@example.com", PASSWORD)
    devices.claim(user, labels[WINDOW]["serial_number"], labels[WINDOW]["setup_code"])
    Device.update(claimed_at=utcnow() - datetime.timedelta(minutes=5)).execute()
    listener = event_stream.Listener(app).start()
    try:
        page.goto(f"{live_server}/login")
        page.fill("#email", "watcher@example.com")
        page.fill("#password", PASSWORD)
        page.click("main button[type=submit]")
        values_requests = []
        page.on("request", lambda request: "/values" in request.url and values_requests.append(request.url))
        page.goto(f"{live_server}/devices/{WINDOW}")
        values = page.locator("#values")
        expect(values.locator("[data-freshness=live]")).to_be_visible()  # design: one "Live" indicator
        # The device moves (a command from elsewhere: the Particle API); its firmware publishes.
        app.extensions["particle"].call_function(user.particle_customer_id, WINDOW, "setPosition", "30")
        expect(values.locator("dd").first).to_contain_text("30%", timeout=20_000)
        assert values_requests == []  # nothing polled: the values were pushed
    finally:
        listener.stop()
