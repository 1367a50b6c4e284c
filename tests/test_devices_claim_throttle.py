"""Issue 9, finding 5: claims with the RIGHT code were never throttled (16 threads of one
account made 92 claims of an owned device in 20 s: 92 Argon2 checks, 92 proof rows). Claims
are limited per account and per serial, right or wrong, before any of that work."""

import pytest
from helpers import csrf_token
from helpers import login
from helpers import make_user
from helpers import seed_registry

from selfserve.models import Device
from selfserve.models import PossessionProof
from selfserve.services import devices

PASSWORD = "correct horse battery"
WINDOW = "e00fce68a1b2c3d4e5f60701"
PUMP = "e00fce68a1b2c3d4e5f60801"


@pytest.fixture
def app_config(app_config):
    app_config["RATE_LIMIT_CLAIM"] = "4 per minute"
    app_config["RATE_LIMIT_CLAIM_SERIAL"] = "6 per minute"
    return app_config


@pytest.fixture
def labels(app, sim):
    return {device["id"]: device for device in seed_registry()}


def _claim(client, label, token):
    return client.post(
        "/devices/claim",
        data={"serial": label["serial_number"], "setup_code": label["setup_code"], "csrf_token": token},
    )


def test_right_code_claims_of_an_owned_device_are_limited_per_account(app, labels):
    owner = make_user("owner@example.com", PASSWORD)
    devices.claim(owner, labels[WINDOW]["serial_number"], labels[WINDOW]["setup_code"])
    asker = make_user("asker@example.com", PASSWORD)
    client = app.test_client()
    login(client, asker.email, PASSWORD)
    token = csrf_token(client, "/devices/claim")
    statuses = [_claim(client, labels[WINDOW], token).status_code for _ in range(6)]
    assert statuses[:4] == [409] * 4  # owned by someone else: "ask the owner"
    assert statuses[4:] == [429, 429]
    proofs = PossessionProof.select().count()
    assert 1 <= proofs <= 4  # none for the refused ones
    # The limit is the account's: another device is refused too, until the window passes.
    assert _claim(client, labels[PUMP], token).status_code == 429
    assert Device.get_by_id(PUMP).owner_id is None


def test_claims_of_one_serial_are_limited_across_accounts_right_or_wrong(app, labels):
    owner = make_user("owner@example.com", PASSWORD)
    devices.claim(owner, labels[WINDOW]["serial_number"], labels[WINDOW]["setup_code"])
    wrong = {**labels[WINDOW], "setup_code": "WRONGCODE"}
    statuses = []
    for n in range(4):
        client = app.test_client()
        user = make_user(f"asker{n}@example.com", PASSWORD)
        login(client, user.email, PASSWORD)
        token = csrf_token(client, "/devices/claim")
        statuses.append(_claim(client, labels[WINDOW], token).status_code)
        statuses.append(_claim(client, wrong, token).status_code)
    assert statuses[:6] == [409, 422] * 3
    assert statuses[6:] == [429, 429]
    # Spaces and case in the typed serial don't make it another serial.
    client = app.test_client()
    login(client, make_user("spaces@example.com", PASSWORD).email, PASSWORD)
    spaced = {**labels[WINDOW], "serial_number": " " + labels[WINDOW]["serial_number"].lower() + " "}
    assert _claim(client, spaced, csrf_token(client, "/devices/claim")).status_code == 429
