"""Accounts: sign-up, verification, sign-in/out, password reset and change, email change,
settings and the account's activity. Thin: parse input, call one service, render or redirect.
"""

import functools
from urllib.parse import urlsplit

from flask import Blueprint
from flask import abort
from flask import current_app
from flask import flash
from flask import make_response
from flask import render_template
from flask import request
from flask import session
from flask import url_for
from flask_babel import gettext as _
from flask_babel import refresh
from flask_limiter.util import get_remote_address
from flask_login import current_user

from selfserve import htmx
from selfserve import i18n
from selfserve import passwords
from selfserve import tokens
from selfserve.security import end_login_session
from selfserve.security import limiter
from selfserve.security import public
from selfserve.security import start_login_session
from selfserve.services import accounts
from selfserve.services import audit
from selfserve.services import impersonation
from selfserve.services import provisioning
from selfserve.services.accounts import FormErrors
from selfserve.services.staff import real_user

bp = Blueprint("accounts", __name__)

# Session key: the address just verified, for the sign-in form to fill in.
SIGN_IN_EMAIL = "sign_in_email"
# An offer's "Create an account": the address it was offered to (pre-filled in the sign-up form)
# and where to return after verifying (the offer). In the server-side session, not in URLs.
SIGNUP_EMAIL = "signup_email"
AFTER_VERIFY_NEXT = "after_verify_next"
# Session key: a verification link opened in this browser, finished by the next sign-in.
VERIFY_PENDING = "verify_pending"


def _limit(name):
    """The rate limit setting RATE_LIMIT_<NAME> (selfserve/config.py), read per request."""
    return lambda: current_app.config["RATE_LIMIT_" + name.upper()]


def _form_email_key():
    return "email:" + accounts.normalize_email(request.form.get("email"))


def _form_email_and_source_key():
    return "email-source:" + accounts.normalize_email(request.form.get("email")) + "|" + get_remote_address()


def _account_key():
    return "account:" + str(current_user.id)


def _failed_login(response):
    return response.status_code == 401


@bp.record_once
def _keep_tokens_out_of_logs(state):
    tokens.install_log_redaction()


@bp.context_processor
def _password_rule():
    return {"min_length": passwords.MIN_LENGTH}


def safe_next(value):
    """`value` if it is a path on this site ("/devices?x=1"), else None (no open redirects)."""
    if not value or len(value) > 2000 or not value.startswith("/") or value.startswith("//"):
        return None
    if "\\" in value or any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return None
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return None
    return value


def _home(user):
    """Where a signed-in person lands: verify first, then watch setup finish, then devices."""
    if not user.is_verified:
        return url_for("accounts.unverified")
    if user.provisioning_state != provisioning.READY:
        return url_for("accounts.settings")
    return url_for("devices.dashboard")


def _me():
    return current_user._get_current_object()


def emailed_link(kind):
    """For a view behind an emailed link (verify, sign-in link, reset, email change): an
    unusable link (expired, used, altered) gets the page that says why and offers the way
    forward, whichever step found it. Such views answer GET with a button only (mail scanners
    fetch links and must not act) and act on POST."""

    def decorate(view):
        @functools.wraps(view)
        def checked(*args, **kwargs):
            try:
                return view(*args, **kwargs)
            except tokens.TokenError as error:
                status = 410 if isinstance(error, tokens.TokenExpired) else 400
                return render_template("accounts/link_error.html", message=error.message, kind=kind), status

        return checked

    return decorate


# --- sign-up and verification ------------------------------------------------------------------


@bp.route("/signup", methods=["GET", "POST"])
@public
@limiter.limit(_limit("signup"), methods=["POST"])
@limiter.limit(_limit("signup_email"), methods=["POST"], key_func=_form_email_key)
def signup():
    next_url = safe_next(request.values.get("next"))
    if request.method == "GET":
        return render_template(
            "accounts/signup.html", errors={}, email=session.get(SIGNUP_EMAIL, ""), next_url=next_url
        )
    email = request.form.get("email", "")
    try:
        accounts.sign_up(
            email,
            request.form.get("password", ""),
            language=i18n.browser_language(),
            time_zone=i18n.browser_time_zone(request.form),
        )
    except FormErrors as exc:
        return render_template("accounts/signup.html", errors=exc.errors, email=email, next_url=next_url), 400
    session.pop(SIGNUP_EMAIL, None)
    if next_url:
        session[AFTER_VERIFY_NEXT] = next_url
    return render_template("accounts/check_email.html", kind="signup", email=accounts.normalize_email(email))


