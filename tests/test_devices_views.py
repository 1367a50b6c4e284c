"""Device pages through the Flask client: dashboard, claim, device page, fragments, actions."""

import html
import json
import logging
import re

import pytest
from helpers import OFFLINE_WINDOW
from helpers import PASSWORD
from helpers import PUMP
from helpers import WINDOW
from helpers import csrf_token
from helpers import login
from helpers import make_user

from selfserve.models import AuditEvent
from selfserve.models import Device
from selfserve.models import DeviceSnapshot
from selfserve.models import User
from selfserve.services import devices

HTMX = {"HX-Request": "true"}


@pytest.fixture
def owner(app, sim):
    return make_user("owner@example.com", PASSWORD)


@pytest.fixture
def browser(client, owner):
    """The owner, signed in."""
    response = login(client, owner.email, PASSWORD)
    assert response.status_code == 200
    return client


def own(user, labels, device_id):
    label = labels[device_id]
    return devices.claim(user, label["serial_number"], label["setup_code"])


def token(client, path="/devices"):
    return csrf_token(client, path)


def total_calls(sim):
    return sim.counters()["total"]


# --- dashboard ----------------------------------------------------------------------------------


def test_dashboard_needs_a_login(client, app):
    response = client.get("/devices")
    assert response.status_code == 302
    assert "/login" in response.headers["Location"]


def test_empty_dashboard_offers_to_add_a_device(browser, labels):
    page = browser.get("/devices").get_data(as_text=True)
    assert "No devices yet" in page
    assert 'href="/devices/claim"' in page
    assert "Add a device" in page


