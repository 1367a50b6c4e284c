"""Device events in: the ingest rules (services/device_events.py) and the product webhook
(views/hooks.py), against the real simulator and database."""

import base64
import datetime
import json
import threading
import time

import pytest
from helpers import PUMP
from helpers import WINDOW
from helpers import count_queries
from helpers import make_user
from helpers import seed_registry
from werkzeug.serving import make_server

from selfserve import models
from selfserve.models import Device
from selfserve.models import DeviceSnapshot
from selfserve.models import ValueSample
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.services import device_events
from selfserve.services import devices
from selfserve.services import history
from selfserve.services import live_values

SLOW_PUMP = "e00fce68a1b2c3d4e5f60803"  # legacy firmware: publishes no state
UNCLAIMED = "e00fce68a1b2c3d4e5f60702"
SECRET = "a-long-webhook-secret-0123456789abcdef"


@pytest.fixture
def app_config(app_config):
    app_config["PARTICLE_WEBHOOK_SECRET"] = SECRET
    return app_config


@pytest.fixture
def owner(app, sim):
    labels = {device["id"]: device for device in seed_registry()}
    user = make_user("owner@example.com")
    for device_id in (WINDOW, PUMP, SLOW_PUMP):
        devices.claim(user, labels[device_id]["serial_number"], labels[device_id]["setup_code"])
    # Owned for an hour: the events of these tests were published while they owned them.
    Device.update(claimed_at=soon(-3600)).where(Device.owner == user).execute()
    return user


