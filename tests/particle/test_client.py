"""ParticleClient against the live simulator over real HTTP: every method, every error mapping,
token caching/refresh/breaker, id validation without network calls, no token in any error or
log line, thread safety, and the encrypted database token store."""

import datetime
import json
import logging
import socket
import threading

import pytest
import requests
from cryptography.fernet import Fernet

from selfserve import config
from selfserve import crypto
from selfserve import models
from selfserve.particle import errors
from selfserve.particle.client import ParticleClient
from selfserve.particle.token_store import DatabaseTokenStore
from selfserve.particle.token_store import MemoryTokenStore
from selfserve.particle.token_store import StoredToken

TOKEN_ROUTE = "POST /oauth/token"
CREATE_ROUTE = "POST /v1/products/:p/customers"
PAST = datetime.datetime(2000, 1, 1)
FAR_FUTURE = datetime.datetime(2999, 1, 1)
# Tokens the simulator hands out when told to, so tests know exactly what must never leak.
KNOWN_TOKENS = [f"{i:x}" * 40 for i in range(1, 10)]


def demo_devices():
    with open("selfserve/simulator/fixtures/demo.json", encoding="utf-8") as handle:
        return {d["name"]: d for d in json.load(handle)["devices"]}


DEVICES = demo_devices()
WINDOW = DEVICES["living_room_blind"]["id"]
WINDOW_2 = DEVICES["bedroom_blind"]["id"]
OFFLINE_WINDOW = DEVICES["office_blind"]["id"]
PUMP = DEVICES["garden_pump"]["id"]
UNKNOWN_DEVICE = "0123456789abcdef01234567"  # well-formed, not in the simulator

MALFORMED_IDS = [
    "",
    "e00fce68a1b2",
    "e00fce68a1b2c3d4e5f607011",
    "g00fce68a1b2c3d4e5f60701",
    " e00fce68a1b2c3d4e5f60701",
    "e00fce68a1b2c3d4e5f6070\n",
    "../../v1/products/4242/dev",
    "e00fce68a1b2c3d4e5f6070١",
    "e00fce68a1b2c3d4e5f60701\n",
    None,
    12345,
]


def make_client(sim, **overrides):
    settings = dict(
        api_url=sim.url,
        product=config.DEMO_PARTICLE_PRODUCT,
        client_id=config.DEMO_PARTICLE_CLIENT_ID,
        client_secret=config.DEMO_PARTICLE_CLIENT_SECRET,
        read_timeout=5.0,
    )
    settings.update(overrides)
    return ParticleClient(**settings)


def token_requests(sim):
    return sim.counters()["routes"].get(TOKEN_ROUTE, 0)


@pytest.fixture
def pc(sim):
    return make_client(sim)


@pytest.fixture
def owner(pc):
    """A customer owning WINDOW and PUMP (imported into the product, then claimed)."""
    pc.add_device_to_product(WINDOW)
    pc.add_device_to_product(PUMP)
    pc.create_customer("owner-1")
    pc.claim_device("owner-1", WINDOW)
    pc.claim_device("owner-1", PUMP)
    return "owner-1"


# --- every method -------------------------------------------------------------------------------


def test_import_claim_and_read_a_device(sim, pc):
    answer = pc.add_device_to_product(WINDOW)
    assert answer["updated"] == 1 and answer["invalidDeviceIds"] == []
    assert sim.device(WINDOW)["in_product"] is True

    pc.create_customer("Home-42")
    claimed = pc.claim_device("home-42", WINDOW)
    assert claimed["ok"] is True and claimed["id"] == WINDOW
    assert sim.device(WINDOW)["owner"] == "home-42"

    assert [d["id"] for d in pc.list_devices("home-42")] == [WINDOW]
    device = pc.get_device("home-42", WINDOW)
    assert device["name"] == "living_room_blind"
    assert "position" in device["variables"] and "setPosition" in device["functions"]


def test_variables_come_back_typed(sim, pc, owner):
    assert pc.get_variable(owner, WINDOW, "position") == 0
    assert isinstance(pc.get_variable(owner, WINDOW, "battery_v"), float)
    assert pc.get_variable(owner, WINDOW, "fw_version") == "2.1.0"
    assert pc.get_variable(owner, WINDOW, "moving") is False
    assert pc.get_variable(owner, PUMP, "running") is True


def test_call_function_returns_the_return_value_and_acts(sim, pc, owner):
    assert pc.call_function(owner, WINDOW, "setPosition", "40") == 1
    assert sim.device(WINDOW)["variables"]["target"] == 40
    assert pc.get_variable(owner, WINDOW, "target") == 40
    # A refused argument is the device's answer, not an error.
    assert pc.call_function(owner, WINDOW, "setPosition", "not a number") == -1
    assert pc.call_function(owner, PUMP, "stop") == 1
    assert sim.device(PUMP)["variables"]["running"] is False


