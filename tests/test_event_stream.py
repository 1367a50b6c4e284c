"""The product event stream listener (selfserve/event_stream.py) against the simulator: events
reach the cache; 401, 429 and 5xx on connect; a dropped or silent stream; the lease (one
listener, takeover when the leader dies); re-reading watched devices after a gap."""

import time

import pytest
from helpers import make_user
from helpers import seed_registry

from selfserve import event_stream
from selfserve.models import Device
from selfserve.models import DeviceSnapshot
from selfserve.models import utcnow
from selfserve.services import devices
from selfserve.services import live_values

WINDOW = "e00fce68a1b2c3d4e5f60701"
PUMP = "e00fce68a1b2c3d4e5f60801"
STREAM_PATH = "/v1/products/*/events*"


@pytest.fixture
def app_config(app_config):
    app_config.update(
        EVENT_STREAM_MIN_OPEN_SECONDS=0.2,
        EVENT_STREAM_LEASE_SECONDS=1.5,
        EVENT_STREAM_LEASE_POLL_SECONDS=0.2,
        EVENT_STREAM_SILENCE_SECONDS=3.0,
    )
    return app_config


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(event_stream, "BACKOFF_BASE_SECONDS", 0.1)
    monkeypatch.setattr(event_stream, "AUTH_BACKOFF_SECONDS", 0.5)


@pytest.fixture(autouse=True)
def lively_stream(sim):
    sim.configure(sse_keepalive=0.3)  # keep-alives well inside the listener's lease


@pytest.fixture
def owner(app, sim):
    labels = {device["id"]: device for device in seed_registry()}
    user = make_user("owner@example.com")
    for device_id in (WINDOW, PUMP):
        devices.claim(user, labels[device_id]["serial_number"], labels[device_id]["setup_code"])
    Device.update(claimed_at=utcnow().replace(year=2020)).execute()
    return user


@pytest.fixture
def listeners(app):
    started = []

    def make(holder=None):
        listener = event_stream.Listener(app, holder=holder).start()
        started.append(listener)
        return listener

    yield make
    for listener in started:
        listener.stop()


