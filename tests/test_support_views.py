"""Support console through the Flask client: staff sign-in with TOTP, the role x route matrix,
"view as customer" (read-only matrix, expiry, banner, audit), staff actions."""

import datetime
import re

import pyotp
import pytest
from helpers import PASSWORD
from helpers import PUMP
from helpers import WINDOW
from helpers import count_queries
from helpers import csrf_token
from helpers import login
from helpers import make_user

from selfserve.models import AuditEvent
from selfserve.models import Device
from selfserve.models import LoginSession
from selfserve.models import StaffView
from selfserve.models import User
from selfserve.security import WRITES_ALLOWED_WHILE_VIEWING
from selfserve.services import audit
from selfserve.services import devices
from selfserve.services import staff

STAFF_EMAIL = "helper@support.example"
HTMX = {"HX-Request": "true"}


@pytest.fixture
def customer(app, sim):
    return make_user("home@example.com", PASSWORD)


@pytest.fixture
def staff_user(app):
    return staff.create_staff(STAFF_EMAIL, PASSWORD)


def code_for(user, offset_steps=0):
    """A TOTP code for the staff member's secret (the next step if the current one was used)."""
    user = User.get_by_id(user.id)
    totp = pyotp.TOTP(staff._secret(user))
    now = datetime.datetime.now(datetime.UTC)
    if user.totp_last_step is not None and user.totp_last_step >= totp.timecode(now):
        offset_steps = max(offset_steps, 1)
    return totp.at(now + datetime.timedelta(seconds=30 * offset_steps))