def test_rename_device(sim, pc, owner):
    answer = pc.rename_device(owner, WINDOW, "Lounge blind")
    assert answer["name"] == "Lounge blind"
    assert sim.device(WINDOW)["name"] == "Lounge blind"
    with pytest.raises(errors.BadRequest):
        pc.rename_device(owner, WINDOW, "  ")


def test_claim_code_claims_the_device_when_it_connects(sim, pc):
    pc.create_customer("code-user")
    pc.add_device_to_product(WINDOW_2)
    answer = pc.get_claim_code("code-user")
    assert len(answer["claim_code"]) == 63 and answer["device_ids"] == []
    result = sim.connect(WINDOW_2, answer["claim_code"])
    assert result["claimed"] is True
    assert [d["id"] for d in pc.list_devices("code-user")] == [WINDOW_2]
    assert pc.get_claim_code("code-user")["device_ids"] == [WINDOW_2]


def test_product_device_views_and_owner(sim, pc, owner):
    device = pc.get_product_device(WINDOW)
    assert device["owner"] == owner and device["product_id"] == int(config.DEMO_PARTICLE_PRODUCT)

    listing = pc.list_product_devices()
    assert {d["id"] for d in listing["devices"]} == {WINDOW, PUMP}
    assert [c["username"] for c in listing["customers"]] == [owner]
    assert listing["meta"]["total_pages"] == 1

    pc.add_device_to_product(WINDOW_2)
    first = pc.list_product_devices(page=1, per_page=2, sort_attr="deviceId")
    second = pc.list_product_devices(page=2, per_page=2, sort_attr="deviceId")
    assert first["meta"]["total_pages"] == 2
    assert [d["id"] for d in first["devices"] + second["devices"]] == sorted([WINDOW, WINDOW_2, PUMP])
    by_name = pc.list_product_devices(device_name="blind")
    assert {d["id"] for d in by_name["devices"]} == {WINDOW, WINDOW_2}
    assert pc.list_product_devices(deviceName="pump")["devices"][0]["id"] == PUMP


def test_remove_device_owner_keeps_it_in_the_product(sim, pc, owner):
    pc.remove_device_owner(WINDOW)
    assert sim.device(WINDOW)["owner"] is None
    assert sim.device(WINDOW)["in_product"] is True
    assert pc.get_product_device(WINDOW)["owner"] is None
    assert [d["id"] for d in pc.list_devices(owner)] == [PUMP]
    with pytest.raises(errors.PermissionDenied):
        pc.get_device(owner, WINDOW)


def test_remove_device_from_product_also_unclaims(sim, pc, owner):
    pc.remove_device_from_product(PUMP)
    assert sim.device(PUMP)["in_product"] is False
    assert sim.device(PUMP)["owner"] is None
    with pytest.raises(errors.NotFound):
        pc.get_product_device(PUMP)


def test_event_stream_of_one_device(sim, pc, owner):
    with pc.get_event_stream(owner, WINDOW) as stream:
        sim.publish(WINDOW, "temperature", "21.5")
        event = next(stream)
    assert event["name"] == "temperature"
    assert event["data"] == "21.5"
    assert event["coreid"] == WINDOW
    assert event["ttl"] == 60
    assert event["published_at"].endswith("Z")


def test_event_stream_of_all_devices_with_prefix(sim, pc, owner):
    stream = pc.get_event_stream(owner, prefix="fault")
    try:
        sim.publish(WINDOW, "position", "50")  # filtered out by the prefix
        sim.publish(PUMP, "fault", "overpressure")
        event = next(stream)
    finally:
        stream.close()
    assert (event["name"], event["data"], event["coreid"]) == ("fault", "overpressure", PUMP)


def test_a_silent_event_stream_ends_after_the_read_timeout(sim, owner):
    sim.configure(sse_keepalive=60)
    quick = make_client(sim, read_timeout=0.5)
    quick.create_customer(owner)  # exists: mints a token for this client
    with quick.get_event_stream(owner, WINDOW) as stream:
        assert list(stream) == []


def test_event_stream_of_a_foreign_device_is_refused(sim, pc, owner):
    pc.create_customer("someone-else")
    with pytest.raises(errors.PermissionDenied):
        pc.get_event_stream("someone-else", WINDOW)


# --- customers and tokens ----------------------------------------------------------------------


