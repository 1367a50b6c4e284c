"""Pages that update by themselves: server-sent events from the site (selfserve/sse.py,
selfserve/push.py). A value published by a device reaches the open device page and dashboard
of its owner, and nobody else's, through any push channel."""

import datetime
import json
import threading
import time

import pytest
from helpers import make_user
from helpers import seed_registry
from helpers import signed_in
from test_support_views import sign_in_staff
from test_support_views import start_view

from selfserve import models
from selfserve.models import Device
from selfserve.models import utcnow
from selfserve.services import device_events
from selfserve.services import devices
from selfserve.services import staff

PASSWORD = "correct horse battery"
WINDOW = "e00fce68a1b2c3d4e5f60701"  # alice's
PUMP = "e00fce68a1b2c3d4e5f60801"  # alice's
OTHER_WINDOW = "e00fce68a1b2c3d4e5f60702"  # bob's


@pytest.fixture
def app_config(app_config):
    app_config["PUSH_STREAM_MAX_SECONDS"] = 4.0
    app_config["VALUES_POLL_SECONDS"] = 1
    return app_config


@pytest.fixture
def accounts(app, sim):
    labels = {device["id"]: device for device in seed_registry()}
    alice = make_user("alice@example.com", PASSWORD)
    bob = make_user("bob@example.com", PASSWORD)
    for user, device_ids in ((alice, (WINDOW, PUMP)), (bob, (OTHER_WINDOW,))):
        for device_id in device_ids:
            devices.claim(user, labels[device_id]["serial_number"], labels[device_id]["setup_code"])
    Device.update(claimed_at=utcnow() - datetime.timedelta(hours=1)).execute()
    # The devices have published recently: pages are served from the cache, no Particle read.
    earlier = iso(utcnow() - datetime.timedelta(seconds=5))
    for device_id in (WINDOW, OTHER_WINDOW):
        state = {"v": 1, "hb": 120, "position": 5, "target": 5, "moving": False}
        assert device_events.ingest("selfserve/state", json.dumps(state), device_id, earlier) == "stored"
    pump = {
        "v": 1,
        "hb": 120,
        "running": False,
        "pressure_kpa": 0.0,
        "flow_lpm": 0.0,
        "runtime_h": 1.0,
        "fault": "",
    }
    assert device_events.ingest("selfserve/state", json.dumps(pump), PUMP, earlier) == "stored"
    return alice, bob


