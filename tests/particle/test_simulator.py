"""The Particle Cloud simulator, over raw HTTP, against the reference's bodies and statuses
(/work/shared/particle-cloud-api.md). Uses the live `sim` fixture; nothing is mocked."""

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import requests
from helpers import OFFLINE_WINDOW
from helpers import PUMP
from helpers import SLOW_PUMP
from helpers import STOPPED_PUMP
from helpers import WINDOW

from selfserve import config as config_module
from selfserve.simulator.server import SimulatorServer

CLIENT = (config_module.DEMO_PARTICLE_CLIENT_ID, config_module.DEMO_PARTICLE_CLIENT_SECRET)
PRODUCT = config_module.DEMO_PARTICLE_PRODUCT
SLUG = "selfserve-demo"

WINDOW_2 = "e00fce68a1b2c3d4e5f60702"  # online, position 60
UNKNOWN_ID = "0123456789abcdef01234567"

HEX40 = re.compile(r"^[0-9a-f]{40}$")
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

PERMISSION_DENIED = {
    "error": "Permission Denied",
    "info": "I didn't recognize that device name or ID, try opening "
    "https://api.particle.io/v1/devices?access_token=undefined",
}
ORG_NOT_FOUND = {"ok": False, "error": "Organization not found for user's role."}


# --- helpers ------------------------------------------------------------------------------------


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def token_request(sim, auth=CLIENT, **form):
    return requests.post(f"{sim.url}/oauth/token", data=form, auth=auth, timeout=10)


