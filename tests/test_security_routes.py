"""The route matrix: every rule in app.url_map, so routes added later are covered without
anyone remembering to add them here.

- deny by default: anonymous requests are sent to sign in, except an explicit, reviewed list
  of public views (a new public view fails until it is added here on purpose);
- CSRF: every POST/PUT/PATCH/DELETE without a valid token is a 400 and changes nothing, for
  plain and htmx requests alike;
- no GET changes state: crawling every page and fragment leaves the database (minus caches)
  and the simulated cloud (minus token minting) as they were;
- ownership: another customer's device, or a malformed id, by every device-scoped URL, is a
  404 with no Particle call at all.
"""

import datetime

import pytest
from helpers import PASSWORD
from helpers import PUMP
from helpers import WINDOW
from helpers import csrf_token
from helpers import login
from helpers import make_user
from test_security_crawl import HTMX
from test_security_crawl import Crawler
from test_security_crawl import concrete_rules

from selfserve import models
from selfserve.models import Device
from selfserve.services import devices

OTHERS_WINDOW = "e00fce68a1b2c3d4e5f60702"
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}

# Views anyone may open without signing in. Reviewed one by one: a view decorated @public that
# is not listed here fails test_public_views_are_exactly_the_reviewed_list until reviewed.
PUBLIC = {
    "main.index": "landing page",
    "main.healthz": "load balancer health check, says only ok",
    "main.help": "how to reach support: static text and the configured support address; people who can't sign in need it most",
    "accounts.signup": "sign-up form (POST rate-limited)",
    "accounts.login": "sign-in form (POST rate-limited)",
    "accounts.forgot": "forgotten password form (POST rate-limited)",
    "accounts.verify": "emailed link: GET shows a button, POST verifies; the signed token is the proof",
    "accounts.reset": "emailed link: signed, single-use token",
    "accounts.confirm_email": "emailed link: GET shows a button, POST changes the address",
    "accounts.send_sign_in_link": "a throttled owner asks for a sign-in link (POST only, rate-limited, same answer for every address)",
    "accounts.sign_in_link": "emailed sign-in link: GET shows a button, POST signs in once; signed, 15 minutes",
    "devices.claim_from_label": "label QR link: moves a code in the query into the fragment, then checks the sign-in itself",
    "demo.mailbox": "demo mode only: the local mailbox (never registered outside DEMO)",
    "transfers.offer_link": "emailed offer link: a signed token shows the offer, accepting needs an account",
    "transfers.answer_link": "emailed link to the recorded owner: a signed token lets them approve or object",
    "sharing.invitation_link": "emailed invitation link: a signed token shows the invitation; accepting is a signed-in POST",
    "hooks.particle": "Particle's product webhook: no session at all; the shared secret (constant-time compare) or 401",
    "alerts.unsubscribe": "emailed one-click unsubscribe (RFC 8058): a signed token naming the person and kinds; GET only shows a button",
}

# Views exempt from CSRF (they take no cookie-authenticated request): reviewed one by one.
CSRF_EXEMPT = {
    "hooks.particle": "machine endpoint authenticated by its secret, never by a session cookie",
    "alerts.unsubscribe": "RFC 8058 one-click POST from mail clients, which have no session: the signed token is the proof, and all it can do is turn alerts off",
}

# Values for URL arguments: the signed-in homeowner's own device, so every request reaches the
# view (and would change something if it weren't refused for another reason).
FORM = {
    "name": "Renamed by a forged form",
    "arg": "10",
    "confirmed": "yes",
    "confirm": "yes",
    "email": "victim@example.com",
    "password": PASSWORD,
    "current_password": PASSWORD,
    "new_password": "a brand new password 123",
    "new_email": "attacker@example.com",
    "email_password": PASSWORD,
    "serial": "SSP-24B-000201",
    "setup_code": "R2DX7GHU",
    "reason": "a forged request with a reason",
    "code": "123456",
}