@bp.get("/verify-email")
def unverified():
    if current_user.is_verified:
        return htmx.redirect(_home(current_user))
    return render_template(
        "accounts/unverified.html",
        user=current_user,
        verification_mail=accounts.verification_mail_state(current_user),
    )


@bp.post("/verify-email/resend")
@limiter.limit(_limit("resend"), key_func=_account_key)
@limiter.limit(_limit("resend_ip"))
def resend():
    sent = accounts.resend_verification(_me())
    if not sent:
        flash(_("Your email address is already verified."), "info")
        return htmx.redirect(_home(current_user))
    flash(
        _(
            "We sent a new link to %(email)s. It works for %(hours)s hours.",
            email=current_user.email,
            hours=accounts.VERIFY_HOURS,
        ),
        "success",
    )
    return htmx.redirect(url_for("accounts.unverified"))


@bp.route("/verify/<token>", methods=["GET", "POST"])
@public
@emailed_link("verify")
def verify(token):
    if request.method == "GET":
        user = accounts.check_verify_link(token)
        return render_template("accounts/verify.html", token=token, already=user.is_verified)
    signed_in = current_user.is_authenticated and getattr(current_user, "staff_view", None) is None
    try:
        result = accounts.verify_email(token, login_session=current_user.login_session if signed_in else None)
    except accounts.SignInToVerify as exc:
        if signed_in:
            flash(_("This link is for another account. Sign out, then open the link again."), "error")
            return htmx.redirect(_home(current_user))
        # The link proves the mailbox; the password is proven by signing in, in this browser,
        # which finishes the verification (the link waits in the session, read once).
        session[VERIFY_PENDING] = token
        session[SIGN_IN_EMAIL] = exc.user.email
        flash(_("Nearly done: sign in with your password and your email address is verified."), "info")
        back_to = safe_next(session.pop(AFTER_VERIFY_NEXT, None))  # signed up from an offer
        return htmx.redirect(
            url_for("accounts.login", next=back_to) if back_to else url_for("accounts.login")
        )
    if result.newly_verified:
        flash(_("Thank you: your email address is verified."), "success")
    else:
        flash(_("Your email address was already verified."), "info")
    # Signed up from somewhere (an offer): go back there after verifying.
    back_to = safe_next(session.pop(AFTER_VERIFY_NEXT, None))
    if current_user.is_authenticated and current_user.id == result.user.id:
        return htmx.redirect(back_to or _home(result.user))
    flash(_("Please sign in to continue."), "info")
    # The sign-in form fills in the address just confirmed (kept in the session, not the URL;
    # read once). Signing in rotates the session, so it goes no further.
    session[SIGN_IN_EMAIL] = result.user.email
    return htmx.redirect(url_for("accounts.login", next=back_to) if back_to else url_for("accounts.login"))


def _finish_verification(token, user):
    """After a sign-in: verify the address whose link was opened in this browser just before
    (the sign-in proved the password). Returns the account as it is now."""
    try:
        result = accounts.verify_email(token, login_session=user.login_session)
    except (tokens.TokenError, accounts.SignInToVerify):
        return user  # a link of another account, or outdated: the sign-in is all that happened
    if result.newly_verified:
        flash(_("Thank you: your email address is verified."), "success")
    return result.user


# --- signing in and out -------------------------------------------------------------------------


def _login_rate_limited(request_limit):
    """Too many sign-in attempts: the sign-in page with its form (the address kept), when to
    try again (the limiter knows), and the way out by email. Sent with Retry-After."""
    import math
    import time

    seconds = max(1, int(request_limit.reset_at - time.time()))
    minutes = math.ceil(seconds / 60)
    wait = "a minute" if minutes <= 1 else f"{minutes} minutes"
    response = make_response(
        render_template(
            "accounts/login.html",
            next_url=safe_next(request.values.get("next")),
            email=request.form.get("email", "")[:254],
            error=None,
            retry_in=wait,
            throttled=True,
        ),
        429,
    )
    response.headers["Retry-After"] = str(seconds)
    return response


