"""Issue 9, smaller findings: a setup code in a percent-encoded `next` reached the access log;
staff couldn't sign out while viewing as a customer."""

import logging

import pytest
from helpers import csrf_token
from test_support_views import PASSWORD
from test_support_views import customer  # noqa: F401 (fixture)
from test_support_views import events
from test_support_views import sign_in_staff
from test_support_views import staff_user  # noqa: F401 (fixture)
from test_support_views import start_view

from selfserve import tokens
from selfserve.models import LoginSession
from selfserve.models import StaffView

CODE = "R2DX7GHU"


def redacted(message):
    record = logging.LogRecord("werkzeug", logging.INFO, __file__, 1, message, None, None)
    tokens.RedactTokenPaths().filter(record)
    return record.getMessage()


@pytest.mark.parametrize(
    "line",
    [
        f'"GET /claim?serial=SSW-24A-000101&code={CODE} HTTP/1.1" 302 -',
        # The reported case: a label link inside the sign-in page's `next`.
        f'"GET /login?next=%2Fclaim%3Fserial%3DSSW-24A-000101%26code%3D{CODE} HTTP/1.1" 200 -',
        f'"GET /login?next=%2Fclaim%3Fcode%3D{CODE}%26serial%3DSSW HTTP/1.1" 200 -',
        # Encoded twice (a `next` inside a `next`), and a code typed with a space.
        f'"GET /login?next=%2Fx%3Fnext%3D%252Fclaim%253Fcode%253D{CODE} HTTP/1.1" 200 -',
        '"GET /login?next=%2Fclaim%3Fsetup_code%3DR2DX%2B7GHU HTTP/1.1" 200 -',
    ],
)
def test_setup_codes_are_redacted_from_access_logs_however_encoded(line):
    out = redacted(line)
    assert CODE not in out and "7GHU" not in out, out
    assert "<redacted>" in out


def test_emailed_link_tokens_are_redacted_inside_next_too():
    out = redacted('"GET /login?next=%2Ftransfers%2Foffer%2FeyJ1Ijo1fQ.aBc-_9.sig HTTP/1.1" 200 -')
    assert "eyJ1Ijo1fQ" not in out and "<redacted>" in out
    assert redacted('"GET /support?q=decode HTTP/1.1" 200 -') == '"GET /support?q=decode HTTP/1.1" 200 -'


def test_the_access_log_of_a_real_request_holds_no_setup_code(app, caplog):
    """End to end through werkzeug's request logger (what the demo and `flask run` print)."""
    from werkzeug.serving import WSGIRequestHandler

    assert any(isinstance(f, tokens.RedactTokenPaths) for f in logging.getLogger("werkzeug").filters)

    class Handler(WSGIRequestHandler):
        def __init__(self):  # no socket: only the log line is wanted
            self.requestline = f"GET /login?next=%2Fclaim%3Fcode%3D{CODE} HTTP/1.1"
            self.client_address = ("127.0.0.1", 1)

    with caplog.at_level(logging.INFO, logger="werkzeug"):
        Handler().log_request(200, "-")
    assert caplog.records and CODE not in caplog.text


def test_staff_can_sign_out_while_viewing_as_a_customer(app, staff_user, customer):  # noqa: F811
    console = sign_in_staff(app.test_client(), staff_user)
    assert start_view(console, customer).status_code == 302
    view = StaffView.get(StaffView.customer == customer.id)
    token = csrf_token(console, "/devices")
    response = console.post("/logout", data={"csrf_token": token})
    assert response.status_code == 302 and response.headers["Location"].startswith("/login")
    # Signed out for real: the session ended on the server, the view ended with it.
    assert console.get("/support").status_code == 302
    assert (
        LoginSession.select()
        .where((LoginSession.user == staff_user.id) & LoginSession.ended_at.is_null())
        .count()
        == 0
    )
    view = StaffView.get_by_id(view.id)
    assert view.ended_at is not None and view.end_cause == "signed_out"
    # The sign-out is the staff member's; the customer's history shows the view ending.
    assert events("account.signed_out", staff_user)
    assert not events("account.signed_out", customer)
    assert events("support.view_ended", customer)


def test_other_writes_stay_refused_while_viewing(app, staff_user, customer):  # noqa: F811
    console = sign_in_staff(app.test_client(), staff_user)
    start_view(console, customer)
    token = csrf_token(console, "/account")
    response = console.post(
        "/account/password",
        data={"csrf_token": token, "current_password": PASSWORD, "new_password": "x" * 12},
    )
    assert response.status_code == 403