def product_token(sim):
    response = token_request(sim, grant_type="client_credentials")
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def create_customer(sim, email, **extra):
    response = requests.post(
        f"{sim.url}/v1/products/{PRODUCT}/customers",
        data={"email": email, "no_password": "true", **extra},
        auth=CLIENT,
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return response.json()["access_token"]


def import_device(sim, token, device_id):
    response = requests.post(
        f"{sim.url}/v1/products/{PRODUCT}/devices", data={"id": device_id}, headers=bearer(token), timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()


def claim(sim, token, device_id):
    return requests.post(f"{sim.url}/v1/devices", data={"id": device_id}, headers=bearer(token), timeout=10)


def owner_of(sim, device_id, email="owner-1", product=None):
    """Import `device_id`, create customer `email`, claim; return the customer token."""
    import_device(sim, product or product_token(sim), device_id)
    token = create_customer(sim, email)
    response = claim(sim, token, device_id)
    assert response.status_code == 200, response.text
    return token


def get_var(sim, token, device_id, name, **params):
    return requests.get(
        f"{sim.url}/v1/devices/{device_id}/{name}", headers=bearer(token), params=params, timeout=10
    )


def call(sim, token, device_id, name, arg=None, **body):
    data = dict(body)
    if arg is not None:
        data["arg"] = arg
    return requests.post(
        f"{sim.url}/v1/devices/{device_id}/{name}", headers=bearer(token), data=data, timeout=10
    )


def wait_until(check, timeout=8.0, interval=0.05):
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(interval)


class Stream:
    """A live SSE response read frame by frame (each read is bounded by the socket timeout)."""

    def __init__(self, url, headers=None, timeout=5):
        self.response = requests.get(url, headers=headers or {}, stream=True, timeout=timeout)
        self.chunks = self.response.iter_content(chunk_size=None)
        self.buffer = ""

    def frame(self):
        while "\n\n" not in self.buffer:
            self.buffer += next(self.chunks).decode("utf-8")
        frame, self.buffer = self.buffer.split("\n\n", 1)
        return frame

    def event(self):
        """The next event (name, data dict), skipping comments such as keep-alives."""
        while True:
            frame = self.frame()
            if frame.startswith(":"):
                continue
            lines = dict(line.split(": ", 1) for line in frame.split("\n"))
            return lines["event"], json.loads(lines["data"])

    def close(self):
        self.response.close()


# --- /oauth/token -------------------------------------------------------------------------------


def test_product_token_body_key_order_and_headers(sim):
    response = token_request(sim, grant_type="client_credentials")
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["token_type", "access_token", "expires_in", "refresh_token"]
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 7776000
    assert HEX40.match(body["access_token"]) and HEX40.match(body["refresh_token"])
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Pragma"] == "no-cache"
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert " " not in response.text  # compact JSON


def test_client_credentials_in_the_body_work_too(sim):
    response = token_request(
        sim, auth=None, grant_type="client_credentials", client_id=CLIENT[0], client_secret=CLIENT[1]
    )
    assert response.status_code == 200
    assert HEX40.match(response.json()["access_token"])


def test_token_endpoint_refuses_json(sim):
    response = requests.post(f"{sim.url}/oauth/token", json={"grant_type": "client_credentials"}, auth=CLIENT)
    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid_request",
        "error_description": "Method must be POST with application/x-www-form-urlencoded encoding",
    }
    assert response.headers["Cache-Control"] == "no-store"


def test_token_validation_order(sim):
    # grant_type is checked before the client
    response = token_request(sim, auth=("x", "y"), grant_type="magic")
    assert (response.status_code, response.json()) == (
        400,
        {"error": "invalid_request", "error_description": "Invalid or missing grant_type parameter"},
    )
    response = token_request(sim, auth=None, scope="")
    assert response.json()["error_description"] == "Invalid or missing grant_type parameter"
    # then the client id, then the secret, then the lookup
    response = token_request(sim, auth=None, grant_type="client_credentials")
    assert (response.status_code, response.json()) == (
        400,
        {"error": "invalid_client", "error_description": "Invalid or missing client_id parameter"},
    )
    response = token_request(sim, auth=None, grant_type="client_credentials", client_id=CLIENT[0])
    assert response.json() == {
        "error": "invalid_client",
        "error_description": "Missing client_secret parameter",
    }
    response = token_request(sim, auth=(CLIENT[0], "0" * 40), grant_type="client_credentials")
    assert (response.status_code, response.json()) == (
        400,
        {"error": "invalid_client", "error_description": "Client credentials are invalid"},
    )
    assert response.headers["WWW-Authenticate"] == 'Basic realm="Service"'


def test_customer_scoped_token_echoes_scope_and_sees_only_its_devices(sim):
    owner_of(sim, WINDOW, "cust-a")
    response = token_request(sim, grant_type="client_credentials", scope="customer=CUST-A")
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["token_type", "access_token", "expires_in", "refresh_token", "scope"]
    assert body["scope"] == "customer=cust-a"
    devices = requests.get(f"{sim.url}/v1/devices", headers=bearer(body["access_token"])).json()
    assert [d["id"] for d in devices] == [WINDOW]


def test_unknown_customer_scope_is_invalid_scope(sim):
    response = token_request(sim, grant_type="client_credentials", scope="customer=nobody")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"  # description invented


def test_non_expiring_token_has_no_refresh_token(sim):
    response = token_request(sim, grant_type="client_credentials", expires_in="0")
    body = response.json()
    assert body["expires_in"] == 0
    assert "refresh_token" not in body
    assert list(body) == ["token_type", "access_token", "expires_in"]
    assert requests.get(f"{sim.url}/v1/devices", headers=bearer(body["access_token"])).status_code == 200


def test_short_lived_token_expires_with_the_recorded_401(sim):
    body = token_request(sim, grant_type="client_credentials", expires_in="1").json()
    assert body["expires_in"] == 1

    def expired():
        response = requests.get(f"{sim.url}/v1/devices", headers=bearer(body["access_token"]))
        return [response] if response.status_code == 401 else None  # a 401 Response is falsy

    [response] = wait_until(expired, timeout=5)
    assert response.json() == {
        "error": "invalid_token",
        "error_description": "The access token provided has expired.",
    }


def test_expires_at_gives_the_seconds_remaining(sim):
    moment = time.gmtime(time.time() + 3600)
    expires_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", moment)
    body = token_request(sim, grant_type="client_credentials", expires_at=expires_at).json()
    assert 3500 <= body["expires_in"] <= 3600


def test_refresh_token_is_single_use_and_keeps_the_customer(sim):
    create_customer(sim, "refresher")
    first = token_request(sim, grant_type="client_credentials", scope="customer=refresher").json()
    response = token_request(sim, grant_type="refresh_token", refresh_token=first["refresh_token"])
    assert response.status_code == 200
    second = response.json()
    assert second["scope"] == "customer=refresher"
    assert second["access_token"] != first["access_token"]
    assert HEX40.match(second["refresh_token"])
    again = token_request(sim, grant_type="refresh_token", refresh_token=first["refresh_token"])
    assert (again.status_code, again.json()) == (
        400,
        {"error": "invalid_grant", "error_description": "Invalid refresh token"},
    )
    missing = token_request(sim, grant_type="refresh_token")
    assert missing.json() == {"error": "invalid_request", "error_description": 'No "refresh_token" parameter'}
    # the refresh token needs the client credentials too
    no_client = token_request(
        sim, auth=None, grant_type="refresh_token", refresh_token=second["refresh_token"]
    )
    assert no_client.json()["error"] == "invalid_client"


def test_refresh_token_lives_fourteen_days_beyond_the_access_token(sim):
    body = token_request(sim, grant_type="client_credentials", expires_in="3600").json()
    with sim.cloud.lock:
        access = sim.cloud.tokens[body["access_token"]]["expires_at"]
        refresh = sim.cloud.refresh_tokens[body["refresh_token"]]["expires_at"]
    assert refresh - access == 14 * 24 * 3600


def test_issue_tokens_hands_out_chosen_tokens_in_order(sim):
    chosen = ["a" * 40, "b" * 40, "c" * 40]
    sim.configure(issue_tokens=chosen)
    body = token_request(sim, grant_type="client_credentials").json()
    assert (body["access_token"], body["refresh_token"]) == ("a" * 40, "b" * 40)
    assert (
        token_request(sim, grant_type="client_credentials", expires_in="0").json()["access_token"] == "c" * 40
    )
    assert requests.get(f"{sim.url}/v1/devices", headers=bearer("a" * 40)).status_code == 200


def test_password_grant_only_for_customers_with_a_password(sim):
    requests.post(
        f"{sim.url}/v1/products/{PRODUCT}/customers",
        data={"email": "pw@example.com", "password": "s3cret!"},
        auth=CLIENT,
    )
    create_customer(sim, "shadow@example.com")
    ok = token_request(sim, grant_type="password", username="pw@example.com", password="s3cret!")
    assert ok.status_code == 200 and ok.json()["scope"] == "customer=pw@example.com"
    for username, password in (("pw@example.com", "wrong"), ("shadow@example.com", "x"), ("nobody", "x")):
        response = token_request(sim, grant_type="password", username=username, password=password)
        assert response.json() == {
            "error": "invalid_grant",
            "error_description": "User credentials are invalid",
        }


# --- passing the token on /v1 ---------------------------------------------------------------------


def test_token_passing_rules(sim):
    token = product_token(sim)
    url = f"{sim.url}/v1/devices"
    response = requests.get(url)
    assert (response.status_code, response.json()) == (
        400,
        {"error": "invalid_request", "error_description": "The access token was not found"},
    )
    response = requests.get(url, headers=bearer(token), params={"access_token": token})
    assert (response.status_code, response.json()) == (
        400,
        {
            "error": "invalid_request",
            "error_description": "Only one method may be used to authenticate at a time (Auth header,  GET or POST).",
        },
    )
    response = requests.get(url, headers={"Authorization": f"Token {token}"})
    assert response.json() == {"error": "invalid_request", "error_description": "Malformed auth header"}
    response = requests.get(url, data={"access_token": token})
    assert response.json() == {
        "error": "invalid_request",
        "error_description": "Method cannot be GET When putting the token in the body.",
    }
    response = requests.post(url, json={"access_token": token, "id": WINDOW})
    assert response.json() == {
        "error": "invalid_request",
        "error_description": "When putting the token in the body, content type must be "
        "application/x-www-form-urlencoded.",
    }
    assert requests.get(url, params={"access_token": token}).status_code == 200


def test_form_body_token_works(sim):
    token = owner_of(sim, WINDOW)
    response = requests.post(
        f"{sim.url}/v1/devices/{WINDOW}/setPosition", data={"access_token": token, "arg": "40"}
    )
    assert response.status_code == 200 and response.json()["return_value"] == 1


def test_query_tokens_can_be_refused(sim):
    token = product_token(sim)
    sim.configure(reject_query_tokens=True)
    response = requests.get(f"{sim.url}/v1/devices", params={"access_token": token})
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"
    assert requests.get(f"{sim.url}/v1/devices", headers=bearer(token)).status_code == 200


def test_unknown_token_and_client_secret_as_bearer_are_401(sim):
    for token in ("f" * 40, CLIENT[1]):
        response = requests.get(f"{sim.url}/v1/devices", headers=bearer(token))
        assert (response.status_code, response.json()) == (
            401,
            {"error": "invalid_token", "error_description": "The access token provided is invalid."},
        )
        assert response.headers["Cache-Control"] == "no-store"


# --- customers ----------------------------------------------------------------------------------------


def test_create_customer_lowercases_and_answers_201_with_a_token(sim):
    response = requests.post(
        f"{sim.url}/v1/products/{PRODUCT}/customers",
        data={"email": "Jane.Doe@Example.COM", "no_password": "true"},
        auth=CLIENT,
    )
    assert response.status_code == 201
    body = response.json()
    assert list(body) == ["token_type", "access_token", "expires_in", "refresh_token", "scope"]
    assert body["scope"] == "customer=jane.doe@example.com"
    assert requests.get(f"{sim.url}/v1/devices", headers=bearer(body["access_token"])).json() == []
    assert [c["username"] for c in sim.state()["customers"]] == ["jane.doe@example.com"]


def test_create_customer_with_body_credentials_json_and_a_non_email_id(sim):
    response = requests.post(
        f"{sim.url}/v1/products/{SLUG}/customers",
        json={
            "email": "7f3c9a0e2b1d4c5e",
            "no_password": True,
            "client_id": CLIENT[0],
            "client_secret": CLIENT[1],
        },
    )
    assert response.status_code == 201
    assert response.json()["scope"] == "customer=7f3c9a0e2b1d4c5e"


def test_product_bearer_token_cannot_create_customers(sim):
    token = product_token(sim)
    response = requests.post(
        f"{sim.url}/v1/products/{PRODUCT}/customers",
        data={"email": "x@example.com", "no_password": "true"},
        headers=bearer(token),
    )
    assert response.status_code == 403
    assert sim.state()["customers"] == []


def test_create_customer_refusals(sim):
    customer = create_customer(sim, "dup@example.com")
    response = requests.post(
        f"{sim.url}/v1/products/{PRODUCT}/customers",
        data={"email": "DUP@example.com", "no_password": "true"},
        auth=CLIENT,
    )
    assert (response.status_code, response.json()) == (
        400,
        {"error": "customer_exists", "error_description": "Customer already exists"},
    )
    response = requests.post(
        f"{sim.url}/v1/products/{PRODUCT}/customers",
        data={"email": "y@example.com", "no_password": "true"},
        auth=(CLIENT[0], "0" * 40),
    )
    assert (response.status_code, response.json()) == (
        400,
        {"error": "invalid_client", "error_description": "Client credentials are invalid"},
    )
    response = requests.post(
        f"{sim.url}/v1/products/{PRODUCT}/customers",
        data={"email": "z@example.com", "no_password": "true"},
        headers=bearer(customer),
    )
    assert (response.status_code, response.json()) == (403, ORG_NOT_FOUND)


def test_concurrent_creates_of_one_customer_make_one(sim):
    barrier = threading.Barrier(10)

    def create(_):
        barrier.wait()
        return requests.post(
            f"{sim.url}/v1/products/{PRODUCT}/customers",
            data={"email": "same-person", "no_password": "true"},
            auth=CLIENT,
            timeout=10,
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(create, range(10)))
    assert sorted(r.status_code for r in responses) == [201] + [400] * 9
    assert all(r.json()["error"] == "customer_exists" for r in responses if r.status_code == 400)
    assert [c["username"] for c in sim.state()["customers"]] == ["same-person"]


def test_duplicate_customer_error_is_configurable(sim):
    sim.configure(duplicate_customer_error={"status": 409, "body": {"ok": False, "error": "exists"}})
    create_customer(sim, "dup")
    response = requests.post(
        f"{sim.url}/v1/products/{PRODUCT}/customers",
        data={"email": "dup", "no_password": "true"},
        auth=CLIENT,
    )
    assert (response.status_code, response.json()) == (409, {"ok": False, "error": "exists"})


def test_customer_list_hides_shadow_customers_without_devices(sim):
    token = product_token(sim)
    create_customer(sim, "no-devices")
    owner_of(sim, WINDOW, "with-device", product=token)
    response = requests.get(f"{sim.url}/v1/products/{PRODUCT}/customers", headers=bearer(token))
    assert response.status_code == 200
    body = response.json()
    assert [(c["username"], c["devices"]) for c in body["customers"]] == [("with-device", [WINDOW])]
    assert re.match(r"^[0-9a-f]{24}$", body["customers"][0]["id"])
    assert [d["id"] for d in body["devices"]] == [WINDOW]
    assert body["meta"] == {"total_pages": 1}


def test_delete_customer_revokes_tokens_codes_and_unclaims(sim):
    product = product_token(sim)
    customer = owner_of(sim, WINDOW, "leaving", product=product)
    code = requests.post(f"{sim.url}/v1/products/{PRODUCT}/device_claims", headers=bearer(customer)).json()[
        "claim_code"
    ]
    response = requests.delete(f"{sim.url}/v1/products/{PRODUCT}/customers/LEAVING", headers=bearer(product))
    assert (response.status_code, response.json()) == (200, {"ok": True})
    assert requests.get(f"{sim.url}/v1/devices", headers=bearer(customer)).status_code == 401
    assert sim.device(WINDOW)["owner"] is None
    assert sim.device(WINDOW)["in_product"] is True
    assert sim.connect(WINDOW_2, code)["claimed"] is False
    again = token_request(sim, grant_type="client_credentials", scope="customer=leaving")
    assert again.json()["error"] == "invalid_scope"


def test_delete_customer_revokes_refresh_tokens_needs_a_product_token_and_answers_404_once_gone(sim):
    """§5.5 as account deletion relies on it: every token of the customer dies (refresh tokens
    too), a customer token can't delete anyone, and deleting again is a 404 (already gone)."""
    product = product_token(sim)
    issued = requests.post(
        f"{sim.url}/v1/products/{PRODUCT}/customers",
        data={"email": "leaving-2", "no_password": "true"},
        auth=CLIENT,
        timeout=10,
    ).json()
    url = f"{sim.url}/v1/products/{PRODUCT}/customers/leaving-2"
    refused = requests.delete(url, headers=bearer(issued["access_token"]), timeout=10)
    assert refused.status_code in (401, 403)
    assert "leaving-2" in sim.cloud.customers
    assert requests.delete(url, headers=bearer(product), timeout=10).status_code == 200
    refresh = token_request(sim, grant_type="refresh_token", refresh_token=issued["refresh_token"])
    assert refresh.status_code == 400 and refresh.json()["error"] == "invalid_grant"
    again = requests.delete(url, headers=bearer(product), timeout=10)
    assert again.status_code == 404
    # The id can be used again afterwards (a new, empty customer).
    assert create_customer(sim, "leaving-2")


# --- product devices ------------------------------------------------------------------------------------


def test_import_device(sim):
    token = product_token(sim)
    assert sim.device(WINDOW)["in_product"] is False
    assert import_device(sim, token, WINDOW) == {
        "updated": 1,
        "nonmemberDeviceIds": [],
        "invalidDeviceIds": [],
    }
    assert sim.device(WINDOW)["in_product"] is True
    assert import_device(sim, token, UNKNOWN_ID) == {
        "updated": 0,
        "nonmemberDeviceIds": [],
        "invalidDeviceIds": [UNKNOWN_ID],
    }


def test_customer_token_on_product_endpoints_is_refused(sim):
    """Pitfall: a customer token (and the id in the query string) on the product import."""
    customer = create_customer(sim, "cust")
    for method, path in (
        ("POST", "/devices"),
        ("GET", "/devices"),
        ("GET", "/customers"),
        ("GET", f"/devices/{WINDOW}"),
        ("DELETE", f"/devices/{WINDOW}/owner"),
    ):
        response = requests.request(
            method, f"{sim.url}/v1/products/{PRODUCT}{path}", params={"id": WINDOW}, headers=bearer(customer)
        )
        assert (response.status_code, response.json()) == (403, ORG_NOT_FOUND), (method, path)
    assert sim.device(WINDOW)["in_product"] is False


def test_product_paths_accept_the_slug_and_refuse_other_products(sim):
    token = product_token(sim)
    assert requests.get(f"{sim.url}/v1/products/{SLUG}/devices", headers=bearer(token)).status_code == 200
    response = requests.get(f"{sim.url}/v1/products/9999/devices", headers=bearer(token))
    assert response.status_code == 404 and response.json()["ok"] is False


def test_product_device_list_pages_filters_and_owners(sim):
    token = product_token(sim)
    for device_id in (WINDOW, WINDOW_2, OFFLINE_WINDOW, PUMP, STOPPED_PUMP):
        import_device(sim, token, device_id)
    customer = create_customer(sim, "lister")
    claim(sim, customer, PUMP)
    url = f"{sim.url}/v1/products/{PRODUCT}/devices"
    first = requests.get(url, headers=bearer(token), params={"perPage": 2}).json()
    assert first["meta"] == {"total_pages": 3}
    second = requests.get(url, headers=bearer(token), params={"per_page": 2, "page": 2}).json()
    seen = [d["id"] for d in first["devices"]] + [d["id"] for d in second["devices"]]
    assert len(set(seen)) == 4
    everything = requests.get(url, headers=bearer(token)).json()
    assert len(everything["devices"]) == 5  # only members: the slow pump was not imported
    owners = {d["id"]: d["owner"] for d in everything["devices"]}
    assert owners[PUMP] == "lister" and owners[WINDOW] is None
    assert everything["customers"] == [{"id": sim.state()["customers"][0]["id"], "username": "lister"}]
    by_name = requests.get(url, headers=bearer(token), params={"deviceName": "BEDROOM"}).json()["devices"]
    assert [d["id"] for d in by_name] == [WINDOW_2]
    by_serial = requests.get(url, headers=bearer(token), params={"serialNumber": "24B-000202"}).json()[
        "devices"
    ]
    assert [d["id"] for d in by_serial] == [STOPPED_PUMP]
    by_id = requests.get(url, headers=bearer(token), params={"deviceId": "60801"}).json()["devices"]
    assert [d["id"] for d in by_id] == [PUMP]
    assert all(d["product_id"] == 4242 for d in everything["devices"])


def test_unclaim_through_the_product_keeps_membership(sim):
    product = product_token(sim)
    customer = owner_of(sim, WINDOW, product=product)
    response = requests.delete(
        f"{sim.url}/v1/products/{PRODUCT}/devices/{WINDOW}/owner", headers=bearer(product)
    )
    assert (response.status_code, response.json()) == (200, {"ok": True})
    device = requests.get(f"{sim.url}/v1/products/{PRODUCT}/devices/{WINDOW}", headers=bearer(product)).json()
    assert device["owner"] is None and device["product_id"] == 4242
    assert requests.get(f"{sim.url}/v1/devices", headers=bearer(customer)).json() == []
    response = requests.get(f"{sim.url}/v1/devices/{WINDOW}", headers=bearer(customer))
    assert (response.status_code, response.json()) == (403, PERMISSION_DENIED)


def test_remove_from_product_answers_204_and_unclaims(sim):
    product = product_token(sim)
    customer = owner_of(sim, WINDOW, product=product)
    response = requests.delete(f"{sim.url}/v1/products/{PRODUCT}/devices/{WINDOW}", headers=bearer(product))
    assert response.status_code == 204 and response.content == b""
    assert sim.device(WINDOW)["in_product"] is False and sim.device(WINDOW)["owner"] is None
    assert requests.get(f"{sim.url}/v1/devices/{WINDOW}", headers=bearer(customer)).status_code == 403
    gone = requests.get(f"{sim.url}/v1/products/{PRODUCT}/devices/{WINDOW}", headers=bearer(product))
    assert gone.status_code == 404


def test_product_token_reads_variables_calls_functions_and_renames(sim):
    product = product_token(sim)
    import_device(sim, product, WINDOW)
    base = f"{sim.url}/v1/products/{PRODUCT}/devices/{WINDOW}"
    response = requests.get(f"{base}/target", headers=bearer(product))
    assert response.status_code == 200 and response.json()["result"] == 0
    response = requests.post(f"{base}/setPosition", data={"arg": "70"}, headers=bearer(product))
    assert response.json()["return_value"] == 1
    assert requests.get(f"{base}/target", headers=bearer(product)).json()["result"] == 70
    response = requests.put(base, data={"name": "lounge"}, headers=bearer(product))
    assert list(response.json()) == ["id", "name", "updated_at"] and response.json()["name"] == "lounge"
    # the product token does not own the device: user paths answer Permission Denied
    response = requests.get(f"{sim.url}/v1/devices/{WINDOW}", headers=bearer(product))
    assert (response.status_code, response.json()) == (403, PERMISSION_DENIED)
    assert requests.get(f"{sim.url}/v1/devices", headers=bearer(product)).json() == []


# --- claiming -------------------------------------------------------------------------------------------


def test_claim_needs_the_id_in_the_body(sim):
    """Pitfall: the id in the query string doesn't count."""
    customer = create_customer(sim, "c")
    for response in (
        requests.post(f"{sim.url}/v1/devices", headers=bearer(customer)),
        requests.post(f"{sim.url}/v1/devices", params={"id": WINDOW}, headers=bearer(customer)),
    ):
        assert (response.status_code, response.json()) == (
            400,
            {"ok": False, "errors": ["data.deviceID is empty"]},
        )


def test_claim_errors(sim):
    product = product_token(sim)
    customer = create_customer(sim, "c1")
    response = claim(sim, customer, UNKNOWN_ID)
    assert (response.status_code, response.json()) == (
        404,
        {"ok": False, "errors": ["device does not exist"]},
    )
    response = claim(sim, customer, WINDOW)  # not imported into the product (error body invented)
    assert response.status_code == 403 and response.json()["ok"] is False
    assert sim.device(WINDOW)["owner"] is None
    import_device(sim, product, WINDOW)
    assert claim(sim, customer, WINDOW).status_code == 200
    other = create_customer(sim, "c2")
    response = claim(sim, other, WINDOW)
    assert (response.status_code, response.json()) == (
        403,
        {"ok": False, "errors": ["That belongs to someone else."]},
    )
    assert sim.device(WINDOW)["owner"] == "c1"


def test_claim_success_body_idempotent_and_offline(sim):
    product = product_token(sim)
    import_device(sim, product, OFFLINE_WINDOW)
    customer = create_customer(sim, "claimer")
    response = requests.post(f"{sim.url}/v1/devices", json={"id": OFFLINE_WINDOW}, headers=bearer(customer))
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["customer_id", "product_id", "updated_at", "id", "connected", "ok"]
    assert body["customer_id"] == sim.state()["customers"][0]["id"]
    assert body["product_id"] == 4242 and body["id"] == OFFLINE_WINDOW
    assert body["connected"] is False and body["ok"] is True
    assert ISO_MS.match(body["updated_at"])
    again = claim(sim, customer, OFFLINE_WINDOW)
    assert again.status_code == 200 and again.json()["ok"] is True
    assert sim.device(OFFLINE_WINDOW)["owner"] == "claimer"


def test_device_ids_are_not_case_folded(sim):
    """Pitfall: ids read from SoftAP/USB are uppercase; the cloud wants lowercase."""
    customer = owner_of(sim, WINDOW)
    response = claim(sim, customer, WINDOW.upper())
    assert (response.status_code, response.json()) == (
        404,
        {"ok": False, "errors": ["device does not exist"]},
    )
    response = requests.get(f"{sim.url}/v1/devices/{WINDOW.upper()}", headers=bearer(customer))
    assert (response.status_code, response.json()) == (403, PERMISSION_DENIED)


def test_there_is_no_product_claim_route(sim):
    """Pitfall: POST /v1/products/:p/devices/:id/claim is just a call of a function "claim"."""
    product = product_token(sim)
    import_device(sim, product, WINDOW)
    response = requests.post(
        f"{sim.url}/v1/products/{PRODUCT}/devices/{WINDOW}/claim", headers=bearer(product)
    )
    assert (response.status_code, response.json()) == (
        404,
        {"ok": False, "error": "Function claim not found"},
    )
    assert sim.device(WINDOW)["owner"] is None


def test_twenty_concurrent_claims_have_exactly_one_winner(sim):
    import_device(sim, product_token(sim), WINDOW)
    tokens = [create_customer(sim, f"racer-{n}") for n in range(20)]
    barrier = threading.Barrier(20)

    def attempt(token):
        barrier.wait()
        return claim(sim, token, WINDOW)

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(attempt, tokens))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [403] * 19
    winner = tokens[[r.status_code for r in responses].index(200)]
    owner = sim.device(WINDOW)["owner"]
    assert owner == f"racer-{tokens.index(winner)}"


