"""Bad input never gets a 5xx: every rule of app.url_map, every field any view reads, as a
homeowner, as staff (second factor passed) and anonymously, on SQLite and (with
SELFSERVE_TEST_DATABASE_URL) PostgreSQL.

- NUL and other control characters in any query or form field: a 400 with the message,
  before anything is written (the database is unchanged, no session rotated);
- ids past 64 bits in integer routes: a 404;
- everything else odd (huge, empty, unicode, SQL, negative, path tricks): anything but a 5xx.

The values are a fixed list (deterministic, so a failure names the exact request to replay).
"""

import glob
import os
import re
from urllib.parse import quote

import pytest
from helpers import csrf_token
from helpers import login
from helpers import make_user
from test_security_crawl import HTMX
from test_security_crawl import concrete_rules
from test_security_routes import PASSWORD
from test_security_routes import PUMP
from test_security_routes import WINDOW
from test_security_routes import database_state
from test_security_routes import diff
from test_security_routes import values_for

from selfserve import input_rules
from selfserve.models import LoginSession
from selfserve.services import devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def field_names():
    """Every query and form field any view reads (found in the views' source, so a field added
    later is fuzzed without anyone listing it), plus the ones every form carries."""
    names = {"next", "csrf_token"}
    for path in glob.glob(os.path.join(ROOT, "selfserve", "views", "*.py")):
        with open(path, encoding="utf-8") as handle:
            names |= set(re.findall(r"request\.(?:args|form|values)\.get(?:list)?\(\"(\w+)\"", handle.read()))
    return sorted(names)


CONTROL = ["\x00", "ok\x00ok", "\x1b[2J", "line\r\nX-Injected: 1", "\x7f", "\x85", "\x08"]
ODD = [
    "",
    "A" * 5000,
    "é" * 300,  # 300 characters, 600 bytes: past a varchar(254) on PostgreSQL
    "\U0001f4a1" * 100,
    "9" * 40,  # past every integer column
    "-1",
    "NaN",
    "' OR 1=1 --",
    "\u202eevil",
    "//evil.example/",
]
PATH_VALUES = ["9223372036854775808", "18446744073709551616", "9" * 40, "-1", "0", "%00", "A" * 500]


@pytest.fixture
def app_config(app_config, tmp_path):
    app_config["DEMO"] = True  # the demo routes are fuzzed too
    app_config["DEMO_MAILBOX_DIR"] = str(tmp_path / "mailbox")
    return app_config


@pytest.fixture
def clients(app, sim, mailbox):
    from helpers import seed_registry
    from test_support_views import sign_in_staff

    from selfserve.services import staff
    from selfserve.services import transfers

    labels = {device["id"]: device for device in seed_registry()}
    owner = make_user("owner@example.com", PASSWORD)
    for device_id in (WINDOW, PUMP):
        devices.claim(owner, labels[device_id]["serial_number"], labels[device_id]["setup_code"])
    offer = transfers.offer(owner, devices.device_for(owner, WINDOW), "buyer@example.com")
    homeowner = app.test_client()
    assert login(homeowner, owner.email, PASSWORD).status_code == 200
    staff_user = staff.create_staff("fuzz@support.example", PASSWORD)
    console = sign_in_staff(app.test_client(), staff_user)
    values = {**values_for(owner), "transfer_id": str(offer.id)}
    return {"homeowner": homeowner, "staff": console, "anonymous": app.test_client()}, values


def _requests(app, values, field_value):
    """(method, path, query, form) for every rule, every field set to `field_value`; the
    sign-out and end-view routes last (they would cut the rest of the run short)."""
    names = [name for name in field_names() if name != "csrf_token"]
    fields = {name: field_value for name in names}
    items = [(method, path, fields, fields) for method, path, _rule in concrete_rules(app, values)]
    return sorted(items, key=lambda item: item[1].endswith(("/logout", "/view/end")))


