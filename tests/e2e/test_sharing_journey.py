"""Sharing journeys in a real browser at phone width: a homeowner invites a household member as
operator, who opens the blinds and cannot release them; a homeowner gives a dealer a week of
access and revokes it; an organisation admin builds two overlapping groups and gives a client's
organisation one site. CSP holds throughout and every page passes axe."""

import datetime

import pytest
from helpers import demo_devices
from helpers import make_user
from helpers import owner_of
from helpers import seed_registry
from pages import check_page
from pages import sign_in
from playwright.sync_api import expect

from selfserve.models import AuditEvent
from selfserve.models import utcnow
from selfserve.services import access

PASSWORD = "correct horse battery"
WINDOW = "e00fce68a1b2c3d4e5f60701"


@pytest.fixture
def owned(labels):
    return owner_of(labels, WINDOW, "owner@example.com", name="Living room blind")


def invite(page, base, email, role, until=None):
    page.goto(f"{base}/devices/{WINDOW}")
    page.fill("#share-email", email)
    page.select_option("#share-role", role)
    if until:
        page.fill("#share-until", until)
    page.click("button:has-text('Send the invitation')")
    expect(page.locator("#share-invitations")).to_contain_text(email)


def accept_from_mail(page, base, mailbox, email):
    message = mailbox.wait_for(email)
    link = next(link for link in mailbox.links(message) if "/share/" in link)
    page.goto(link)
    expect(page.locator("h1")).to_contain_text("A device is shared with you")
    check_page(page)
    page.click("main a:has-text('Sign in')")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    # Back to the invitation after signing in (by its id: the token stays out of ?next=).
    page.click("button:has-text('Accept the invitation')")
    expect(page).to_have_url(f"{base}/devices/{WINDOW}")


def test_household_member_invited_as_operator_opens_the_blinds_and_cannot_release(
    live_server, page, second_page, owned, mailbox, sim
):
    sign_in(page, live_server, "owner@example.com")
    invite(page, live_server, "teen@example.com", "operator")
    check_page(page)

    make_user("teen@example.com", PASSWORD, provisioned=False)
    teen = second_page
    accept_from_mail(teen, live_server, mailbox, "teen@example.com")
    expect(teen.locator("#shared-role")).to_contain_text("Operator")
    check_page(teen)
    teen.click("#controls button:has-text('Open')")
    expect(teen.locator("#function-result")).not_to_be_empty()
    expect(teen.locator("#function-result")).not_to_contain_text("failed")
    # No rename, no sharing, no release for an operator; the release page itself is a 404.
    assert teen.locator("text=Release this device").count() == 0
    assert teen.locator("#sharing").count() == 0
    assert teen.locator("summary:has-text('Rename')").count() == 0
    response = teen.goto(f"{live_server}/devices/{WINDOW}/release")
    assert response.status == 404
    teen.problems.errors.clear()
    teen.goto(f"{live_server}/devices")
    expect(teen.locator("#shared-heading")).to_be_visible()
    expect(teen.locator("main")).to_contain_text("owner@example.com")
    check_page(teen)
    called = AuditEvent.select().where(AuditEvent.action == "device.function_called").get()
    assert called.actor.email == "teen@example.com" and called.user_id == owned.id