def test_claim_codes(sim):
    customer = owner_of(sim, WINDOW, "coder")
    response = requests.post(f"{sim.url}/v1/products/{PRODUCT}/device_claims", headers=bearer(customer))
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["claim_code", "device_ids"]
    assert re.match(r"^[A-Za-z0-9+/]{63}$", body["claim_code"])
    assert body["device_ids"] == [WINDOW]
    # the device presents the code when it connects: claimed to the customer, joins the product
    sim.set_device(WINDOW_2, online=False)
    result = sim.connect(WINDOW_2, body["claim_code"])
    assert result["claimed"] is True and result["owner"] == "coder"
    assert sim.device(WINDOW_2)["in_product"] is True and sim.device(WINDOW_2)["online"] is True
    listed = requests.get(f"{sim.url}/v1/devices", headers=bearer(customer)).json()
    assert sorted(d["id"] for d in listed) == [WINDOW, WINDOW_2]
    # codes are single use; a product token cannot make one
    assert sim.connect(PUMP, body["claim_code"])["claimed"] is False
    response = requests.post(
        f"{sim.url}/v1/products/{PRODUCT}/device_claims", headers=bearer(product_token(sim))
    )
    assert response.status_code == 403


def test_expired_claim_code_does_not_claim(sim):
    customer = create_customer(sim, "late")
    code = requests.post(f"{sim.url}/v1/products/{PRODUCT}/device_claims", headers=bearer(customer)).json()[
        "claim_code"
    ]
    with sim.cloud.lock:
        sim.cloud.claim_codes[code]["expires_at"] = time.time() - 1
    response = requests.post(f"{sim.url}/_sim/devices/{WINDOW}/connect", json={"claim_code": code})
    assert response.status_code == 200 and response.json()["claimed"] is False
    assert sim.device(WINDOW)["owner"] is None


