"""No Particle token, client secret, session id, session cookie or setup code in any page,
fragment, header, URL, log record or error page.

The simulator is told which access and refresh tokens to issue, so the test knows exactly
what must never come out. A homeowner signs up through the site, verifies, signs in, claims a
device with its label and runs a function; then every GET rule in app.url_map (filled with the
homeowner's real ids), with and without HX-Request, plus every link found on the way, is
fetched and searched, and so is every log record (DEBUG, all loggers). Then the simulated
cloud fails with bodies that echo the tokens, and the error pages and logs are searched again.

The crawl helpers here are shared by the other test_security_* modules.
"""

import collections
import dataclasses
import logging
import re
import secrets
import threading
from urllib.parse import urlsplit

import pytest
import requests
from helpers import OTHER_WINDOW
from helpers import PASSWORD
from helpers import PUMP
from helpers import WINDOW
from helpers import csrf_token
from helpers import demo_devices
from helpers import login
from helpers import seed_registry
from werkzeug.serving import make_server

from selfserve import config as config_module
from selfserve.models import Device
from selfserve.models import LoginSession
from selfserve.models import User

EMAIL = "leak.hunter@example.com"
COOKIE = "selfserve_session"
HTMX = {"HX-Request": "true"}
# A URL argument the crawl has no real value for (a route added after this test was written)
# still gets fetched, with this value.
FALLBACK_ARGUMENT = "1"
MAX_CRAWL = 400


# --- filling the URL map ----------------------------------------------------------------------


def concrete_rules(app, values, methods=None):
    """Every rule of the app except static as (method, path, rule), its arguments filled from
    `values` (FALLBACK_ARGUMENT for names it doesn't know). Several values for one argument
    name (a list) give one path each."""
    found = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        choices = [{}]
        for name in sorted(rule.arguments):
            options = values.get(name, FALLBACK_ARGUMENT)
            options = options if isinstance(options, list) else [options]
            choices = [{**chosen, name: option} for chosen in choices for option in options]
        for chosen in choices:
            built = rule.build(chosen, append_unknown=False)
            assert built is not None, (rule.rule, chosen)
            path = built[1]
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                if methods is None or method in methods:
                    found.append((method, path, rule))
    return found


# --- the crawler ---------------------------------------------------------------------------------

_LINK = re.compile(
    r'\b(?:href|src|action|hx-get|hx-post|hx-put|hx-patch|hx-delete)\s*=\s*"([^"]*)"', re.IGNORECASE
)


@dataclasses.dataclass
class Fetched:
    method: str
    url: str
    htmx: bool
    status: int
    headers: list  # (name, value)
    body: str


def links_in(body):
    """Same-site paths named by links, forms and htmx attributes of a page."""
    found = []
    for raw in _LINK.findall(body):
        url = raw.replace("&amp;", "&")
        parts = urlsplit(url)
        if parts.scheme or parts.netloc or not url.startswith("/"):
            continue
        found.append(url.split("#", 1)[0])
    return found


class Crawler:
    """GETs URLs with a test client (each plain and as htmx), follows the links it finds, and
    keeps every answer and every session cookie value it was given."""

    def __init__(self, client):
        self.client = client
        self.fetched = []
        self.cookie_values = set()
        self._seen = set()

    def fetch(self, url, method="GET", htmx=False, **kwargs):
        headers = dict(kwargs.pop("headers", {}))
        if htmx:
            headers.update(HTMX)
        response = self.client.open(url, method=method, headers=headers, **kwargs)
        item = Fetched(
            method,
            url,
            htmx,
            response.status_code,
            list(response.headers.items()),
            # Downloads (the data export's zip) are bytes: searched as text all the same.
            response.get_data().decode("utf-8", "replace"),
        )
        self.fetched.append(item)
        cookie = self.client.get_cookie(COOKIE)
        if cookie is not None:
            self.cookie_values.add(cookie.value)
        return item

    def crawl(self, start_urls, follow=True):
        queue = collections.deque(start_urls)
        while queue and len(self._seen) < MAX_CRAWL:
            url = queue.popleft()
            if url in self._seen or url.startswith("/static/"):
                continue
            self._seen.add(url)
            for htmx in (False, True):
                item = self.fetch(url, htmx=htmx)
                if not follow:
                    continue
                queue.extend(links_in(item.body))
                for name, value in item.headers:
                    if name in ("Location", "HX-Redirect", "HX-Location"):
                        queue.append(value)
        return self.fetched

    @property
    def urls(self):
        return {item.url for item in self.fetched}


