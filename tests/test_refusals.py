"""One base for the refusals services give people, and one htmx-aware handler for the ones a
view doesn't catch to show next to its form."""

import pytest

from selfserve.refusals import Refusal
from selfserve.security import public
from selfserve.services import accounts
from selfserve.services import devices
from selfserve.services import impersonation
from selfserve.services import staff
from selfserve.services import support


@pytest.mark.parametrize(
    "refusal",
    [
        devices.DeviceError("That setup code is not right.", kind="wrong", field="setup_code", status=400),
        support.SupportError("Give a reason.", status=422),
        impersonation.ViewRefused("Not while another view is open.", status=409),
        staff.StaffError("That address already has an account."),
        accounts.FormErrors({"email": "Enter an email address.", "password": "Too short."}),
    ],
)
def test_every_service_refusal_is_a_refusal_with_message_kind_field_status(refusal):
    assert isinstance(refusal, Refusal)
    assert refusal.message and isinstance(refusal.status, int) and refusal.kind
    if isinstance(refusal, accounts.FormErrors):
        assert (refusal.field, refusal.message) == ("email", "Enter an email address.")
        assert refusal.errors["password"] == "Too short."


@pytest.fixture
def refusing_app(app):
    @public
    def refuse():
        raise devices.DeviceError("That device is being moved right now.", kind="busy", status=409)

    app.add_url_rule("/_test/refuse", "test_refuse", refuse)
    return app


def test_a_refusal_no_view_caught_is_an_error_page_with_its_status(refusing_app):
    response = refusing_app.test_client().get("/_test/refuse")
    assert response.status_code == 409
    page = response.get_data(as_text=True)
    assert "That device is being moved right now." in page and "<html" in page


def test_for_htmx_it_is_the_message_in_the_flash_region(refusing_app):
    response = refusing_app.test_client().get("/_test/refuse", headers={"HX-Request": "true"})
    assert response.status_code == 409
    assert response.headers["HX-Retarget"] == "#flashes"
    body = response.get_data(as_text=True)
    assert "That device is being moved right now." in body and "<html" not in body