# --- user device paths ------------------------------------------------------------------------------------


def test_devices_you_dont_own_look_like_devices_that_dont_exist(sim):
    product = product_token(sim)
    owner_of(sim, WINDOW, "owner", product=product)
    stranger = create_customer(sim, "stranger")
    for method, suffix in (
        ("GET", ""),
        ("PUT", ""),
        ("DELETE", ""),
        ("GET", "/position"),
        ("POST", "/open"),
        ("GET", "/events"),
        ("PUT", "/ping"),
    ):
        for device_id in (WINDOW, UNKNOWN_ID, "living_room_blind"):
            response = requests.request(
                method,
                f"{sim.url}/v1/devices/{device_id}{suffix}",
                headers=bearer(stranger),
                data={"name": "x"},
                timeout=10,
            )
            assert (response.status_code, response.json()) == (403, PERMISSION_DENIED), (
                method,
                suffix,
                device_id,
            )
    # a query-string token shows up in the info instead of "undefined"
    response = requests.get(f"{sim.url}/v1/devices/{WINDOW}", params={"access_token": stranger})
    assert response.status_code == 403
    assert response.json()["info"].endswith(f"access_token={stranger}")
    assert sim.device(WINDOW)["owner"] == "owner"


def test_device_json(sim):
    token = owner_of(sim, WINDOW)
    body = requests.get(f"{sim.url}/v1/devices/{WINDOW}", headers=bearer(token)).json()
    assert body["id"] == WINDOW and body["name"] == "living_room_blind"
    assert body["online"] is True and body["connected"] is True
    assert body["product_id"] == 4242 and body["platform_id"] == 12
    assert body["owner"] == "owner-1"
    assert body["serial_number"] == "SSW-24A-000101"
    assert body["variables"] == {
        "position": "int32",
        "target": "int32",
        "moving": "bool",
        "battery_v": "double",
        "fw_version": "string",
    }
    assert body["functions"] == ["open", "close", "setPosition", "stop"]
    assert ISO_MS.match(body["last_heard"]) and ISO_MS.match(body["last_handshake_at"])
    by_name = requests.get(f"{sim.url}/v1/devices/living_room_blind", headers=bearer(token)).json()
    assert by_name["id"] == WINDOW
    sim.set_device(WINDOW, online=False)
    offline = requests.get(f"{sim.url}/v1/devices/{WINDOW}", headers=bearer(token)).json()
    assert offline["online"] is False and offline["variables"] is None and offline["functions"] is None


