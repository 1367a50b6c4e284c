"""The page shell in a real browser: CSP holds, htmx loads, accessible, phone friendly."""

from pages import check_page


def test_landing_page_is_accessible_and_fits_a_phone(live_server, page):
    response = page.goto(live_server + "/")
    assert response.status == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert page.evaluate("typeof window.htmx") == "object"  # htmx loaded under the CSP
    check_page(page)


def test_shell_is_easy_to_tap_and_uses_one_font(live_server, page):
    page.goto(live_server + "/")
    # Header and footer links (Help & support included) are at least 44px tall: those shown,
    # then the phone menu's once it is open.
    visible = (
        "els => els.filter(e => e.offsetParent !== null)"
        ".map(e => [e.textContent.trim(), e.getBoundingClientRect().height])"
    )
    sizes = page.eval_on_selector_all(".site-header a, .site-footer a", visible)
    assert "Help & support" in dict(sizes) and "Menu" in dict(sizes), sizes
    assert all(height >= 44 for _, height in sizes), sizes
    page.click("[data-menu-toggle]")
    menu = page.eval_on_selector_all("#site-nav a, #site-nav button", visible)
    assert "Sign in" in dict(menu) and "Create account" in dict(menu), menu
    assert all(height >= 44 for _, height in menu), menu
    page.click(".site-footer a:has-text('Help & support')")
    assert page.url == live_server + "/help"
    assert page.locator("main a[href^='mailto:']").count() == 1
    check_page(page)
    # Checkboxes, radios, buttons and fields as the site's stylesheet renders them.
    measured = page.evaluate("""() => {
        const main = document.querySelector("main");
        const box = document.createElement("div");
        box.innerHTML = '<input type="checkbox"><input type="radio"><button type="button">b</button>'
                      + '<input type="text"><select><option>o</option></select>';
        main.appendChild(box);
        const style = (el) => getComputedStyle(el);
        const [check, radio, button, field, select] = box.children;
        const result = {
            body: style(document.body).fontFamily,
            fonts: [button, field, select].map((el) => style(el).fontFamily),
            boxes: [check, radio].map((el) => [el.getBoundingClientRect().width, el.getBoundingClientRect().height]),
            accent: [check, radio].map((el) => style(el).accentColor),
        };
        box.remove();
        return result;
    }""")
    assert set(measured["fonts"]) == {measured["body"]}, measured
    assert all(w >= 20 and h >= 20 for w, h in measured["boxes"]), measured  # 1.25rem
    assert all(accent not in ("auto", "") for accent in measured["accent"]), measured
