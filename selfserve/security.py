"""Login, sessions, CSRF, rate limits, deny-by-default and security headers: one place.

- Every endpoint needs a signed-in user unless its view is decorated with `@public`.
- A login is a server-side LoginSession; the cookie holds only a random id (the database only
  its sha256), so logging out (or a password reset) ends it on the server. Idle and absolute
  timeouts are checked on load.
- CSRF (Flask-WTF) covers every POST/PUT/PATCH/DELETE, htmx requests included (they send the
  token in the X-CSRFToken header, set once on <body hx-headers>).
"""

import datetime
import functools
import hashlib
import logging
import secrets

from flask import request
from flask import session
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_login import current_user
from flask_login import login_user
from flask_login import logout_user
from flask_wtf.csrf import CSRFProtect

from selfserve.i18n import lazy_text as _l
from selfserve.models import LoginSession
from selfserve.models import User
from selfserve.models import utcnow

login_manager = LoginManager()
csrf = CSRFProtect()
limiter = Limiter(key_func=get_remote_address)

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ]
)


class HideSqlParameters(logging.Filter):
    """peewee logs every query with its parameters at DEBUG: session ids, emails, password
    hashes. Keep the SQL (useful when debugging), drop the values."""

    def filter(self, record):
        if (
            isinstance(record.msg, tuple)
            and len(record.msg) == 2
            and isinstance(record.msg[1], (list, tuple))
        ):
            sql, params = record.msg
            record.msg = (sql, f"[{len(params)} parameter(s) not logged]")
        return True


def _hide_sql_parameters():
    logger = logging.getLogger("peewee")
    if not any(isinstance(f, HideSqlParameters) for f in logger.filters):
        logger.addFilter(HideSqlParameters())


def public(view):
    """Mark a view as reachable without signing in (deny by default for everything else)."""
    view.is_public = True
    return view


def sessionless(view):
    """Mark a machine endpoint (the product webhook) that never loads a login session: no user,
    no staff rules. It must also be @public and authenticate the request itself."""
    view.is_sessionless = True
    return view


def init_app(app):
    from selfserve import input_rules

    # First: bad input is refused before the limiter, CSRF or the login read or write anything.
    input_rules.init_app(app)
    _hide_sql_parameters()
    login_manager.init_app(app)
    login_manager.login_view = "accounts.login"
    login_manager.login_message = _l("Please sign in to continue.")
    login_manager.login_message_category = "info"
    # Protection "strong" would end sessions on IP changes (phones roaming); our own
    # LoginSession rows give server-side logout instead.
    login_manager.session_protection = None
    csrf.init_app(app)
    app.config.setdefault("RATELIMIT_HEADERS_ENABLED", True)
    app.config["RATELIMIT_STORAGE_URI"] = app.config.get("RATELIMIT_STORAGE_URI") or "memory://"
    limiter.init_app(app)

    @app.before_request
    def _deny_by_default():
        if request.endpoint is None:
            return None  # 404/405 are handled by the error pages
        view = app.view_functions.get(request.endpoint)
        if request.endpoint == "static" or getattr(view, "is_public", False):
            return None
        if not current_user.is_authenticated:
            if request.headers.get("HX-Request") == "true":
                return _htmx_sign_in()
            return login_manager.unauthorized()
        return None

    @app.before_request
    def _staff_rules():
        # After deny-by-default, so the user (and any staff view) is loaded already.
        if request.endpoint is None or request.endpoint == "static":
            return None
        if getattr(app.view_functions.get(request.endpoint), "is_sessionless", False):
            return None
        if not current_user.is_authenticated:
            return None
        view = getattr(current_user, "staff_view", None)
        if view is not None:
            return _read_only_while_viewing(app, view)
        if getattr(current_user, "is_staff", False) and current_user.login_session.mfa_verified_at is None:
            return _second_factor_first(app)
        return None

    @app.after_request
    def _security_headers(response):
        headers = response.headers
        headers.setdefault("Content-Security-Policy", CSP)
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Referrer-Policy", "same-origin")
        headers.setdefault("Permissions-Policy", "camera=(self), geolocation=(), microphone=()")
        headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        if not app.config.get("DEMO") and not app.config.get("TESTING"):
            headers.setdefault("Strict-Transport-Security", "max-age=63072000; includeSubDomains")
        if request.endpoint != "static":
            # Pages show personal data and live values: never cache them.
            headers["Cache-Control"] = "no-store"
            headers.add("Vary", "Cookie")
        return response