def test_unimported_device_uses_its_platform_as_product_id(sim):
    product = product_token(sim)
    import_device(sim, product, WINDOW)
    sim.set_device(WINDOW, owner="direct")  # control-API extension: set the owner
    with sim.cloud.lock:
        sim.cloud.devices[WINDOW].in_product = False
    token = token_request(sim, grant_type="client_credentials", scope="customer=direct").json()[
        "access_token"
    ]
    assert requests.get(f"{sim.url}/v1/devices/{WINDOW}", headers=bearer(token)).json()["product_id"] == 12


def test_rename_and_release(sim):
    token = owner_of(sim, WINDOW)
    response = requests.put(
        f"{sim.url}/v1/devices/{WINDOW}", json={"name": "study_blind"}, headers=bearer(token)
    )
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["id", "name", "updated_at"]
    assert body["id"] == WINDOW and body["name"] == "study_blind" and ISO_MS.match(body["updated_at"])
    response = requests.delete(f"{sim.url}/v1/devices/{WINDOW}", headers=bearer(token))
    assert (response.status_code, response.json()) == (200, {"ok": True})
    assert sim.device(WINDOW)["owner"] is None and sim.device(WINDOW)["in_product"] is True
    assert requests.get(f"{sim.url}/v1/devices/{WINDOW}", headers=bearer(token)).status_code == 403


def test_ping(sim):
    token = owner_of(sim, WINDOW)
    response = requests.put(f"{sim.url}/v1/devices/{WINDOW}/ping", headers=bearer(token))
    assert response.json() == {"online": True, "ok": True}


# --- variables and functions ------------------------------------------------------------------------------


def test_variable_bodies_are_typed_with_core_info(sim):
    window = owner_of(sim, WINDOW, "w")
    pump = owner_of(sim, PUMP, "p")
    body = get_var(sim, window, WINDOW, "position").json()
    assert list(body) == ["cmd", "name", "result", "coreInfo"]
    assert body["cmd"] == "VarReturn" and body["name"] == "position" and body["result"] == 0
    assert set(body["coreInfo"]) == {
        "name",
        "deviceID",
        "connected",
        "last_handshake_at",
        "last_heard",
        "last_app",
        "product_id",
    }
    assert body["coreInfo"]["deviceID"] == WINDOW and body["coreInfo"]["product_id"] == 4242
    assert get_var(sim, window, WINDOW, "moving").json()["result"] is False
    assert isinstance(get_var(sim, window, WINDOW, "battery_v").json()["result"], float)
    assert isinstance(get_var(sim, window, WINDOW, "fw_version").json()["result"], str)
    assert get_var(sim, pump, PUMP, "running").json()["result"] is True
    assert isinstance(get_var(sim, pump, PUMP, "pressure_kpa").json()["result"], float)
    assert get_var(sim, pump, PUMP, "fault").json()["result"] == ""
    raw = get_var(sim, window, WINDOW, "moving", format="raw")
    assert raw.text == "false" and raw.headers["Content-Type"].startswith("text/plain")
    assert get_var(sim, window, WINDOW, "position", format="raw").text == "0"


def test_unknown_variable_and_function(sim):
    token = owner_of(sim, WINDOW)
    response = get_var(sim, token, WINDOW, "nope")
    assert (response.status_code, response.json()) == (404, {"ok": False, "error": "Unknown Variable: nope"})
    response = call(sim, token, WINDOW, "nope", "1")
    assert (response.status_code, response.json()) == (404, {"ok": False, "error": "Function nope not found"})
    sim.configure(legacy_errors=True)
    response = get_var(sim, token, WINDOW, "nope")
    assert (response.status_code, response.json()) == (404, {"ok": False, "error": "Variable not found"})