def test_create_customer_lowercases_and_is_idempotent(sim, pc):
    pc.create_customer("MiXeD-Case-ID")
    token = pc.customer_token("mixed-case-id")
    assert [c["username"] for c in sim.state()["customers"]] == ["mixed-case-id"]
    assert token_requests(sim) == 0  # the creation answer's token is used

    pc.create_customer("mixed-case-id")  # 400 customer_exists -> no error
    assert pc.customer_token("MIXED-case-id") == token
    assert sim.counters()["routes"][CREATE_ROUTE] == 2

    fresh = make_client(sim)  # another worker, empty cache: mints a scoped token instead
    fresh.create_customer("mixed-case-id")
    assert token_requests(sim) == 1
    assert len(sim.state()["customers"]) == 1
    fresh.create_customer("mixed-case-id")
    assert token_requests(sim) == 1


def test_customer_token_for_an_unknown_customer_is_a_bad_request(sim, pc):
    with pytest.raises(errors.BadRequest) as caught:
        pc.customer_token("nobody-here")
    assert caught.value.status == 400


def test_tokens_are_cached(sim, pc, owner):
    sim.reset_counters()
    for _ in range(5):
        pc.get_variable(owner, WINDOW, "position")
        pc.get_product_device(WINDOW)
    assert token_requests(sim) == 0  # both tokens were minted once, during the fixture

    fresh = make_client(sim)
    for _ in range(5):
        fresh.get_variable(owner, WINDOW, "position")
        fresh.get_product_device(WINDOW)
    assert token_requests(sim) == 2  # one customer token, one product token
    assert fresh.product_token() == fresh.product_token()


def test_forget_customer_token_mints_a_new_one(sim, pc, owner):
    old = pc.customer_token(owner)
    pc.forget_customer_token(owner.upper())
    assert pc.token_store.get(f"customer:{owner}") is None
    assert pc.customer_token(owner) != old
    assert token_requests(sim) == 2  # the product token from the fixture, and this one


def test_customer_token_asks_for_the_configured_lifetime(sim, owner):
    client = make_client(sim, customer_token_lifetime=3600)
    client.customer_token(owner)
    stored = client.token_store.get(f"customer:{owner}")
    left = (stored.expires_at - models.utcnow()).total_seconds()
    assert 3000 < left <= 3600  # Particle's lifetime, used a little less


def test_a_rejected_token_is_replaced_once_and_the_call_succeeds(sim, pc, owner):
    pc.token_store.put(f"customer:{owner}", StoredToken("0" * 40, FAR_FUTURE))  # unknown to the cloud
    sim.reset_counters()
    assert pc.get_variable(owner, WINDOW, "position") == 0
    routes = sim.counters()["routes"]
    assert routes["GET /v1/devices/:id/:name"] == 2  # the 401, then the retry
    assert routes[TOKEN_ROUTE] == 1
    assert pc.token_store.get(f"customer:{owner}").access_token != "0" * 40


def test_a_401_after_renewal_is_token_invalid_without_a_loop(sim, pc, owner):
    sim.add_fault(
        "GET",
        "/v1/devices/*",
        count=5,
        status=401,
        body={"error": "invalid_token", "error_description": "The access token provided is invalid."},
    )
    sim.reset_counters()
    with pytest.raises(errors.TokenInvalid) as caught:
        pc.get_device(owner, WINDOW)
    assert caught.value.status == 401
    routes = sim.counters()["routes"]
    assert routes["GET /v1/devices/:id"] == 2
    assert routes[TOKEN_ROUTE] == 1


def test_an_expired_token_is_refreshed_with_its_refresh_token(sim, pc, owner):
    key = f"customer:{owner}"
    before = pc.token_store.get(key)
    assert before.refresh_token
    pc.token_store.put(key, StoredToken(before.access_token, PAST, before.refresh_token))
    sim.reset_counters()

    assert pc.get_variable(owner, WINDOW, "position") == 0
    after = pc.token_store.get(key)
    assert token_requests(sim) == 1
    left = (after.expires_at - models.utcnow()).total_seconds()
    assert 80000 < left <= 86400  # the refreshed token keeps the configured lifetime
    assert after.access_token != before.access_token
    assert after.refresh_token != before.refresh_token
    # Proof the refresh grant was used: refresh tokens are single-use.
    answer = requests.post(
        f"{sim.url}/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": before.refresh_token},
        auth=(config.DEMO_PARTICLE_CLIENT_ID, config.DEMO_PARTICLE_CLIENT_SECRET),
    )
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