def iso(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def state(position, hb=120, **extra):
    return json.dumps({"v": 1, "hb": hb, "position": position, "target": position, "moving": False, **extra})


def soon(seconds=0.0):
    return utcnow() + datetime.timedelta(seconds=seconds)


def snapshot_row(device_id):
    return DeviceSnapshot.get_or_none(DeviceSnapshot.device_id == device_id)


# --- ingest ----------------------------------------------------------------------------------------


def test_state_event_fills_the_cache_with_publish_times_and_viewing_costs_nothing(owner, sim):
    published = soon(-2)
    assert device_events.ingest("selfserve/state", state(40), WINDOW, iso(published)) == "stored"
    sim.reset_counters()
    snapshot = live_values.current(Device.get_by_id(WINDOW))
    assert sim.counters()["total"] == 0  # fresh for the heartbeat plus a grace: no Particle call
    assert snapshot.online is True
    assert snapshot.reading("position").text == "40"
    assert abs((snapshot.reading("position").at - published).total_seconds()) < 0.002
    assert snapshot.fetched_at == snapshot.reading("position").at


def test_a_repeated_event_has_no_second_effect(owner):
    published = iso(soon(-1))
    assert device_events.ingest("selfserve/state", state(40), WINDOW, published) == "stored"
    before = snapshot_row(WINDOW).__data__.copy()
    assert device_events.ingest("selfserve/state", state(40), WINDOW, published) == "stale"
    after = snapshot_row(WINDOW).__data__
    assert after == before
    assert device_events.ignored_counts()["stale"] == 1


def test_an_older_event_never_overwrites_newer_values(owner):
    assert device_events.ingest("selfserve/state", state(70), WINDOW, iso(soon(-1))) == "stored"
    assert device_events.ingest("selfserve/state", state(10), WINDOW, iso(soon(-5))) == "stale"
    assert snapshot_row(WINDOW).values["position"]["value"] == 70


def test_an_event_older_than_values_read_from_particle_is_ignored(owner, sim):
    live_values.current(Device.get_by_id(WINDOW))  # a poll: values read now
    read = snapshot_row(WINDOW).values["position"]["value"]
    assert device_events.ingest("selfserve/state", state(read + 33), WINDOW, iso(soon(-30))) == "stale"
    assert snapshot_row(WINDOW).values["position"]["value"] == read


def test_online_state_follows_the_latest_status_whatever_the_arrival_order(owner):
    assert device_events.ingest("spark/status", "offline", WINDOW, iso(soon(-1))) == "stored"
    assert device_events.ingest("spark/status", "online", WINDOW, iso(soon(-3))) == "stale"
    # A state event published before the device went offline doesn't bring it back online.
    assert device_events.ingest("selfserve/state", state(20), WINDOW, iso(soon(-2))) == "stored"
    row = snapshot_row(WINDOW)
    assert row.online is False and row.offline_since is not None
    assert row.values["position"]["value"] == 20
    snapshot = live_values.last_known(Device.get_by_id(WINDOW))
    assert snapshot.online is False


def test_unknown_devices_event_names_and_bad_data_are_ignored_and_counted(owner):
    now = iso(soon())
    assert (
        device_events.ingest("selfserve/state", state(1), "0123456789abcdef01234567", now) == "unknown_device"
    )
    assert device_events.ingest("position", "40", WINDOW, now) == "unknown_event"
    assert device_events.ingest("selfserve/state", "{not json", WINDOW, now) == "malformed"
    assert (
        device_events.ingest("selfserve/state", json.dumps({"v": 2, "position": 1}), WINDOW, now)
        == "malformed"
    )
    assert device_events.ingest("selfserve/state", state(1), WINDOW, "yesterday") == "malformed"
    assert device_events.ingest("spark/status", "sleepy", WINDOW, now) == "malformed"
    assert device_events.ingest("selfserve/state", state(1), UNCLAIMED, now) == "no_owner"
    assert device_events.ignored_counts() == {
        "unknown_device": 1,
        "unknown_event": 1,
        "malformed": 4,
        "no_owner": 1,
    }
    assert snapshot_row(WINDOW) is None or not snapshot_row(WINDOW).values


def test_what_an_event_costs_doesnt_grow_with_the_devices_history(owner):
    """What bounds intake: the round trips per event on PostgreSQL (BEGIN travels with the
    device read, the inserts together, NOTIFY with COMMIT), the statements on SQLite, and a
    read of the latest values that doesn't grow with the days of history the device has."""
    start = soon(-86400)
    ValueSample.insert_many(
        [
            {
                "device_id": WINDOW,
                "owner": owner.id,
                "name": name,
                "at": start + datetime.timedelta(seconds=n),
                "value": 1000 + n,
            }
            for n in range(1500)
            for name in ("position", "target")
        ]
    ).execute()
    assert device_events.ingest("selfserve/state", state(40), WINDOW, iso(soon(-2))) == "stored"
    with count_queries() as queries:
        assert device_events.ingest("selfserve/state", state(41), WINDOW, iso(soon(-1))) == "stored"
    sent = [query.split("', ")[0].lstrip("('") for query in queries]
    if models.is_postgres():  # the suite's broker there: LISTEN/NOTIFY on the same database
        expected = [
            "BEGIN; SET LOCAL synchronous_commit = off; SELECT model",
            "UPDATE devicesnapshot",
            "SELECT * FROM (SELECT name, at",
            "INSERT INTO valuesample",
            "SELECT pg_notify",
        ]
        assert "; INSERT INTO rolluppending" in sent[3] and sent[4].endswith("; COMMIT")
    else:  # BEGIN IMMEDIATE and COMMIT go through the driver, unlogged
        expected = [
            "SELECT model",
            "UPDATE devicesnapshot",
            "SELECT * FROM (SELECT name, at",
            "INSERT INTO valuesample",
            "INSERT INTO rolluppending",
        ]
    assert len(sent) == len(expected) and all(map(str.startswith, sent, expected)), sent
    changed = ValueSample.select().where((ValueSample.device_id == WINDOW) & (ValueSample.value == 41))
    assert sorted(sample.name for sample in changed) == ["position", "target"]

    names = ["position", "target", "moving", "online"]
    latest = history._latest(WINDOW, names)
    assert {name: sample.value for name, sample in latest.items()} == {
        "position": 41.0,
        "target": 41.0,
        "moving": 0.0,
        "online": 1.0,
    }
    if models.is_postgres():
        params = [value for name in names for value in (WINDOW, name)]
        plan = db.execute_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + history._latest_sql(len(names)), params)
        assert rows_read(plan.fetchone()[0][0]["Plan"], "valuesample") <= len(names)


