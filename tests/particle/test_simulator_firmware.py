"""The firmware contract in the simulator: state events on change and as a heartbeat, older
firmware that publishes nothing, webhooks (reference §16), the event-stream open limit (§11)."""

import datetime
import json
import threading
import time

import requests
from helpers import STOPPED_PUMP
from helpers import WINDOW
from test_simulator import PRODUCT
from test_simulator import Stream
from test_simulator import bearer
from test_simulator import import_device
from test_simulator import product_token
from werkzeug.serving import make_server
from werkzeug.wrappers import Request
from werkzeug.wrappers import Response

from selfserve import config as config_module

STATE = "selfserve/state"
LEGACY = "0a0b0c0d0e0f101112131415"


def product_stream(sim, prefix="selfserve"):
    token = product_token(sim)
    for device_id in (WINDOW, STOPPED_PUMP):
        import_device(sim, token, device_id)
    stream = Stream(f"{sim.url}/v1/products/{PRODUCT}/events/{prefix}", bearer(token), timeout=10)
    assert stream.frame() == ":ok"
    return stream


def state_events(stream, count, device_id=None):
    events = []
    while len(events) < count:
        name, data = stream.event()
        if name == STATE and (device_id is None or data["coreid"] == device_id):
            events.append(data)
    return events


def test_state_event_on_connect_carries_every_variable_and_the_heartbeat(sim):
    stream = product_stream(sim)
    try:
        sim.set_device(WINDOW, online=False)
        sim.set_device(WINDOW, online=True)
        (event,) = state_events(stream, 1, WINDOW)
        state = json.loads(event["data"])
        assert state["v"] == 1 and state["hb"] == 120
        assert {k: state[k] for k in ("position", "target", "moving")} == {
            "position": 0,
            "target": 0,
            "moving": False,
        }
        assert set(state) == {"v", "hb", "position", "target", "moving", "battery_v", "fw_version"}
    finally:
        stream.close()


def test_a_moving_window_publishes_its_state_at_most_once_a_second_until_it_arrives(sim):
    stream = product_stream(sim)
    token = product_token(sim)
    try:
        response = requests.post(
            f"{sim.url}/v1/products/{PRODUCT}/devices/{WINDOW}/setPosition",
            data={"arg": "30"},
            headers=bearer(token),
            timeout=5,
        )
        assert response.json()["return_value"] == 1
        seen = []
        while True:
            (event,) = state_events(stream, 1, WINDOW)
            published = datetime.datetime.fromisoformat(event["published_at"].replace("Z", "+00:00"))
            seen.append((published, json.loads(event["data"])))
            if not seen[-1][1]["moving"]:
                break
        assert seen[-1][1]["position"] == 30 and seen[-1][1]["target"] == 30
        assert len(seen) >= 2  # while moving, and on arrival
        gaps = [
            (later[0] - earlier[0]).total_seconds() for earlier, later in zip(seen, seen[1:], strict=False)
        ]
        assert all(gap >= 0.999 for gap in gaps), gaps  # Particle's one publish per second
    finally:
        stream.close()


def test_heartbeat_repeats_the_state_of_an_idle_device(sim):
    sim.configure(heartbeat_seconds=0.5)
    stream = product_stream(sim)
    try:
        events = state_events(stream, 3, STOPPED_PUMP)
        states = [json.loads(event["data"]) for event in events]
        assert all(state["running"] is False for state in states)
        assert [state["hb"] for state in states] == [0.5, 0.5, 0.5]
        assert len({event["published_at"] for event in events}) == 3
    finally:
        stream.close()


def test_legacy_firmware_publishes_no_state_but_answers_variables(sim):
    sim.add_device(LEGACY, model="pump", firmware="legacy", in_product=True, heartbeat=0.3)
    token = product_token(sim)
    stream = Stream(f"{sim.url}/v1/products/{PRODUCT}/events", bearer(token), timeout=10)
    try:
        assert stream.frame() == ":ok"
        sim.set_device(LEGACY, online=False)
        sim.set_device(LEGACY, online=True)
        requests.post(
            f"{sim.url}/v1/products/{PRODUCT}/devices/{LEGACY}/start",
            data={},
            headers=bearer(token),
            timeout=5,
        )
        time.sleep(1.0)  # several heartbeat periods and the pressure rising
        sim.publish(LEGACY, "marker", "end")
        names = []
        while True:
            name, data = stream.event()
            if data["coreid"] != LEGACY:
                continue
            if name == "marker":
                break
            names.append(name)
        assert names == ["spark/status", "spark/status"]  # the cloud's own events only
        variable = requests.get(
            f"{sim.url}/v1/products/{PRODUCT}/devices/{LEGACY}/running", headers=bearer(token), timeout=5
        )
        assert variable.json()["result"] is True
    finally:
        stream.close()