def test_a_refused_refresh_falls_back_to_client_credentials(sim, pc, owner):
    key = f"customer:{owner}"
    pc.token_store.put(key, StoredToken(pc.customer_token(owner), PAST, "f" * 40))
    sim.reset_counters()
    assert pc.get_variable(owner, WINDOW, "position") == 0
    assert token_requests(sim) == 2  # refresh (refused), then client_credentials
    assert pc.token_store.get(key).usable()


def test_a_token_is_renewed_when_it_really_expires(sim, owner):
    client = make_client(sim, customer_token_lifetime=1)
    first = client.customer_token(owner)
    threading.Event().wait(1.1)  # let the cloud's 1-second token expire
    assert client.get_variable(owner, WINDOW, "position") == 0
    assert client.customer_token(owner) != first


def test_non_expiring_token_is_kept(sim, owner):
    client = make_client(sim, customer_token_lifetime=0)
    token = client.customer_token(owner)
    assert client.token_store.get(f"customer:{owner}") == StoredToken(token, None, None)
    assert client.customer_token(owner) == token


# --- the token breaker ---------------------------------------------------------------------------


def test_breaker_stops_token_requests_after_the_limit(sim):
    sim.add_fault("POST", "/oauth/token", count=None, status=503)
    client = make_client(sim, token_failure_limit=3)
    for _ in range(3):
        with pytest.raises(errors.CloudUnavailable) as caught:
            client.product_token()
        assert type(caught.value) is errors.CloudUnavailable and caught.value.status == 503
    for _ in range(5):
        with pytest.raises(errors.TokenRequestsSuspended):
            client.get_product_device(WINDOW)
    assert token_requests(sim) == 3
    sim.clear_faults()
    with pytest.raises(errors.TokenRequestsSuspended):  # still paused: the cloud isn't asked
        client.product_token()
    assert token_requests(sim) == 3


def test_breaker_keeps_the_ip_below_particles_lockout(sim):
    """Unknown customers fail token requests: the default limit (5) stays below the simulated
    Particle lockout (10 failures in a row), so a correct request still works afterwards."""
    client = make_client(sim)
    for attempt in range(20):
        with pytest.raises((errors.BadRequest, errors.TokenRequestsSuspended)):
            client.customer_token(f"ghost-{attempt}")
    assert token_requests(sim) == 5
    assert make_client(sim).product_token()  # the simulated cloud did not lock us out


def test_a_success_resets_the_failure_count(sim):
    client = make_client(sim, token_failure_limit=3)
    client.create_customer("real")
    sim.add_fault("POST", "/oauth/token", count=2, status=500)
    for _ in range(2):
        with pytest.raises(errors.CloudUnavailable):
            client.product_token()
    assert client.product_token()
    client.forget_customer_token("real")
    sim.add_fault("POST", "/oauth/token", count=2, status=500)
    for _ in range(2):
        with pytest.raises(errors.CloudUnavailable):
            client.customer_token("real")
    assert client.customer_token("real")  # 2 + 2 failures, never 3 in a row


def test_after_the_pause_one_request_probes_again(sim):
    client = make_client(sim, token_failure_limit=1, token_pause_seconds=0.2)
    sim.add_fault("POST", "/oauth/token", count=1, status=503)
    with pytest.raises(errors.CloudUnavailable):
        client.product_token()
    with pytest.raises(errors.TokenRequestsSuspended):
        client.product_token()
    threading.Event().wait(0.3)
    assert client.product_token()
    assert token_requests(sim) == 2


def test_a_wrong_client_secret_stops_at_once(sim):
    client = make_client(sim, client_secret="0badc0de" * 5)
    with pytest.raises(errors.InvalidClient) as caught:
        client.product_token()
    assert caught.value.status == 400
    for _ in range(10):
        with pytest.raises(errors.TokenRequestsSuspended):
            client.get_product_device(WINDOW)
        with pytest.raises(errors.TokenRequestsSuspended):
            client.create_customer("anyone")
    assert token_requests(sim) == 1
    assert sim.counters()["routes"].get(CREATE_ROUTE, 0) == 0


def test_a_wrong_client_secret_on_customer_creation_stops_at_once(sim):
    client = make_client(sim, client_secret="0badc0de" * 5)
    with pytest.raises(errors.InvalidClient):
        client.create_customer("anyone")
    with pytest.raises(errors.TokenRequestsSuspended):
        client.product_token()
    assert sim.counters()["total"] == 1


# --- error mapping ---------------------------------------------------------------------------------


def test_rate_limited_with_retry_after_from_an_injected_fault(sim, pc, owner):
    sim.add_fault(
        "GET",
        "/v1/devices/*",
        status=429,
        headers={"Retry-After": "7"},
        body={"ok": False, "error": "Too many requests"},
    )
    with pytest.raises(errors.RateLimited) as caught:
        pc.get_variable(owner, WINDOW, "position")
    assert caught.value.retry_after == 7
    assert caught.value.status == 429
    assert caught.value.message == "Too many requests"
    assert pc.get_variable(owner, WINDOW, "position") == 0  # nothing sticky


