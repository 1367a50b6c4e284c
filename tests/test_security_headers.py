"""Security headers, the CSP, cookies, and markup that works under the CSP.

Every response of a crawl over every GET rule (signed in and anonymous, plain and htmx, error
pages included) carries the headers; the CSP allows no inline script or style; templates and
rendered pages have no inline <script>, no on*= handlers, no style= attributes; the session
cookie is HttpOnly and SameSite=Lax everywhere and Secure in production settings.
"""

import glob
import html.parser
import os
import re

import pytest
from helpers import PASSWORD
from helpers import WINDOW
from helpers import csrf_token
from helpers import login
from helpers import make_user
from helpers import seed_registry
from test_security_crawl import Crawler
from test_security_crawl import concrete_rules

from selfserve import config as config_module
from selfserve import security
from selfserve.models import LoginSession
from selfserve.services import devices
from selfserve.services import outbox

COOKIE = "selfserve_session"
PRODUCTION_BASE_URL = "https://devices.example.com"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(ROOT, "templates")


def csp_directives(value):
    directives = {}
    for part in value.split(";"):
        words = part.split()
        if words:
            directives[words[0].lower()] = words[1:]
    return directives


def check_csp(value, where):
    assert "unsafe-inline" not in value and "unsafe-eval" not in value and "unsafe-hashes" not in value, where
    directives = csp_directives(value)
    assert directives.get("default-src") == ["'self'"], where
    assert directives.get("script-src") == ["'self'"], where  # no inline, no hosts, no data:
    assert directives.get("style-src") == ["'self'"], where
    assert directives.get("object-src") == ["'none'"], where
    assert directives.get("base-uri") in (["'none'"], ["'self'"]), where
    assert directives.get("frame-ancestors") == ["'none'"], where
    assert directives.get("form-action") == ["'self'"], where


