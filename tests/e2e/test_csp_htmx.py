"""The CSP in a real browser: htmx loads, polls, posts and swaps under it with no violation,
and the browser really enforces it (an injected inline script and inline style are blocked).
Without the second half, a lost CSP header would pass every journey silently."""

import pytest
from helpers import PASSWORD
from helpers import WINDOW
from helpers import make_user
from helpers import seed_registry
from playwright.sync_api import expect

WATCH_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", function (event) {
  window.__cspViolations.push(event.violatedDirective + " " + (event.blockedURI || ""));
});
"""


@pytest.fixture
def app_config(app_config):
    app_config["VALUES_POLL_SECONDS"] = 1
    return app_config


def test_htmx_works_under_the_csp_and_the_csp_is_enforced(live_server, desktop_page, app, sim):
    labels = {device["id"]: device for device in seed_registry()}
    from selfserve.services import devices

    user = make_user("csp@example.com", PASSWORD)
    devices.claim(user, labels[WINDOW]["serial_number"], labels[WINDOW]["setup_code"])
    page = desktop_page
    page.add_init_script(WATCH_VIOLATIONS)

    page.goto(f"{live_server}/login")
    page.fill("#email", "csp@example.com")
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    page.goto(f"{live_server}/devices/{WINDOW}")
    assert page.evaluate("typeof window.htmx") == "object"
    # hx-get on load and polling: the values fragment is swapped in.
    expect(page.locator("#values [data-freshness=live]")).to_be_visible()
    # hx-post with the CSRF header from <body hx-headers>: the result fragment is swapped in.
    page.click("#function-result ~ .controls button:has-text('Open')")
    expect(page.locator("#function-result")).not_to_be_empty()
    assert "expired" not in page.locator("#function-result").inner_text().lower()
    assert page.evaluate("window.__cspViolations") == []

    # The browser enforces the policy: inline script and inline style are refused.
    page.evaluate("""() => {
        const script = document.createElement("script");
        script.textContent = "window.__inlineRan = true;";
        document.body.appendChild(script);
        const holder = document.createElement("div");
        holder.innerHTML = '<p id="styled" style="color: rgb(255, 0, 0)">x</p>';
        document.body.appendChild(holder);
    }""")
    page.wait_for_function("window.__cspViolations.length >= 2")
    assert page.evaluate("window.__inlineRan === undefined")
    assert page.evaluate("getComputedStyle(document.getElementById('styled')).color") != "rgb(255, 0, 0)"
    violations = page.evaluate("window.__cspViolations")
    assert any(v.startswith("script-src") for v in violations), violations
    assert any(v.startswith("style-src") for v in violations), violations
    # Those refusals were ours on purpose; anything else the browser reported still fails.
    page.problems.errors[:] = [e for e in page.problems.errors if "Content Security Policy" not in e]