@bp.route("/login", methods=["GET", "POST"])
@public
@limiter.limit(_limit("login"), methods=["POST"], on_breach=_login_rate_limited)
@limiter.limit(
    _limit("login_email_source"),
    methods=["POST"],
    key_func=_form_email_and_source_key,
    deduct_when=_failed_login,
    on_breach=_login_rate_limited,
)
@limiter.limit(
    _limit("login_email"),
    methods=["POST"],
    key_func=_form_email_key,
    deduct_when=_failed_login,
    on_breach=_login_rate_limited,
)
def login():
    next_url = safe_next(request.values.get("next"))
    if request.method == "GET":
        email = session.pop(SIGN_IN_EMAIL, "")
        if current_user.is_authenticated:
            return htmx.redirect(next_url or _home(current_user))
        return _login_page(next_url, email)
    email = request.form.get("email", "")
    user = accounts.authenticate(email, request.form.get("password", ""))
    if user is None:
        error = _("That email address and password don't match an account. Check both and try again.")
        return _login_page(next_url, email, error), 401
    accounts.remember_browser(user, i18n.browser_language(), i18n.browser_time_zone(request.form))
    pending_verification = session.get(VERIFY_PENDING)
    start_login_session(user)  # a fresh session: nothing from before the login survives
    if pending_verification:
        user = _finish_verification(pending_verification, user)
    return htmx.redirect(next_url or _home(user))


def _login_page(next_url, email, error=None, throttled=False):
    return render_template(
        "accounts/login.html",
        next_url=next_url,
        email=email,
        error=error,
        verifying=bool(session.get(VERIFY_PENDING)),
        throttled=throttled,
    )


@bp.post("/login/link")
@public
@limiter.limit(_limit("sign_in_link"))
@limiter.limit(_limit("sign_in_link_email"), key_func=_form_email_key)
def send_sign_in_link():
    email = request.form.get("email", "")
    try:
        accounts.send_sign_in_link(email)
    except FormErrors as exc:
        flash(exc.errors["email"], "error")
        return htmx.redirect(url_for("accounts.login"))
    return render_template(
        "accounts/check_email.html", kind="sign_in_link", email=accounts.normalize_email(email)
    )


@bp.route("/login/link/<token>", methods=["GET", "POST"])
@public
@limiter.limit(_limit("sign_in_link"), methods=["POST"])
@emailed_link("sign_in_link")
def sign_in_link(token):
    if request.method == "GET":
        user = accounts.check_sign_in_link(token)
        return render_template("accounts/sign_in_link.html", token=token, email=user.email)
    user = accounts.use_sign_in_link(token)  # signs in once
    start_login_session(user)
    flash(_("You are signed in."), "success")
    return htmx.redirect(_home(user))


@bp.post("/logout")
def logout():
    # Staff viewing as a customer sign out too (the read-only wall lets this through): the
    # view ends with the session, and the sign-out is the staff member's, not the customer's.
    view = getattr(current_user, "staff_view", None)
    if view is not None:
        impersonation.end_view(view, "signed_out")
    accounts.record_sign_out(real_user())
    end_login_session()
    flash(_("You are signed out."), "success")
    return htmx.redirect(url_for("accounts.login"))


# --- forgotten password ------------------------------------------------------------------------


@bp.route("/forgot", methods=["GET", "POST"])
@public
@limiter.limit(_limit("forgot"), methods=["POST"])
@limiter.limit(_limit("forgot_email"), methods=["POST"], key_func=_form_email_key)
def forgot():
    if request.method == "GET":
        return render_template("accounts/forgot.html", errors={}, email="")
    email = request.form.get("email", "")
    try:
        accounts.request_password_reset(email)
    except FormErrors as exc:
        return render_template("accounts/forgot.html", errors=exc.errors, email=email), 400
    return render_template("accounts/check_email.html", kind="reset", email=accounts.normalize_email(email))


@bp.route("/reset/<token>", methods=["GET", "POST"])
@public
@limiter.limit(_limit("reset"), methods=["POST"])
@emailed_link("reset")
def reset(token):
    if request.method == "GET":
        accounts.check_reset_link(token)
        return render_template("accounts/reset.html", token=token, errors={})
    try:
        accounts.reset_password(token, request.form.get("password", ""))
    except FormErrors as exc:
        return render_template("accounts/reset.html", token=token, errors=exc.errors), 400
    if current_user.is_authenticated:
        end_login_session()  # every session of the account was ended; this browser's too
    flash(
        _("Your password is changed and every device was signed out. Please sign in with the new password."),
        "success",
    )
    return htmx.redirect(url_for("accounts.login"))