def rows_read(node, table):
    """Rows PostgreSQL's plan `node` and its children read from `table` (EXPLAIN ANALYZE)."""
    own = (
        node.get("Actual Rows", 0) * node.get("Actual Loops", 1) if node.get("Relation Name") == table else 0
    )
    return own + sum(rows_read(child, table) for child in node.get("Plans", []))


def test_events_only_reach_the_current_owner(owner, app):
    """Mid-transfer events go nowhere; once the device has a new owner, only events published
    after they got it count (the old owner's state never shows in the new owner's view)."""
    Device.update(claim_state="transferring").where(Device.device_id == WINDOW).execute()
    assert device_events.ingest("selfserve/state", state(55), WINDOW, iso(soon(-1))) == "in_flight"
    buyer = make_user("buyer@example.com")
    handed_over = soon()
    Device.update(owner=buyer, claim_state=None, claimed_at=handed_over).where(
        Device.device_id == WINDOW
    ).execute()
    live_values.forget(WINDOW)
    assert (
        device_events.ingest(
            "selfserve/state", state(55), WINDOW, iso(handed_over - datetime.timedelta(seconds=1))
        )
        == "before_owner"
    )
    assert snapshot_row(WINDOW) is None
    assert (
        device_events.ingest(
            "selfserve/state", state(65), WINDOW, iso(handed_over + datetime.timedelta(seconds=1))
        )
        == "stored"
    )
    buyers_view = live_values.last_known(devices.device_for(buyer, WINDOW))
    assert buyers_view.reading("position").text == "65"
    with pytest.raises(Exception):
        devices.device_for(owner, WINDOW)  # the seller has no view of it any more


def test_values_older_than_heartbeat_and_grace_are_read_from_particle(owner, sim, app):
    app.config["EVENTS_GRACE_SECONDS"] = 1.0
    published = soon(-(app.config["VALUES_CACHE_SECONDS"] + 2))  # heartbeat 1 s + grace 1 s: stale
    assert device_events.ingest("selfserve/state", state(40, hb=1), WINDOW, iso(published)) == "stored"
    sim.reset_counters()
    snapshot = live_values.current(Device.get_by_id(WINDOW))
    assert sim.counters()["routes"].get("GET /v1/devices/:id", 0) == 1
    assert snapshot.reading("position").text == "0"  # what the device really says


def test_legacy_firmware_is_read_from_particle_as_before(owner, sim):
    sim.reset_counters()
    snapshot = live_values.current(Device.get_by_id(SLOW_PUMP))
    assert sim.counters()["routes"].get("GET /v1/devices/:id/:name", 0) == 5
    assert snapshot.reading("running") is not None and snapshot.reading("running").at is not None


def test_after_a_command_a_publishing_device_waits_briefly_for_its_event(owner, sim, monkeypatch):
    assert device_events.ingest("selfserve/state", state(40), WINDOW, iso(soon(-1))) == "stored"
    live_values.invalidate(WINDOW)
    sim.reset_counters()
    live_values.current(Device.get_by_id(WINDOW))
    assert sim.counters()["total"] == 0  # the state event is expected within a few seconds
    monkeypatch.setattr(live_values, "EVENT_AFTER_COMMAND_SECONDS", 0.0)
    live_values.invalidate(WINDOW)
    live_values.current(Device.get_by_id(WINDOW))
    assert sim.counters()["routes"].get("GET /v1/devices/:id", 0) == 1  # it didn't come: read


# --- the webhook endpoint --------------------------------------------------------------------------