class Receiver:
    """A webhook receiver on loopback: records each request, answers `status`."""

    def __init__(self, status=200):
        self.status = status
        self.requests = []
        self.arrived = threading.Condition()
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def app(self, environ, start_response):
        request = Request(environ)
        with self.arrived:
            self.requests.append(
                {
                    "path": request.path,
                    "headers": dict(request.headers),
                    "json": request.get_json(silent=True),
                    "auth": request.authorization,
                }
            )
            self.arrived.notify_all()
        return Response("{}", status=self.status)(environ, start_response)

    def wait(self, count, timeout=10):
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.requests) >= count, timeout), self.requests
            return list(self.requests)

    def stop(self):
        self.server.shutdown()


def test_webhook_posts_product_events_with_basic_auth_and_default_fields(sim):
    receiver = Receiver()
    try:
        token = product_token(sim)
        import_device(sim, token, WINDOW)
        sim.add_webhook(receiver.url, "selfserve/", auth={"username": "particle", "password": "s3cret"})
        sim.set_device(WINDOW, online=False)
        sim.set_device(WINDOW, online=True)  # spark/status (no match) and the state event
        (hook,) = receiver.wait(1)
        assert hook["path"] == "/hook"
        assert hook["headers"]["User-Agent"] == "ParticleBot/1.1 (https://docs.particle.io/webhooks)"
        assert (hook["auth"].username, hook["auth"].password) == ("particle", "s3cret")
        assert set(hook["json"]) == {"event", "data", "coreid", "published_at"}
        assert hook["json"]["event"] == STATE and hook["json"]["coreid"] == WINDOW
        assert json.loads(hook["json"]["data"])["position"] == 0
    finally:
        receiver.stop()


def test_webhook_is_not_sent_for_devices_outside_the_product(sim):
    receiver = Receiver()
    try:
        sim.add_webhook(receiver.url, "selfserve/", headers={"Authorization": "Bearer x"})
        sim.set_device(WINDOW, online=False)
        sim.set_device(WINDOW, online=True)  # WINDOW is not imported
        token = product_token(sim)
        import_device(sim, token, STOPPED_PUMP)
        sim.set_device(STOPPED_PUMP, online=False)
        sim.set_device(STOPPED_PUMP, online=True)
        hooks = receiver.wait(1)
        time.sleep(0.3)
        assert [h["json"]["coreid"] for h in receiver.requests] == [STOPPED_PUMP]
        assert hooks[0]["headers"]["Authorization"] == "Bearer x"
    finally:
        receiver.stop()


def test_failed_webhook_is_retried_then_dropped(sim):
    receiver = Receiver(status=500)
    try:
        sim.configure(webhook_retry_seconds=[0.1, 0.2])
        token = product_token(sim)
        import_device(sim, token, WINDOW)
        sim.add_webhook(receiver.url, "selfserve/state")
        sim.set_device(WINDOW, online=False)
        sim.set_device(WINDOW, online=True)
        hooks = receiver.wait(3)
        assert len({json.dumps(h["json"], sort_keys=True) for h in hooks}) == 1  # the same event
        deadline = time.monotonic() + 5
        while sim.state()["webhook_log"]["dropped"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sim.state()["webhook_log"] == {"sent": 0, "failed": 3, "dropped": 1}
    finally:
        receiver.stop()


def test_event_stream_opens_are_limited_per_address(sim):
    sim.configure(stream_rate_limit={"requests": 2, "window": 300})
    token = product_token(sim)
    url = f"{sim.url}/v1/products/{PRODUCT}/events"
    opened = [Stream(url, bearer(token)) for _ in range(2)]
    try:
        assert [s.response.status_code for s in opened] == [200, 200]
        third = requests.get(url, headers=bearer(token), timeout=5)
        assert third.status_code == 429 and int(third.headers["Retry-After"]) > 0
        # Other routes are not limited by it.
        assert requests.get(f"{sim.url}/v1/products/{PRODUCT}/devices", headers=bearer(token), timeout=5).ok
    finally:
        for stream in opened:
            stream.close()


def test_simulator_default_heartbeat_matches_the_documented_contract():
    from selfserve.simulator.state import DEFAULT_CONFIG
    from selfserve.simulator.state import STATE_EVENT

    assert STATE_EVENT == STATE
    assert DEFAULT_CONFIG["heartbeat_seconds"] == 120.0
    assert config_module.DEMO_PARTICLE_PRODUCT == PRODUCT