# --- secrets ---------------------------------------------------------------------------------------


def planted_tokens(count=16):
    """Tokens for the simulator to issue: random, 40 lowercase hex (as Particle's)."""
    return [secrets.token_hex(20) for _ in range(count)]


def fragments(secret, size=16):
    """The secret and overlapping slices of it, so a cut-off or partly scrubbed copy is found."""
    if len(secret) <= size:
        return [secret]
    starts = sorted({0, len(secret) - size, *range(0, len(secret) - size, size // 2)})
    return [secret] + [secret[start : start + size] for start in starts]


def issued_tokens(sim):
    """Every access and refresh token the simulator handed out (current and revoked alike are
    ours to hide; the simulator only remembers live ones, so callers keep the planted list)."""
    with sim.cloud.lock:
        return set(sim.cloud.tokens) | set(sim.cloud.refresh_tokens)


def session_secrets():
    """Every server-side session id there is (live or ended; stored hashed)."""
    return {row.id for row in LoginSession.select(LoginSession.id)}


def cookie_session_ids(app, cookie_values):
    """The session ids inside session cookies (what the database stores a hash of)."""
    serializer = app.session_interface.get_signing_serializer(app)
    found = set()
    for value in cookie_values:
        user_id = serializer.loads(value).get("_user_id")
        if user_id:
            found.add(user_id)
    return found


def setup_codes():
    codes = set()
    for device in demo_devices():
        codes.update({device["setup_code"], device["setup_code"].lower()})
    return codes


def find_leaks(texts, secret_values, whole_values=()):
    """[(secret, where)] for every fragment of a secret in `secret_values`, or every one of
    `whole_values` (searched whole: values such as cookies share innocent pieces with pages),
    found in one of `texts` ((where, text))."""
    leaks = []
    pieces = [(secret, fragments(secret)) for secret in secret_values if secret]
    pieces += [(value, [value]) for value in whole_values if value]
    for _secret, parts in pieces:
        for piece in parts:
            for where, text in texts:
                if piece and piece in text:
                    leaks.append((piece, where))
    return leaks


def response_texts(fetched, include_set_cookie=True):
    """(where, text) for every URL, header and body of the crawl."""
    texts = []
    for item in fetched:
        where = f"{item.method} {item.url}{' (htmx)' if item.htmx else ''} -> {item.status}"
        texts.append((where + " [url]", item.url))
        texts.append((where + " [body]", item.body))
        for name, value in item.headers:
            if name.lower() == "set-cookie" and not include_set_cookie:
                continue
            texts.append((f"{where} [header {name}]", value))
    return texts


def log_texts(records):
    texts = []
    for record in records:
        where = f"log {record.name}:{record.levelname}"
        try:
            message = record.getMessage()
        except Exception:  # pragma: no cover - a broken record still gets searched raw
            message = str(record.msg)
        texts.append((where, message))
        texts.append((where + " [record]", repr(record.__dict__)))
        if record.exc_info:
            texts.append((where + " [traceback]", logging.Formatter().formatException(record.exc_info)))
        if record.exc_text:
            texts.append((where + " [exc_text]", record.exc_text))
    return texts


@pytest.fixture
def all_logs(caplog):
    """Capture every log record at DEBUG, the chatty libraries included."""
    caplog.set_level(logging.DEBUG)
    for name in ("werkzeug", "urllib3", "selfserve", "selfserve.particle", "flask_limiter", "peewee"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


# --- a homeowner with a device, made through the site ---------------------------------------------


@dataclasses.dataclass
class Homeowner:
    client: object
    user: object
    device_id: str
    other_device_id: str
    verify_path: str
    planted: list
    label: dict


def sign_up_and_claim(app, client, sim, mailbox, planted, email=EMAIL):
    """Sign up, verify, sign in, claim the window with its label and run a function, all
    through the site, with the simulator issuing `planted` tokens. Returns a Homeowner."""
    # Like accounts that forbid ?access_token=: a token in a URL would fail the journey.
    sim.configure(issue_tokens=list(planted), reject_query_tokens=True)
    labels = {device["id"]: device for device in seed_registry()}

    response = client.post(
        "/signup", data={"email": email, "password": PASSWORD, "csrf_token": csrf_token(client, "/signup")}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    message = mailbox.wait_for(email)
    verify_path = urlsplit([link for link in mailbox.links(message) if "/verify/" in link][-1]).path
    assert client.get(verify_path).status_code == 200
    response = client.post(verify_path, data={"csrf_token": csrf_token(client, verify_path)})
    assert response.status_code == 302
    assert login(client, email, PASSWORD).status_code == 200
    user = User.get(User.email == email)
    assert user.provisioning_state == "ready"

    label = labels[WINDOW]
    token = csrf_token(client, "/devices/claim")
    response = client.post(
        "/devices/claim",
        data={"serial": label["serial_number"], "setup_code": label["setup_code"], "csrf_token": token},
    )
    assert response.status_code == 302, response.get_data(as_text=True)
    assert Device.get_by_id(WINDOW).owner_id == user.id
    token = csrf_token(client, f"/devices/{WINDOW}")
    response = client.post(
        f"/devices/{WINDOW}/functions/setPosition",
        data={"arg": "40", "csrf_token": token},
        headers={**HTMX, "X-CSRFToken": token},
    )
    assert response.status_code == 200 and "HX-Trigger" in response.headers, response.get_data(as_text=True)
    response = client.post(f"/devices/{WINDOW}/rename", data={"name": "Kitchen blind", "csrf_token": token})
    assert response.status_code == 302

    # The product token and the homeowner's customer token both came from the planted list.
    issued = issued_tokens(sim)
    kinds = {info["kind"] for token_value, info in sim.cloud.tokens.items() if token_value in planted}
    assert issued & set(planted) and {"product", "customer"} <= kinds, kinds
    return Homeowner(client, user, WINDOW, OTHER_WINDOW, verify_path, planted, label)


def crawl_values(homeowner):
    """URL arguments for the crawl: the homeowner's real ids, and wrong ones too."""
    return {
        "device_id": [homeowner.device_id, homeowner.other_device_id],
        "token": [homeowner.verify_path.rsplit("/", 1)[1], "not-a-token"],
        "customer_id": str(homeowner.user.id),
        "function_name": "setPosition",
    }


def everything_secret(app, sim, homeowner, crawler):
    """All values that must never be shown or logged."""
    values = set(homeowner.planted) | issued_tokens(sim)
    values |= {config_module.DEMO_PARTICLE_CLIENT_SECRET, app.config["SECRET_KEY"], PASSWORD}
    values |= setup_codes()
    values |= session_secrets()
    values |= cookie_session_ids(app, crawler.cookie_values)
    return values


@pytest.fixture
def app_config(app_config):
    # Every fragment read goes upstream (no cache), so every read uses a token.
    app_config["VALUES_CACHE_SECONDS"] = 0
    app_config["OFFLINE_REMEMBER_SECONDS"] = 0
    return app_config


@pytest.fixture
def homeowner(app, client, sim, mailbox, all_logs):
    return sign_up_and_claim(app, client, sim, mailbox, planted_tokens())


# --- the tests ----------------------------------------------------------------------------------------


def test_crawl_every_page_and_fragment_leaks_no_secret(app, sim, mailbox, homeowner, all_logs):
    crawler = Crawler(homeowner.client)
    start = [path for method, path, rule in concrete_rules(app, crawl_values(homeowner), {"GET"})]
    fetched = crawler.crawl(["/"] + start)

    # The crawl saw the homeowner's pages and live fragments (so the tokens were in use).
    statuses = {(item.url, item.htmx): item.status for item in fetched}
    assert statuses[(f"/devices/{WINDOW}/values", True)] == 200
    assert statuses[(f"/devices/{WINDOW}", False)] == 200
    assert "Kitchen blind" in next(i.body for i in fetched if i.url == "/devices" and not i.htmx)
    assert len(crawler.urls) >= len(start)
    # Links found on pages were followed too (e.g. activity paging, the label QR page).
    assert crawler.urls - set(start) - {"/"}

    secret_values = everything_secret(app, sim, homeowner, crawler)
    texts = response_texts(fetched, include_set_cookie=False) + mail_texts(mailbox)
    assert len(mailbox.messages) >= 1  # the verification email is searched too
    assert find_leaks(texts, secret_values, crawler.cookie_values) == []
    # Set-Cookie carries the session cookie by design, but never a token or a setup code.
    cookie_headers = [(w, t) for w, t in response_texts(fetched) if "[header Set-Cookie]" in w]
    assert find_leaks(cookie_headers, set(homeowner.planted) | setup_codes() | session_secrets()) == []

    # The logs: everything since the sign-up, at DEBUG (urllib3 and our client included).
    names = {record.name for record in all_logs.records}
    assert any(name.startswith("selfserve.particle") for name in names), names
    assert any(name.startswith("urllib3") for name in names), names
    leaks = find_leaks(log_texts(all_logs.records), secret_values, crawler.cookie_values)
    assert sorted({w for s, w in leaks}) == []


def _echoing_body(tokens, secret):
    joined = " ".join(tokens)
    return {
        "error": "server_error",
        "error_description": f"upstream rejected Bearer {joined} (client secret {secret})",
        "access_token": tokens[0],
        "refresh_token": tokens[-1],
        "info": joined,
    }


def test_error_pages_and_logs_hide_tokens_the_cloud_echoes(app, sim, homeowner, all_logs, particle):
    client = homeowner.client
    crawler = Crawler(client)
    secret = config_module.DEMO_PARTICLE_CLIENT_SECRET
    tokens = sorted(issued_tokens(sim) | set(homeowner.planted))
    body = _echoing_body(tokens, secret)
    text_body = "proxy error: Authorization: Bearer " + " ".join(tokens) + " secret=" + secret
    token = csrf_token(client, f"/devices/{WINDOW}")
    post_headers = {"X-CSRFToken": token}

    cases = [
        # (method, path glob, status, body) and the request that runs into it
        ("GET", "/v1/devices/*", 503, body, ("GET", f"/devices/{WINDOW}/values", None)),
        ("GET", "/v1/devices/*", 500, text_body, ("GET", f"/devices/{WINDOW}/summary", None)),
        (
            "POST",
            "/v1/devices/*",
            503,
            body,
            ("POST", f"/devices/{WINDOW}/functions/setPosition", {"arg": "10"}),
        ),
        ("POST", "/v1/devices/*", 429, body, ("POST", f"/devices/{WINDOW}/functions/open", {})),
        ("POST", "/v1/devices/*", 400, text_body, ("POST", f"/devices/{WINDOW}/functions/close", {})),
        ("PUT", "/v1/devices/*", 400, body, ("POST", f"/devices/{WINDOW}/rename", {"name": "Echo"})),
        ("PUT", "/v1/devices/*", 500, text_body, ("POST", f"/devices/{WINDOW}/rename", {"name": "Echo two"})),
        # A 502 is an uncertain outcome: the rename is kept and sent again later (no error
        # page), and nothing of the echo may reach a page or a log either.
        (
            "PUT",
            "/v1/devices/*",
            502,
            text_body,
            ("POST", f"/devices/{WINDOW}/rename", {"name": "Echo three"}),
        ),
        ("DELETE", "/v1/products/*/devices/*/owner", 500, body, ("POST", f"/devices/{WINDOW}/release", {})),
        (
            "DELETE",
            "/v1/products/*/devices/*/owner",
            403,
            text_body,
            ("POST", f"/devices/{WINDOW}/release", {}),
        ),
    ]
    for method, glob, status, fault_body, (our_method, our_path, data) in cases:
        for htmx in (False, True):
            sim.clear_faults()
            sim.add_fault(method, glob, count=None, status=status, body=fault_body)
            if our_method == "GET":
                crawler.fetch(our_path, htmx=htmx)
            else:
                crawler.fetch(
                    our_path,
                    method="POST",
                    htmx=htmx,
                    headers=post_headers,
                    data={**data, "csrf_token": token},
                )
    sim.clear_faults()
    # The device is still the homeowner's: every failure above changed nothing.
    assert Device.get_by_id(WINDOW).owner_id == homeowner.user.id

    # Token minting fails with an echo: drop the cached customer token first.
    particle.forget_customer_token(homeowner.user.particle_customer_id)
    sim.add_fault(
        "POST",
        "/oauth/token",
        count=2,
        status=400,
        body={"error": "invalid_grant", "error_description": text_body},
    )
    for htmx in (False, True):
        crawler.fetch(f"/devices/{WINDOW}/values", htmx=htmx)
    sim.clear_faults()

    # A claim that fails upstream with an echo (another label).
    other = next(d for d in demo_devices() if d["id"] == PUMP)
    sim.add_fault("POST", "/v1/devices", count=None, status=503, body=body)
    crawler.fetch(
        "/devices/claim",
        method="POST",
        headers=post_headers,
        data={"serial": other["serial_number"], "setup_code": other["setup_code"], "csrf_token": token},
    )
    sim.clear_faults()

    failures = [item for item in crawler.fetched if item.status >= 400 or "error" in item.body.lower()]
    assert len(failures) >= 10, [(i.url, i.status) for i in crawler.fetched]
    secret_values = everything_secret(app, sim, homeowner, crawler) | set(tokens)
    cookies = crawler.cookie_values
    assert find_leaks(response_texts(crawler.fetched, include_set_cookie=False), secret_values, cookies) == []
    assert find_leaks(log_texts(all_logs.records), secret_values, cookies) == []
    assert any(record.levelno >= logging.WARNING for record in all_logs.records)


def test_access_log_of_a_real_server_holds_no_secret(app, sim, mailbox, all_logs, particle):
    """Through a real HTTP server, so werkzeug writes its access log: request lines with
    paths (verify links included) must not carry tokens, and cookies are never logged."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        browser = requests.Session()
        planted = planted_tokens()
        sim.configure(issue_tokens=list(planted))
        seed_registry()

        def token_from(path):
            page = browser.get(base + path, timeout=10).text
            return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)

        browser.post(
            base + "/signup",
            data={"email": EMAIL, "password": PASSWORD, "csrf_token": token_from("/signup")},
            timeout=10,
        )
        verify_path = urlsplit(
            [link for link in mailbox.links(mailbox.wait_for(EMAIL)) if "/verify/" in link][-1]
        ).path
        browser.post(base + verify_path, data={"csrf_token": token_from(verify_path)}, timeout=10)
        browser.post(
            base + "/login",
            data={"email": EMAIL, "password": PASSWORD, "csrf_token": token_from("/login")},
            timeout=10,
        )
        label = next(d for d in demo_devices() if d["id"] == WINDOW)
        response = browser.post(
            base + "/devices/claim",
            timeout=10,
            data={
                "serial": label["serial_number"],
                "setup_code": label["setup_code"],
                "csrf_token": token_from("/devices/claim"),
            },
        )
        assert response.url.endswith(f"/devices/{WINDOW}")
        for path in ("/devices", f"/devices/{WINDOW}", "/account", "/account/activity"):
            assert browser.get(base + path, timeout=10).status_code == 200
        assert browser.get(base + f"/devices/{WINDOW}/values", headers=HTMX, timeout=10).status_code == 200
        cookie = browser.cookies.get(COOKIE)
    finally:
        server.shutdown()
        thread.join(timeout=5)

    # The test's own HTTP client (urllib3 talking to our server) is the browser, and the SMTP
    # sink (aiosmtpd's "mail.log") is the mail provider: neither is the app.
    port = str(server.server_port)
    server_side = [
        record
        for record in all_logs.records
        if not (record.name.startswith("urllib3") and port in record.getMessage())
        and not record.name.startswith("mail.log")
    ]
    access = [record for record in server_side if record.name == "werkzeug"]
    assert any("/devices/claim" in record.getMessage() for record in access)
    secret_values = set(planted) | issued_tokens(sim) | setup_codes() | session_secrets() | {PASSWORD}
    secret_values.add(verify_path.rsplit("/", 1)[1])  # the emailed link's token (redacted in logs)
    assert find_leaks(log_texts(server_side), secret_values, {cookie}) == []


def test_support_console_crawl_leaks_no_secret(app, sim, homeowner, all_logs):
    """Staff pages show Particle's view of devices (product token at work): no token, session
    id, cookie or setup code there either, and crawling them writes nothing to the cloud."""
    from test_support_views import sign_in_staff

    from selfserve.services import staff

    staff_user = staff.create_staff("crawler@support.example", PASSWORD)
    console = sign_in_staff(homeowner.client.application.test_client(), staff_user)
    sim.reset_counters()
    crawler = Crawler(console)
    values = {**crawl_values(homeowner), "customer_id": [str(homeowner.user.id), str(staff_user.id)]}
    start = [
        path
        for method, path, rule in concrete_rules(app, values, {"GET"})
        if rule.endpoint.startswith("support.")
    ]
    fetched = crawler.crawl(
        ["/support", "/support?q=leak.hunter", f"/support?q={WINDOW}", "/support/fleet", "/support/mail"]
        + start
    )

    statuses = {(item.url, item.htmx): item.status for item in fetched}
    assert statuses[(f"/support/devices/{WINDOW}", False)] == 200
    assert statuses[(f"/support/customers/{homeowner.user.id}", False)] == 200
    writes = {
        route: n
        for route, n in sim.counters()["routes"].items()
        if n and not route.startswith("GET ") and route != "POST /oauth/token"
    }
    assert writes == {}
    secret_values = everything_secret(app, sim, homeowner, crawler)
    cookies = crawler.cookie_values
    assert find_leaks(response_texts(fetched, include_set_cookie=False), secret_values, cookies) == []
    assert find_leaks(log_texts(all_logs.records), secret_values, cookies) == []


def test_a_label_link_with_the_code_in_the_query_goes_no_further(app, sim, mailbox, all_logs):
    """Labels we print keep serial and code in the URL fragment, which never reaches the
    server. A label printed with them in the query string (or a link typed by hand) must not
    carry the code any further: not into the sign-in redirect's `next`, the sign-in page, a
    later request, or the access log."""
    label = next(d for d in demo_devices() if d["id"] == WINDOW)
    query = f"/claim?serial={label['serial_number']}&code={label['setup_code']}"
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    seen = []
    try:
        browser = requests.Session()
        response = browser.get(base + query, timeout=10)
        seen.extend(response.history + [response])
    finally:
        server.shutdown()
        thread.join(timeout=5)
    # The browser ends on the sign-in page; the code only ever went back in a fragment.
    assert urlsplit(response.url).path == "/login"
    first = seen[0]
    assert first.status_code == 302
    location = urlsplit(first.headers["Location"])
    assert location.path == "/claim" and not location.query and label["setup_code"] in location.fragment
    # What the server was sent (requests, like browsers, keeps the fragment locally) and answered.
    later = [
        (
            f"{r.request.method} {r.request.path_url} -> {r.status_code}",
            r.request.path_url + " " + r.text + " " + repr(dict(r.headers)),
        )
        for r in seen[1:]
    ]
    assert len(later) >= 2  # /claim, then the sign-in page
    assert find_leaks(later, setup_codes()) == []
    port = str(server.server_port)
    server_side = [
        record
        for record in all_logs.records
        if not (record.name.startswith("urllib3") and port in record.getMessage())
    ]
    assert any(record.name == "werkzeug" for record in server_side)
    assert find_leaks(log_texts(server_side), setup_codes()) == []


def mail_texts(mailbox):
    return [
        (f"mail to {message['To']}: {message['Subject']}", message.as_string() + "\n" + mailbox.body(message))
        for message in list(mailbox.messages)
    ]


def test_proving_possession_of_someone_elses_device_shows_and_mails_no_code(
    app, sim, mailbox, homeowner, all_logs
):
    """The buyer's path: the right label for a device someone else owns offers to ask the owner
    (an opaque proof, never the code), and the owner's email holds no code or token either."""
    from helpers import make_user

    buyer = make_user("holder@example.com", PASSWORD)
    client = homeowner.client.application.test_client()
    login(client, buyer.email, PASSWORD)
    crawler = Crawler(client)
    token = csrf_token(client, "/devices/claim")
    label = homeowner.label
    for htmx in (False, True):
        item = crawler.fetch(
            "/devices/claim",
            method="POST",
            htmx=htmx,
            headers={"X-CSRFToken": token},
            data={"serial": label["serial_number"], "setup_code": label["setup_code"], "csrf_token": token},
        )
        assert item.status in (200, 409), item.status
    proof = re.search(r'name="proof" value="([^"]+)"', crawler.fetched[-1].body)
    assert proof, crawler.fetched[-1].body
    item = crawler.fetch(
        "/transfers/request", method="POST", data={"proof": proof.group(1), "csrf_token": token}
    )
    assert item.status == 302, item.body
    mailbox.wait_for(EMAIL, count=2)  # the owner is asked (after the sign-up's verify mail)
    crawler.crawl([dict(item.headers)["Location"], "/devices", "/account/activity"])

    secret_values = everything_secret(app, sim, homeowner, crawler)
    texts = response_texts(crawler.fetched, include_set_cookie=False) + mail_texts(mailbox)
    assert find_leaks(texts, secret_values, crawler.cookie_values) == []
    assert find_leaks(log_texts(all_logs.records), secret_values, crawler.cookie_values) == []