def test_dashboard_lists_devices_and_makes_no_particle_call(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    own(owner, labels, PUMP)
    devices.rename(owner, devices.device_for(owner, PUMP), "Garden pump")
    sim.reset_counters()
    response = browser.get("/devices")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert total_calls(sim) == 0
    assert "Garden pump" in page
    # The serial never breaks across lines in the heading.
    assert 'Window covering <span class="serial">SSW-24A-000101</span>' in page
    assert f'hx-get="/devices/{WINDOW}/summary"' in page
    assert f'hx-get="/devices/{PUMP}/summary"' in page
    # One request renders every card; changes are pushed (no fragment request per card).
    assert 'sse-connect="/devices/live"' in page and f'sse-swap="summary-{WINDOW}"' in page
    assert 'hx-trigger="load' not in page
    assert "Checking…" in page  # nothing read yet


def test_dashboard_shows_pending_claims(browser, owner, labels):
    Device.update(owner=owner.id, claim_state="claiming").where(Device.device_id == PUMP).execute()
    page = browser.get("/devices").get_data(as_text=True)
    assert "being added to your account" in page
    assert f"/devices/{PUMP}" not in page  # no link into a half-done device


def test_summary_fragment_with_and_without_htmx(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    response = browser.get(f"/devices/{WINDOW}/summary", headers=HTMX)
    fragment = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "<html" not in fragment
    # One freshness indicator ("Live"), the state in words, the summary reading.
    assert 'data-freshness="live"' in fragment and ">Live<" in fragment.replace("\n", "")
    assert "Closed" in fragment and "Position" in fragment
    plain = browser.get(f"/devices/{WINDOW}/summary")
    assert plain.status_code == 302
    assert plain.headers["Location"].endswith(f"/devices/{WINDOW}")


# --- device page and values -----------------------------------------------------------------------


def test_device_page_shell_makes_no_particle_call(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    sim.reset_counters()
    page = browser.get(f"/devices/{WINDOW}").get_data(as_text=True)
    assert total_calls(sim) == 0
    assert f'hx-get="/devices/{WINDOW}/values"' in page
    # Pushed values; our cache is also polled now and then (the fallback).
    assert 'hx-trigger="every 60s, refresh, device-changed from:body"' in page
    assert f'sse-connect="/devices/{WINDOW}/live"' in page and 'sse-swap="values"' in page
    for label in ("Open", "Close", "Set position", "Stop"):
        assert f">{label}</button>" in page
    assert f'action="/devices/{WINDOW}/functions/setPosition"' in page
    assert 'min="0" max="100"' in page
    assert 'aria-live="polite"' in page
    assert f'href="/devices/{WINDOW}/release"' in page
    assert "style=" not in page and "onclick" not in page and "<script>" not in page


def test_values_fragment_with_and_without_htmx(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    response = browser.get(f"/devices/{WINDOW}/values", headers=HTMX)
    fragment = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "<html" not in fragment
    for label in ("Position", "Target position", "Moving", "Battery", "Firmware"):
        assert f"<dt>{label}</dt>" in fragment
    assert " V</span>" in fragment  # battery unit
    # One freshness indicator for the whole device, not an "as of" on every value.
    assert fragment.count("data-freshness=") == 1 and "as of" not in fragment
    # The blind drawn at its position; what can't apply now, for the controls.
    assert 'class="blind"' in fragment and 'aria-label="Blind 0% open"' in fragment
    unavailable = json.loads(html.unescape(re.search(r"data-unavailable='([^']*)'", fragment).group(1)))
    assert unavailable == {"close": "Already closed.", "stop": "It isn't moving."}
    plain = browser.get(f"/devices/{WINDOW}/values")
    assert plain.status_code == 302
    assert plain.headers["Location"].endswith(f"/devices/{WINDOW}")


def test_pump_page_has_pump_controls_with_confirmation(browser, owner, labels):
    own(owner, labels, PUMP)
    page = browser.get(f"/devices/{PUMP}").get_data(as_text=True)
    assert (
        ">Start pump</button>" in page and ">Stop pump</button>" in page and ">Set pressure</button>" in page
    )
    assert 'hx-confirm="Start the pump?' in page
    assert 'min="50" max="400"' in page
    assert ">Open</button>" not in page


def test_offline_device_shows_offline_since(browser, owner, labels):
    own(owner, labels, OFFLINE_WINDOW)
    fragment = browser.get(f"/devices/{OFFLINE_WINDOW}/values", headers=HTMX).get_data(as_text=True)
    # Never heard from since it was added: offline, without a misleading "since".
    assert 'data-freshness="offline"' in fragment and "Offline" in fragment
    assert "heard from since you added it" in fragment


@pytest.fixture
def slow_cloud(app_config, sim):
    app_config["PARTICLE_READ_TIMEOUT"] = 0.5
    sim.configure(cloud_timeout=0.5)
    return sim


def test_hung_device_answers_quickly_with_last_values(slow_cloud, browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    browser.get(f"/devices/{WINDOW}/values", headers=HTMX)
    position = DeviceSnapshot.get_by_id(WINDOW).values["position"]["value"]
    sim.set_device(WINDOW, hung=True)
    DeviceSnapshot.update(checked_at=None).where(DeviceSnapshot.device_id == WINDOW).execute()
    fragment = browser.get(f"/devices/{WINDOW}/values", headers=HTMX).get_data(as_text=True)
    assert "Offline since" in fragment
    # The last known values, under the device's one freshness indicator.
    assert f'<span class="value">{position}%</span>' in fragment
    assert 'data-freshness="offline"' in fragment


# --- ownership: one check, 404, no Particle call --------------------------------------------------


def test_another_customers_device_is_404_everywhere_without_particle_calls(client, app, labels, sim):
    owner = make_user("owner@example.com", PASSWORD)
    own(owner, labels, WINDOW)
    make_user("other@example.com", PASSWORD)
    login(client, "other@example.com", PASSWORD)
    csrf = token(client)
    sim.reset_counters()
    for device_id in (WINDOW, PUMP, "f" * 24, "not-a-device", WINDOW.upper() + "00"):
        for path in ("", "/summary", "/values", "/release"):
            for headers in ({}, HTMX):
                response = client.get(f"/devices/{device_id}{path}", headers=headers)
                assert response.status_code == 404, (device_id, path)
        for path, data in (
            ("/rename", {"name": "Mine now"}),
            ("/functions/open", {}),
            ("/release", {}),
        ):
            response = client.post(f"/devices/{device_id}{path}", data={"csrf_token": csrf, **data})
            assert response.status_code == 404, (device_id, path)
    assert total_calls(sim) == 0
    device = Device.get_by_id(WINDOW)
    assert device.owner_id == owner.id and device.name is None


# --- claim ----------------------------------------------------------------------------------------


def test_claim_form_and_success(browser, owner, labels, sim):
    page = browser.get("/devices/claim").get_data(as_text=True)
    assert 'name="serial"' in page and 'name="setup_code"' in page and "Add device" in page
    label = labels[WINDOW]
    response = browser.post(
        "/devices/claim",
        data={
            "serial": label["serial_number"],
            "setup_code": label["setup_code"],
            "csrf_token": token(browser),
        },
    )
    assert response.status_code == 302
    assert response.headers["Location"].endswith(f"/devices/{WINDOW}")
    assert Device.get_by_id(WINDOW).owner_id == owner.id
    assert sim.device(WINDOW)["owner"] == owner.particle_customer_id
    page = browser.get(response.headers["Location"]).get_data(as_text=True)
    assert "was added to your account" in page


def test_claim_with_htmx_redirects_with_hx_redirect(browser, owner, labels):
    label = labels[PUMP]
    response = browser.post(
        "/devices/claim",
        data={"serial": label["serial_number"], "setup_code": label["setup_code"]},
        headers={**HTMX, "X-CSRFToken": token(browser)},
    )
    assert response.status_code == 200
    assert response.headers["HX-Redirect"].endswith(f"/devices/{PUMP}")
    assert Device.get_by_id(PUMP).owner_id == owner.id


def test_wrong_code_answer_never_shows_the_code(browser, owner, labels):
    label = labels[WINDOW]
    typed = "ZZTOP999"
    response = browser.post(
        "/devices/claim",
        data={"serial": label["serial_number"], "setup_code": typed, "csrf_token": token(browser)},
    )
    page = response.get_data(as_text=True)
    assert response.status_code == 422
    assert "serial number and setup code don&#39;t match" in page
    assert f'value="{label["serial_number"]}"' in page  # the serial is kept for correcting
    assert typed not in page
    htmx_response = browser.post(
        "/devices/claim",
        data={"serial": label["serial_number"], "setup_code": typed},
        headers={**HTMX, "X-CSRFToken": token(browser)},
    )
    fragment = htmx_response.get_data(as_text=True)
    assert htmx_response.status_code == 200  # htmx swaps only 2xx
    assert "<html" not in fragment and 'id="claim-form"' in fragment
    assert "don&#39;t match" in fragment
    assert typed not in fragment
    assert Device.get_by_id(WINDOW).owner_id is None


def test_claim_without_csrf_is_refused(browser, owner, labels):
    label = labels[WINDOW]
    response = browser.post(
        "/devices/claim", data={"serial": label["serial_number"], "setup_code": label["setup_code"]}
    )
    assert response.status_code == 400
    assert Device.get_by_id(WINDOW).owner_id is None


def test_too_many_attempts(app, browser, owner, labels):
    csrf = token(browser)
    for _ in range(app.config["CLAIM_MAX_FAILURES_PER_SERIAL"]):
        browser.post(
            "/devices/claim", data={"serial": "SSW-24A-000101", "setup_code": "WRONG123", "csrf_token": csrf}
        )
    label = labels[WINDOW]
    response = browser.post(
        "/devices/claim",
        data={"serial": label["serial_number"], "setup_code": label["setup_code"], "csrf_token": csrf},
    )
    assert response.status_code == 429
    assert "Too many attempts" in response.get_data(as_text=True)
    assert Device.get_by_id(WINDOW).owner_id is None


def test_claiming_your_own_device_again_goes_to_it(browser, owner, labels):
    own(owner, labels, WINDOW)
    label = labels[WINDOW]
    response = browser.post(
        "/devices/claim",
        data={
            "serial": label["serial_number"],
            "setup_code": label["setup_code"],
            "csrf_token": token(browser),
        },
        follow_redirects=True,
    )
    assert response.request.path == f"/devices/{WINDOW}"
    assert "already in your account" in response.get_data(as_text=True)


def test_device_owned_by_someone_else_explains_next_steps(browser, labels, app):
    other = make_user("previous@example.com", PASSWORD)
    own(other, labels, WINDOW)
    label = labels[WINDOW]
    response = browser.post(
        "/devices/claim",
        data={
            "serial": label["serial_number"],
            "setup_code": label["setup_code"],
            "csrf_token": token(browser),
        },
    )
    page = response.get_data(as_text=True)
    assert response.status_code == 409
    assert "registered to another account" in page
    # The message points to the "ask the owner" card under it instead of contradicting it.
    assert "ask the current owner for it below" in page
    assert "must release it" not in page and "contact support" not in page
    assert 'id="ask-owner"' in page
    assert label["setup_code"] not in page


def test_claim_while_the_cloud_is_down(browser, owner, labels, sim):
    sim.add_fault("POST", "/v1/devices", count=1, status=503)
    label = labels[WINDOW]
    response = browser.post(
        "/devices/claim",
        data={
            "serial": label["serial_number"],
            "setup_code": label["setup_code"],
            "csrf_token": token(browser),
        },
    )
    assert response.status_code == 503
    assert "Nothing was changed" in response.get_data(as_text=True)
    device = Device.get_by_id(WINDOW)
    assert device.owner_id is None and device.claim_state is None
    assert sim.device(WINDOW)["owner"] is None


def test_claim_while_the_account_is_being_set_up(client, app, labels):
    make_user("pending@example.com", PASSWORD, provisioned=False)
    login(client, "pending@example.com", PASSWORD)
    page = client.get("/devices/claim").get_data(as_text=True)
    assert "still being set up" in page
    label = labels[WINDOW]
    response = client.post(
        "/devices/claim",
        data={
            "serial": label["serial_number"],
            "setup_code": label["setup_code"],
            "csrf_token": token(client),
        },
    )
    assert response.status_code == 409
    assert "still being set up" in response.get_data(as_text=True)
    assert Device.get_by_id(WINDOW).owner_id is None


def test_claim_needs_a_verified_email(client, app, labels):
    make_user("unverified@example.com", PASSWORD, verified=False)
    login(client, "unverified@example.com", PASSWORD)
    for path in ("/devices/claim", "/claim"):
        response = client.get(path)
        assert response.status_code == 302
        assert "/verify-email" in response.headers["Location"]


def test_label_link_page_never_renders_the_code(browser, owner, labels):
    label = labels[WINDOW]
    # The real label link keeps both in the fragment, which the server never sees; a hand-made
    # link with them in the query is sent to the fragment form at once.
    response = browser.get(f"/claim?serial={label['serial_number']}&code={label['setup_code']}")
    assert response.status_code == 302
    assert response.headers["Location"] == (
        f"/claim#serial={label['serial_number']}&code={label['setup_code']}"
    )
    response = browser.get("/claim")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "js-claim-form" in page and 'id="label-note"' in page
    assert label["setup_code"] not in page
    assert "/static/js/devices.js" in page
    # GET never claims.
    assert Device.get_by_id(WINDOW).owner_id is None


def test_label_link_survives_the_sign_in_redirect(client, app, labels):
    response = client.get("/claim")
    assert response.status_code == 302
    # Browsers carry the #fragment across this redirect; devices.js on the sign-in page keeps it.
    assert "/login" in response.headers["Location"]
    assert "claim" in response.headers["Location"]


def test_setup_code_never_appears_in_responses_or_logs(client, app, labels, sim, caplog):
    caplog.set_level(logging.DEBUG)
    make_user("careful@example.com", PASSWORD)
    bodies = [login(client, "careful@example.com", PASSWORD).get_data(as_text=True)]
    label = labels[PUMP]
    csrf = token(client)
    for code in ("WRONG000", label["setup_code"].lower(), label["setup_code"]):
        for headers in ({}, HTMX):
            response = client.post(
                "/devices/claim",
                data={"serial": label["serial_number"], "setup_code": code, "csrf_token": csrf},
                headers={**headers, "X-CSRFToken": csrf},
                follow_redirects=True,
            )
            bodies.append(response.get_data(as_text=True))
    for path in ("/devices", f"/devices/{PUMP}", "/account/activity", f"/devices/{PUMP}/release"):
        bodies.append(client.get(path).get_data(as_text=True))
    everything = "\n".join(bodies)
    assert Device.get_by_id(PUMP).owner.email == "careful@example.com"
    for secret in (label["setup_code"], label["setup_code"].lower(), "WRONG000"):
        assert secret not in everything
        assert secret not in caplog.text
    for event in AuditEvent.select():
        assert label["setup_code"] not in str(event.detail)


# --- functions ---------------------------------------------------------------------------------------


def test_call_function_with_htmx(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    response = browser.post(
        f"/devices/{WINDOW}/functions/setPosition",
        data={"arg": "30"},
        headers={**HTMX, "X-CSRFToken": token(browser)},
    )
    fragment = response.get_data(as_text=True)
    assert response.status_code == 200
    # Accepted: pending until the device reports where it got to (static/js/devices.js).
    assert "Moving to 30%…" in fragment and "data-pending" in fragment
    assert response.headers["HX-Trigger"] == "device-changed"
    assert sim.device(WINDOW)["variables"]["target"] == 30


def test_call_function_without_htmx(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    response = browser.post(f"/devices/{WINDOW}/functions/close", data={"csrf_token": token(browser)})
    assert response.status_code == 302
    assert response.headers["Location"].endswith(f"/devices/{WINDOW}")
    assert "Closing…" in browser.get(f"/devices/{WINDOW}").get_data(as_text=True)


def test_bad_argument_is_explained(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    sim.reset_counters()
    response = browser.post(
        f"/devices/{WINDOW}/functions/setPosition",
        data={"arg": "250"},
        headers={**HTMX, "X-CSRFToken": token(browser)},
    )
    assert "0 to 100%" in response.get_data(as_text=True)
    assert "HX-Trigger" not in response.headers
    assert total_calls(sim) == 0


def test_pump_start_asks_first_without_javascript(browser, owner, labels, sim):
    pump = "e00fce68a1b2c3d4e5f60802"
    own(owner, labels, pump)
    csrf = token(browser)
    response = browser.post(f"/devices/{pump}/functions/start", data={"csrf_token": csrf})
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "Start the pump?" in page
    assert 'name="confirmed" value="yes"' in page
    assert sim.device(pump)["variables"]["running"] is False
    response = browser.post(f"/devices/{pump}/functions/start", data={"csrf_token": csrf, "confirmed": "yes"})
    assert response.status_code == 302
    assert sim.device(pump)["variables"]["running"] is True
    # With htmx the same question comes back as a fragment.
    fragment = browser.post(
        f"/devices/{pump}/functions/stop", headers={**HTMX, "X-CSRFToken": csrf}
    ).get_data(as_text=True)
    assert "Stop the pump?" in fragment and "<html" not in fragment


def test_function_on_offline_device_is_explained(browser, owner, labels):
    own(owner, labels, OFFLINE_WINDOW)
    fragment = browser.post(
        f"/devices/{OFFLINE_WINDOW}/functions/open", headers={**HTMX, "X-CSRFToken": token(browser)}
    ).get_data(as_text=True)
    assert "offline or not answering" in fragment


def test_unknown_function_is_404_and_get_is_not_allowed(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    sim.reset_counters()
    response = browser.post(f"/devices/{WINDOW}/functions/selfDestruct", data={"csrf_token": token(browser)})
    assert response.status_code == 404
    assert browser.get(f"/devices/{WINDOW}/functions/open").status_code == 405
    assert browser.get(f"/devices/{WINDOW}/rename").status_code == 405
    assert total_calls(sim) == 0


def test_function_without_csrf_is_refused(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    sim.reset_counters()
    assert browser.post(f"/devices/{WINDOW}/functions/open").status_code == 400
    assert browser.post(f"/devices/{WINDOW}/functions/open", headers=HTMX).status_code == 400
    assert total_calls(sim) == 0


# --- rename ------------------------------------------------------------------------------------------


def test_rename_with_and_without_htmx(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    response = browser.post(
        f"/devices/{WINDOW}/rename",
        data={"name": "Kitchen blind"},
        headers={**HTMX, "X-CSRFToken": token(browser)},
    )
    fragment = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "<h1>Kitchen blind</h1>" in fragment and "<html" not in fragment
    assert Device.get_by_id(WINDOW).name == "Kitchen blind"
    response = browser.post(
        f"/devices/{WINDOW}/rename", data={"name": "Study blind", "csrf_token": token(browser)}
    )
    assert response.status_code == 302
    assert Device.get_by_id(WINDOW).name == "Study blind"
    assert sim.device(WINDOW)["name"] == "Study_blind"


def test_rename_errors(browser, owner, labels):
    own(owner, labels, WINDOW)
    fragment = browser.post(
        f"/devices/{WINDOW}/rename", data={"name": "x" * 70}, headers={**HTMX, "X-CSRFToken": token(browser)}
    ).get_data(as_text=True)
    assert "at most 64" in fragment and 'aria-invalid="true"' in fragment
    response = browser.post(
        f"/devices/{WINDOW}/rename", data={"name": "  ", "csrf_token": token(browser)}, follow_redirects=True
    )
    assert "Enter a name" in response.get_data(as_text=True)
    assert browser.post(f"/devices/{WINDOW}/rename", data={"name": "Nope"}).status_code == 400
    assert Device.get_by_id(WINDOW).name is None


# --- release -------------------------------------------------------------------------------------------


def test_release_confirmation_page_changes_nothing(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    page = browser.get(f"/devices/{WINDOW}/release").get_data(as_text=True)
    assert "leaves your account" in page
    assert "can no longer see or control it" in page
    assert "whoever has the device and its label can add it" in page
    assert "history stays on your activity page" in page
    assert Device.get_by_id(WINDOW).owner_id == owner.id
    assert sim.device(WINDOW)["owner"] == owner.particle_customer_id


def test_release_without_htmx(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    response = browser.post(f"/devices/{WINDOW}/release", data={"csrf_token": token(browser)})
    assert response.status_code == 302
    assert response.headers["Location"].endswith("/devices")
    assert Device.get_by_id(WINDOW).owner_id is None
    assert sim.device(WINDOW)["owner"] is None
    page = browser.get("/devices").get_data(as_text=True)
    assert "was released" in page
    assert browser.get(f"/devices/{WINDOW}").status_code == 404


def test_release_with_htmx(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    response = browser.post(f"/devices/{WINDOW}/release", headers={**HTMX, "X-CSRFToken": token(browser)})
    assert response.headers["HX-Redirect"].endswith("/devices")
    assert Device.get_by_id(WINDOW).owner_id is None


def test_release_while_the_cloud_is_down(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    sim.add_fault("DELETE", "/v1/products/*/devices/*/owner", count=2, status=503)
    response = browser.post(f"/devices/{WINDOW}/release", data={"csrf_token": token(browser)})
    assert response.status_code == 503
    assert "It is still yours" in response.get_data(as_text=True)
    fragment = browser.post(f"/devices/{WINDOW}/release", headers={**HTMX, "X-CSRFToken": token(browser)})
    assert fragment.status_code == 200 and "It is still yours" in fragment.get_data(as_text=True)
    device = Device.get_by_id(WINDOW)
    assert device.owner_id == owner.id and device.claim_state is None
    assert sim.device(WINDOW)["owner"] == owner.particle_customer_id


def test_release_without_csrf_is_refused(browser, owner, labels):
    own(owner, labels, WINDOW)
    assert browser.post(f"/devices/{WINDOW}/release").status_code == 400
    assert Device.get_by_id(WINDOW).owner_id == owner.id


def test_activity_lists_device_events(browser, owner, labels):
    own(owner, labels, WINDOW)
    browser.post(f"/devices/{WINDOW}/rename", data={"name": "Hall blind", "csrf_token": token(browser)})
    browser.post(f"/devices/{WINDOW}/release", data={"csrf_token": token(browser)})
    page = browser.get("/account/activity").get_data(as_text=True)
    assert "Added device" in page
    assert "Renamed device" in page and "Hall blind" in page
    assert "Released device Hall blind" in page
    assert re.search(r"Released device Hall blind", page)
    assert User.get_by_id(owner.id).email == "owner@example.com"


# --- UX review fixes ------------------------------------------------------------------------------


def control_buttons(page):
    """{label: the <button ...> tag} of the Controls section."""
    controls = page[page.index('id="controls"') :]
    return {label: tag for tag, label in re.findall(r"(<button[^>]*>)([^<]+)</button>", controls)}


def test_pump_controls_start_is_primary_stop_is_neutral_both_confirmed(browser, owner, labels):
    own(owner, labels, PUMP)
    page = browser.get(f"/devices/{PUMP}").get_data(as_text=True)
    buttons = control_buttons(page)
    assert 'class="primary"' in buttons["Start pump"]
    assert "danger" not in buttons["Stop pump"] and "primary" not in buttons["Stop pump"]
    assert 'hx-confirm="Start the pump?' in page and 'hx-confirm="Stop the pump?' in page


def test_a_command_in_flight_disables_every_control_and_names_itself(browser, owner, labels):
    own(owner, labels, WINDOW)
    page = browser.get(f"/devices/{WINDOW}").get_data(as_text=True)
    forms = re.findall(r'<form method="post" action="/devices/[0-9a-f]+/functions/[^"]+"[^>]*>', page)
    assert len(forms) == 4
    for form in forms:
        # static/js/devices.js disables all the device's controls while one is in flight; it
        # finds them by these.
        assert 'data-function-label="' in form and 'data-function="' in form
    assert 'data-function-label="Set position"' in page
    # The status region the "Sending …" message goes to (static/js/devices.js) is live.
    assert '<div id="function-result" role="status" aria-live="polite">' in page
    # Simple buttons first, together; the one taking a value below them.
    assert page.index(">Stop</button>") < page.index('id="arg-setPosition"')


def test_offline_device_without_values_says_so_and_describes_the_controls(browser, owner, labels, sim):
    own(owner, labels, OFFLINE_WINDOW)
    fragment = html.unescape(
        browser.get(f"/devices/{OFFLINE_WINDOW}/values", headers=HTMX).get_data(as_text=True)
    )
    assert "No values yet: the device hasn't been heard from since you added it." in fragment
    summary = browser.get(f"/devices/{OFFLINE_WINDOW}/summary", headers=HTMX).get_data(as_text=True)
    assert "not heard from since you added it" in summary and "last heard" not in summary
    assert "showing the last known values" not in fragment
    sim.reset_counters()
    page = browser.get(f"/devices/{OFFLINE_WINDOW}").get_data(as_text=True)
    assert total_calls(sim) == 0
    assert 'id="offline-note">' in page  # shown (not hidden)
    assert "The device is offline. The controls will work again when it's back online." in page
    assert page.index('id="offline-note"') < page.index('id="controls"')
    buttons = control_buttons(page)
    # Unavailable, with the reason next to each (the values poll enables them when it is back).
    for label in ("Open", "Close", "Stop", "Set position"):
        assert "disabled" in buttons[label]
    assert page.count("This will work again when it&#39;s back online.") == 4


def test_online_device_has_no_offline_note_and_keeps_last_known_wording(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    browser.get(f"/devices/{WINDOW}/values", headers=HTMX)
    page = browser.get(f"/devices/{WINDOW}").get_data(as_text=True)
    # The offline note is there for the page's script to show, but hidden while online.
    assert 'id="offline-note" hidden' in page
    # Once values were read and the device goes offline, the old wording is right.
    DeviceSnapshot.update(online=False, offline_since=DeviceSnapshot.fetched_at).where(
        DeviceSnapshot.device_id == WINDOW
    ).execute()
    page = browser.get(f"/devices/{WINDOW}").get_data(as_text=True)
    assert "showing the last known values" in page and "No values yet" not in page


def test_position_is_prefilled_from_the_stored_target_without_particle_calls(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    sim.set_device(WINDOW, hung=False)
    browser.post(
        f"/devices/{WINDOW}/functions/setPosition",
        data={"arg": "40"},
        headers={**HTMX, "X-CSRFToken": token(browser)},
    )
    browser.get(f"/devices/{WINDOW}/values", headers=HTMX)
    target = DeviceSnapshot.get_by_id(WINDOW).values["target"]["value"]
    assert int(float(target)) == 40
    sim.reset_counters()
    page = browser.get(f"/devices/{WINDOW}").get_data(as_text=True)
    assert total_calls(sim) == 0
    assert re.search(r'<input type="number" id="arg-setPosition"[^>]*value="40"', page)


def test_inputs_stay_empty_when_nothing_is_known(browser, owner, labels, sim):
    own(owner, labels, WINDOW)
    own(owner, labels, PUMP)
    window = browser.get(f"/devices/{WINDOW}").get_data(as_text=True)
    assert re.search(r'id="arg-setPosition"[^>]*value=""', window)
    # The pump reports its pressure, not its set point: never guessed from a reading.
    browser.get(f"/devices/{PUMP}/values", headers=HTMX)
    pump = browser.get(f"/devices/{PUMP}").get_data(as_text=True)
    assert re.search(r'id="arg-setPressure"[^>]*value=""', pump)


def test_serial_is_unbreakable_in_headings(browser, owner, labels):
    own(owner, labels, WINDOW)
    page = browser.get(f"/devices/{WINDOW}").get_data(as_text=True)
    assert '<h1>Window covering <span class="serial">SSW-24A-000101</span></h1>' in page
    assert '<span class="serial">' in browser.get("/devices").get_data(as_text=True)
    css = browser.get("/static/css/site.css").get_data(as_text=True)
    assert re.search(r"\.serial\s*\{[^}]*white-space:\s*nowrap", css)


def test_dashboard_summaries_poll_at_three_times_the_values_interval_without_push(
    app, browser, owner, labels
):
    own(owner, labels, WINDOW)
    app.config["VALUES_POLL_SECONDS"] = 4
    app.config["PUSH_ENABLED"] = False
    page = browser.get("/devices").get_data(as_text=True)
    assert re.search(
        rf'class="poll summary" id="summary-{WINDOW}"[^>]*hx-trigger="load, every 12s, refresh"', page, re.S
    )


def test_activity_names_the_argument_of_a_function(browser, owner, labels):
    own(owner, labels, WINDOW)
    browser.post(f"/devices/{WINDOW}/rename", data={"name": "Lounge", "csrf_token": token(browser)})
    browser.post(f"/devices/{WINDOW}/functions/setPosition", data={"arg": "40", "csrf_token": token(browser)})
    browser.post(f"/devices/{WINDOW}/functions/open", data={"csrf_token": token(browser)})
    page = browser.get("/account/activity").get_data(as_text=True)
    # What was asked, and what the device answered (in the catalogue's words).
    assert "Asked Lounge: Set position (40%). The device answered: Moving to 40%…" in page
    assert "Asked Lounge: Open. The device answered: Opening…" in page
    # A row recorded before the value was shown (no "arg") still reads well.
    AuditEvent.create(
        action="device.function_called",
        user=owner.id,
        actor=owner.id,
        device_id=WINDOW,
        detail={"function": "Close", "name": "Lounge", "result": "done"},
    )
    assert "Asked Lounge: Close<" in browser.get("/account/activity").get_data(as_text=True)


def test_released_device_link_says_it_left_the_account(browser, owner, labels, sim, client, app):
    own(owner, labels, WINDOW)
    browser.post(f"/devices/{WINDOW}/release", data={"csrf_token": token(browser)})
    sim.reset_counters()
    response = browser.get(f"/devices/{WINDOW}")
    page = response.get_data(as_text=True)
    assert response.status_code == 404
    assert total_calls(sim) == 0
    assert "This device is no longer on your account (you released it on" in page
    assert 'href="/devices"' in page
    assert "We couldn" not in page


def test_strangers_still_get_the_plain_404(app, labels, sim):
    former = make_user("former@example.com", PASSWORD)
    own(former, labels, WINDOW)
    devices.release(former, devices.device_for(former, WINDOW))
    make_user("stranger@example.com", PASSWORD)
    stranger = app.test_client()
    login(stranger, "stranger@example.com", PASSWORD)
    for device_id in (WINDOW, PUMP, "0" * 24):
        response = stranger.get(f"/devices/{device_id}")
        page = response.get_data(as_text=True)
        assert response.status_code == 404
        assert "no longer on your account" not in page and "released it" not in page
    # A device the user owns again is theirs, not "no longer" theirs.
    own(former, labels, WINDOW)
    again = app.test_client()
    login(again, "former@example.com", PASSWORD)
    assert again.get(f"/devices/{WINDOW}").status_code == 200


def test_dashboard_reads_the_open_transfers_of_all_cards_with_one_query(browser, owner, labels):
    from helpers import count_queries

    from selfserve.services import transfers

    def dashboard_queries():
        with count_queries() as queries:
            assert browser.get("/devices").status_code == 200
        return len(queries)

    own(owner, labels, WINDOW)
    transfers.offer(owner, Device.get_by_id(WINDOW), "buyer1@example.com")
    one_card = dashboard_queries()
    for number, device_id in enumerate((PUMP, OFFLINE_WINDOW), start=2):
        own(owner, labels, device_id)
        transfers.offer(owner, Device.get_by_id(device_id), f"buyer{number}@example.com")
    page = browser.get("/devices").get_data(as_text=True)
    assert page.count("Offered to") == 3
    assert dashboard_queries() == one_card  # flat in the number of cards