def test_offline_device_times_out_at_once(sim):
    token = owner_of(sim, OFFLINE_WINDOW)
    response = get_var(sim, token, OFFLINE_WINDOW, "position")
    assert (response.status_code, response.json()) == (408, {"ok": False, "error": "timed out"})
    response = call(sim, token, OFFLINE_WINDOW, "open", "")
    assert (response.status_code, response.json()) == (408, {"ok": False, "error": "timed out"})
    sim.configure(legacy_errors=True)
    response = get_var(sim, token, OFFLINE_WINDOW, "position")
    assert (response.status_code, response.json()) == (408, {"error": "Timed out."})
    response = call(sim, token, OFFLINE_WINDOW, "open", "")
    assert (response.status_code, response.json()) == (400, {"ok": False, "error": "Timed out."})


def test_hung_device_times_out_after_the_cloud_timeout(sim):
    token = owner_of(sim, WINDOW)
    sim.configure(cloud_timeout=0.3)
    sim.set_device(WINDOW, hung=True)
    response = get_var(sim, token, WINDOW, "position")
    assert (response.status_code, response.json()) == (408, {"ok": False, "error": "timed out"})
    assert call(sim, token, WINDOW, "open", "").status_code == 408
    assert sim.device(WINDOW)["variables"]["target"] == 0  # the call never reached the device
    sim.set_device(WINDOW, hung=False)
    assert get_var(sim, token, WINDOW, "position").status_code == 200


def test_slow_device_answers_after_its_latency(sim):
    token = owner_of(sim, SLOW_PUMP)
    sim.set_device(SLOW_PUMP, latency=0.3)
    response = get_var(sim, token, SLOW_PUMP, "running")
    assert (response.status_code, response.json()["result"]) == (200, False)


def test_function_body_and_argument_fields(sim):
    token = owner_of(sim, WINDOW)
    response = call(sim, token, WINDOW, "setPosition", "20")
    assert response.json() == {"id": WINDOW, "last_app": "", "connected": True, "return_value": 1}
    assert call(sim, token, WINDOW, "setPosition", args="30").json()["return_value"] == 1
    assert sim.device(WINDOW)["variables"]["target"] == 30
    response = requests.post(
        f"{sim.url}/v1/devices/{WINDOW}/setPosition", json={"params": "40"}, headers=bearer(token)
    )
    assert response.json()["return_value"] == 1
    assert sim.device(WINDOW)["variables"]["target"] == 40
    for bad in ("abc", "101", "-1", "", "50.5"):
        assert call(sim, token, WINDOW, "setPosition", bad).json()["return_value"] == -1, bad
    # the argument belongs in the body: in the query string it doesn't count
    response = requests.post(
        f"{sim.url}/v1/devices/{WINDOW}/setPosition", params={"arg": "60"}, headers=bearer(token)
    )
    assert response.json()["return_value"] == -1
    raw = call(sim, token, WINDOW, "setPosition", "10", format="raw")
    assert raw.text == "1"


def test_window_moves_toward_its_target_over_time(sim):
    token = owner_of(sim, WINDOW)
    assert call(sim, token, WINDOW, "setPosition", "30").json()["return_value"] == 1
    assert get_var(sim, token, WINDOW, "target").json()["result"] == 30
    assert get_var(sim, token, WINDOW, "moving").json()["result"] is True
    positions = []

    def arrived():
        position = get_var(sim, token, WINDOW, "position").json()["result"]
        positions.append(position)
        return position == 30

    wait_until(arrived)
    assert positions == sorted(positions) and len(set(positions)) > 1
    assert get_var(sim, token, WINDOW, "moving").json()["result"] is False
    call(sim, token, WINDOW, "open")
    wait_until(lambda: get_var(sim, token, WINDOW, "position").json()["result"] > 35)
    assert call(sim, token, WINDOW, "stop").json()["return_value"] == 1
    stopped_at = get_var(sim, token, WINDOW, "target").json()["result"]
    assert 35 <= stopped_at < 100
    assert get_var(sim, token, WINDOW, "moving").json()["result"] is False
    assert get_var(sim, token, WINDOW, "position").json()["result"] == stopped_at


def test_pump_pressure_rises_while_running_and_decays_when_stopped(sim):
    token = owner_of(sim, STOPPED_PUMP)
    assert get_var(sim, token, STOPPED_PUMP, "running").json()["result"] is False
    assert get_var(sim, token, STOPPED_PUMP, "pressure_kpa").json()["result"] == 0
    for bad in ("49", "401", "abc", ""):
        assert call(sim, token, STOPPED_PUMP, "setPressure", bad).json()["return_value"] == -1, bad
    assert call(sim, token, STOPPED_PUMP, "setPressure", "200").json()["return_value"] == 1
    runtime = get_var(sim, token, STOPPED_PUMP, "runtime_h").json()["result"]
    assert call(sim, token, STOPPED_PUMP, "start").json()["return_value"] == 1
    assert get_var(sim, token, STOPPED_PUMP, "running").json()["result"] is True
    wait_until(lambda: get_var(sim, token, STOPPED_PUMP, "pressure_kpa").json()["result"] > 60)
    assert get_var(sim, token, STOPPED_PUMP, "flow_lpm").json()["result"] > 0
    wait_until(lambda: get_var(sim, token, STOPPED_PUMP, "runtime_h").json()["result"] > runtime)
    call(sim, token, STOPPED_PUMP, "stop")
    peak = get_var(sim, token, STOPPED_PUMP, "pressure_kpa").json()["result"]
    wait_until(lambda: get_var(sim, token, STOPPED_PUMP, "pressure_kpa").json()["result"] < peak * 0.9)
    assert get_var(sim, token, STOPPED_PUMP, "running").json()["result"] is False


def test_pump_overpressure_fault_latches_until_stop(sim):
    token = owner_of(sim, PUMP)
    assert call(sim, token, PUMP, "setPressure", "400").json()["return_value"] == 1
    wait_until(lambda: get_var(sim, token, PUMP, "fault").json()["result"] == "overpressure", timeout=15)
    assert get_var(sim, token, PUMP, "running").json()["result"] is False
    assert call(sim, token, PUMP, "start").json()["return_value"] == -2
    assert call(sim, token, PUMP, "stop").json()["return_value"] == 1
    assert get_var(sim, token, PUMP, "fault").json()["result"] == ""


def test_concurrent_reads_all_answer(sim):
    token = owner_of(sim, PUMP)
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda _: get_var(sim, token, PUMP, "pressure_kpa"), range(48)))
    assert all(r.status_code == 200 for r in responses)
    assert sim.counters()["routes"]["GET /v1/devices/:id/:name"] == 48


# --- events -------------------------------------------------------------------------------------------------


def test_event_stream_frames(sim):
    token = owner_of(sim, WINDOW)
    stream = Stream(f"{sim.url}/v1/devices/events", bearer(token))
    try:
        assert stream.response.status_code == 200
        assert stream.response.headers["Content-Type"].startswith("text/event-stream")
        assert stream.frame() == ":ok"
        sim.publish(WINDOW, "hello", "world")
        name, data = stream.event()
        assert name == "hello"
        assert list(data) == ["data", "ttl", "published_at", "coreid"]
        assert data["data"] == "world" and data["coreid"] == WINDOW and ISO_MS.match(data["published_at"])
        sim.set_device(WINDOW, online=False)
        name, data = stream.event()
        assert (name, data["data"], data["coreid"]) == ("spark/status", "offline", WINDOW)
    finally:
        stream.close()


