"""Live values: one shared, short-lived cache with single-flight reads; offline memory."""

import datetime
import threading

import pytest
from helpers import OFFLINE_WINDOW
from helpers import PUMP
from helpers import WINDOW
from helpers import make_user
from helpers import seed_registry

from selfserve.models import DeviceSnapshot
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.services import devices
from selfserve.services import live_values

WINDOW_VARIABLES = 5

DEVICE_GET = "GET /v1/devices/:id"
VARIABLE_GET = "GET /v1/devices/:id/:name"


def reads(sim, route):
    return sim.counters()["routes"].get(route, 0)


def age_snapshot(device_id, seconds):
    """Pretend the last read was `seconds` ago (no sleeping in tests)."""
    snapshot = DeviceSnapshot.get_by_id(device_id)
    DeviceSnapshot.update(checked_at=snapshot.checked_at - datetime.timedelta(seconds=seconds)).where(
        DeviceSnapshot.device_id == device_id
    ).execute()


def claimed(device_id):
    """A device owned by a new user (registry seeded, claimed through the service)."""
    labels = {device["id"]: device for device in seed_registry()}
    owner = make_user("viewer@example.com")
    devices.claim(owner, labels[device_id]["serial_number"], labels[device_id]["setup_code"])
    return owner, devices.device_for(owner, device_id)


@pytest.fixture
def window(app, sim):
    owner, device = claimed(WINDOW)
    sim.reset_counters()
    return device


def test_first_read_gets_every_variable_with_its_time(window, sim):
    snapshot = live_values.current(window)
    assert snapshot.online is True
    assert reads(sim, DEVICE_GET) == 1
    assert reads(sim, VARIABLE_GET) == WINDOW_VARIABLES
    position = snapshot.reading("position")
    assert position.label == "Position" and position.unit == "%"
    assert position.text == str(sim.device(WINDOW)["variables"]["position"])
    assert position.at is not None and utcnow() - position.at < datetime.timedelta(seconds=30)
    assert snapshot.reading("moving").text in ("Moving", "Still")
    assert snapshot.reading("battery_v").text.count(".") == 1
    assert snapshot.message == ""


def test_fresh_values_are_served_without_asking_particle(window, sim, app):
    live_values.current(window)
    sim.reset_counters()
    for _ in range(5):
        live_values.current(window)
    assert sim.counters()["total"] == 0
    age_snapshot(WINDOW, app.config["VALUES_CACHE_SECONDS"] + 1)
    live_values.current(window)
    assert reads(sim, DEVICE_GET) == 1


