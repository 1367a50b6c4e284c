"""Login, sessions, CSRF, rate limits, deny-by-default and security headers: one place.

- Every endpoint needs a signed-in user unless its view is decorated with `@public`.
- A login is a server-side LoginSession; the cookie holds only its random id, so logging out
  (or a password reset) ends it on the server. Idle and absolute timeouts are checked on load.
- CSRF (Flask-WTF) covers every POST/PUT/PATCH/DELETE, htmx requests included (they send the
  token in the X-CSRFToken header, set once on <body hx-headers>).
"""
import datetime
import functools
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


def public(view):
    """Mark a view as reachable without signing in (deny by default for everything else)."""
    view.is_public = True
    return view


def init_app(app):
    login_manager.init_app(app)
    login_manager.login_view = "accounts.login"
    login_manager.login_message = "Please sign in to continue."
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


@login_manager.user_loader
def _load_user(login_session_id):
    """Return the user of a live LoginSession, ending it when idle or too old."""
    from flask import current_app

    try:
        login_session = LoginSession.select(LoginSession, User).join(User).where(
            (LoginSession.id == login_session_id) & LoginSession.ended_at.is_null()
        ).get()
    except LoginSession.DoesNotExist:
        return None
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
    return user


def start_login_session(user):
    """Sign `user` in with a fresh server-side session; the old cookie session is discarded."""
    session.clear()  # rotate: nothing from the anonymous session survives the login
    login_session = LoginSession.create(
        id=secrets.token_urlsafe(32),
        user=user,
        user_agent=(request.user_agent.string or "")[:255],
    )
    user.login_session = login_session
    login_user(user)
    session.permanent = False
    return login_session


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
            flash("Please verify your email address first.", "warning")
            return redirect(url_for("accounts.unverified"))
        return view(*args, **kwargs)

    return wrapper