def sign_in_staff(client, user, password=PASSWORD):
    """Password, then the TOTP step (enrolling on first use)."""
    response = login(client, user.email, password)
    assert "/support/second-factor" in response.request.path
    if staff.is_enrolled(User.get_by_id(user.id)):
        code = code_for(user)
    else:
        page = response.get_data(as_text=True)
        assert "data:image/svg+xml;base64," in page
        secret = re.search(r'id="totp-secret" class="secret">([A-Z2-7]+)<', page).group(1)
        # The page shows the same secret when reloaded, and stores nothing until confirmed.
        again = client.get("/support/second-factor").get_data(as_text=True)
        assert f'class="secret">{secret}<' in again
        assert User.get_by_id(user.id).totp_secret_encrypted is None
        code = pyotp.TOTP(secret).now()
    token = csrf_token(client, "/support/second-factor")
    response = client.post(
        "/support/second-factor", data={"code": code, "csrf_token": token}, follow_redirects=True
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.request.path == "/support"
    return client


@pytest.fixture
def console(app, staff_user):
    return sign_in_staff(app.test_client(), staff_user)


def post(client, path, data=None, **kwargs):
    token = csrf_token(client, kwargs.pop("token_page", "/support"))
    return client.post(path, data={"csrf_token": token, **(data or {})}, **kwargs)


def start_view(client, customer_user, reason="ticket #4411"):
    return post(client, f"/support/customers/{customer_user.id}/view", {"reason": reason})


def writes(sim):
    """Particle calls that change something: every method but GET, except minting a token."""
    routes = sim.counters()["routes"]
    return {
        route: count
        for route, count in routes.items()
        if count and not route.startswith("GET ") and route != "POST /oauth/token"
    }


def events(action, user=None):
    query = AuditEvent.select().where(AuditEvent.action == action)
    if user is not None:
        query = query.where(AuditEvent.user == user)
    return list(query.order_by(AuditEvent.id))


def fill(rule, values):
    """The rule's path with its arguments filled in (1 for ints, "x" for unknown names)."""

    def value(match):
        converter, name = match.group(1), match.group(2)
        return values.get(name, "1" if converter == "int" else "x")

    return re.sub(r"<(?:(\w+):)?(\w+)>", value, rule.rule)


def support_rules(app, customer_id):
    """Every /support rule with a concrete path and its methods (GET or POST)."""
    values = {"customer_id": str(customer_id), "device_id": WINDOW}
    found = []
    for rule in app.url_map.iter_rules():
        # The console's blueprint, and support pages other blueprints add under /support
        # (account_data's pending deletions).
        if not (rule.endpoint.startswith("support.") or rule.rule.startswith("/support/")):
            continue
        path = fill(rule, values)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            found.append((method, path, rule.endpoint))
    return found


# --- staff sign-in and the second factor ----------------------------------------------------------


def test_first_sign_in_enrols_with_a_qr_code_then_asks_for_codes(app, staff_user):
    client = app.test_client()
    sign_in_staff(client, staff_user)
    user = User.get_by_id(staff_user.id)
    assert user.totp_enrolled_at is not None
    assert user.totp_secret_encrypted and staff._secret(user) not in user.totp_secret_encrypted
    session_row = LoginSession.get((LoginSession.user == user) & LoginSession.ended_at.is_null())
    assert session_row.mfa_verified_at is not None
    # Second sign-in (another browser): no QR code any more, just a code.
    other = app.test_client()
    response = login(other, user.email, PASSWORD)
    page = response.get_data(as_text=True)
    assert "Confirm your sign-in" in page and "data:image" not in page and "totp-secret" not in page


def test_wrong_and_replayed_codes_are_refused(app, staff_user):
    client = app.test_client()
    sign_in_staff(client, staff_user)
    used = code_for(staff_user, 0)
    other = app.test_client()
    login(other, staff_user.email, PASSWORD)
    token = csrf_token(other, "/support/second-factor")
    wrong = "000000" if used != "000000" else "111111"
    response = other.post("/support/second-factor", data={"code": wrong, "csrf_token": token})
    assert response.status_code == 401
    assert "That code is not right" in response.get_data(as_text=True)
    # The code the first browser used (its step is spent) doesn't work again.
    user = User.get_by_id(staff_user.id)
    totp = pyotp.TOTP(staff._secret(user))
    spent = totp.at(datetime.datetime.fromtimestamp(user.totp_last_step * 30, datetime.UTC))
    response = other.post("/support/second-factor", data={"code": spent, "csrf_token": token})
    assert response.status_code == 401
    assert other.get("/support").status_code == 302
    assert len(events("staff.second_factor_failed", user)) == 2


def test_staff_without_the_second_factor_get_nothing(app, staff_user, customer):
    client = app.test_client()
    login(client, staff_user.email, PASSWORD)
    for path in ("/support", "/support/fleet", f"/support/customers/{customer.id}", "/devices", "/account"):
        response = client.get(path)
        assert response.status_code == 302, path
        assert "/support/second-factor" in response.headers["Location"]
    response = post(
        client,
        f"/support/customers/{customer.id}/view",
        {"reason": "ticket 1"},
        token_page="/support/second-factor",
    )
    assert response.status_code == 403
    assert not StaffView.select().exists()
    # htmx requests get a refusal, not a page.
    assert client.get("/support/fleet", headers=HTMX).status_code == 403


def test_sign_in_rotates_the_session_after_the_second_factor(app, staff_user):
    sign_in_staff(app.test_client(), staff_user)  # enrols
    LoginSession.update(ended_at=datetime.datetime(2020, 1, 1)).execute()
    client = app.test_client()
    login(client, staff_user.email, PASSWORD)
    before = LoginSession.get((LoginSession.user == staff_user.id) & LoginSession.ended_at.is_null())
    token = csrf_token(client, "/support/second-factor")
    client.post("/support/second-factor", data={"code": code_for(staff_user), "csrf_token": token})
    after = LoginSession.get((LoginSession.user == staff_user.id) & LoginSession.ended_at.is_null())
    assert after.id != before.id and after.mfa_verified_at is not None
    assert LoginSession.get_by_id(before.id).ended_at is not None


def test_customers_never_reach_the_second_factor_or_become_staff(app, client, customer):
    login(client, customer.email, PASSWORD)
    assert client.get("/support/second-factor").status_code == 403
    response = post(client, "/support/second-factor", {"code": "123456"}, token_page="/account")
    assert response.status_code == 403
    assert User.get_by_id(customer.id).role == "customer"


# --- role x route matrix -------------------------------------------------------------------------


def test_role_route_matrix(app, staff_user, customer, labels):
    rules = support_rules(app, customer.id)
    assert len(rules) >= 12
    assert "account_data.pending_deletions" in {endpoint for _, _, endpoint in rules}
    anonymous = app.test_client()
    customer_client = app.test_client()
    login(customer_client, customer.email, PASSWORD)
    half_staff = app.test_client()
    login(half_staff, staff_user.email, PASSWORD)
    full_staff = sign_in_staff(app.test_client(), staff_user)
    customer_token = csrf_token(customer_client, "/account")
    half_token = csrf_token(half_staff, "/support/second-factor")
    for method, path, endpoint in rules:
        # Anonymous: sent to sign in.
        response = anonymous.open(path, method=method, data={"csrf_token": csrf_token(anonymous, "/login")})
        assert response.status_code == 302 and "/login" in response.headers["Location"], (method, path)
        # Customers: 403 on every staff route.
        response = customer_client.open(
            path, method=method, data={"csrf_token": customer_token, "reason": "x" * 10}
        )
        assert response.status_code == 403, (method, path, response.status_code)
        if endpoint == "support.second_factor":
            continue
        # Staff without the second factor: nothing (redirect to it, or 403).
        response = half_staff.open(path, method=method, data={"csrf_token": half_token, "reason": "x" * 10})
        assert response.status_code in (302, 403), (method, path)
        if response.status_code == 302:
            assert "/support/second-factor" in response.headers["Location"]
    # Full staff: every page opens.
    for method, path, endpoint in rules:
        if method == "GET":
            response = full_staff.get(path)
            expected = 302 if endpoint == "support.second_factor" else 200
            assert response.status_code == expected, (path, response.status_code)
    # Full staff: every action is reachable (without a reason each one explains and redirects).
    full_token = csrf_token(full_staff, "/support")
    for method, path, _endpoint in rules:
        if method == "POST":
            response = full_staff.post(path, data={"csrf_token": full_token})
            assert response.status_code == 302, (path, response.status_code)
    assert not StaffView.select().exists()
    assert User.get_by_id(customer.id).role == "customer"
    assert Device.get_by_id(WINDOW).owner_id is None


def test_start_and_end_view_refuse_get(console, customer):
    assert console.get(f"/support/customers/{customer.id}/view").status_code == 405
    assert console.get("/support/view/end").status_code == 405
    assert not StaffView.select().exists()


def test_posts_without_csrf_are_refused(console, customer):
    response = console.post(f"/support/customers/{customer.id}/view", data={"reason": "ticket 9"})
    assert response.status_code == 400
    assert not StaffView.select().exists()


# --- search, customer and device pages -------------------------------------------------------------


def test_search_by_partial_email_device_id_and_serial(console, customer, labels):
    make_user("other@else.example", PASSWORD, verified=False)
    own(customer, labels, WINDOW)
    page = console.get("/support?q=home@exa").get_data(as_text=True)
    assert "home@example.com" in page and "other@else.example" not in page and STAFF_EMAIL not in page
    serial = labels[WINDOW]["serial_number"]
    page = console.get(f"/support?q={serial[2:].lower()}").get_data(as_text=True)
    assert serial in page and "owned by home@example.com" in page
    page = console.get(f"/support?q={WINDOW[:10]}").get_data(as_text=True)
    assert WINDOW in page
    response = console.get("/support?q=ab")
    assert response.status_code == 422 and "at least 3 characters" in response.get_data(as_text=True)
    assert "Nothing matches" in console.get("/support?q=nobody-at-all").get_data(as_text=True)


def test_customer_page_shows_state_devices_and_activity(console, customer, labels):
    own(customer, labels, WINDOW)
    page = console.get(f"/support/customers/{customer.id}").get_data(as_text=True)
    assert "home@example.com" in page and "set up" in page
    assert labels[WINDOW]["serial_number"] in page or WINDOW in page
    assert "Transfers" in page and "No transfers." in page
    assert "Added device" in page  # activity
    # Looking is itself recorded on the customer's activity (a trace they can see).
    looked = events("support.console_viewed", customer)
    assert len(looked) == 1 and looked[0].actor.email == STAFF_EMAIL
    console.get(f"/support/devices/{WINDOW}")
    assert events("support.console_viewed_device", customer)[0].device_id == WINDOW
    staff_account = User.get(User.email == STAFF_EMAIL)
    assert console.get(f"/support/customers/{staff_account.id}").status_code == 404
    assert console.get("/support/customers/999999").status_code == 404
    assert console.get("/support/customers/abc").status_code == 404


def test_the_customer_page_costs_the_same_queries_for_3_or_30_activity_rows(console, customer, staff_user):
    """Who acted (a staff member's email) is loaded with the events, not row by row."""

    def queries_with(rows):
        AuditEvent.delete().where(AuditEvent.user == customer.id).execute()
        for _ in range(rows):
            audit.record("support.console_viewed", user=customer, actor=staff_user)
        with count_queries() as queries:
            page = console.get(f"/support/customers/{customer.id}").get_data(as_text=True)
        assert page.count(STAFF_EMAIL) >= rows
        return len(queries)

    assert queries_with(3) == queries_with(30)


def test_device_page_flags_disagreement_with_particle(console, customer, labels, sim):
    own(customer, labels, WINDOW)
    page = console.get(f"/support/devices/{WINDOW}").get_data(as_text=True)
    assert 'data-drift="none"' in page and customer.particle_customer_id in page
    sim.set_device(WINDOW, owner=None)
    page = console.get(f"/support/devices/{WINDOW}").get_data(as_text=True)
    assert 'data-drift="unclaimed_on_particle"' in page
    sim.set_device(PUMP, owner="stranger-customer")
    page = console.get(f"/support/devices/{PUMP}").get_data(as_text=True)
    assert 'data-drift="claimed_not_in_db"' in page and "stranger-customer" in page
    assert console.get("/support/devices/not-a-device").status_code == 404


def test_fleet_runs_reconciliation_and_lists_stuck_work(console, customer, labels, sim):
    own(customer, labels, WINDOW)
    sim.set_device(WINDOW, owner=None)
    response = post(console, "/support/fleet/reconcile", follow_redirects=True)
    page = response.get_data(as_text=True)
    assert "Reconciliation finished" in page and 'data-drift="unclaimed_on_particle"' in page
    assert own_state(WINDOW).owner_id == customer.id  # reported, never fixed
    # Online state as Particle reported it in the run (the demo has online and offline devices).
    assert 'class="badge online"' in page and 'class="badge offline"' in page
    Device.update(claim_state="releasing", claim_state_at=datetime.datetime(2020, 1, 1)).where(
        Device.device_id == WINDOW
    ).execute()
    page = console.get("/support/fleet").get_data(as_text=True)
    assert "Claims and releases not finished" in page
    assert console.get("/support/fleet?show=drift").status_code == 200
    assert console.get("/support/fleet?page=999&show=bogus").status_code == 200


def own(user, labels, device_id):
    label = labels[device_id]
    return devices.claim(user, label["serial_number"], label["setup_code"])


def own_state(device_id):
    return Device.get_by_id(device_id)


# --- view as customer ------------------------------------------------------------------------------


def test_view_as_customer_shows_their_pages_with_a_banner_and_audits(console, customer, labels, sim):
    own(customer, labels, WINDOW)
    staff_account = User.get(User.email == STAFF_EMAIL)
    before = LoginSession.get((LoginSession.user == staff_account) & LoginSession.ended_at.is_null())
    response = start_view(console, customer)
    assert response.status_code == 302 and response.headers["Location"].endswith("/devices")
    view = StaffView.get()
    assert view.reason == "ticket #4411" and view.ended_at is None
    assert view.login_session_id != before.id  # rotated
    assert LoginSession.get_by_id(before.id).ended_at is not None
    pages = [
        "/devices",
        f"/devices/{WINDOW}",
        "/account",
        "/account/activity",
        "/support",
        f"/support/customers/{customer.id}",
        "/devices/claim",
    ]
    for path in pages:
        page = console.get(path).get_data(as_text=True)
        assert "data-staff-view" in page, path
        assert f"<strong>{STAFF_EMAIL}</strong> is viewing as <strong>home@example.com</strong>" in page, path
        assert "End view" in page and "Time left" in page
    # The customer's pages render as the customer.
    assert labels[WINDOW]["serial_number"] in console.get("/devices").get_data(as_text=True)
    # Live values are allowed (reads).
    response = console.get(f"/devices/{WINDOW}/values", headers=HTMX)
    assert response.status_code == 200
    assert sim.counters()["routes"].get("GET /v1/devices/:id/:name", 0) > 0
    # Every full page viewed outside the console is audited against the customer.
    viewed = events("support.page_viewed", customer)
    assert [e.detail["page"] for e in viewed] == [
        "/devices",
        f"/devices/{WINDOW}",
        "/account",
        "/account/activity",
        "/devices/claim",
        "/devices",
    ]
    assert all(e.actor_id == staff_account.id and e.detail["reason"] == "ticket #4411" for e in viewed)
    started = events("support.view_started", customer)
    assert len(started) == 1 and started[0].actor_id == staff_account.id


def test_view_refusals(app, console, customer, staff_user):
    other_staff = staff.create_staff("second@support.example", PASSWORD)
    assert start_view(console, other_staff).status_code == 404
    assert start_view(console, staff_user).status_code == 404
    response = start_view(console, customer, reason=" ")
    assert response.status_code == 302
    assert "Give a reason" in console.get(response.headers["Location"]).get_data(as_text=True)
    assert not StaffView.select().exists()
    assert start_view(console, customer).status_code == 302
    # No nesting: a second start is refused by the read-only wall (and the service).
    third = make_user("third@example.com", PASSWORD)
    response = start_view(console, third)
    assert response.status_code == 403
    assert StaffView.select().count() == 1


def test_read_only_matrix_every_state_changing_route_is_refused(app, console, customer, labels, sim):
    own(customer, labels, WINDOW)
    start_view(console, customer)
    token = csrf_token(console, "/devices")
    sim.reset_counters()
    values = {
        "device_id": WINDOW,
        "customer_id": str(customer.id),
        "function_name": "stop",
        "token": "x" * 20,
    }
    checked = []
    for rule in app.url_map.iter_rules():
        # Ending the view and signing out are the ways out of a view (test_security_small).
        methods = (
            set()
            if rule.endpoint in WRITES_ALLOWED_WHILE_VIEWING
            else rule.methods - {"GET", "HEAD", "OPTIONS"}
        )
        if not methods or rule.endpoint == "support.end_view":
            continue
        path = fill(rule, values)
        if getattr(app.view_functions[rule.endpoint], "is_sessionless", False):
            # A machine endpoint (the product webhook): a staff session is no credential there.
            for method in methods:
                assert console.open(path, method=method, data={"csrf_token": token}).status_code in (401, 404)
            continue
        for method in methods:
            response = console.open(
                path,
                method=method,
                data={
                    "csrf_token": token,
                    "reason": "ticket 5",
                    "confirm": "yes",
                    "confirmed": "yes",
                    "name": "Renamed",
                    "arg": "50",
                    "serial": "X",
                    "setup_code": "Y",
                    "email": "a@b.example",
                    "password": PASSWORD,
                    "code": "123456",
                },
            )
            assert response.status_code == 403, (method, path, response.status_code)
            assert "read-only" in response.get_data(as_text=True)
            checked.append((method, rule.endpoint))
    endpoints = {endpoint for _, endpoint in checked}
    for expected in (
        "devices.release",
        "devices.rename",
        "devices.call_function",
        "devices.claim",
        "accounts.change_password",
        "support.release_device",
        "support.start_view",
        "account_data.delete",
        "account_data.undo_delete",
        "alerts.shared_devices",
        "organisations.group_alerts",
        "sharing.accept",
    ):
        if expected in app.view_functions:
            assert expected in endpoints
    assert writes(sim) == {}
    assert own_state(WINDOW).owner_id == customer.id and own_state(WINDOW).name is None
    assert User.get_by_id(customer.id).password_hash == customer.password_hash


def test_particle_writes_are_refused_even_if_a_get_tries_one(app, console, customer, sim):
    """The second wall: while viewing, the client refuses writes whatever route asks."""
    from selfserve.particle import ReadOnlyRequest
    from selfserve.particle import forbid_writes
    from selfserve.particle import get_client

    start_view(console, customer)
    sim.reset_counters()
    with app.test_request_context("/devices"):
        forbid_writes()
        with pytest.raises(ReadOnlyRequest):
            get_client().remove_device_owner(WINDOW)
        with pytest.raises(ReadOnlyRequest):
            get_client().call_function(customer.particle_customer_id, WINDOW, "stop", "")
        get_client().customer_token(customer.particle_customer_id)  # reads still get tokens
    assert writes(sim) == {}


def test_end_view_rotates_and_audits_and_the_staff_is_back(console, customer):
    start_view(console, customer)
    view = StaffView.get()
    response = post(console, "/support/view/end", token_page="/devices")
    assert response.status_code == 302 and response.headers["Location"].endswith(
        f"/support/customers/{customer.id}"
    )
    view = StaffView.get_by_id(view.id)
    assert view.ended_at is not None and view.end_cause == "ended"
    assert LoginSession.get_by_id(view.login_session_id).ended_at is not None
    page = console.get("/devices").get_data(as_text=True)
    assert "data-staff-view" not in page and "Support console" in page
    ended = events("support.view_ended", customer)
    assert len(ended) == 1 and ended[0].detail["cause"] == "ended"
    # Ending twice: nothing to end.
    response = post(console, "/support/view/end", follow_redirects=True)
    assert "already ended" in response.get_data(as_text=True)


def test_view_expires_by_itself(app, console, customer):
    start_view(console, customer)
    view = StaffView.get()
    StaffView.update(
        expires_at=datetime.datetime(2020, 1, 1), started_at=datetime.datetime(2019, 12, 31, 23, 30)
    ).where(StaffView.id == view.id).execute()
    page = console.get("/devices").get_data(as_text=True)
    assert "data-staff-view" not in page
    assert "ended by itself" in page
    assert StaffView.get_by_id(view.id).end_cause == "expired"
    assert len(events("support.view_ended", customer)) == 1
    assert not events("support.page_viewed", customer)


def test_the_homeowner_sees_that_support_viewed_their_account(app, console, customer):
    start_view(console, customer)
    console.get("/devices")
    post(console, "/support/view/end", token_page="/devices")
    home = app.test_client()
    login(home, customer.email, PASSWORD)
    page = home.get("/account/activity").get_data(as_text=True)
    # One entry for the visit: the reason support gave, how long, the pages seen (folded).
    assert page.count("data-support-visit") == 1
    assert "Support viewed your account" in page and "Reason: " in page
    assert "1 page seen" in page and '<li class="mono">/devices</li>' in page
    assert "Support looked at" not in page and "Support stopped viewing" not in page
    assert "data-staff-view" not in page


def test_view_time_left_is_shown_and_configurable(app, console, customer):
    app.config["STAFF_VIEW_MINUTES"] = 5
    start_view(console, customer)
    page = console.get("/account").get_data(as_text=True)
    seconds = int(re.search(r'data-seconds-left="(\d+)"', page).group(1))
    assert 240 < seconds <= 300
    assert "js/support.js" in page


# --- staff actions ---------------------------------------------------------------------------------


def test_release_needs_reason_and_confirmation_and_is_audited(console, customer, labels, sim):
    own(customer, labels, WINDOW)
    path = f"/support/devices/{WINDOW}/release"
    response = post(console, path, {"reason": "stolen, ticket 77"}, follow_redirects=True)
    assert "Tick the box" in response.get_data(as_text=True)
    response = post(console, path, {"confirm": "yes"}, follow_redirects=True)
    assert "Give a reason" in response.get_data(as_text=True)
    assert own_state(WINDOW).owner_id == customer.id
    response = post(console, path, {"reason": "stolen, ticket 77", "confirm": "yes"}, follow_redirects=True)
    assert "The device was released" in response.get_data(as_text=True)
    assert own_state(WINDOW).owner_id is None
    assert sim.device(WINDOW)["owner"] is None
    row = events("support.released_device", customer)[0]
    assert row.actor.email == STAFF_EMAIL and row.detail["reason"] == "stolen, ticket 77"


def test_release_while_the_cloud_is_down_changes_nothing(console, customer, labels, sim):
    own(customer, labels, WINDOW)
    sim.add_fault("DELETE", "/v1/products/*/devices/*/owner", count=1, status=503)
    response = post(
        console,
        f"/support/devices/{WINDOW}/release",
        {"reason": "return 12", "confirm": "yes"},
        follow_redirects=True,
    )
    assert "still yours" in response.get_data(as_text=True) or "not released" in response.get_data(
        as_text=True
    )
    assert own_state(WINDOW).owner_id == customer.id
    assert not events("support.released_device")


def test_resend_verification_for_an_unverified_customer(console, mailbox):
    waiting = make_user("waiting@example.com", PASSWORD, verified=False)
    response = post(
        console,
        f"/support/customers/{waiting.id}/resend-verification",
        {"reason": "call 3"},
        follow_redirects=True,
    )
    assert "new verification link was sent" in response.get_data(as_text=True)
    mailbox.wait_for("waiting@example.com")
    assert events("support.resent_verification", waiting)[0].detail["reason"] == "call 3"


def test_retry_and_cancel_stuck_device_steps(console, customer, labels, sim):
    own(customer, labels, WINDOW)
    old = datetime.datetime(2020, 1, 1)
    # A release that stopped half-way: retry finishes it.
    Device.update(claim_state="releasing", claim_state_at=old).where(Device.device_id == WINDOW).execute()
    response = post(console, f"/support/devices/{WINDOW}/retry", {"reason": "stuck 1"}, follow_redirects=True)
    assert "Done" in response.get_data(as_text=True)
    assert own_state(WINDOW).owner_id is None and sim.device(WINDOW)["owner"] is None
    # A claim that stopped half-way (Particle already claimed): cancel gives it back to nobody.
    own(customer, labels, WINDOW)
    Device.update(claim_state="claiming", claim_state_at=old).where(Device.device_id == WINDOW).execute()
    response = post(
        console, f"/support/devices/{WINDOW}/cancel", {"reason": "stuck 2"}, follow_redirects=True
    )
    assert "Done" in response.get_data(as_text=True)
    assert own_state(WINDOW).owner_id is None and own_state(WINDOW).claim_state is None
    assert sim.device(WINDOW)["owner"] is None
    assert [e.detail["reason"] for e in events("support.retried", customer)] == ["stuck 1"]
    assert [e.detail["reason"] for e in events("support.cancelled", customer)] == ["stuck 2"]
    response = post(console, f"/support/devices/{WINDOW}/retry", {"reason": "nothing"}, follow_redirects=True)
    assert "Nothing is in progress" in response.get_data(as_text=True)


def test_retry_stuck_account_setup(console, sim):
    waiting = make_user("pending@example.com", PASSWORD, verified=True, provisioned=False)
    User.update(provisioning_attempts=3, provisioning_next_at=datetime.datetime(2999, 1, 1)).where(
        User.id == waiting.id
    ).execute()
    assert "Account setup not finished" in console.get("/support/fleet").get_data(as_text=True)
    response = post(
        console, f"/support/customers/{waiting.id}/retry-setup", {"reason": "ticket 8"}, follow_redirects=True
    )
    assert "now set up" in response.get_data(as_text=True)
    assert User.get_by_id(waiting.id).provisioning_state == "ready"


def test_banner_on_every_page_while_viewing(app, console, customer, labels):
    own(customer, labels, WINDOW)
    start_view(console, customer)
    values = {
        "device_id": WINDOW,
        "customer_id": str(customer.id),
        "token": "not-a-token",
        "function_name": "stop",
        "filename": "css/site.css",
    }
    checked = []
    for rule in app.url_map.iter_rules():
        # The one-click unsubscribe page is stand-alone on purpose: no session, no banner.
        if "GET" not in rule.methods or rule.endpoint in ("static", "alerts.unsubscribe"):
            continue
        path = fill(rule, values)
        response = console.get(path, follow_redirects=True)
        page = response.get_data(as_text=True)
        if response.mimetype != "text/html" or "<html" not in page:
            continue
        assert "data-staff-view" in page, (path, response.status_code)
        assert "is viewing as <strong>home@example.com</strong>" in page
        checked.append(rule.endpoint)
    for endpoint in (
        "devices.dashboard",
        "devices.detail",
        "devices.release",
        "accounts.settings",
        "accounts.activity",
        "support.home",
        "support.fleet",
        "support.customer",
        "main.index",
    ):
        if endpoint in app.view_functions:
            assert endpoint in checked, endpoint
    # A refused action's error page carries the banner too (a way out).
    response = post(console, f"/devices/{WINDOW}/rename", {"name": "x"}, token_page="/devices")
    assert response.status_code == 403 and "data-staff-view" in response.get_data(as_text=True)


def test_customer_page_and_fleet_show_transfers_and_alerts(console, customer, labels, mailbox):
    from selfserve import models
    from selfserve.services import audit

    audit.record("staff.alert", user=None, device_id=WINDOW, reason="move failed")
    page = console.get("/support/fleet").get_data(as_text=True)
    assert "Alerts" in page and "move failed" in page
    from selfserve.services import transfers

    own(customer, labels, WINDOW)
    transfer = transfers.offer(customer, Device.get_by_id(WINDOW), "buyer@example.com")
    page = console.get(f"/support/customers/{customer.id}").get_data(as_text=True)
    assert f"offered by {customer.email} to buyer@example.com" in page
    # A fresh offer waits on the buyer: not on the fleet's needs-staff list.
    assert "buyer@example.com" not in console.get("/support/fleet").get_data(as_text=True)
    models.Transfer.update(state="objected", kind="request").where(
        models.Transfer.id == transfer.id
    ).execute()
    page = console.get("/support/fleet").get_data(as_text=True)
    assert f"asked for by buyer@example.com from {customer.email}" in page


def test_second_factor_guesses_are_rate_limited(app, staff_user):
    sign_in_staff(app.test_client(), staff_user)  # enrols
    client = app.test_client()
    login(client, staff_user.email, PASSWORD)
    token = csrf_token(client, "/support/second-factor")
    wrong = "000000" if code_for(staff_user) != "000000" else "111111"
    statuses = [
        client.post("/support/second-factor", data={"code": wrong, "csrf_token": token}).status_code
        for _ in range(10)
    ]
    # 10 tries per 5 minutes per staff account; the enrolment above was the first.
    assert statuses == [401] * 9 + [429]
    assert client.get("/support").status_code == 302


def test_the_homeowner_never_sees_the_staff_members_address(app, console, customer):
    console.environ_base["REMOTE_ADDR"] = "203.0.113.7"
    start_view(console, customer)
    console.get("/devices")
    post(console, "/support/view/end", token_page="/devices")
    home = app.test_client()
    login(home, customer.email, PASSWORD)
    page = home.get("/account/activity").get_data(as_text=True)
    assert "Support viewed your account" in page
    assert "203.0.113.7" not in page
    assert "<td>Support</td>" in page


def test_support_polling_a_pending_account_does_not_drive_its_setup(app, console, sim):
    waiting = make_user("pending.view@example.com", PASSWORD, verified=True, provisioned=False)
    User.update(provisioning_next_at=datetime.datetime(2000, 1, 1)).where(User.id == waiting.id).execute()
    before = User.get_by_id(waiting.id)
    start_view(console, waiting)
    response = console.get("/account/status")
    assert response.status_code == 200
    after = User.get_by_id(waiting.id)
    assert after.provisioning_state == "pending"
    assert after.provisioning_attempts == before.provisioning_attempts
    assert after.provisioning_error == before.provisioning_error
    assert writes(sim) == {}


def test_staff_pages_speak_about_the_customer_not_to_them(app, console, customer):
    start_view(console, customer)
    post(console, "/support/view/end", token_page="/devices")
    page = console.get(f"/support/customers/{customer.id}").get_data(as_text=True)
    assert (
        "Support viewed the customer&#39;s account" in page or "Support viewed the customer's account" in page
    )
    assert "your account" not in page


def test_pages_say_they_are_read_only_while_viewing_so_site_js_disables_their_controls(
    app, console, customer, labels
):
    own(customer, labels, WINDOW)
    body = re.compile(r"<body [^>]*\bdata-read-only\b")
    # Support without a view, and the homeowner themselves: controls are live.
    assert not body.search(console.get("/support").get_data(as_text=True))
    homeowner = app.test_client()
    login(homeowner, customer.email, PASSWORD)
    for path in ("/devices", f"/devices/{WINDOW}", "/account"):
        assert not body.search(homeowner.get(path).get_data(as_text=True)), path

    start_view(console, customer)
    for path in ("/devices", f"/devices/{WINDOW}", "/devices/claim", "/account", "/help", "/no-such-page"):
        page = console.get(path).get_data(as_text=True)
        assert body.search(page), path
        # The one form that must keep working is marked for site.js to leave alone.
        end_view = re.search(r'<form[^>]*action="/support/view/end"[^>]*>', page).group(0)
        assert "data-allowed-while-viewing" in end_view, path
        assert page.count("data-allowed-while-viewing") == 1, path
    # The server refuses anyway: the marker is presentation only.
    response = post(console, f"/devices/{WINDOW}/rename", {"name": "x"}, token_page="/devices")
    assert response.status_code == 403 and body.search(response.get_data(as_text=True))

    post(console, "/support/view/end", token_page="/devices")
    assert not body.search(console.get("/devices").get_data(as_text=True))