# Caches may change on a GET (that is what they are for); everything else may not.
# History is recorded from every value read, whoever's page asked for it (derived from the
# device, like the snapshot), and its rollups are marked pending as values arrive.
CACHE_TABLES = {"devicesnapshot", "particletoken", "valuesample", "rolluppending"}
IGNORED_COLUMNS = {("loginsession", "last_seen_at")}


@pytest.fixture
def app_config(app_config, tmp_path):
    # Demo mode registers the demo blueprint too, so its routes are in the matrix.
    app_config["DEMO"] = True
    app_config["DEMO_MAILBOX_DIR"] = str(tmp_path / "mailbox")
    return app_config


@pytest.fixture
def owner(app, sim, labels):
    user = make_user("owner@example.com", PASSWORD)
    for device_id in (WINDOW, PUMP):
        label = labels[device_id]
        devices.claim(user, label["serial_number"], label["setup_code"])
    return user


@pytest.fixture
def browser(app, owner):
    client = app.test_client()
    assert login(client, owner.email, PASSWORD).status_code == 200
    return client


def values_for(user, device_id=WINDOW):
    return {
        "device_id": device_id,
        "customer_id": str(user.id),
        "function_name": "open",
        "token": "not-a-token",
        "transfer_id": "1",
    }


def database_state(page_views_allowed=False):
    """Every row of every table (caches left out), as comparable values. With
    `page_views_allowed`, the audit rows of staff page views are left out too (the support
    console records every customer and device page a staff member opens, and every page seen
    while viewing as a customer)."""
    state = {}
    for model in models.ALL_MODELS:
        table = model._meta.table_name
        if table in CACHE_TABLES:
            continue
        columns = [f for f in model._meta.sorted_fields if (table, f.column_name) not in IGNORED_COLUMNS]
        query = model.select(*columns)
        if page_views_allowed and model is models.AuditEvent:
            query = query.where(
                ~(
                    models.AuditEvent.action.startswith("support.")
                    & models.AuditEvent.action.contains("viewed")
                )
            )
        state[table] = sorted(tuple(str(v) for v in row) for row in query.tuples())
    return state


def diff(before, after):
    return {
        table: {
            "gone": sorted(set(before[table]) - set(after[table])),
            "new": sorted(set(after[table]) - set(before[table])),
        }
        for table in before
        if before[table] != after[table]
    }


def particle_writes(sim):
    """Calls that change something in the cloud: every method but GET, except minting tokens."""
    return {
        route: count
        for route, count in sim.counters()["routes"].items()
        if count and not route.startswith("GET ") and route != "POST /oauth/token"
    }


# --- deny by default ------------------------------------------------------------------------------


def test_public_views_are_exactly_the_reviewed_list(app):
    public = {
        endpoint
        for endpoint, view in app.view_functions.items()
        if endpoint != "static" and getattr(view, "is_public", False)
    }
    assert public - set(PUBLIC) == set(), "new public views: review them and add them to PUBLIC"
    registered = set(app.view_functions)
    assert {"demo.mailbox", "accounts.login", "devices.dashboard"} <= registered
    # Listed but gone, or no longer public: keep the list honest (a missing route fails here).
    assert set(PUBLIC) - registered == set(), "public views that are not registered"
    assert set(PUBLIC) - public == set()


def test_anonymous_requests_are_sent_to_sign_in(app, owner):
    anonymous = app.test_client()
    token = csrf_token(anonymous, "/login")
    checked = 0
    for method, path, rule in concrete_rules(app, values_for(owner)):
        if rule.endpoint in PUBLIC:
            continue
        for htmx in (False, True):
            headers = {**HTMX, "X-CSRFToken": token} if htmx else {}
            response = anonymous.open(
                path, method=method, headers=headers, data={"csrf_token": token, **FORM}
            )
            where = (method, path, htmx, response.status_code)
            if htmx:
                # htmx: navigate the whole page to sign-in, nothing swapped in.
                assert response.status_code == 200 and response.get_data() == b"", where
                assert response.headers["HX-Redirect"].startswith("/login"), where
            else:
                assert response.status_code == 302, where
                assert response.headers["Location"].startswith("/login"), where
            checked += 1
    assert checked >= 40