def test_rate_limited_by_the_simulated_cloud(sim, pc, owner):
    sim.configure(rate_limit={"requests": 3, "window": 120})
    for _ in range(3):
        pc.get_variable(owner, WINDOW, "position")
    with pytest.raises(errors.RateLimited) as caught:
        pc.get_variable(owner, WINDOW, "position")
    assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 120


def test_rate_limited_retry_after_as_an_http_date(sim, pc, owner):
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=90)
    sim.add_fault(
        "GET", "/v1/devices", status=429, headers={"Retry-After": later.strftime("%a, %d %b %Y %H:%M:%S GMT")}
    )
    with pytest.raises(errors.RateLimited) as caught:
        pc.list_devices(owner)
    assert 60 <= caught.value.retry_after <= 90


def test_token_endpoint_rate_limit(sim, pc):
    sim.configure(token_rate_limit={"requests": 1, "window": 60})
    pc.product_token()
    with pytest.raises(errors.RateLimited) as caught:
        make_client(sim).product_token()
    assert caught.value.retry_after and caught.value.message == "Too many requests"


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_cloud_unavailable(sim, pc, owner, status):
    sim.add_fault("POST", "/v1/devices/*/*", status=status, body="<html>Bad Gateway</html>")
    with pytest.raises(errors.CloudUnavailable) as caught:
        pc.call_function(owner, WINDOW, "open")
    assert caught.value.status == status
    assert sim.device(WINDOW)["variables"]["target"] == 0  # the function never ran


def test_a_read_timeout_is_cloud_unavailable(sim, owner):
    slow = make_client(sim, read_timeout=0.3)
    slow.customer_token(owner)
    sim.add_fault("GET", "/v1/devices/*", status=None, latency=1.0)
    with pytest.raises(errors.CloudUnavailable) as caught:
        slow.get_device(owner, WINDOW)
    assert caught.value.status is None
    assert "timed out" in caught.value.message
    assert sim.url not in str(caught.value) and "127.0.0.1" not in caught.value.message
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_a_slow_device_within_the_read_timeout_answers(sim, owner):
    sim.set_device(WINDOW, latency=0.2)
    assert make_client(sim, read_timeout=2).get_variable(owner, WINDOW, "position") == 0


def test_an_unreachable_cloud_is_cloud_unavailable(sim):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    client = make_client(sim, api_url=f"http://127.0.0.1:{port}", connect_timeout=0.5)
    with pytest.raises(errors.CloudUnavailable) as caught:
        client.product_token()
    assert caught.value.status is None
    assert str(port) not in str(caught.value)


def test_offline_device_is_device_offline(sim, pc, owner):
    sim.set_device(WINDOW, online=False)
    with pytest.raises(errors.DeviceOffline) as caught:
        pc.get_variable(owner, WINDOW, "position")
    assert caught.value.status == 408
    with pytest.raises(errors.DeviceOffline):
        pc.call_function(owner, WINDOW, "open")
    assert sim.device(WINDOW)["variables"]["target"] == 0


def test_a_claimed_offline_fixture_device_is_device_offline(sim, pc):
    pc.add_device_to_product(OFFLINE_WINDOW)
    pc.create_customer("far-away")
    pc.claim_device("far-away", OFFLINE_WINDOW)  # product devices can be claimed offline
    device = pc.get_device("far-away", OFFLINE_WINDOW)
    assert device["online"] is False
    with pytest.raises(errors.DeviceOffline):
        pc.get_variable("far-away", OFFLINE_WINDOW, "position")


def test_a_hung_device_times_out_in_the_cloud(sim, pc, owner):
    sim.configure(cloud_timeout=0.3)
    sim.set_device(PUMP, hung=True)
    with pytest.raises(errors.DeviceOffline) as caught:
        pc.get_variable(owner, PUMP, "pressure_kpa")
    assert caught.value.status == 408


def test_legacy_timeout_answers_are_device_offline(sim, pc, owner):
    sim.configure(legacy_errors=True)
    sim.set_device(WINDOW, online=False)
    with pytest.raises(errors.DeviceOffline) as caught:
        pc.call_function(owner, WINDOW, "open")
    assert (caught.value.status, caught.value.message) == (400, "Timed out.")
    with pytest.raises(errors.DeviceOffline) as caught:
        pc.get_variable(owner, WINDOW, "position")
    assert (caught.value.status, caught.value.message) == (408, "Timed out.")


