"""The page shell in a real browser: CSP holds, htmx loads, accessible, phone friendly."""
from pages import check_page


def test_landing_page_is_accessible_and_fits_a_phone(live_server, page):
    response = page.goto(live_server + "/")
    assert response.status == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert page.evaluate("typeof window.htmx") == "object"  # htmx loaded under the CSP
    check_page(page)