def test_public_views_answer_anonymous_requests_without_errors(app, owner):
    anonymous = app.test_client()
    for _method, path, rule in concrete_rules(app, values_for(owner), {"GET"}):
        if rule.endpoint in PUBLIC:
            response = anonymous.get(path)
            assert response.status_code < 500, (path, response.status_code)


# --- CSRF -------------------------------------------------------------------------------------------


def _forged_requests(app, owner, token_of_another_session):
    """(method, path, headers, data) for every state-changing rule: no token, a garbage token,
    another session's token, each as plain form and as htmx."""
    for method, path, rule in concrete_rules(app, values_for(owner), STATE_CHANGING):
        if rule.endpoint in CSRF_EXEMPT:
            continue
        variants = [
            ({}, dict(FORM)),
            ({}, {**FORM, "csrf_token": "garbage"}),
            ({}, {**FORM, "csrf_token": token_of_another_session}),
            (dict(HTMX), dict(FORM)),
            ({**HTMX, "X-CSRFToken": "garbage"}, dict(FORM)),
            ({**HTMX, "X-CSRFToken": token_of_another_session}, dict(FORM)),
        ]
        for headers, data in variants:
            yield method, path, rule, headers, data


def test_every_state_change_needs_the_csrf_token(app, owner, browser, sim):
    stranger = app.test_client()
    stranger_token = csrf_token(stranger, "/login")
    before = database_state()
    sim.reset_counters()
    checked = set()
    for method, path, rule, headers, data in _forged_requests(app, owner, stranger_token):
        for client in (browser, app.test_client()):  # signed in, and anonymous
            response = client.open(path, method=method, headers=headers, data=data)
            where = (method, path, headers, sorted(data)[:1], response.status_code)
            assert response.status_code == 400, where
            if headers.get("HX-Request"):
                # The message is swapped into the flash region on purpose.
                assert response.headers.get("HX-Retarget") == "#flashes", where
            assert "expired" in response.get_data(as_text=True), where
        checked.add(rule.endpoint)
    assert diff(before, database_state()) == {}
    assert sim.counters()["total"] == 0
    assert {
        "accounts.login",
        "accounts.logout",
        "devices.claim",
        "devices.call_function",
        "devices.rename",
        "devices.release",
        "account_data.delete",
        "account_data.undo_delete",
    } <= checked
    # The signed-in session survived every forged logout.
    assert browser.get("/account").status_code == 200


def test_the_real_token_works_where_the_forged_ones_failed(app, owner, browser, sim):
    """The refusals above are CSRF refusals, not broken routes: with the token the same rename
    goes through."""
    token = csrf_token(browser, f"/devices/{WINDOW}")
    response = browser.post(
        f"/devices/{WINDOW}/rename",
        data={"name": "Bedroom", "csrf_token": token},
        headers={**HTMX, "X-CSRFToken": token},
    )
    assert response.status_code == 200
    assert Device.get_by_id(WINDOW).name == "Bedroom"


def test_csrf_exempt_views_are_exactly_the_reviewed_list_and_refuse_a_browser(app, owner, browser, sim):
    from selfserve.security import csrf

    exempt = {
        endpoint
        for endpoint, view in app.view_functions.items()
        if f"{view.__module__}.{view.__name__}" in csrf._exempt_views
    }
    assert exempt == set(CSRF_EXEMPT)
    before = database_state()
    sim.reset_counters()
    for method, path, rule in concrete_rules(app, values_for(owner), STATE_CHANGING):
        if rule.endpoint not in CSRF_EXEMPT:
            continue
        for client in (browser, app.test_client()):  # a signed-in session is no credential there
            response = client.open(path, method=method, headers=HTMX, data=dict(FORM))
            assert response.status_code in (401, 404), (path, response.status_code)
            assert "Set-Cookie" not in response.headers
    assert diff(before, database_state()) == {}
    assert sim.counters()["total"] == 0


# --- no GET changes state ---------------------------------------------------------------------------------