def hook_body(position=40, device_id=WINDOW, published=None, name="selfserve/state"):
    return {
        "event": name,
        "data": state(position),
        "coreid": device_id,
        "published_at": iso(published or soon(-1)),
    }


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_webhook_with_basic_auth_or_bearer_stores_the_event(client, owner):
    response = client.post("/hooks/particle", json=hook_body(41), headers=basic("particle", SECRET))
    assert response.status_code == 200 and response.get_json() == {"ok": True, "result": "stored"}
    assert "Set-Cookie" not in response.headers
    response = client.post(
        "/hooks/particle", json=hook_body(42, published=soon()), headers={"Authorization": f"Bearer {SECRET}"}
    )
    assert response.get_json()["result"] == "stored"
    assert snapshot_row(WINDOW).values["position"]["value"] == 42


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {SECRET[:-1]}"},
        {"Authorization": f"Bearer {SECRET}x"},
        basic("particle", "wrong"),
        {"Authorization": SECRET},
    ],
)
def test_webhook_with_a_wrong_or_missing_secret_is_401_and_changes_nothing(client, owner, headers):
    response = client.post("/hooks/particle", json=hook_body(), headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert snapshot_row(WINDOW) is None
    assert device_events.ignored_counts() == {}


def test_webhook_answers_404_when_no_secret_is_configured(client, owner, app):
    app.config["PARTICLE_WEBHOOK_SECRET"] = ""
    response = client.post("/hooks/particle", json=hook_body(), headers={"Authorization": "Bearer "})
    assert response.status_code == 404
    assert snapshot_row(WINDOW) is None


def test_webhook_refuses_malformed_and_huge_bodies(client, owner, app):
    auth = {"Authorization": f"Bearer {SECRET}"}
    for raw in (b"{not json", b"[1, 2]", b'"text"', b"", json.dumps({"data": "x"}).encode()):
        response = client.post(
            "/hooks/particle", data=raw, headers={**auth, "Content-Type": "application/json"}
        )
        assert response.status_code == 400, raw
    huge = json.dumps({**hook_body(), "pad": "x" * app.config["PARTICLE_WEBHOOK_MAX_BYTES"]})
    response = client.post("/hooks/particle", data=huge, headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 413
    assert snapshot_row(WINDOW) is None


def test_webhook_takes_form_bodies_and_says_why_an_event_was_ignored(client, owner):
    auth = {"Authorization": f"Bearer {SECRET}"}
    response = client.post("/hooks/particle", data=hook_body(12), headers=auth)
    assert response.get_json() == {"ok": True, "result": "stored"}
    replay = client.post(
        "/hooks/particle",
        data=hook_body(12, published=None) | {"published_at": snapshot_published()},
        headers=auth,
    )
    assert replay.get_json() == {"ok": True, "result": "stale"}
    unknown = client.post(
        "/hooks/particle", json=hook_body(device_id="0123456789abcdef01234567"), headers=auth
    )
    assert unknown.status_code == 200 and unknown.get_json()["result"] == "unknown_device"


def snapshot_published():
    return iso(snapshot_row(WINDOW).state_at)


def test_webhook_ignores_the_session_of_a_signed_in_browser(app, owner):
    from helpers import login

    browser = app.test_client()
    login(browser, "owner@example.com")
    response = browser.post("/hooks/particle", json=hook_body(), headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401  # a session is no substitute for the secret
    response = browser.post(
        "/hooks/particle", json=hook_body(), headers={"Authorization": f"Bearer {SECRET}"}
    )
    assert response.status_code == 200 and "Set-Cookie" not in response.headers


def test_the_simulated_clouds_webhook_reaches_the_site(app, owner, sim):
    """Particle's side for real: the simulator POSTs product events to the running site."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        sim.add_webhook(
            f"http://127.0.0.1:{server.server_port}/hooks/particle",
            "selfserve/",
            auth={"username": "particle", "password": SECRET},
        )
        sim.set_device(WINDOW, online=False)
        sim.set_device(WINDOW, online=True)  # the firmware publishes its state on connecting
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            row = snapshot_row(WINDOW)
            # The simulator counts a delivery once the site's answer is back, a moment after
            # the row is written (the site records history in between): wait for both.
            if row is not None and row.state_at is not None and sim.state()["webhook_log"]["sent"] >= 1:
                break
            time.sleep(0.05)
        row = snapshot_row(WINDOW)
        assert row is not None and row.state_at is not None
        assert row.values["position"]["value"] == sim.device(WINDOW)["variables"]["position"]
        assert sim.state()["webhook_log"]["sent"] >= 1
    finally:
        server.shutdown()