# --- settings ----------------------------------------------------------------------------------


def _settings_page(status=200, password_errors=None, email_errors=None, new_email="", preference_errors=None):
    return render_template(
        "accounts/settings.html",
        user=current_user,
        password_errors=password_errors or {},
        email_errors=email_errors or {},
        new_email=new_email,
        preference_errors=preference_errors or {},
        time_zones=i18n.time_zones(),
        browser_language=i18n.browser_language(),
    ), status


@bp.get("/account")
def settings():
    return _settings_page()


@bp.post("/account/preferences")
def change_preferences():
    try:
        accounts.save_preferences(_me(), request.form.get("language"), request.form.get("time_zone"))
    except FormErrors as exc:
        return _settings_page(400, preference_errors=exc.errors)
    refresh()  # the confirmation below is already in the new language
    flash(_("Your language and time zone are saved."), "success")
    return htmx.redirect(url_for("accounts.settings"))


@bp.post("/account/password")
@limiter.limit(_limit("account_change"), key_func=_account_key)
def change_password():
    try:
        accounts.change_password(
            _me(),
            request.form.get("current_password", ""),
            request.form.get("new_password", ""),
            keep_session=current_user.login_session,
        )
    except FormErrors as exc:
        return _settings_page(400, password_errors=exc.errors)
    flash(_("Your password is changed. You were signed out everywhere else."), "success")
    return htmx.redirect(url_for("accounts.settings"))


@bp.post("/account/email")
@limiter.limit(_limit("account_change"), key_func=_account_key)
def change_email():
    new_email = request.form.get("new_email", "")
    try:
        accounts.request_email_change(_me(), new_email, request.form.get("email_password", ""))
    except FormErrors as exc:
        return _settings_page(400, email_errors=exc.errors, new_email=new_email)
    flash(
        _(
            "We sent a link to %(email)s. Your address changes when you open it; until then, keep using the current one.",
            email=accounts.normalize_email(new_email),
        ),
        "success",
    )
    return htmx.redirect(url_for("accounts.settings"))


@bp.post("/account/email/cancel")
def cancel_email_change():
    accounts.cancel_email_change(_me())
    flash(_("The email change is cancelled; the link we sent no longer works."), "info")
    return htmx.redirect(url_for("accounts.settings"))


@bp.route("/confirm-email/<token>", methods=["GET", "POST"])
@public
@emailed_link("email")
def confirm_email(token):
    if request.method == "GET":
        user = accounts.check_email_change_link(token)
        return render_template("accounts/confirm_email.html", token=token, new_email=user.pending_email)
    user = accounts.confirm_email_change(token)
    flash(_("Your email address is now %(email)s.", email=user.email), "success")
    if current_user.is_authenticated and current_user.id == user.id:
        return htmx.redirect(url_for("accounts.settings"))
    flash(_("Please sign in with your new address."), "info")
    return htmx.redirect(url_for("accounts.login"))


@bp.get("/account/status")
def status():
    """The "setting up your account" fragment; it polls itself while provisioning is pending.

    Polling also continues provisioning that was already started (idempotent, leased,
    backoff respected): nothing the person asked for changes, it only finishes.
    """
    user = _me()
    # Support viewing the account only looks: their polls must not drive the set-up (the
    # read-only guard would refuse the Particle write and count it as a failed attempt).
    if getattr(current_user, "staff_view", None) is None:
        user = provisioning.resume_user(user)
    return render_template("accounts/_provisioning.html", user=user, polled=True)


# --- activity ----------------------------------------------------------------------------------


@bp.get("/account/activity")
def activity():
    before = request.args.get("before")
    if before is not None:
        if not before.isdigit() or len(before) > 18:
            abort(400)
        before = int(before)
    events, older = accounts.activity(_me(), before)
    return render_template(
        "accounts/activity.html",
        events=audit.fold_support_visits(events),
        older=older,
        describe=audit.describe,
        first_page=before is None,
    )