def test_status_events_and_prefix_filter(sim):
    token = owner_of(sim, WINDOW)
    stream = Stream(f"{sim.url}/v1/devices/events/spark", bearer(token))
    try:
        stream.frame()
        sim.publish(WINDOW, "other", "ignored by the prefix")
        sim.set_device(WINDOW, online=False)
        sim.set_device(WINDOW, online=True)
        first, second = stream.event(), stream.event()
        assert (first[0], first[1]["data"]) == ("spark/status", "offline")
        assert (second[0], second[1]["data"]) == ("spark/status", "online")
    finally:
        stream.close()


def test_streams_are_isolated_between_customers(sim):
    product = product_token(sim)
    alice = owner_of(sim, WINDOW, "alice", product=product)
    owner_of(sim, WINDOW_2, "bob", product=product)
    stream = Stream(f"{sim.url}/v1/devices/events", bearer(alice))
    try:
        stream.frame()
        sim.publish(WINDOW_2, "secret", "bob's")
        sim.publish(WINDOW, "mine", "alice's")
        name, data = stream.event()
        assert (name, data["coreid"]) == ("mine", WINDOW)
    finally:
        stream.close()
    response = requests.get(f"{sim.url}/v1/devices/{WINDOW_2}/events", headers=bearer(alice), timeout=5)
    assert (response.status_code, response.json()) == (403, PERMISSION_DENIED)


def test_device_stream_and_window_position_events(sim):
    token = owner_of(sim, WINDOW)
    stream = Stream(f"{sim.url}/v1/devices/{WINDOW}/events/position", bearer(token))
    try:
        stream.frame()
        call(sim, token, WINDOW, "setPosition", "20")
        seen = []
        while not seen or seen[-1] != "20":
            name, data = stream.event()
            assert name == "position"
            seen.append(data["data"])
        assert [int(p) for p in seen] == sorted(int(p) for p in seen)
    finally:
        stream.close()


def test_product_stream_and_pump_fault_event(sim):
    product = product_token(sim)
    import_device(sim, product, PUMP)
    stream = Stream(f"{sim.url}/v1/products/{PRODUCT}/events/fault", bearer(product))
    try:
        stream.frame()
        sim.publish(WINDOW, "fault", "not a product device")
        sim.set_device(PUMP, fault="dry_run")
        name, data = stream.event()
        assert (name, data["data"], data["coreid"]) == ("fault", "dry_run", PUMP)
    finally:
        stream.close()
    customer = create_customer(sim, "c")
    response = requests.get(f"{sim.url}/v1/products/{PRODUCT}/events", headers=bearer(customer), timeout=5)
    assert (response.status_code, response.json()) == (403, ORG_NOT_FOUND)


def test_stream_keep_alive(sim):
    token = owner_of(sim, WINDOW)
    sim.configure(sse_keepalive=0.2)
    stream = Stream(f"{sim.url}/v1/devices/events", bearer(token))
    try:
        assert stream.frame() == ":ok"
        assert stream.frame() == ":ok"  # nothing was published: this one is a keep-alive
    finally:
        stream.close()


def test_open_streams_do_not_block_shutdown():
    server = SimulatorServer(port=0).start()
    token = requests.post(
        f"{server.url}/oauth/token", data={"grant_type": "client_credentials"}, auth=CLIENT
    ).json()["access_token"]
    stream = Stream(f"{server.url}/v1/devices/events", bearer(token), timeout=30)
    assert stream.frame() == ":ok"
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    stopper.join(timeout=10)
    assert not stopper.is_alive()
    with pytest.raises(Exception):
        while True:  # the stream ends instead of hanging
            stream.frame()
    stream.close()


# --- rate limits -----------------------------------------------------------------------------------------------


def test_general_rate_limit(sim):
    token = product_token(sim)
    sim.configure(rate_limit={"requests": 3, "window": 60})
    for _ in range(3):
        assert requests.get(f"{sim.url}/v1/devices", headers=bearer(token)).status_code == 200
    response = requests.get(f"{sim.url}/v1/devices", headers=bearer(token))
    assert (response.status_code, response.json()) == (429, {"ok": False, "error": "Too many requests"})
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    response = token_request(sim, grant_type="client_credentials")
    assert response.status_code == 429 and response.json()["error"] == "rate_limit_exceeded"
    assert requests.get(f"{sim.url}/_sim/state").status_code == 200  # the control API is not limited


def test_token_rate_limit(sim):
    sim.configure(token_rate_limit={"requests": 2, "window": 60})
    assert token_request(sim, grant_type="client_credentials").status_code == 200
    assert token_request(sim, grant_type="client_credentials").status_code == 200
    response = token_request(sim, grant_type="client_credentials")
    assert response.status_code == 429
    assert response.json() == {"error": "rate_limit_exceeded", "error_description": "Too many requests"}
    assert int(response.headers["Retry-After"]) >= 1
    # the token limit is separate from the general one
    assert requests.get(f"{sim.url}/v1/devices", headers=bearer("f" * 40)).status_code == 401


def test_token_lockout_after_consecutive_failures(sim):
    sim.configure(token_lockout={"failures": 3, "seconds": 60})
    bad = (CLIENT[0], "0" * 40)
    # a success resets the count
    for _ in range(2):
        assert token_request(sim, auth=bad, grant_type="client_credentials").status_code == 400
    assert token_request(sim, grant_type="client_credentials").status_code == 200
    for _ in range(2):
        assert token_request(sim, auth=bad, grant_type="client_credentials").status_code == 400
    assert token_request(sim, grant_type="client_credentials").status_code == 200
    # three in a row lock the address out, even for good credentials
    for _ in range(3):
        assert token_request(sim, auth=bad, grant_type="client_credentials").status_code == 400
    response = token_request(sim, grant_type="client_credentials")
    assert response.status_code == 429
    assert response.json()["error"] == "rate_limit_exceeded"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    # other routes are not locked
    assert requests.get(f"{sim.url}/v1/devices").status_code == 400


# --- faults ------------------------------------------------------------------------------------------------------


def test_faults_answer_the_next_matching_requests(sim):
    token = owner_of(sim, WINDOW)
    sim.add_fault(
        "GET",
        "/v1/devices/*",
        count=2,
        status=503,
        body={"ok": False, "error": "down"},
        headers={"X-Sim": "fault"},
    )
    assert call(sim, token, WINDOW, "stop").status_code == 200  # POST doesn't match
    for _ in range(2):
        response = get_var(sim, token, WINDOW, "position")
        assert (response.status_code, response.json()) == (503, {"ok": False, "error": "down"})
        assert response.headers["X-Sim"] == "fault"
    assert get_var(sim, token, WINDOW, "position").status_code == 200
    assert sim.state()["faults"] == []


def test_fault_variants_over_http(sim):
    token = product_token(sim)
    response = requests.post(
        f"{sim.url}/_sim/faults",
        json={"method": "GET", "path": "/v1/devices", "status": 429, "headers": {"Retry-After": "7"}},
    )
    assert response.status_code == 201
    response = requests.get(f"{sim.url}/v1/devices", headers=bearer(token))
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    requests.post(
        f"{sim.url}/_sim/faults",
        json={"method": "GET", "path": "/v1/devices", "status": 502, "body": "<html>Bad Gateway</html>"},
    )
    response = requests.get(f"{sim.url}/v1/devices", headers=bearer(token))
    assert response.status_code == 502 and response.text == "<html>Bad Gateway</html>"
    requests.post(f"{sim.url}/_sim/faults", json={"method": "GET", "path": "/v1/devices", "latency": 0.2})
    response = requests.get(f"{sim.url}/v1/devices", headers=bearer(token))
    assert response.status_code == 200  # latency without status only delays
    requests.post(f"{sim.url}/_sim/faults", json={"path": "/v1/*", "count": 5})
    assert requests.delete(f"{sim.url}/_sim/faults").json() == {"ok": True}
    assert requests.get(f"{sim.url}/v1/devices", headers=bearer(token)).status_code == 200
    bad = requests.post(f"{sim.url}/_sim/faults", json={"method": "GET"})
    assert bad.status_code == 400