def iso(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def publish_later(app, device_id, position, delay=0.5):
    """Another thread takes in a state event while the stream is being read (as the webhook or
    the listener would)."""

    def run():
        time.sleep(delay)
        with app.app_context():
            models.db.connect(reuse_if_open=True)
            try:
                data = json.dumps(
                    {"v": 1, "hb": 120, "position": position, "target": position, "moving": False}
                )
                assert device_events.ingest("selfserve/state", data, device_id, iso(utcnow())) == "stored"
            finally:
                models.db.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def read_events(response):
    """All (event, data) of a finished stream (it ends after PUSH_STREAM_MAX_SECONDS)."""
    text = b"".join(response.response).decode()
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        name = next((line[7:] for line in lines if line.startswith("event: ")), None)
        if name is not None:
            events.append((name, "\n".join(line[6:] for line in lines if line.startswith("data: "))))
    return events


def test_a_published_value_is_pushed_to_the_open_device_page(app, accounts, sim):
    page = signed_in(app, "alice@example.com").get(f"/devices/{WINDOW}")
    assert f'sse-connect="/devices/{WINDOW}/live"' in page.get_data(as_text=True)
    client = signed_in(app, "alice@example.com")
    response = client.get(f"/devices/{WINDOW}/live", buffered=False)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    thread = publish_later(app, WINDOW, 77)
    events = read_events(response)
    thread.join()
    values = [data for name, data in events if name == "values"]
    assert values, events
    assert any('<span class="value">77%</span>' in data for data in values), values[-1]


def test_the_dashboard_is_one_request_from_the_cache_then_pushes_each_card(app, accounts, sim):
    client = signed_in(app, "alice@example.com")
    sim.reset_counters()
    page = client.get("/devices").get_data(as_text=True)
    assert sim.counters()["total"] == 0
    assert 'sse-connect="/devices/live"' in page
    assert f'sse-swap="summary-{WINDOW}"' in page and f'sse-swap="summary-{PUMP}"' in page
    assert "load," not in page  # no fragment request per card
    response = client.get("/devices/live", buffered=False)
    thread = publish_later(app, WINDOW, 33)
    events = read_events(response)
    thread.join()
    names = {name for name, _ in events}
    assert names == {f"summary-{WINDOW}", f"summary-{PUMP}"}
    assert any("33" in data for name, data in events if name == f"summary-{WINDOW}")


def test_no_push_channel_shows_another_customers_device(app, accounts, sim):
    alice, bob = accounts
    alices = signed_in(app, "alice@example.com")
    bobs = signed_in(app, "bob@example.com")
    # Bob can't open a stream of Alice's device (same 404 as for any device not his).
    sim.reset_counters()
    assert bobs.get(f"/devices/{WINDOW}/live").status_code == 404
    assert sim.counters()["total"] == 0
    # Bob's dashboard stream never carries Alice's devices, even as they change.
    response = bobs.get("/devices/live", buffered=False)
    thread = publish_later(app, WINDOW, 91)
    events = read_events(response)
    thread.join()
    assert {name for name, _ in events} == {f"summary-{OTHER_WINDOW}"}
    assert all("91" not in data for _, data in events)
    # And Alice's page stream says nothing about Bob's device when it changes.
    response = alices.get(f"/devices/{WINDOW}/live", buffered=False)
    thread = publish_later(app, OTHER_WINDOW, 19)
    events = read_events(response)
    thread.join()
    assert {name for name, _ in events} == {"values"}
    assert all("19%" not in data for _, data in events)


def test_a_device_that_leaves_the_account_ends_its_stream(app, accounts, sim):
    client = signed_in(app, "alice@example.com")
    response = client.get(f"/devices/{WINDOW}/live", buffered=False)

    def hand_over():
        time.sleep(0.5)
        with app.app_context():
            models.db.connect(reuse_if_open=True)
            Device.update(claim_state="transferring").where(Device.device_id == WINDOW).execute()
            app.extensions["announce_device_change"](WINDOW)
            models.db.close()

    thread = threading.Thread(target=hand_over)
    thread.start()
    events = read_events(response)
    thread.join()
    assert events[-1][0] == "gone"


def test_a_signed_out_session_ends_the_stream(app, accounts, sim):
    client = signed_in(app, "alice@example.com")
    response = client.get(f"/devices/{WINDOW}/live", buffered=False)

    def sign_out_everywhere():
        time.sleep(0.5)
        with app.app_context():
            models.db.connect(reuse_if_open=True)
            models.LoginSession.update(ended_at=utcnow()).execute()
            app.extensions["announce_device_change"](WINDOW)
            models.db.close()

    thread = threading.Thread(target=sign_out_everywhere)
    thread.start()
    events = read_events(response)
    thread.join()
    assert events[-1][0] == "signed-out"
    assert sum(1 for name, _ in events if name == "values") == 1  # only the first, before


def test_support_viewing_read_only_gets_the_customers_pushes_only_while_the_view_lasts(app, accounts, sim):
    alice, bob = accounts
    support = staff.create_staff("helper@support.example", PASSWORD)
    console = sign_in_staff(app.test_client(), support)
    # Before a view: no device of any customer.
    assert console.get(f"/devices/{WINDOW}/live").status_code == 404
    assert start_view(console, alice).status_code in (200, 302)
    response = console.get(f"/devices/{WINDOW}/live", buffered=False)
    thread = publish_later(app, WINDOW, 64)
    events = read_events(response)
    thread.join()
    assert any('<span class="value">64%</span>' in data for name, data in events if name == "values")
    # Bob's device through the view of Alice: 404.
    assert console.get(f"/devices/{OTHER_WINDOW}/live").status_code == 404
    # The view ends (as its time runs out): the stream ends with it.
    response = console.get(f"/devices/{WINDOW}/live", buffered=False)

    def end_views():
        time.sleep(0.5)
        with app.app_context():
            models.db.connect(reuse_if_open=True)
            models.StaffView.update(expires_at=utcnow() - datetime.timedelta(seconds=1)).execute()
            app.extensions["announce_device_change"](WINDOW)
            models.db.close()

    thread = threading.Thread(target=end_views)
    thread.start()
    events = read_events(response)
    thread.join()
    assert events[-1][0] == "gone"


def test_with_push_off_pages_poll_as_before(app, accounts, sim):
    app.config["PUSH_ENABLED"] = False
    client = signed_in(app, "alice@example.com")
    page = client.get(f"/devices/{WINDOW}").get_data(as_text=True)
    assert "sse-connect" not in page and "load, every 1s" in page
    assert client.get(f"/devices/{WINDOW}/live").status_code == 404
    assert "load, every" in client.get("/devices").get_data(as_text=True)
