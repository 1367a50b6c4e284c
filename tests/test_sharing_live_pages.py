"""Access that ends ends the live pages of the person who had it (issue 10/11): a revoke, an
expiry, a release, removal from the organisation, or the device leaving the group, and the
open server-sent-events stream stops sending the device's values at once and says that access
ended. The streams here tick only every minute: only the announcement can end them sooner."""

import datetime
import json
import threading
import time

import pytest
from helpers import csrf_token
from helpers import make_user
from helpers import seed_registry
from helpers import signed_in

from selfserve import models
from selfserve.models import Device
from selfserve.models import Grant
from selfserve.models import utcnow
from selfserve.services import access
from selfserve.services import device_events
from selfserve.services import devices
from selfserve.services import organisations

PASSWORD = "correct horse battery"
WINDOW = "e00fce68a1b2c3d4e5f60701"
PUMP = "e00fce68a1b2c3d4e5f60801"


@pytest.fixture
def app_config(app_config):
    app_config["VALUES_POLL_SECONDS"] = 60  # no periodic re-check during the test
    app_config["PUSH_STREAM_MAX_SECONDS"] = 20.0  # a stream the announcement missed ends here
    return app_config


@pytest.fixture
def world(app, sim, mailbox):
    labels = {device["id"]: device for device in seed_registry()}
    owner = make_user("owner@example.com", PASSWORD)
    devices.claim(owner, labels[WINDOW]["serial_number"], labels[WINDOW]["setup_code"])
    admin = make_user("admin@company.example", PASSWORD)
    org = organisations.create(admin, "Pumps Inc")
    organisations.claim(admin, org, labels[PUMP]["serial_number"], labels[PUMP]["setup_code"])
    site = organisations.create_group(admin, org, "Site A")
    organisations.add_to_group(admin, org, site, [PUMP])
    viewer = make_user("viewer@example.com", PASSWORD, provisioned=False)
    grant = access.give(devices.device_for(owner, WINDOW), viewer, "viewer", owner)
    organisations.add_member(admin, org, viewer.email)
    organisations.grant_group(admin, org, site, "viewer", email=viewer.email)
    Device.update(claimed_at=utcnow() - datetime.timedelta(hours=1)).execute()
    # Recent values: the pages are served from the cache.
    state = {"v": 1, "hb": 120, "position": 5, "target": 5, "moving": False}
    now = utcnow().strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert device_events.ingest("selfserve/state", json.dumps(state), WINDOW, now) == "stored"
    return {"owner": owner, "viewer": viewer, "grant": grant, "admin": admin, "org": org, "site": site}


def frames_until_gone(response, act):
    """Read the stream; once its first values arrived, `act` runs in another thread (as another
    request would). Returns the (event, data) read and how long after `act` the stream ended."""
    events, buffer, acted = [], "", None
    for chunk in response.response:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            lines = [line for line in block.split("\n") if line and not line.startswith(":")]
            name = next((line[7:] for line in lines if line.startswith("event: ")), None)
            if name is not None:
                events.append((name, "\n".join(line[6:] for line in lines if line.startswith("data: "))))
        if acted is None and any(name in ("values", "summary-" + WINDOW) for name, _ in events):
            acted = threading.Thread(target=act)
            acted.start()
    if acted is not None:
        acted.join()
    return events


def read_in_thread(app, client, path):
    """Open and read a stream in a thread of its own (each open stream holds its request
    context in the thread that opened it). Returns (thread, events); waits until it is open."""
    events = []
    hub = app.extensions["push_hub"]
    pages = hub.open_pages()

    def run():
        response = client.get(path, buffered=False)
        events.extend(frames_until_gone(response, lambda: None))

    thread = threading.Thread(target=run)
    thread.start()
    while hub.open_pages() == pages:
        time.sleep(0.02)
    return thread, events


def in_thread(app, work):
    def run():
        time.sleep(0.3)
        with app.app_context():
            models.db.connect(reuse_if_open=True)
            try:
                work()
            finally:
                models.db.close()

    return run


def assert_ended(events):
    names = [name for name, _ in events]
    assert names[-1] == "gone", names  # ended by the announcement, not by the stream's age
    assert names[-2] == "values" and "Your access to this device has ended" in events[-2][1]
    assert '<span class="value">' not in events[-2][1]