def test_unknown_variable_and_function_are_not_found(sim, pc, owner):
    with pytest.raises(errors.NotFound) as caught:
        pc.get_variable(owner, WINDOW, "humidity")
    assert caught.value.message == "Unknown Variable: humidity"
    with pytest.raises(errors.NotFound) as caught:
        pc.call_function(owner, WINDOW, "explode")
    assert caught.value.message == "Function explode not found"
    sim.configure(legacy_errors=True)
    with pytest.raises(errors.NotFound) as caught:
        pc.get_variable(owner, WINDOW, "humidity")
    assert caught.value.message == "Variable not found"


def test_names_cannot_reach_another_route(sim, pc, owner):
    with pytest.raises(errors.NotFound):
        pc.get_variable(owner, WINDOW, "../../products/4242/devices")
    routes = sim.counters()["routes"]
    assert not any(route.startswith("GET /v1/products") for route in routes)


def test_function_failures_answered_with_200(sim, pc, owner):
    sim.add_fault("POST", "/v1/devices/*/*", status=200, body={"ok": False, "error": "Device busy"})
    with pytest.raises(errors.FunctionFailed) as caught:
        pc.call_function(owner, WINDOW, "open")
    assert caught.value.message == "Device busy"
    sim.add_fault("POST", "/v1/devices/*/*", status=200, body={"id": WINDOW, "connected": True})
    with pytest.raises(errors.FunctionFailed):
        pc.call_function(owner, WINDOW, "open")


def test_foreign_device_is_permission_denied_and_leaks_nothing(sim, pc, owner):
    pc.create_customer("neighbour")
    pc.call_function(owner, WINDOW, "setPosition", "30")
    attempts = [
        lambda: pc.get_device("neighbour", WINDOW),
        lambda: pc.get_variable("neighbour", WINDOW, "position"),
        lambda: pc.call_function("neighbour", WINDOW, "open"),
        lambda: pc.rename_device("neighbour", WINDOW, "mine now"),
    ]
    bodies = []
    for attempt in attempts:
        with pytest.raises(errors.PermissionDenied) as caught:
            attempt()
        assert type(caught.value) is errors.PermissionDenied and caught.value.status == 403
        text = str(caught.value) + repr(caught.value) + json.dumps(caught.value.body)
        assert "living_room_blind" not in text and owner not in text and "position" not in text
        bodies.append(caught.value.body)
    with pytest.raises(errors.PermissionDenied) as unknown:
        pc.get_device("neighbour", UNKNOWN_DEVICE)
    assert all(body == unknown.value.body for body in bodies)  # foreign looks like non-existent
    state = sim.device(WINDOW)
    assert state["name"] == "living_room_blind" and state["variables"]["target"] == 30
    assert pc.list_devices("neighbour") == []


def test_claim_errors(sim, pc, owner):
    pc.create_customer("claimer")
    with pytest.raises(errors.NotFound) as caught:
        pc.claim_device("claimer", UNKNOWN_DEVICE)
    assert caught.value.message == "device does not exist"
    with pytest.raises(errors.DeviceOwnedByOther) as caught:
        pc.claim_device("claimer", WINDOW)
    assert caught.value.status == 403 and "belongs to someone else" in caught.value.message
    with pytest.raises(errors.PermissionDenied) as caught:
        pc.claim_device("claimer", WINDOW_2)  # not imported into the product
    assert not isinstance(caught.value, errors.DeviceOwnedByOther)
    assert sim.device(WINDOW)["owner"] == owner and sim.device(WINDOW_2)["owner"] is None
    assert pc.claim_device(owner, WINDOW.upper())["ok"] is True  # own device again: fine


def test_a_bad_request_keeps_particles_message(sim, pc, owner):
    sim.add_fault("PUT", "/v1/devices/*", status=400, body={"ok": False, "errors": ["name is too long"]})
    with pytest.raises(errors.BadRequest) as caught:
        pc.rename_device(owner, WINDOW, "x" * 10)
    assert type(caught.value) is errors.BadRequest
    assert (caught.value.status, caught.value.message) == (400, "name is too long")


def test_other_statuses(sim, pc, owner):
    sim.add_fault("GET", "/v1/devices", status=409, body={"ok": False, "error": "conflict"})
    with pytest.raises(errors.BadRequest):
        pc.list_devices(owner)
    sim.add_fault("GET", "/v1/devices", status=200, body="not json")
    with pytest.raises(errors.CloudUnavailable):
        pc.list_devices(owner)


# --- input checked before any network call ---------------------------------------------------------