def test_no_get_changes_state(app, owner, browser, sim):
    before = database_state()
    sim.reset_counters()
    values = {**values_for(owner), "device_id": [WINDOW, PUMP, OTHERS_WINDOW, "not-a-device"]}
    # Every rule fetched with GET, including POST-only ones (they must answer 405, not act).
    paths = sorted({path for method, path, rule in concrete_rules(app, values)})
    signed_in = Crawler(browser)
    signed_in.crawl(["/"] + paths)
    anonymous = Crawler(app.test_client())
    anonymous.crawl(["/"] + paths)

    for item in signed_in.fetched + anonymous.fetched:
        assert item.status < 500, (item.url, item.status)
    post_only = [
        path
        for method, path, rule in concrete_rules(app, values)
        if "GET" not in rule.methods and method == "POST"
    ]
    assert post_only
    for item in signed_in.fetched:
        if item.url in post_only:
            assert item.status == 405, (item.url, item.status)
    # The live fragments did read the cloud (so "nothing changed" is not "nothing ran").
    assert sim.counters()["routes"].get("GET /v1/devices/:id/:name", 0) > 0
    assert particle_writes(sim) == {}
    assert diff(before, database_state()) == {}
    assert browser.get("/account").status_code == 200  # still signed in
    # The downloads and the deletion's pages were among them (and answered).
    fetched = {item.url: item.status for item in signed_in.fetched}
    for path in ("/account/data.json", "/account/data.zip", "/account/delete", "/account/delete/scheduled"):
        assert fetched.get(path) in (200, 302), (path, fetched.get(path))


def test_no_get_changes_state_for_staff_in_the_console_and_viewing_as_a_customer(app, owner, sim):
    from test_support_views import sign_in_staff

    from selfserve.models import AuditEvent
    from selfserve.services import staff

    staff_user = staff.create_staff("gets@support.example", PASSWORD)
    console = sign_in_staff(app.test_client(), staff_user)
    values = {
        **values_for(owner),
        "device_id": [WINDOW, OTHERS_WINDOW],
        "customer_id": [str(owner.id), "999"],
    }
    paths = sorted({path for method, path, rule in concrete_rules(app, values)})
    before = database_state(page_views_allowed=True)
    sim.reset_counters()
    Crawler(console).crawl(
        [
            "/support",
            "/support?q=owner",
            "/support/fleet",
            "/support/mail",
            "/support/mail?address=owner@example.com",
        ]
        + paths
    )
    assert particle_writes(sim) == {}
    assert diff(before, database_state(page_views_allowed=True)) == {}

    # While viewing as the customer, GETs record page views and nothing else.
    token = csrf_token(console, "/support")
    started = console.post(
        f"/support/customers/{owner.id}/view", data={"reason": "ticket 77", "csrf_token": token}
    )
    assert started.status_code == 302
    before = database_state(page_views_allowed=True)
    views_before = AuditEvent.select().where(AuditEvent.action == "support.page_viewed").count()
    sim.reset_counters()
    viewer = Crawler(console)
    viewer.crawl(["/devices", f"/devices/{WINDOW}", "/account"] + paths)
    assert all(item.status < 500 for item in viewer.fetched), [
        (i.url, i.status) for i in viewer.fetched if i.status >= 500
    ]
    assert particle_writes(sim) == {}
    assert diff(before, database_state(page_views_allowed=True)) == {}
    assert AuditEvent.select().where(AuditEvent.action == "support.page_viewed").count() > views_before


# --- ownership: another customer's device ---------------------------------------------------------------

MALFORMED_IDS = [
    "not-a-device",
    "e00fce68a1b2c3d4e5f6070",  # 23
    "e00fce68a1b2c3d4e5f607011",  # 25
    "e00fce68a1b2c3d4e5f6070g",
    "E00FCE68A1B2C3D4E5F6070100",
    "%00",
    "..",
    "0" * 200,
    "e00fce68a1b2c3d4e5f60701%0a",
]