def wait_until(condition, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stored_position(device_id=WINDOW):
    row = DeviceSnapshot.get_or_none(DeviceSnapshot.device_id == device_id)
    if row is None or row.state_at is None:
        return None
    return row.values["position"]["value"]


def reconnect_device(sim, device_id=WINDOW):
    """The device drops off and comes back: its firmware publishes its state on connecting."""
    sim.set_device(device_id, online=False)
    sim.set_device(device_id, online=True)


def test_published_state_reaches_the_cache_through_the_stream(owner, sim, listeners):
    listener = listeners()
    wait_until(lambda: sim.open_streams("product") == 1, what="the stream to open")
    sim.reset_counters()
    reconnect_device(sim)
    wait_until(lambda: stored_position() == 0, what="the state event")
    assert listener.stats["stored"] >= 1
    # Viewing now costs Particle nothing.
    live_values.current(Device.get_by_id(WINDOW))
    assert sim.counters()["routes"].get("GET /v1/devices/:id", 0) == 0
    assert sim.counters()["routes"].get("GET /v1/devices/:id/:name", 0) == 0


@pytest.mark.parametrize(
    "status, body, headers",
    [
        (401, {"error": "invalid_token", "error_description": "The access token provided is invalid."}, {}),
        (429, {"ok": False, "error": "Too many requests"}, {"Retry-After": "1"}),
        (503, None, {}),
    ],
)
def test_refused_connects_are_retried_with_backoff_until_the_stream_opens(
    owner, sim, listeners, status, body, headers
):
    # Each refused open: the client retries a 401 once itself with a fresh token.
    refusals = 2 if status == 401 else 3
    sim.add_fault(
        "GET",
        STREAM_PATH,
        count=refusals * (2 if status == 401 else 1),
        status=status,
        body=body,
        headers=headers,
    )
    listener = listeners()
    wait_until(lambda: sim.open_streams("product") == 1, what="the stream to open after the refusals")
    assert listener.stats["failures"] == refusals
    gaps = [
        b - a for a, b in zip(listener.stats["open_times"], listener.stats["open_times"][1:], strict=False)
    ]
    if status == 429:
        assert all(gap >= 1.0 for gap in gaps), gaps  # Retry-After respected
    reconnect_device(sim)
    wait_until(lambda: stored_position() == 0, what="the state event")


def test_a_dropped_stream_is_reopened_and_watched_devices_are_read_again(owner, sim, listeners):
    listener = listeners()
    wait_until(lambda: sim.open_streams("product") == 1, what="the stream to open")
    live_values.watch(WINDOW, 60)
    sim.reset_counters()
    assert sim.drop_streams("product") == 1
    wait_until(lambda: listener.stats["opens"] >= 2 and sim.open_streams("product") == 1, what="the reopen")
    # What was published during the gap is lost: the watched device is read from Particle.
    wait_until(
        lambda: sim.counters()["routes"].get("GET /v1/devices/:id", 0) >= 1, what="the watched device re-read"
    )
    assert listener.stats["gaps"] >= 2
    # Once the re-read is stored (its values are newer than anything published before), the
    # device's next events count again.
    wait_until(
        lambda: (
            (row := DeviceSnapshot.get_or_none(DeviceSnapshot.device_id == WINDOW)) is not None
            and row.fetched_at is not None
            and row.lease_until is None
        ),
        what="the re-read to be stored",
    )
    time.sleep(0.05)
    reconnect_device(sim)
    wait_until(lambda: stored_position() == 0, what="events again")


def test_a_silent_stream_is_restarted(owner, sim, listeners, app):
    sim.configure(sse_keepalive=30.0)  # nothing at all on the wire after ":ok"
    listener = listeners()
    wait_until(lambda: listener.stats["opens"] >= 3, what="restarts of the silent stream")
    assert listener.stats["failures"] == 0  # each open itself worked


def test_exactly_one_listener_holds_the_stream_and_another_takes_over_when_it_dies(owner, sim, listeners):
    first = listeners("first")
    wait_until(lambda: sim.open_streams("product") == 1, what="one stream")
    second = listeners("second")
    third = listeners("third")
    for _ in range(20):  # a few lease periods: still one stream, held by the first
        time.sleep(0.1)
        assert sim.open_streams("product") == 1
    assert event_stream.Lease.holder_of() == "first"
    assert second.stats["opens"] == third.stats["opens"] == 0

    first.stop(release=False)  # dies: no goodbye, the lease runs out by itself
    new_holder = wait_until(
        lambda: event_stream.Lease.holder_of() not in (None, "first") and event_stream.Lease.holder_of(),
        what="a takeover",
    )
    wait_until(lambda: sim.open_streams("product") == 1, what="the new leader's stream")
    assert {second.stats["opens"] > 0, third.stats["opens"] > 0} == {True, False}
    assert new_holder == ("second" if second.stats["opens"] else "third")
    reconnect_device(sim)
    wait_until(lambda: stored_position() == 0, what="events through the new leader")


def test_open_delay_stays_within_particles_stream_budget():
    # 100 opens per 5 minutes per address: never more than 50 from the listener.
    assert event_stream.open_delay(0) >= 300 / 50
    assert all(event_stream.open_delay(n, rng=lambda: 0.0) >= 6.0 for n in range(0, 12))
    delays = [event_stream.open_delay(n, rng=lambda: 0.5) for n in range(1, 24)]
    assert delays == sorted(delays) and delays[-1] == event_stream.BACKOFF_MAX_SECONDS
    # Jitter: different processes don't retry in step.
    assert event_stream.open_delay(12, rng=lambda: 0.0) < event_stream.open_delay(12, rng=lambda: 1.0)
    # Retry-After is a floor.
    assert event_stream.open_delay(1, retry_after=90, rng=lambda: 0.0) >= 90