DEVICE_CALLS = {
    "add_device_to_product": lambda c, d: c.add_device_to_product(d),
    "remove_device_owner": lambda c, d: c.remove_device_owner(d),
    "get_product_device": lambda c, d: c.get_product_device(d),
    "remove_device_from_product": lambda c, d: c.remove_device_from_product(d),
    "claim_device": lambda c, d: c.claim_device("someone", d),
    "get_device": lambda c, d: c.get_device("someone", d),
    "get_variable": lambda c, d: c.get_variable("someone", d, "position"),
    "call_function": lambda c, d: c.call_function("someone", d, "open"),
    "rename_device": lambda c, d: c.rename_device("someone", d, "name"),
    "get_event_stream": lambda c, d: c.get_event_stream("someone", d),
}


@pytest.mark.parametrize("method", sorted(DEVICE_CALLS))
def test_malformed_device_ids_are_refused_without_a_network_call(sim, pc, method):
    for bad in MALFORMED_IDS:
        if bad is None and method == "get_event_stream":
            continue  # None means "all the customer's devices" there
        with pytest.raises(errors.BadRequest) as caught:
            DEVICE_CALLS[method](pc, bad)
        assert caught.value.status is None
    assert sim.counters()["total"] == 0


@pytest.mark.parametrize("bad", ["", "   ", "two words", "tab\there", None, 7, "x" * 201])
def test_malformed_customer_ids_are_refused_without_a_network_call(sim, pc, bad):
    for call in (
        pc.create_customer,
        pc.customer_token,
        pc.list_devices,
        pc.get_claim_code,
        pc.forget_customer_token,
        lambda c: pc.get_device(c, WINDOW),
    ):
        with pytest.raises(errors.BadRequest):
            call(bad)
    assert sim.counters()["total"] == 0


def test_other_bad_input_is_refused_without_a_network_call(sim, pc):
    with pytest.raises(errors.BadRequest):
        pc.get_variable("someone", WINDOW, "")
    with pytest.raises(errors.BadRequest):
        pc.call_function("someone", WINDOW, "open", arg=5)
    with pytest.raises(errors.BadRequest):
        pc.rename_device("someone", WINDOW, "")
    assert sim.counters()["total"] == 0


def test_uppercase_device_ids_are_lowercased(sim, pc, owner):
    assert pc.get_device(owner, WINDOW.upper())["id"] == WINDOW
    assert pc.get_product_device(PUMP.upper())["id"] == PUMP


# --- no secrets anywhere ------------------------------------------------------------------------------


def _all_text(exc):
    return " ".join([str(exc), repr(exc), exc.message, json.dumps(exc.body), str(exc.args)])


def test_no_token_or_secret_in_any_error(sim, pc, caplog):
    caplog.set_level(logging.DEBUG)  # urllib3 logs every URL at DEBUG: tokens must not be there
    sim.configure(issue_tokens=list(KNOWN_TOKENS))
    secret = config.DEMO_PARTICLE_CLIENT_SECRET
    pc.add_device_to_product(WINDOW)
    pc.create_customer("leaky")
    pc.claim_device("leaky", WINDOW)
    held = {pc.product_token(), pc.customer_token("leaky")}
    held |= {pc.token_store.get("customer:leaky").refresh_token, pc.token_store.get("product").refresh_token}
    assert held <= set(KNOWN_TOKENS)
    customer_token = pc.customer_token("leaky")

    echoes = [
        {
            "error": f"bad token {customer_token}",
            "access_token": customer_token,
            "nested": [{"refresh_token": KNOWN_TOKENS[1]}, f"secret={secret}"],
        },
        f"plain text {customer_token.upper()} and {secret}",
        {"ok": False, "errors": [f"token {customer_token} rejected"]},
        {"error_description": f"Bearer {customer_token}", "info": secret},
    ]
    raised = []
    for status, body in zip((400, 403, 404, 500), echoes, strict=False):
        sim.add_fault("GET", "/v1/devices/*", status=status, body=body)
        with pytest.raises(errors.ParticleError) as caught:
            pc.get_device("leaky", WINDOW)
        raised.append(caught.value)
    sim.add_fault("GET", "/v1/devices/*", status=401, count=2, body={"error": f"expired {customer_token}"})
    with pytest.raises(errors.TokenInvalid) as caught:
        pc.get_device("leaky", WINDOW)
    raised.append(caught.value)
    sim.add_fault(
        "POST",
        "/oauth/token",
        status=400,
        body={"error": "invalid_grant", "error_description": f"refresh {KNOWN_TOKENS[3]} bad"},
    )
    pc.forget_customer_token("leaky")
    with pytest.raises(errors.BadRequest) as caught:
        pc.customer_token("leaky")
    raised.append(caught.value)
    sim.add_fault("POST", "/v1/devices/*/*", status=200, body={"ok": False, "error": f"x{customer_token}"})
    pc.forget_customer_token("leaky")
    with pytest.raises(errors.FunctionFailed) as caught:
        pc.call_function("leaky", WINDOW, "open")
    raised.append(caught.value)

    issued = set(KNOWN_TOKENS)
    for exc in raised:
        text = _all_text(exc)
        for token in issued:
            assert token not in text and token.upper() not in text
        assert secret not in text
    log_text = "\n".join(record.getMessage() for record in caplog.records)
    assert "/v1/devices/{device_id}" in log_text
    for token in issued:
        assert token not in log_text
    assert secret not in log_text