def test_another_customers_device_is_404_by_every_device_url_without_particle_calls(app, owner, labels, sim):
    other = make_user("other@example.com", PASSWORD)
    label = labels[OTHERS_WINDOW]
    devices.claim(other, label["serial_number"], label["setup_code"])
    client = app.test_client()
    login(client, other.email, PASSWORD)
    token = csrf_token(client, "/devices")
    before = database_state()
    sim.reset_counters()

    device_rules = [rule for rule in app.url_map.iter_rules() if "device_id" in rule.arguments]
    assert {
        "devices.detail",
        "devices.values",
        "devices.summary",
        "devices.rename",
        "devices.release",
        "devices.call_function",
        "devices.history_charts",
        "devices.history_csv",
    } <= {rule.endpoint for rule in device_rules}
    checked = 0
    for device_id in [WINDOW, PUMP, WINDOW.upper(), "f" * 24] + MALFORMED_IDS:
        for method, path, rule in concrete_rules(app, {**values_for(other), "device_id": device_id}):
            if "device_id" not in rule.arguments:
                continue
            # Staff-only routes are refused to customers before any lookup.
            expected = 403 if rule.endpoint.startswith("support.") else 404
            for htmx in (False, True):
                headers = {**HTMX, "X-CSRFToken": token} if htmx else {}
                response = client.open(
                    path, method=method, headers=headers, data={"csrf_token": token, **FORM}
                )
                assert response.status_code == expected, (method, path, htmx, response.status_code)
                checked += 1
    assert checked >= 100
    assert sim.counters()["total"] == 0, sim.counters()
    assert diff(before, database_state()) == {}
    assert Device.get_by_id(WINDOW).owner_id == owner.id and Device.get_by_id(WINDOW).name is None


def test_a_device_mid_claim_or_release_is_404_too(app, owner, sim):
    """device_for only hands out devices with no claim or release in flight."""
    Device.update(claim_state="releasing", claim_state_at=datetime.datetime(2020, 1, 1)).where(
        Device.device_id == PUMP
    ).execute()
    client = app.test_client()
    login(client, owner.email, PASSWORD)
    sim.reset_counters()
    for _method, path, rule in concrete_rules(app, values_for(owner, PUMP), {"GET"}):
        if "device_id" in rule.arguments and rule.endpoint.startswith("devices."):
            assert client.get(path, headers=HTMX).status_code == 404, path
    assert sim.counters()["total"] == 0


def test_another_customers_transfer_is_404_by_every_transfer_url(app, owner, sim, mailbox):
    """Every route naming a transfer answers a stranger (neither seller nor buyer) with 404 and
    changes nothing, wherever it sits in the url_map."""
    from selfserve.services import transfers

    transfer_rules = [rule for rule in app.url_map.iter_rules() if "transfer_id" in rule.arguments]
    # The transfers blueprint is part of the site: its routes missing is a failure, not a skip.
    assert len(transfer_rules) >= 4, "the transfer routes are not registered"
    offer = transfers.offer(owner, devices.device_for(owner, WINDOW), "buyer@example.com")
    stranger = make_user("stranger@example.com", PASSWORD)
    client = app.test_client()
    login(client, stranger.email, PASSWORD)
    token = csrf_token(client, "/devices")
    seller = app.test_client()
    login(seller, owner.email, PASSWORD)
    assert seller.get(f"/transfers/{offer.id}").status_code == 200  # the id is real
    before = database_state()
    sim.reset_counters()
    checked = 0
    for transfer_id in (str(offer.id), str(offer.id + 1000)):
        for method, path, rule in concrete_rules(app, {**values_for(stranger), "transfer_id": transfer_id}):
            if "transfer_id" not in rule.arguments:
                continue
            expected = 403 if rule.endpoint.startswith("support.") else 404
            for htmx in (False, True):
                headers = {**HTMX, "X-CSRFToken": token} if htmx else {}
                response = client.open(
                    path, method=method, headers=headers, data={"csrf_token": token, **FORM}
                )
                assert response.status_code == expected, (method, path, htmx, response.status_code)
                checked += 1
    assert checked >= 8
    assert sim.counters()["total"] == 0
    assert diff(before, database_state()) == {}
