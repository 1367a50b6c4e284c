"""Your data in a real browser at phone width: download it as JSON and as CSV files from the
account page, then delete the account with the password (a plain form), get signed out, sign
in again during the grace and undo it. CSP holds and every page passes axe."""

import io
import json
import zipfile

from helpers import PASSWORD
from helpers import make_user
from helpers import seed_registry
from pages import check_page
from pages import sign_in
from playwright.sync_api import expect

from selfserve.models import AccountDeletion
from selfserve.services import devices

WINDOW = "e00fce68a1b2c3d4e5f60701"


def test_download_my_data_then_delete_and_undo(live_server, page, sim, mailbox):
    labels = {device["id"]: device for device in seed_registry()}
    home = make_user("leaving@example.com", PASSWORD)
    devices.claim(home, labels[WINDOW]["serial_number"], labels[WINDOW]["setup_code"])
    sign_in(page, live_server, home.email)
    page.goto(live_server + "/account")
    check_page(page)

    with page.expect_download() as download:
        page.click("text=Download as JSON")
    data = json.loads(open(download.value.path(), encoding="utf-8").read())
    assert data["account"]["email"] == "leaving@example.com"
    assert [row["device_id"] for row in data["devices"]] == [WINDOW]
    with page.expect_download() as download:
        page.click("text=Download as CSV files (zip)")
    archive = zipfile.ZipFile(io.BytesIO(open(download.value.path(), "rb").read()))
    assert "devices.csv" in archive.namelist() and WINDOW in archive.read("devices.csv").decode()

    page.click("main a:has-text('Delete your account')")
    expect(page.locator("h1")).to_have_text("Delete your account")
    check_page(page)
    page.fill("#password", "not my password at all")
    page.click("main button[type=submit]")
    expect(page.locator(".error-summary")).to_contain_text("not your current password")
    assert all("400" in e for e in page.problems.errors)
    page.problems.errors.clear()
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    expect(page).to_have_url(live_server + "/login")
    expect(page.locator("#flashes")).to_contain_text("will be deleted on")
    check_page(page)
    assert AccountDeletion.get().state == "scheduled"

    sign_in(page, live_server, home.email)
    expect(page).to_have_url(live_server + "/account/delete/scheduled")
    expect(page.locator("main")).to_contain_text("It will be deleted on")
    check_page(page)
    page.click("main button:has-text('Undo: keep my account')")
    expect(page).to_have_url(live_server + "/account")
    expect(page.locator("#flashes")).to_contain_text("will not be deleted")
    assert AccountDeletion.get().state == "cancelled"
    page.goto(live_server + "/devices")
    expect(page).to_have_url(live_server + "/devices")