def test_a_revoke_ends_the_grantees_open_page_at_once(app, world):
    owner_client = signed_in(app, world["owner"])
    token = csrf_token(owner_client, f"/devices/{WINDOW}")
    response = signed_in(app, world["viewer"]).get(f"/devices/{WINDOW}/live", buffered=False)
    assert response.status_code == 200

    def revoke():
        done = owner_client.post(
            f"/devices/{WINDOW}/sharing/grants/{world['grant'].id}/revoke",
            data={"csrf_token": token, "confirmed": "yes"},
        )
        assert done.status_code == 302

    assert_ended(frames_until_gone(response, in_thread(app, revoke)))
    # The page itself tells the browser to stop reconnecting on "gone".
    assert (
        signed_in(app, world["owner"])
        .get(f"/devices/{WINDOW}")
        .get_data(as_text=True)
        .count('sse-close="gone"')
    )


def test_an_expiry_recorded_by_the_sweep_ends_the_page(app, world):
    response = signed_in(app, world["viewer"]).get(f"/devices/{WINDOW}/live", buffered=False)

    def run_out():
        past = utcnow() - datetime.timedelta(seconds=1)
        Grant.update(expires_at=past).where(Grant.id == world["grant"].id).execute()
        assert access.record_expired() == 1

    assert_ended(frames_until_gone(response, in_thread(app, run_out)))


def test_a_release_ends_the_owners_and_the_grantees_pages(app, world):
    response = signed_in(app, world["viewer"]).get(f"/devices/{WINDOW}/live", buffered=False)
    app.config["PUSH_STREAM_MAX_SECONDS"] = 4.0  # the dashboard's stream goes on for the other cards
    reader, owner_events = read_in_thread(app, signed_in(app, world["owner"]), "/devices/live")

    def release():
        devices.release(world["owner"], devices.device_for(world["owner"], WINDOW))

    thread = threading.Thread(target=in_thread(app, release))
    thread.start()
    viewer_events = frames_until_gone(response, lambda: None)
    reader.join()
    thread.join()
    assert_ended(viewer_events)
    # The owner's dashboard card says it too (the dashboard's stream goes on for other cards).
    card = [data for name, data in owner_events if name == f"summary-{WINDOW}"]
    assert "Your access to this device has ended" in card[-1]


def test_leaving_the_organisation_or_the_group_ends_the_members_page(app, world):
    admin, org, viewer = world["admin"], world["org"], world["viewer"]
    # Through the organisation: a second admin (its devices are theirs to run) is removed.
    second = make_user("second@company.example", PASSWORD, provisioned=False)
    organisations.add_member(admin, org, second.email, role="admin")
    response = signed_in(app, second).get(f"/devices/{PUMP}/live", buffered=False)
    assert_ended(
        frames_until_gone(
            response, in_thread(app, lambda: organisations.remove_member(admin, org, second.id))
        )
    )
    # Through a group: the device is taken out of the group the viewer's grant is on.
    response = signed_in(app, viewer).get(f"/devices/{PUMP}/live", buffered=False)
    assert_ended(
        frames_until_gone(
            response,
            in_thread(app, lambda: organisations.remove_from_group(admin, org, world["site"], [PUMP])),
        )
    )


def test_someone_who_keeps_access_keeps_their_page(app, world):
    """The announcement wakes every page of the device; the owner's goes on showing values."""
    viewer_stream = signed_in(app, world["viewer"]).get(f"/devices/{WINDOW}/live", buffered=False)
    app.config["PUSH_STREAM_MAX_SECONDS"] = 3.0
    reader, owner_events = read_in_thread(app, signed_in(app, world["owner"]), f"/devices/{WINDOW}/live")
    thread = threading.Thread(target=in_thread(app, lambda: access.revoke(world["grant"], world["owner"])))
    thread.start()
    assert_ended(frames_until_gone(viewer_stream, lambda: None))
    reader.join()
    thread.join()
    assert [name for name, _ in owner_events] == ["values"]


def test_a_transfer_ends_the_sellers_and_the_grantees_pages(app, world, mailbox):
    from selfserve.services import transfers

    owner = world["owner"]
    buyer = make_user("buyer@example.com", PASSWORD)
    transfer = transfers.offer(owner, devices.device_for(owner, WINDOW), buyer.email)
    response = signed_in(app, world["viewer"]).get(f"/devices/{WINDOW}/live", buffered=False)
    app.config["PUSH_STREAM_MAX_SECONDS"] = 20.0
    reader, seller_events = read_in_thread(app, signed_in(app, owner), f"/devices/{WINDOW}/live")
    assert_ended(frames_until_gone(response, in_thread(app, lambda: transfers.accept(buyer, transfer))))
    reader.join()
    assert_ended(seller_events)
    assert Device.get_by_id(WINDOW).owner_id == buyer.id