def _paths_with(app, argument):
    """(method, path) for every rule with an argument, each argument set to `argument`
    (percent-encoded as a browser would; any converter, so an int route gets text too)."""
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static" or not rule.arguments:
            continue
        path = re.sub(r"<(?:[^:<>]+:)?(\w+)>", lambda _m: quote(argument, safe=""), rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield method, path


def _send(client, method, path, query, form, token, htmx=False):
    headers = {**HTMX, "X-CSRFToken": token} if htmx else {}
    data = {**form, "csrf_token": token} if method != "GET" else None
    # buffered: a streamed body (the data export) is read to its end, so an error in the middle
    # of it shows, and its request context ends with it.
    return client.open(path, method=method, query_string=query, data=data, headers=headers, buffered=True)


def test_control_characters_are_refused_everywhere_with_a_400_and_nothing_changes(app, clients, sim):
    by_role, values = clients
    before = database_state()
    sessions_before = {row.id for row in LoginSession.select() if row.ended_at is None}
    sim.reset_counters()
    checked = set()
    for role, client in by_role.items():
        token = _token(client, role)
        for number, value in enumerate(CONTROL):
            for method, path, query, form in _requests(app, values, value):
                # The query alone, then (state-changing requests) the form alone, as htmx.
                parts = [(query, {})] + ([({}, form)] if method != "GET" else [])
                for query_part, form_part in parts:
                    htmx = bool(form_part) or number % 2 == 1
                    response = _send(client, method, path, query_part, form_part, token, htmx=htmx)
                    where = (role, method, path, repr(value), bool(form_part), response.status_code)
                    assert response.status_code == 400, where
                    body = response.get_data(as_text=True)
                    assert "control" in body and "character" in body, where
                    checked.add(path)
    assert len(checked) >= 40
    changed = diff(before, database_state())
    assert changed == {}, repr(changed)
    # No session was ended or rotated (a staff view's reason used to rotate it first).
    assert {row.id for row in LoginSession.select() if row.ended_at is None} == sessions_before
    assert sim.counters()["total"] == 0


def test_odd_values_in_every_field_and_route_never_get_a_5xx(app, clients):
    by_role, values = clients
    failures = []
    for role, client in by_role.items():
        token = _token(client, role)
        for number, value in enumerate(ODD):
            for method, path, query, form in _requests(app, values, value):
                if path.endswith(("/logout", "/view/end")) and number < len(ODD) - 1:
                    continue  # signing out would end the run for this role: the last value only
                response = _send(client, method, path, query, form, token, htmx=number % 2 == 1)
                if response.status_code >= 500:
                    failures.append((role, method, path, repr(value)[:40], response.status_code))
    assert failures == []


def test_odd_route_arguments_never_get_a_5xx_and_huge_ids_are_404(app, clients):
    by_role, values = clients
    failures = []
    for role, client in by_role.items():
        token = _token(client, role)
        for argument in PATH_VALUES:
            for method, path in sorted(
                _paths_with(app, argument), key=lambda item: item[1].endswith("/logout")
            ):
                response = _send(client, method, path, {}, {"confirmed": "yes"}, token)
                if response.status_code >= 500:
                    failures.append((role, method, path, response.status_code))
        # Integer routes past 64 bits: not found, like any other id that doesn't exist.
        for huge in ("9223372036854775808", "99999999999999999999999"):
            for suffix in ("", "/accept", "/decline", "/cancel", "/approve", "/object", "/decide"):
                path = f"/transfers/{huge}{suffix}"
                method = "GET" if not suffix else "POST"
                response = _send(client, method, path, {}, {}, token)
                if role != "anonymous" or method == "GET":
                    assert response.status_code == 404, (role, path, response.status_code)
    assert failures == []


def _token(client, role):
    page = {"staff": "/support", "homeowner": "/account"}.get(role, "/login")
    try:
        return csrf_token(client, page)
    except AssertionError:  # signed out by a fuzzed logout: the sign-in page has one
        return csrf_token(client, "/login")


def test_the_int_converter_is_bounded_to_64_bits(app):
    adapter = app.url_map.bind("localhost")
    endpoint, args = adapter.match(f"/transfers/{input_rules.MAX_ID}")
    assert args == {"transfer_id": input_rules.MAX_ID}
    from werkzeug.exceptions import NotFound

    with pytest.raises(NotFound):
        adapter.match(f"/transfers/{input_rules.MAX_ID + 1}")


def test_the_view_reason_with_a_nul_keeps_the_staff_session(app, clients):
    """The reported case: the session was rotated before the insert of the reason failed."""
    by_role, values = clients
    console = by_role["staff"]
    token = csrf_token(console, "/support")
    live_before = {row.id for row in LoginSession.select().where(LoginSession.ended_at.is_null())}
    response = console.post(
        f"/support/customers/{values['customer_id']}/view",
        data={"reason": "ticket\x00 9", "csrf_token": token},
    )
    assert response.status_code == 400
    assert {row.id for row in LoginSession.select().where(LoginSession.ended_at.is_null())} == live_before
    assert console.get("/support").status_code == 200  # the same session, still signed in


def test_a_line_break_in_next_is_refused(app, clients):
    by_role, _values = clients
    console = by_role["staff"]
    response = console.get("/support/second-factor", query_string={"next": "/support\r\nSet-Cookie: x=1"})
    assert response.status_code == 400
    # And the console's own check refuses it even if it arrived some other way.
    from selfserve.views.support import _safe_support_next

    assert _safe_support_next("/support\r\nSet-Cookie: x=1") is None
    assert _safe_support_next("/support/fleet") == "/support/fleet"