def test_fault_on_the_token_endpoint(sim):
    sim.add_fault("POST", "/oauth/token", status=500)
    response = token_request(sim, grant_type="client_credentials")
    assert response.status_code == 500
    assert token_request(sim, grant_type="client_credentials").status_code == 200


# --- counters ------------------------------------------------------------------------------------------------------


def test_counters_by_route_template(sim):
    token = owner_of(sim, WINDOW)
    sim.reset_counters()
    get_var(sim, token, WINDOW, "position")
    get_var(sim, token, WINDOW, "target")
    call(sim, token, WINDOW, "stop")
    requests.get(f"{sim.url}/v1/devices", headers=bearer(token))
    requests.get(f"{sim.url}/v1/nowhere/at/all/really", headers=bearer(token))
    requests.get(f"{sim.url}/_sim/state")
    token_request(sim, grant_type="client_credentials")
    counters = requests.get(f"{sim.url}/_sim/counters").json()
    assert counters["routes"]["GET /v1/devices/:id/:name"] == 2
    assert counters["routes"]["POST /v1/devices/:id/:name"] == 1
    assert counters["routes"]["GET /v1/devices"] == 1
    assert counters["routes"]["POST /oauth/token"] == 1
    assert counters["total"] == 6
    assert not any("_sim" in key for key in counters["routes"])
    assert requests.post(f"{sim.url}/_sim/counters/reset").json() == {"ok": True}
    assert sim.counters() == {"routes": {}, "total": 0}


def test_counters_include_faulted_and_limited_requests(sim):
    sim.add_fault("GET", "/v1/devices", status=503)
    requests.get(f"{sim.url}/v1/devices")
    sim.configure(rate_limit={"requests": 1, "window": 60})
    requests.get(f"{sim.url}/v1/devices")
    requests.get(f"{sim.url}/v1/devices")
    assert sim.counters()["routes"] == {"GET /v1/devices": 3}


# --- control API ---------------------------------------------------------------------------------------------------


def test_control_state_and_device_settings_over_http(sim):
    state = requests.get(f"{sim.url}/_sim/state").json()
    assert state["product"] == {"id": 4242, "slug": SLUG, "platform_id": 12}
    assert len(state["devices"]) >= 6
    models = {d["model"] for d in state["devices"]}
    assert models == {"window", "pump"}
    assert any(not d["online"] for d in state["devices"]) and any(d["latency"] >= 2 for d in state["devices"])
    device = next(d for d in state["devices"] if d["id"] == WINDOW)
    assert set(device) >= {
        "id",
        "serial_number",
        "setup_code",
        "model",
        "in_product",
        "owner",
        "online",
        "latency",
        "hung",
        "variables",
    }
    response = requests.post(
        f"{sim.url}/_sim/devices/{WINDOW}", json={"online": False, "latency": 1.5, "hung": True}
    )
    assert response.status_code == 200
    assert (response.json()["online"], response.json()["latency"], response.json()["hung"]) == (
        False,
        1.5,
        True,
    )
    assert requests.post(f"{sim.url}/_sim/devices/{UNKNOWN_ID}", json={"online": False}).status_code == 404
    assert requests.post(f"{sim.url}/_sim/devices/{WINDOW}", json={"colour": "red"}).status_code == 400
    assert requests.post(f"{sim.url}/_sim/config", json={"nonsense": 1}).status_code == 400
    assert requests.post(f"{sim.url}/_sim/reset").json() == {"ok": True}
    assert sim.device(WINDOW)["online"] is True and sim.device(WINDOW)["hung"] is False


def test_reset_forgets_customers_tokens_faults_and_config(sim):
    token = owner_of(sim, WINDOW)
    sim.add_fault("GET", "/v1/*", count=None, status=500)
    sim.configure(legacy_errors=True, cloud_timeout=0.5)
    sim.reset()
    state = sim.state()
    assert state["customers"] == [] and state["faults"] == []
    assert state["config"]["legacy_errors"] is False and state["config"]["cloud_timeout"] == 30
    assert sim.device(WINDOW)["owner"] is None and sim.device(WINDOW)["in_product"] is False
    assert sim.counters() == {"routes": {}, "total": 0}
    assert requests.get(f"{sim.url}/v1/devices", headers=bearer(token)).status_code == 401


def test_devices_can_be_added_at_runtime(sim):
    response = requests.post(
        f"{sim.url}/_sim/devices",
        json={
            "id": "aa00000000000000000000ff",
            "serial_number": "SSW-NEW-1",
            "setup_code": "ABCD2345",
            "platform_id": 12,
            "model": "pump",
            "name": "new_pump",
            "online": True,
            "latency": 0,
            "in_product": True,
        },
    )
    assert response.status_code == 201 and response.json()["in_product"] is True
    assert (
        requests.post(f"{sim.url}/_sim/devices", json={"id": "aa00000000000000000000ff"}).status_code == 400
    )
    assert requests.post(f"{sim.url}/_sim/devices", json={"id": "not-hex"}).status_code == 400
    for n in range(60):
        sim.add_device(f"bb{n:022x}", model="window", serial_number=f"BULK-{n:04d}")
    token = product_token(sim)
    for n in range(60):
        import_device(sim, token, f"bb{n:022x}")
    listing = requests.get(
        f"{sim.url}/v1/products/{PRODUCT}/devices",
        headers=bearer(token),
        params={"serialNumber": "BULK-", "perPage": 25},
    ).json()
    assert listing["meta"] == {"total_pages": 3} and len(listing["devices"]) == 25


def test_control_publish_over_http(sim):
    token = owner_of(sim, PUMP)
    stream = Stream(f"{sim.url}/v1/devices/events", bearer(token))
    try:
        stream.frame()
        response = requests.post(f"{sim.url}/_sim/devices/{PUMP}/events", json={"name": "note", "data": "hi"})
        assert response.json() == {"ok": True}
        name, data = stream.event()
        assert (name, data["data"]) == ("note", "hi")
    finally:
        stream.close()


def test_standalone_server_prints_what_a_person_needs():
    env = {
        **os.environ,
        "SELFSERVE_PARTICLE_PRODUCT": "",
        "SELFSERVE_PARTICLE_CLIENT_ID": "",
        "SELFSERVE_PARTICLE_CLIENT_SECRET": "",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "selfserve.simulator.server", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    try:
        lines = []
        while len(lines) < 13:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        url = re.search(r"http://127\.0\.0\.1:\d+", text).group(0)
        assert "4242" in text and CLIENT[0] in text and CLIENT[1] in text
        assert "SSW-24A-000101" in text and "7KQ2M9XD" in text and "window" in text and "pump" in text
        assert requests.get(f"{url}/_sim/state", timeout=5).json()["product"]["id"] == 4242
        token = requests.post(
            f"{url}/oauth/token", data={"grant_type": "client_credentials"}, auth=CLIENT, timeout=5
        )
        assert token.status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=10)
