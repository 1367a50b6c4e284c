"""Checks every browser test runs on the pages it visits, and steps many journeys share."""

from helpers import PASSWORD


def check_page(page):
    """axe-core finds no serious or critical violation, and nothing overflows sideways."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    bad = [v for v in results.response["violations"] if v.get("impact") in ("serious", "critical")]
    summary = "\n".join(
        f"{v['id']} ({v['impact']}): {v['help']} -> {[n['target'] for n in v['nodes']][:3]}" for v in bad
    )
    assert not bad, f"accessibility violations on {page.url}:\n{summary}"
    # clientWidth, not innerWidth: on a mobile viewport innerWidth grows with wide content.
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 1, f"{page.url} is {overflow}px wider than the screen"


def open_menu(page):
    """On a phone the navigation folds behind "Menu": open it (a no-op where it is always shown)."""
    toggle = page.locator("[data-menu-toggle]")
    if toggle.is_visible() and toggle.get_attribute("aria-expanded") != "true":
        toggle.click()


def sign_in(page, base, email, password=PASSWORD):
    """Sign in from the login page (the caller expects where it lands)."""
    page.goto(base + "/login")
    page.fill("#email", email)
    page.fill("#password", password)
    page.click("main button[type=submit]")