def _htmx_sign_in():
    """An htmx request (a poll, a fragment form) after the session ended: navigate the whole
    page to sign-in, coming back to that page, instead of swapping the sign-in page into a
    fragment."""
    from urllib.parse import urlsplit

    from flask import flash
    from flask import url_for

    from selfserve import htmx

    current = urlsplit(request.headers.get("HX-Current-URL", ""))
    next_page = None
    if current.netloc == request.host and current.path.startswith("/"):
        next_page = current.path + ("?" + current.query if current.query else "")
    flash(login_manager.login_message, login_manager.login_message_category)
    return htmx.redirect(url_for(login_manager.login_view, next=next_page))


def _new_session_id():
    """(cookie id, stored id): the cookie carries a random id, the database only its hash, so
    a database copy, a backup or a query log holds no session anyone could use."""
    cookie_id = secrets.token_urlsafe(32)
    return cookie_id, stored_session_id(cookie_id)


def stored_session_id(cookie_id):
    """The LoginSession primary key for the id in a session cookie."""
    return hashlib.sha256(cookie_id.encode()).hexdigest()


@login_manager.user_loader
def _load_user(cookie_id):
    """Return the user of a live LoginSession, ending it when idle or too old."""
    from flask import current_app

    if not isinstance(cookie_id, str) or not cookie_id or len(cookie_id) > 100:
        return None
    try:
        login_session = (
            LoginSession.select(LoginSession, User)
            .join(User)
            .where((LoginSession.id == stored_session_id(cookie_id)) & LoginSession.ended_at.is_null())
            .get()
        )
    except LoginSession.DoesNotExist:
        return None
    login_session.cookie_id = cookie_id
    now = utcnow()
    idle = datetime.timedelta(seconds=current_app.config["SESSION_IDLE_SECONDS"])
    absolute = datetime.timedelta(seconds=current_app.config["SESSION_ABSOLUTE_SECONDS"])
    if now - login_session.last_seen_at > idle or now - login_session.created_at > absolute:
        end_login_session(login_session)
        return None
    # Touch at most once a minute to keep writes off the hot path.
    if now - login_session.last_seen_at > datetime.timedelta(seconds=60):
        LoginSession.update(last_seen_at=now).where(LoginSession.id == login_session.id).execute()
    user = login_session.user
    user.login_session = login_session
    if user.is_staff:
        # A staff member viewing as a customer is "the customer" for the pages (read-only).
        from selfserve.services import impersonation

        return impersonation.effective_user(user, login_session)
    return user


# While a staff member views as a customer, only these non-GET endpoints work.
WRITES_ALLOWED_WHILE_VIEWING = frozenset({"support.end_view", "accounts.logout"})
READ_ONLY_MESSAGE = _l(
    "You are viewing this account as support, read-only: nothing can be changed. "
    "End the view (the button at the top of the page) to do anything else."
)
# A staff member who hasn't passed the second factor may only reach these (and public pages).
SECOND_FACTOR_ENDPOINTS = frozenset({"support.second_factor", "accounts.logout"})
SECOND_FACTOR_MESSAGE = _l("Please confirm your sign-in with your authenticator app first.")