def test_stored_token_repr_hides_the_token():
    stored = StoredToken("a" * 40, FAR_FUTURE, "b" * 40)
    assert "a" * 40 not in repr(stored) and "b" * 40 not in repr(stored)


# --- threads ------------------------------------------------------------------------------------------


def _in_threads(count, work):
    barrier = threading.Barrier(count)
    results, failures = [], []

    def run():
        barrier.wait()
        try:
            results.append(work())
        except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not failures, failures
    return results


def test_twenty_threads_mint_one_customer_token(sim, pc):
    pc.create_customer("busy")
    fresh = make_client(sim)
    tokens = _in_threads(20, lambda: fresh.customer_token("busy"))
    assert len(set(tokens)) == 1
    assert token_requests(sim) == 1


def test_twenty_threads_share_one_product_token_and_work(sim, pc, owner):
    fresh = make_client(sim)
    sim.reset_counters()
    results = _in_threads(
        20, lambda: (fresh.get_product_device(WINDOW)["id"], fresh.get_variable(owner, WINDOW, "position"))
    )
    assert set(results) == {(WINDOW, 0)}
    assert token_requests(sim) == 2


def test_one_session_per_thread(pc):
    mine = pc._session()
    assert pc._session() is mine
    other = _in_threads(1, pc._session)[0]
    assert other is not mine


# --- the database token store -------------------------------------------------------------------------


def test_database_store_encrypts_and_survives_a_new_client(sim, app):
    fernet = crypto.fernet_for(app.config)
    first = make_client(sim, token_store=DatabaseTokenStore(fernet))
    first.create_customer("stored")
    token = first.customer_token("stored")
    product = first.product_token()

    row = models.ParticleToken.get(models.ParticleToken.key == "customer:stored")
    assert token not in row.token_encrypted
    assert (
        row.refresh_encrypted
        and first.token_store.get("customer:stored").refresh_token not in row.refresh_encrypted
    )
    assert product not in models.ParticleToken.get(models.ParticleToken.key == "product").token_encrypted

    sim.reset_counters()
    second = make_client(sim, token_store=DatabaseTokenStore(crypto.fernet_for(app.config)))
    assert second.customer_token("STORED") == token
    assert second.product_token() == product
    assert token_requests(sim) == 0


def test_app_client_uses_the_database_store(sim, app, particle):
    assert isinstance(particle.token_store, DatabaseTokenStore)
    particle.create_customer("app-user")
    assert models.ParticleToken.select().where(models.ParticleToken.key == "customer:app-user").exists()


def test_undecryptable_tokens_count_as_missing(sim, app):
    make_client(sim, token_store=DatabaseTokenStore(crypto.fernet_for(app.config))).create_customer("rotated")
    rotated = make_client(sim, token_store=DatabaseTokenStore(Fernet(Fernet.generate_key())))
    assert rotated.customer_token("rotated")
    assert token_requests(sim) == 1
    assert rotated.get_claim_code("rotated")["device_ids"] == []


def test_database_store_works_outside_a_request_and_in_threads(sim, app):
    store = DatabaseTokenStore(crypto.fernet_for(app.config))
    client = make_client(sim, token_store=store)
    client.create_customer("threaded")
    models.db.close()  # as in a CLI command or a background job
    assert client.customer_token("threaded")
    assert models.db.is_closed()  # the store opened and closed its own connection
    models.db.connect()
    assert client.customer_token("threaded")
    assert not models.db.is_closed()  # a request's open connection is reused, not closed

    fresh = make_client(sim, token_store=DatabaseTokenStore(crypto.fernet_for(app.config)))
    fresh.forget_customer_token("threaded")
    sim.reset_counters()
    tokens = _in_threads(10, lambda: fresh.customer_token("threaded"))
    assert len(set(tokens)) == 1
    assert token_requests(sim) == 1


def test_memory_store_is_the_default(sim):
    assert isinstance(make_client(sim).token_store, MemoryTokenStore)