def test_homeowner_gives_a_dealer_a_week_and_revokes_it(live_server, page, second_page, owned, mailbox):
    from selfserve.services import organisations

    boss = make_user("boss@dealer.example", PASSWORD)
    dealer = organisations.create(boss, "Blinds and Co", kind="dealer")
    make_user("fixer@dealer.example", PASSWORD, provisioned=False)
    organisations.add_member(boss, dealer, "fixer@dealer.example")

    sign_in(page, live_server, "owner@example.com")
    page.goto(f"{live_server}/devices/{WINDOW}")
    week = (utcnow() + datetime.timedelta(days=7)).date().isoformat()
    page.select_option("#dealer-name", "Blinds and Co")
    page.select_option("#dealer-role", "operator")
    page.fill("#dealer-until", week)
    page.click("button:has-text('Give the dealer access')")
    expect(page.locator("#share-grants")).to_contain_text("organisation Blinds and Co")
    expect(page.locator("#share-grants")).to_contain_text("until")
    check_page(page)
    grant = access.grants_of_device(WINDOW)[0]
    assert grant.expires_at.date() == datetime.date.fromisoformat(week) + datetime.timedelta(days=1)

    sign_in(second_page, live_server, "fixer@dealer.example")
    second_page.goto(f"{live_server}/devices/{WINDOW}")
    expect(second_page.locator("#controls")).to_be_visible()

    # Asked in the page's own dialog (site.js), not the browser's confirm() box.
    page.click("#share-grants button:has-text('Revoke')")
    expect(page.locator("#confirm-dialog")).to_contain_text(
        "Revoke the access of organisation Blinds and Co?"
    )
    page.locator("#confirm-dialog button[data-dialog-confirm]").click()
    expect(page.locator("#sharing")).to_contain_text("Nobody else has access")
    check_page(page)
    response = second_page.goto(f"{live_server}/devices/{WINDOW}")
    assert response.status == 404
    second_page.problems.errors.clear()
    page.goto(f"{live_server}/account/activity")
    expect(page.locator("main")).to_contain_text("Revoked the operator access of organisation Blinds and Co")


def test_org_admin_builds_two_overlapping_groups_and_grants_a_clients_employee_one_site(
    live_server, page, second_page, app, sim
):
    from selfserve.services import organisations

    seed_registry()
    labels = {device["id"]: device for device in demo_devices()}
    admin = make_user("admin@company.example", PASSWORD)
    org = organisations.create(admin, "Pumps Inc")
    pumps = ["e00fce68a1b2c3d4e5f60801", "e00fce68a1b2c3d4e5f60802", "e00fce68a1b2c3d4e5f60803"]
    for device_id in pumps:
        organisations.claim(admin, org, labels[device_id]["serial_number"], labels[device_id]["setup_code"])
    serial = {device_id: labels[device_id]["serial_number"] for device_id in pumps}
    client_boss = make_user("boss@client.example", PASSWORD)
    client_org = organisations.create(client_boss, "Client Ltd")
    make_user("worker@client.example", PASSWORD, provisioned=False)
    organisations.add_member(client_boss, client_org, "worker@client.example")

    sign_in(page, live_server, "admin@company.example")
    page.goto(f"{live_server}/organisations/{org.id}")
    check_page(page)
    for name, members in (("North region", pumps[:2]), ("Site A", pumps[1:])):
        page.fill("#group-name", name)
        page.click("button:has-text('Create group')")
        expect(page.locator("main")).to_contain_text(name)
        group = page.locator("section[id^='group-']", has=page.locator(f"h3:has-text('{name}')"))
        group.locator("summary").click()
        group.locator("input[name=serials]").fill(" ".join(serial[d] for d in members))
        group.locator("button:has-text('Add to the group')").click()
        expect(page.locator(".flash")).to_contain_text(f"Added to {name}")
    site = page.locator("section[id^='group-']", has=page.locator("h3:has-text('Site A')"))
    site.locator("summary").click()
    site.locator("input[name=organisation]").fill("Client Ltd")
    site.locator("select[name=role]").select_option("operator")
    site.locator("button:has-text('Give access')").click()
    expect(page.locator("main")).to_contain_text("organisation Client Ltd: operator")
    check_page(page)

    sign_in(second_page, live_server, "worker@client.example")
    second_page.goto(f"{live_server}/devices")
    expect(second_page.locator("main")).to_contain_text("Site A")
    assert second_page.locator(f"a[href='/devices/{pumps[0]}']").count() == 0  # North only
    second_page.goto(f"{live_server}/devices/{pumps[2]}")
    expect(second_page.locator("#controls")).to_be_visible()
    response = second_page.goto(f"{live_server}/devices/{pumps[0]}")
    assert response.status == 404
    second_page.problems.errors.clear()