def _read_only_while_viewing(app, view):
    """The one read-only enforcement point for staff views: every state-changing request is
    refused (403) except ending the view, Particle writes are refused for the whole request
    (a second wall), and every full page viewed is audited against the customer."""
    from selfserve import htmx
    from selfserve.particle import forbid_writes
    from selfserve.services import impersonation

    forbid_writes()
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        if request.endpoint in WRITES_ALLOWED_WHILE_VIEWING:
            return None
        return htmx.error_response(READ_ONLY_MESSAGE, 403, _l("Read-only view"))
    if (
        request.method == "GET"
        and not request.headers.get("HX-Request")
        and not request.endpoint.startswith("support.")
    ):
        view_function = app.view_functions.get(request.endpoint)
        # Public pages may carry a token in their path: record only their name.
        page = request.endpoint if getattr(view_function, "is_public", False) else request.path
        impersonation.record_page_view(view, page)
    return None


def _second_factor_first(app):
    """Staff without the second factor get nothing but the second-factor step."""
    from flask import redirect
    from flask import url_for

    from selfserve import htmx

    view_function = app.view_functions.get(request.endpoint)
    if request.endpoint in SECOND_FACTOR_ENDPOINTS or getattr(view_function, "is_public", False):
        return None
    if request.method == "GET" and not request.headers.get("HX-Request"):
        next_page = request.full_path.rstrip("?") if request.endpoint.startswith("support.") else None
        return redirect(url_for("support.second_factor", next=next_page))
    return htmx.error_response(SECOND_FACTOR_MESSAGE, 403, _l("Second factor needed"))


def start_login_session(user):
    """Sign `user` in with a fresh server-side session; the old cookie session is discarded."""
    session.clear()  # rotate: nothing from the anonymous session survives the login
    cookie_id, stored_id = _new_session_id()
    login_session = LoginSession.create(
        id=stored_id,
        user=user,
        user_agent=(request.user_agent.string or "")[:255],
    )
    login_session.cookie_id = cookie_id
    user.login_session = login_session
    login_user(user)
    session.permanent = False
    return login_session


def rotate_login_session(**changes):
    """Give the signed-in person a fresh login session (new id, same start time, same second
    factor) and end the old one: used when a staff view starts or ends, so a session id seen
    before cannot be reused across the change. `changes` are extra LoginSession fields."""
    old = current_user.login_session
    now = utcnow()
    cookie_id, stored_id = _new_session_id()
    fields = {
        "id": stored_id,
        "user": old.user_id,
        "created_at": old.created_at,  # the absolute timeout still counts from the sign-in
        "last_seen_at": now,
        "user_agent": old.user_agent,
        "mfa_verified_at": old.mfa_verified_at,
    }
    fields.update(changes)
    new = LoginSession.create(**fields)
    new.cookie_id = cookie_id
    LoginSession.update(ended_at=now).where(LoginSession.id == old.id).execute()
    session.clear()
    user = User.get_by_id(old.user_id)
    user.login_session = new
    login_user(user)
    return new


def end_login_session(login_session=None):
    """End one login session on the server (the current one by default) and sign out."""
    if login_session is None and current_user.is_authenticated:
        login_session = current_user.login_session
    if login_session is not None:
        LoginSession.update(ended_at=utcnow()).where(
            (LoginSession.id == login_session.id) & LoginSession.ended_at.is_null()
        ).execute()
    if current_user.is_authenticated and (
        login_session is None or current_user.login_session.id == login_session.id
    ):
        logout_user()
        session.clear()


def end_all_login_sessions(user, keep=None):
    """End every session of `user` (password reset or change), except `keep` if given."""
    query = LoginSession.update(ended_at=utcnow()).where(
        (LoginSession.user == user) & LoginSession.ended_at.is_null()
    )
    if keep is not None:
        query = query.where(LoginSession.id != keep.id)
    query.execute()


def verified_required(view):
    """For views that need a verified email (claiming, transfers)."""
    from flask import flash
    from flask import redirect
    from flask import url_for

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if not current_user.is_verified:
            flash(_l("Please verify your email address first."), "warning")
            return redirect(url_for("accounts.unverified"))
        return view(*args, **kwargs)

    return wrapper