def test_many_viewers_cost_one_upstream_read(window, sim, app):
    # A slow device makes every viewer arrive while the first read is in flight.
    sim.set_device(WINDOW, latency=0.3)
    viewers = 8
    barrier = threading.Barrier(viewers)
    snapshots = []

    def view():
        with app.app_context():
            db.connect(reuse_if_open=True)
            try:
                barrier.wait()
                snapshots.append(live_values.current(window))
            finally:
                db.close()

    threads = [threading.Thread(target=view) for _ in range(viewers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(snapshots) == viewers
    assert reads(sim, DEVICE_GET) == 1
    assert reads(sim, VARIABLE_GET) == WINDOW_VARIABLES
    # Every viewer got values (the late ones waited briefly for the first read).
    assert all(snapshot.reading("position").at is not None for snapshot in snapshots)


def test_another_worker_holding_the_lease_means_no_second_read(window, sim, app):
    live_values.current(window)
    age_snapshot(WINDOW, app.config["VALUES_CACHE_SECONDS"] + 1)
    # Another process is reading the device right now.
    DeviceSnapshot.update(lease_until=utcnow() + datetime.timedelta(seconds=30)).where(
        DeviceSnapshot.device_id == WINDOW
    ).execute()
    sim.reset_counters()
    snapshot = live_values.current(window)
    assert sim.counters()["total"] == 0
    assert snapshot.reading("position").at is not None  # the last values, with their time


def test_invalidate_makes_the_next_read_fresh(window, sim):
    live_values.current(window)
    sim.reset_counters()
    live_values.invalidate(WINDOW)
    live_values.current(window)
    assert reads(sim, DEVICE_GET) == 1


def test_offline_device_is_remembered(app, sim):
    owner, device = claimed(OFFLINE_WINDOW)
    sim.reset_counters()
    snapshot = live_values.current(device)
    assert snapshot.online is False
    assert snapshot.offline_since is not None
    assert "offline" in snapshot.message
    assert reads(sim, DEVICE_GET) == 1
    assert reads(sim, VARIABLE_GET) == 0  # no point asking an offline device

    # Past the values interval but within the offline memory: no new call.
    age_snapshot(OFFLINE_WINDOW, app.config["VALUES_CACHE_SECONDS"] + 1)
    sim.reset_counters()
    assert live_values.current(device).online is False
    assert sim.counters()["total"] == 0

    # After the offline memory, it is checked again and found back online.
    sim.set_device(OFFLINE_WINDOW, online=True)
    age_snapshot(OFFLINE_WINDOW, app.config["OFFLINE_REMEMBER_SECONDS"] + 1)
    snapshot = live_values.current(device)
    assert snapshot.online is True and snapshot.offline_since is None
    assert reads(sim, VARIABLE_GET) == WINDOW_VARIABLES


def test_hung_device_shows_last_values_and_is_not_asked_again(window, sim, app):
    first = live_values.current(window)
    sim.configure(cloud_timeout=0.5)
    sim.set_device(WINDOW, hung=True)
    age_snapshot(WINDOW, app.config["VALUES_CACHE_SECONDS"] + 1)
    snapshot = live_values.current(window)  # the cloud answers 408 after 0.5 s
    assert snapshot.online is False
    assert snapshot.offline_since is not None
    assert snapshot.reading("position").text == first.reading("position").text
    assert snapshot.reading("position").at == first.reading("position").at  # their real age
    sim.reset_counters()
    age_snapshot(WINDOW, app.config["VALUES_CACHE_SECONDS"] + 1)
    live_values.current(window)
    assert sim.counters()["total"] == 0


@pytest.fixture
def short_read_timeout(app_config):
    app_config["PARTICLE_READ_TIMEOUT"] = 0.4
    return app_config


def test_our_own_read_timeout_bounds_a_slow_device(short_read_timeout, app, sim):
    owner, device = claimed(WINDOW)
    first = live_values.current(device)
    sim.configure(cloud_timeout=10)  # the cloud would wait long; our client gives up first
    sim.set_device(WINDOW, hung=True)
    age_snapshot(WINDOW, app.config["VALUES_CACHE_SECONDS"] + 1)
    snapshot = live_values.current(device)
    assert snapshot.online is False
    assert snapshot.reading("position").at == first.reading("position").at
    sim.set_device(WINDOW, hung=False)


def test_cloud_outage_keeps_last_values_and_says_so(window, sim, app):
    first = live_values.current(window)
    sim.add_fault("GET", f"/v1/devices/{WINDOW}", count=1, status=503)
    age_snapshot(WINDOW, app.config["VALUES_CACHE_SECONDS"] + 1)
    snapshot = live_values.current(window)
    assert "not reachable" in snapshot.message
    assert snapshot.reading("position").at == first.reading("position").at
    # The failure counts as a check: viewers don't hammer a failing cloud.
    sim.reset_counters()
    live_values.current(window)
    assert sim.counters()["total"] == 0


def test_rate_limit_holds_off_until_retry_after(window, sim, app):
    live_values.current(window)
    sim.add_fault("GET", f"/v1/devices/{WINDOW}", count=1, status=429, headers={"Retry-After": "120"})
    age_snapshot(WINDOW, app.config["VALUES_CACHE_SECONDS"] + 1)
    snapshot = live_values.current(window)
    assert "busy" in snapshot.message
    age_snapshot(WINDOW, app.config["VALUES_CACHE_SECONDS"] + 1)
    sim.reset_counters()
    live_values.current(window)
    assert sim.counters()["total"] == 0  # still within Retry-After


def test_last_known_never_calls_particle(window, sim):
    snapshot = live_values.last_known(window)
    assert snapshot.online is None
    assert all(reading.at is None for reading in snapshot.readings)
    assert [reading.name for reading in snapshot.readings][:2] == ["position", "target"]
    assert sim.counters()["total"] == 0


def test_reads_use_the_current_owners_token(app, sim):
    owner, device = claimed(PUMP)
    assert live_values.current(device).online is True
    devices.release(owner, device)
    # Nobody owns it now: no Particle read with anyone's token.
    sim.reset_counters()
    snapshot = live_values.current(device)
    assert sim.counters()["total"] == 0
    assert snapshot.message


def test_an_unexpected_error_during_a_read_releases_the_lease(window, app, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not the cloud")

    monkeypatch.setattr(app.extensions["particle"], "get_device", broken)
    with pytest.raises(RuntimeError):
        live_values.current(window)
    assert DeviceSnapshot.get_by_id(WINDOW).lease_until is None
    monkeypatch.undo()
    assert live_values.current(window).online is True


def test_the_stored_reason_is_shown_in_each_viewers_language(window, sim, app):
    # The snapshot row is shared: a German viewer's refresh must not store German for everyone.
    from selfserve import i18n

    live_values.current(window)
    sim.add_fault("GET", f"/v1/devices/{WINDOW}", count=1, status=503)
    age_snapshot(WINDOW, app.config["VALUES_CACHE_SECONDS"] + 1)
    with i18n.as_recipient("de"):
        german = live_values.current(window)
        assert "nicht erreichbar" in str(german.message)
    english = live_values.last_known(window)
    assert str(english.message) == (
        "The device cloud is not reachable right now; showing the last known values."
    )
