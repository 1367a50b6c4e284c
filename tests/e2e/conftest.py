"""Browser fixtures: the app served on a loopback port, Debian's Chromium driven by Playwright.

Pages run under the real CSP; any CSP violation or page error fails the test. `check_page`
runs axe-core (serious/critical violations fail) and checks the page fits a phone's width.
"""

import contextlib
import threading

import pytest
from werkzeug.serving import make_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
PHONE = {"width": 375, "height": 740}


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def app_config(app_config, live_port):
    # Links in emails must point at the live server.
    app_config["BASE_URL"] = f"http://127.0.0.1:{live_port}"
    # A push stream the server ends is an error to htmx's SSE extension (logged in the console):
    # in a browser test they stay open for the whole test.
    app_config["PUSH_STREAM_MAX_SECONDS"] = 600.0
    return app_config


@pytest.fixture
def live_port():
    from helpers import free_port

    return free_port()


@pytest.fixture
def live_server(app, live_port):
    """The app served by a threaded werkzeug server; yields its base URL."""
    server = make_server("127.0.0.1", live_port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{live_port}"
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    yield chromium
    chromium.close()
    playwright.stop()


class PageProblems:
    """Console errors (CSP violations included) and uncaught page errors seen by a page."""

    def __init__(self, page):
        self.errors = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))

    def _console(self, message):
        if message.type == "error":
            self.errors.append(f"console: {message.text}")


@contextlib.contextmanager
def _checked_page(browser, viewport, mobile):
    """A page in a context of its own (its own cookies) that fails the test if the browser
    reported console errors or uncaught page errors (a missing favicon aside)."""
    context = browser.new_context(viewport=viewport, is_mobile=mobile, has_touch=mobile)
    context.set_default_timeout(10_000)
    page = context.new_page()
    page.problems = PageProblems(page)
    yield page
    problems = [e for e in page.problems.errors if "favicon" not in e]
    context.close()
    assert not problems, "browser reported problems:\n" + "\n".join(problems)


@pytest.fixture
def page(browser):
    """A phone-sized page (the journeys must work at phone width)."""
    with _checked_page(browser, PHONE, mobile=True) as phone:
        yield phone


@pytest.fixture
def second_page(browser):
    """Another person's phone (its own cookies), checked as `page` is."""
    with _checked_page(browser, PHONE, mobile=True) as phone:
        yield phone


@pytest.fixture
def desktop_page(browser):
    with _checked_page(browser, {"width": 1280, "height": 800}, mobile=False) as desktop:
        yield desktop