class InlineCode(html.parser.HTMLParser):
    """Collects what a strict CSP would block: inline scripts, handlers, style attributes and
    blocks, javascript: URLs, and htmx features that evaluate strings."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.problems = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        names = dict(attrs)
        if tag == "script":
            if not names.get("src"):
                self.problems.append("<script> without src")
            self._in_script = True
        if tag == "style":
            self.problems.append("<style> block")
        for name, value in attrs:
            if name.startswith("on"):
                self.problems.append(f"{tag} {name}=")
            if name == "style":
                self.problems.append(f"{tag} style=")
            if (
                name.startswith("hx-on")
                or name.startswith("data-hx-on")
                or name in ("hx-vars", "data-hx-vars")
            ):
                self.problems.append(f"{tag} {name}= (evaluated by htmx)")
            if name in ("hx-vals", "data-hx-vals") and (value or "").strip().startswith(
                ("js:", "javascript:")
            ):
                self.problems.append(f"{tag} hx-vals with js:")
            if (value or "").strip().lower().startswith("javascript:"):
                self.problems.append(f"{tag} {name}=javascript:")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.problems.append("inline script content")


def inline_code(text):
    parser = InlineCode()
    parser.feed(text)
    parser.close()
    return parser.problems


@pytest.fixture
def homeowner_client(app, sim):
    labels = {device["id"]: device for device in seed_registry()}
    user = make_user("headers@example.com", PASSWORD)
    devices.claim(user, labels[WINDOW]["serial_number"], labels[WINDOW]["setup_code"])
    client = app.test_client()
    assert login(client, user.email, PASSWORD).status_code == 200
    return client, user


def crawl_everything(app, client, user):
    values = {
        "device_id": WINDOW,
        "customer_id": str(user.id),
        "function_name": "open",
        "token": "not-a-token",
    }
    paths = sorted({path for method, path, rule in concrete_rules(app, values)})
    crawler = Crawler(client)
    crawler.crawl(["/", "/no/such/page", f"/devices/{'0' * 24}"] + paths)
    return crawler.fetched


# --- headers ---------------------------------------------------------------------------------------------


def test_every_response_has_the_security_headers(app, homeowner_client):
    client, user = homeowner_client
    fetched = crawl_everything(app, client, user) + crawl_everything(app, app.test_client(), user)
    # Error answers too: a forged form and a wrong method.
    fetched.append(Crawler(client).fetch("/logout", method="POST"))
    fetched.append(Crawler(client).fetch("/logout", method="GET"))
    statuses = {item.status for item in fetched}
    assert {200, 302, 400, 403, 404, 405} <= statuses, statuses
    html_pages = 0
    for item in fetched:
        where = (item.method, item.url, item.htmx, item.status)
        headers = {}
        for name, value in item.headers:
            headers.setdefault(name.lower(), []).append(value)
        assert headers.get("x-content-type-options") == ["nosniff"], where
        assert headers.get("x-frame-options") == ["DENY"], where
        assert headers.get("referrer-policy", [""])[0] in (
            "same-origin",
            "no-referrer",
            "strict-origin-when-cross-origin",
        ), where
        assert len(headers.get("content-security-policy", [])) == 1, where
        check_csp(headers["content-security-policy"][0], where)
        # Pages hold personal data and live values: never cached, also not by shared caches.
        assert "no-store" in headers.get("cache-control", [""])[0], where
        assert "strict-transport-security" not in headers, where  # test settings are plain http
        if headers.get("content-type", [""])[0].startswith("text/html"):
            html_pages += 1
    assert html_pages >= 50


def test_static_files_are_not_sniffed_and_have_the_csp(client):
    for path in ("/static/vendor/htmx-2.0.11.min.js", "/static/js/site.js", "/static/css/site.css"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        check_csp(response.headers["Content-Security-Policy"], path)


# --- markup that works under the CSP ------------------------------------------------------------------------


def test_templates_have_no_inline_script_handlers_or_styles():
    files = sorted(glob.glob(os.path.join(TEMPLATES, "**", "*.html"), recursive=True))
    assert len(files) >= 30
    problems = {}
    for path in files:
        with open(path, encoding="utf-8") as handle:
            source = handle.read()
        # Jinja comments, expressions and tags would confuse the HTML parser; blank them.
        source = re.sub(r"\{#.*?#\}", "", source, flags=re.S)
        source = re.sub(r"\{%.*?%\}", "", source, flags=re.S)
        markup = re.sub(r"\{\{.*?\}\}", "x", source, flags=re.S)
        found = inline_code(markup)
        # Belt and braces for what the parser can't see inside Jinja conditionals.
        for pattern, label in (
            (r"\son[a-z]+\s*=", "on*= handler"),
            (r"\sstyle\s*=", "style="),
            (r"<style", "<style> block"),
            (r"javascript:", "javascript: URL"),
            (r"\shx-on", "hx-on"),
        ):
            if re.search(pattern, source, flags=re.I):
                found.append(label)
        if found:
            problems[os.path.relpath(path, ROOT)] = sorted(set(found))
    assert problems == {}


def test_rendered_pages_and_fragments_have_no_inline_code(app, homeowner_client):
    client, user = homeowner_client
    fetched = crawl_everything(app, client, user) + crawl_everything(app, app.test_client(), user)
    problems = {}
    full_pages = 0
    for item in fetched:
        if not item.body.strip() or "<" not in item.body:
            continue
        found = inline_code(item.body)
        if found:
            problems[(item.url, item.htmx)] = sorted(set(found))
        if item.status == 200 and "<html" in item.body:
            full_pages += 1
            # htmx may not inject its indicator <style> or evaluate strings.
            config = re.search(r'<meta name="htmx-config" content=\'([^\']+)\'', item.body)
            assert config, item.url
            assert '"includeIndicatorStyles": false' in config.group(
                1
            ) and '"allowEval": false' in config.group(1)
            assert '"allowScriptTags": false' in config.group(1)
    assert problems == {}
    assert full_pages >= 20


# --- cookies -----------------------------------------------------------------------------------------------


def _cookie_attributes(header):
    parts = [p.strip() for p in header.split(";")]
    name, _, value = parts[0].partition("=")
    attributes = {}
    for part in parts[1:]:
        key, _, val = part.partition("=")
        attributes[key.lower()] = val
    return name, value, attributes


def _session_cookies(response):
    return [
        _cookie_attributes(h) for h in response.headers.getlist("Set-Cookie") if h.startswith(COOKIE + "=")
    ]


def test_session_cookie_is_httponly_and_samesite_lax_in_tests(app, client):
    make_user("cookie@example.com", PASSWORD, provisioned=False)
    cookies = _session_cookies(client.get("/login"))
    token = csrf_token(client, "/login")
    response = client.post(
        "/login", data={"email": "cookie@example.com", "password": PASSWORD, "csrf_token": token}
    )
    cookies += _session_cookies(response)
    assert cookies
    for _name, _value, attributes in cookies:
        assert "httponly" in attributes
        assert attributes.get("samesite") == "Lax"
        assert "expires" not in attributes and "max-age" not in attributes  # ends with the browser
    assert [h for h in response.headers.getlist("Set-Cookie") if h.startswith("remember_token")] == []


@pytest.fixture
def production_app(app_config, db_url):
    """The app as production builds it (TESTING and DEMO off, real-looking secrets)."""
    from selfserve import create_app

    settings = {
        "TESTING": False,
        "DEMO": False,
        "SECRET_KEY": "production-secret-key-" + "0123456789abcdef" * 2,
        "BASE_URL": PRODUCTION_BASE_URL,
        "DATABASE_URL": db_url,
        "PARTICLE_API_URL": app_config["PARTICLE_API_URL"],
        "PARTICLE_PRODUCT": config_module.DEMO_PARTICLE_PRODUCT,
        "PARTICLE_CLIENT_ID": config_module.DEMO_PARTICLE_CLIENT_ID,
        "PARTICLE_CLIENT_SECRET": config_module.DEMO_PARTICLE_CLIENT_SECRET,
        "MAIL_SERVER": app_config["MAIL_SERVER"],
        "MAIL_PORT": app_config["MAIL_PORT"],
        "SWEEP_SECONDS": 0,
    }
    production = create_app(settings)
    assert not production.testing and not production.config.get("DEMO")
    return production


def test_production_session_cookie_is_secure_httponly_lax_and_pages_have_hsts(app, production_app):
    make_user("prod@example.com", PASSWORD, provisioned=False)
    browser = production_app.test_client()
    base = "https://localhost"
    page = browser.get(base + "/login")
    assert page.status_code == 200
    assert page.headers["Strict-Transport-Security"].startswith("max-age=")
    check_csp(page.headers["Content-Security-Policy"], "/login")
    cookies = _session_cookies(page)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    response = browser.post(
        base + "/login",
        data={"email": "prod@example.com", "password": PASSWORD, "csrf_token": token},
        headers={"Referer": base + "/login"},
    )
    assert response.status_code == 302, response.get_data(as_text=True)
    cookies += _session_cookies(response)
    assert len(cookies) >= 2
    for _name, _value, attributes in cookies:
        assert "secure" in attributes, attributes
        assert "httponly" in attributes, attributes
        assert attributes.get("samesite") == "Lax", attributes
    assert browser.get(base + "/account").status_code == 200


def test_production_refuses_to_start_without_real_secrets_or_a_base_url(app_config, db_url):
    from selfserve import create_app

    complete = {
        "TESTING": False,
        "DEMO": False,
        "SECRET_KEY": "k" * 40,
        "DATABASE_URL": db_url,
        "BASE_URL": PRODUCTION_BASE_URL,
        "PARTICLE_PRODUCT": "1",
        "PARTICLE_CLIENT_ID": "x",
        "PARTICLE_CLIENT_SECRET": "y",
        "SWEEP_SECONDS": 0,
    }
    config_module.check_production(complete)  # the complete set starts
    for missing, value in (
        ("SECRET_KEY", ""),
        ("SECRET_KEY", "short"),
        ("PARTICLE_CLIENT_SECRET", ""),
        ("BASE_URL", ""),
        ("BASE_URL", "devices.example.com"),
    ):
        with pytest.raises(config_module.ConfigError) as refused:
            create_app({**complete, missing: value})
        assert "SELFSERVE_" + missing in str(refused.value)


def test_emailed_links_ignore_a_forged_host_header(app, production_app, mailbox):
    """Password-reset poisoning: a reset requested with someone else's Host header must still
    mail a link to the real site."""
    make_user("victim@example.com", PASSWORD, provisioned=False)
    attacker = production_app.test_client()
    forged = "https://evil.example"
    page = attacker.get(forged + "/forgot")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    response = attacker.post(
        forged + "/forgot",
        data={"email": "victim@example.com", "csrf_token": token},
        headers={"Referer": forged + "/forgot"},
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    # The production site's outbox sender makes the link and sends it, outside any request.
    with production_app.app_context():
        outbox.send_due()
    links = mailbox.links(mailbox.wait_for("victim@example.com"))
    assert links and all(link.startswith(PRODUCTION_BASE_URL + "/") for link in links), links
    assert not any("evil" in link for link in links)


def test_the_cookie_holds_only_the_rotatable_session_id(app, client):
    """Flask-Login's user id in the cookie is the server-side session's random id, never the
    account's primary key, so ending the session on the server makes the cookie worthless; the
    database stores only its hash."""
    user = make_user("opaque@example.com", PASSWORD, provisioned=False)
    login(client, user.email, PASSWORD)
    serializer = app.session_interface.get_signing_serializer(app)
    data = serializer.loads(client.get_cookie(COOKIE).value)
    live = LoginSession.get((LoginSession.user == user) & LoginSession.ended_at.is_null())
    assert data["_user_id"] != str(user.id)
    assert user.email not in repr(data)
    # The database holds only a hash of it: a copy of the database opens no session.
    assert data["_user_id"] != live.id
    assert security.stored_session_id(data["_user_id"]) == live.id
    replay = app.test_client()
    replay.set_cookie(COOKIE, serializer.dumps({"_user_id": live.id, "_fresh": True}))
    assert replay.get("/account").status_code == 302
