"""Accounts: sign-up, email verification, sign-in, password reset and change, email change,
and the account's own activity history.

Plain functions, tested without HTTP. They raise:
- `FormErrors` for input the person must correct (field name -> message);
- `tokens.TokenError` for a link that can't be used (expired, tampered, used, outdated).

Emails go through the outbox (services/outbox.py), queued in the same transaction as the change
they report: a mail server that is down delays them, it never fails the request.

No answer reveals whether an email address has an account: sign-up and "forgot password"
answer the same either way (the owner of an existing address gets a different email instead),
and a failed sign-in costs the same work for unknown addresses (a dummy hash is checked).
"""

import datetime
import logging
import re
import time
from dataclasses import dataclass

import peewee
from flask import current_app
from flask import has_request_context
from flask import request
from flask_babel import gettext as _

from selfserve import i18n
from selfserve import mail
from selfserve import passwords
from selfserve import tokens
from selfserve.i18n import lazy_text as _l
from selfserve.models import LoginSession
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.refusals import Refusal
from selfserve.security import end_all_login_sessions
from selfserve.services import audit
from selfserve.services import outbox
from selfserve.services import provisioning
from selfserve.services import steps

log = logging.getLogger(__name__)

EMAIL_MAX_LENGTH = 254
# Deliberately loose: one @, something on each side, a dot in the domain, no spaces. The
# verification email is the real test of an address.
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")

VERIFY_HOURS = tokens.PURPOSES["verify_email"].max_age // 3600
RESET_MINUTES = tokens.PURPOSES["reset_password"].max_age // 60
EMAIL_CHANGE_HOURS = tokens.PURPOSES["confirm_email_change"].max_age // 3600
SIGN_IN_LINK_MINUTES = tokens.PURPOSES["sign_in_link"].max_age // 60

ACTIVITY_PAGE_SIZE = 25

LINK_USED = _l(
    "This link has already been used or is no longer valid. If you still need one, please ask for a new link."
)
VERIFY_LINK_OUTDATED = _l(
    "This link was sent to an email address that is no longer on the account. Please ask for a new link."
)


class FormErrors(Refusal):
    """Input to correct. `errors` maps a form field name to a message for that field (the
    first one is also the refusal's `field` and `message`)."""

    def __init__(self, errors):
        field, message = next(iter(errors.items()), (None, _l("Please correct the form.")))
        super().__init__(message, kind="form", field=field, status=422)
        self.errors = errors

    def __str__(self):
        return ", ".join(f"{k}: {v}" for k, v in self.errors.items())


@dataclass
class VerifyResult:
    user: User
    newly_verified: bool  # False: it was already verified (a second click, or another tab)


# --- helpers -----------------------------------------------------------------------------------


def normalize_email(raw):
    """Trimmed and lowercased (Particle and most mail systems treat case as equal)."""
    return (raw or "").strip().lower()


def email_problem(email):
    """What is wrong with a (normalized) email address, or None."""
    if not email:
        return _l("Enter your email address.")
    if len(email) > EMAIL_MAX_LENGTH or not _EMAIL.match(email):
        return _l("Enter an email address like name@example.com.")
    return None


def absolute_url(endpoint, **values):
    """An absolute link for emails: BASE_URL when configured, else the request's own root."""
    base = current_app.config.get("BASE_URL") or ""
    if not base and has_request_context():
        base = request.url_root
    if not base:
        raise RuntimeError("Set BASE_URL to build links outside a request.")
    path = current_app.url_map.bind("localhost").build(endpoint, values)
    return base.rstrip("/") + path


def _user_from(payload):
    user_id = payload.get("u")
    if not isinstance(user_id, int) or isinstance(user_id, bool):
        raise tokens.TokenInvalid()
    user = User.get_or_none(User.id == user_id)
    if user is None:
        raise tokens.TokenInvalid()
    return user


def _verified_fields(now):
    """The columns set when an address is proven: verified now, and provisioning starts with
    an opaque customer id saved before Particle is called and the lease taken in the same
    statement (so this worker, and only it, makes the first attempt)."""
    return {
        User.email_verified_at: now,
        User.provisioning_state: peewee.fn.COALESCE(User.provisioning_state, provisioning.PENDING),
        User.particle_customer_id: peewee.fn.COALESCE(
            User.particle_customer_id, provisioning.new_customer_id()
        ),
        User.provisioning_next_at: steps.lease_until(now),
    }


# --- sign-up and verification ------------------------------------------------------------------


def checked_credentials(email, password):
    """The normalized email of a new account, or FormErrors naming what's wrong with the email
    and the password (both checked at once, so the form shows every problem)."""
    email = normalize_email(email)
    errors = {}
    problem = email_problem(email)
    if problem:
        errors["email"] = problem
    problem = passwords.problem(password or "")
    if problem:
        errors["password"] = problem
    if errors:
        raise FormErrors(errors)
    return email


def sign_up(email, password, language=None, time_zone=None):
    """Create an account and send its verification email.

    If the address already has a verified account, nothing is created and that address gets a
    "someone tried to sign up with your address" email instead; the caller can't tell which
    happened. If it has an account that was never verified, this sign-up replaces it: the
    password is the new one, every session of the old sign-up ends, and a verification link
    goes out (someone who signed up with another person's address first can't keep it, and
    a person who lost the first link just starts again). Raises FormErrors for a bad address
    or password. The email is queued with the account (outbox): an address the mail server
    refuses still gets its account, the mail is marked failed for support, and "resend" works.
    `language` and `time_zone` are the browser's (i18n.browser_language,
    i18n.browser_time_zone): the verification email goes out in that language.
    """
    email = checked_credentials(email, password)
    browser = {"seen_locale": language if language in i18n.LANGUAGES else None, "time_zone": time_zone}
    browser = {key: value for key, value in browser.items() if value}
    # Hashed before the lookup so a new and an existing address cost the same work.
    password_hash = passwords.hash_password(password)
    existing = User.get_or_none(User.email == email)
    if existing is None:
        try:
            with db.atomic():
                user = User.create(email=email, password_hash=password_hash, **browser)
                audit.record("account.signed_up", user=user)
                send_verification(user)
            return
        except peewee.IntegrityError:
            existing = User.get(User.email == email)  # the same address signed up just now
    if not existing.is_verified and not existing.is_staff:
        with db.atomic():
            replaced = (
                User.update(password_hash=password_hash, password_changed_at=utcnow(), **browser)
                .where((User.id == existing.id) & User.email_verified_at.is_null())
                .execute()
            )
            if replaced:
                end_all_login_sessions(existing)
                audit.record("account.signup_replaced", user=existing)
                send_verification(User.get_by_id(existing.id))
        if replaced:
            return
    with db.atomic():
        audit.record("account.signup_attempted", user=existing)
        mail.send(
            existing.email,
            _l("Someone tried to sign up with your email address"),
            "signup_attempt",
            login_url=absolute_url("accounts.login"),
            forgot_url=absolute_url("accounts.forgot"),
        )


def send_verification(user):
    """Queue for `user` a fresh verification link (valid 48 h, bound to the current address)."""
    token = tokens.make("verify_email", {"u": user.id, "e": tokens.fingerprint(user.email)})
    mail.send(
        user.email,
        _l("Confirm your email address"),
        "verify_email",
        sensitive=True,
        verify_url=absolute_url("accounts.verify", token=token),
        hours=VERIFY_HOURS,
    )


def verification_mail_state(user):
    """How the newest verification email to the account's address fared: "pending" (queued or
    being retried), "sent", "failed" (the mail server refused the address, or gave up), or None."""
    return outbox.latest_state(user.email, "verify_email")


def resend_verification(user):
    """Send another verification link; False (and nothing sent) if already verified."""
    user = User.get_by_id(user.id)
    if user.is_verified:
        return False
    send_verification(user)
    return True


def check_verify_link(token):
    """The account a verification link is for, without changing anything (the GET page)."""
    payload = tokens.read("verify_email", token)
    user = _user_from(payload)
    if not tokens.same(payload.get("e"), tokens.fingerprint(user.email)):
        raise tokens.TokenInvalid(VERIFY_LINK_OUTDATED)
    return user


class SignInToVerify(Exception):
    """The link is good, but whoever opened it hasn't shown they know the account's password:
    they sign in (the view then calls `verify_email` again with the new session)."""

    def __init__(self, user):
        super().__init__("sign in to finish the verification")
        self.user = user


def verify_email(token, *, login_session=None, password=None, now=None):
    """Verify the address a link was sent to and create the Particle customer.

    Whoever verifies must hold both the mailbox (the link) and the password: a live
    `login_session` of this account (the browser that opened the link is signed in to it) or
    the `password` itself. Otherwise SignInToVerify is raised and nothing changes. Verifying
    ends every other session of the account, so someone who signed up with another person's
    address and stayed signed in is signed out the moment the mailbox holder verifies, and
    can't sign in again (the password they chose is gone: a later sign-up or the reset link
    replaced it, or the mailbox holder's sign-in proved it is theirs).

    One atomic UPDATE (`... WHERE email_verified_at IS NULL`) picks the winner when several
    clicks arrive at once: only it starts provisioning. Later clicks get
    `newly_verified=False`. If Particle fails, the account stays "pending" and
    `provisioning.resume_*` finishes it later.
    """
    user = check_verify_link(token)
    if user.is_verified:
        return VerifyResult(user, False)
    proven = (
        login_session is not None
        and login_session.user_id == user.id
        and LoginSession.select()
        .where((LoginSession.id == login_session.id) & LoginSession.ended_at.is_null())
        .exists()
    ) or (password is not None and passwords.check_password(user.password_hash, password))
    if not proven:
        raise SignInToVerify(user)
    now = now or utcnow()
    won = (
        User.update(_verified_fields(now))
        .where(
            (User.id == user.id)
            & User.email_verified_at.is_null()
            & (User.email == user.email)
            # The password proven above is still the account's (not replaced meanwhile).
            & (User.password_hash == user.password_hash)
        )
        .execute()
    )
    if not won:
        user = User.get_by_id(user.id)
        if not user.is_verified:  # the address or the password changed in between
            raise tokens.TokenInvalid(VERIFY_LINK_OUTDATED)
        return VerifyResult(user, False)
    end_all_login_sessions(user, keep=login_session)
    audit.record("account.email_verified", user=user)
    return VerifyResult(provisioning.attempt(user.id, now), True)


# --- signing in and out -------------------------------------------------------------------------


def authenticate(email, password):
    """The account for these credentials, or None. Unknown address and wrong password are
    indistinguishable (same answer, same hashing work). Both outcomes are audited."""
    email = normalize_email(email)
    user = User.get_or_none(User.email == email) if email else None
    if not passwords.check_password(user.password_hash if user else None, password or ""):
        audit.record("account.sign_in_failed", user=user)
        return None
    if passwords.needs_rehash(user.password_hash):
        user.password_hash = passwords.hash_password(password)
        User.update(password_hash=user.password_hash).where(User.id == user.id).execute()
    audit.record("account.signed_in", user=user)
    return user


def remember_browser(user, language=None, time_zone=None):
    """At sign-in: the browser's language (for emails while the person chose none) and, when
    the account has none yet, the browser's time zone."""
    changes = {}
    if language in i18n.LANGUAGES and language != user.seen_locale:
        changes["seen_locale"] = language
    if time_zone and i18n.valid_time_zone(time_zone) and not user.time_zone:
        changes["time_zone"] = time_zone
    if changes:
        User.update(**changes).where(User.id == user.id).execute()
        for field, value in changes.items():
            setattr(user, field, value)


def save_preferences(user, language, time_zone):
    """The language ("" = follow the browser) and time zone chosen on the settings page.
    Raises FormErrors naming the field at fault (nothing is saved)."""
    language = (language or "").strip()
    time_zone = (time_zone or "").strip()
    errors = {}
    if language and language not in i18n.LANGUAGES:
        errors["language"] = _("Choose one of the languages in the list.")
    if not i18n.valid_time_zone(time_zone):
        errors["time_zone"] = _("Choose a time zone from the list, such as Europe/Berlin.")
    if errors:
        raise FormErrors(errors)
    User.update(locale=language or None, time_zone=time_zone).where(User.id == user.id).execute()
    user.locale, user.time_zone = language or None, time_zone
    audit.record("account.preferences_changed", user=user)


def record_sign_out(user):
    """Audit a sign-out (the caller ends the session)."""
    audit.record("account.signed_out", user=user)


# --- a sign-in link by email (when sign-in is throttled) ---------------------------------------


def send_sign_in_link(email):
    """Email a link that signs in without the password (15 minutes, once), for an owner whose
    sign-in is throttled because someone else guessed at the address.

    Only verified accounts get one (the link proves the mailbox, as a verification or reset
    does); the answer is the same for every address. Raises FormErrors for a malformed
    address.
    """
    email = normalize_email(email)
    problem = email_problem(email)
    if problem:
        raise FormErrors({"email": problem})
    user = User.get_or_none(User.email == email)
    if user is None or not user.is_verified:
        return
    token = tokens.make(
        "sign_in_link",
        {
            "u": user.id,
            "e": tokens.fingerprint(user.email),
            "p": tokens.fingerprint(user.password_hash),
            "i": time.time(),  # links issued before the last one used are dead
        },
    )
    with db.atomic():
        audit.record("account.sign_in_link_sent", user=user)
        mail.send(
            user.email,
            _l("Your sign-in link"),
            "sign_in_link",
            sensitive=True,
            link_url=absolute_url("accounts.sign_in_link", token=token),
            minutes=SIGN_IN_LINK_MINUTES,
        )


def _sign_in_link_payload(token):
    payload = tokens.read("sign_in_link", token)
    user = _user_from(payload)
    issued = payload.get("i")
    used = user.sign_in_link_used_at
    if not (
        isinstance(issued, (int, float))
        and user.is_verified
        and tokens.same(payload.get("e"), tokens.fingerprint(user.email))
        and tokens.same(payload.get("p"), tokens.fingerprint(user.password_hash))
        and (used is None or used.replace(tzinfo=datetime.UTC).timestamp() < issued)
    ):
        raise tokens.TokenInvalid(LINK_USED)
    return user, issued


def check_sign_in_link(token):
    """The account a sign-in link is for, if still usable (changes nothing: the GET page)."""
    return _sign_in_link_payload(token)[0]


def use_sign_in_link(token):
    """Spend a sign-in link: the account to sign in, once. One atomic UPDATE marks it used, so
    of two clicks only one signs in; every link sent before it dies with it."""
    user, issued = _sign_in_link_payload(token)
    now = utcnow()
    spent = (
        User.update(sign_in_link_used_at=now)
        .where(
            (User.id == user.id)
            & (User.password_hash == user.password_hash)
            & (User.sign_in_link_used_at.is_null() | (User.sign_in_link_used_at < _naive(issued)))
        )
        .execute()
    )
    if not spent:
        raise tokens.TokenInvalid(LINK_USED)
    audit.record("account.signed_in_by_link", user=user)
    return User.get_by_id(user.id)


def _naive(timestamp):
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).replace(tzinfo=None)


# --- forgotten password ------------------------------------------------------------------------


def request_password_reset(email):
    """Have a reset link (valid 1 h, single use, bound to the current password) emailed if the
    address has an account.

    The request does the same work for every address (finding 6: its time told which
    addresses have accounts): it queues one reset request in the outbox and looks nothing up;
    the outbox's sender finds the account and sends the link, or sends nothing
    (services/outbox.py). Raises FormErrors for a malformed address.
    """
    email = normalize_email(email)
    problem = email_problem(email)
    if problem:
        raise FormErrors({"email": problem})
    outbox.enqueue_reset_request(email)


def check_reset_link(token):
    """The account a reset link is for, if the link is still usable (changes nothing)."""
    payload = tokens.read("reset_password", token)
    user = _user_from(payload)
    if not (
        tokens.same(payload.get("e"), tokens.fingerprint(user.email))
        and tokens.same(payload.get("p"), tokens.fingerprint(user.password_hash))
    ):
        raise tokens.TokenInvalid(LINK_USED)
    return user


def reset_password(token, new_password):
    """Set a new password through a reset link and end every session of the account.

    The UPDATE matches the old hash, so of two uses of one link only the first works.
    """
    user = check_reset_link(token)
    problem = passwords.problem(new_password or "")
    if problem:
        raise FormErrors({"password": problem})
    new_hash = passwords.hash_password(new_password)  # slow: not inside the transaction
    # One transaction: the new password never stands without the other sessions ended, the
    # audit entry and the "password changed" mail.
    with db.atomic():
        changed = (
            User.update(password_hash=new_hash, password_changed_at=utcnow())
            .where((User.id == user.id) & (User.password_hash == user.password_hash))
            .execute()
        )
        if not changed:
            raise tokens.TokenInvalid(LINK_USED)
        end_all_login_sessions(user)
        audit.record("account.password_reset", user=user)
        mail.send(
            user.email,
            _l("Your password was changed"),
            "password_changed",
            forgot_url=absolute_url("accounts.forgot"),
        )
    if not user.is_verified:
        # The reset link proved the mailbox and its holder just chose the password: the same
        # proof as a verification (and the way in when someone else chose the first password).
        now = utcnow()
        verified = (
            User.update(_verified_fields(now))
            .where((User.id == user.id) & User.email_verified_at.is_null())
            .execute()
        )
        if verified:
            audit.record("account.email_verified", user=user)
            provisioning.attempt(user.id, now)
    return User.get_by_id(user.id)


# --- settings ----------------------------------------------------------------------------------


def change_password(user, current_password, new_password, keep_session=None):
    """Change the password (the current one is required); end every other session."""
    errors = {}
    if not passwords.check_password(user.password_hash, current_password or ""):
        errors["current_password"] = _l("That is not your current password.")
    problem = passwords.problem(new_password or "")
    if problem:
        errors["new_password"] = problem
    if errors:
        raise FormErrors(errors)
    new_hash = passwords.hash_password(new_password)  # slow: not inside the transaction
    # One transaction, as in reset_password.
    with db.atomic():
        changed = (
            User.update(password_hash=new_hash, password_changed_at=utcnow())
            .where((User.id == user.id) & (User.password_hash == user.password_hash))
            .execute()
        )
        if not changed:
            raise FormErrors(
                {"current_password": _l("Your password was just changed elsewhere. Please reload the page.")}
            )
        end_all_login_sessions(user, keep=keep_session)
        audit.record("account.password_changed", user=user)
        mail.send(
            user.email,
            _l("Your password was changed"),
            "password_changed",
            forgot_url=absolute_url("accounts.forgot"),
        )
    return User.get_by_id(user.id)


def request_email_change(user, new_email, password):
    """Ask to move the account to `new_email`: a confirmation link goes to the NEW address and
    nothing changes until it is opened. Requires the current password.

    If the new address already belongs to another account, that address is told instead and
    the answer here is the same (no probing for accounts). Raises FormErrors.
    """
    new_email = normalize_email(new_email)
    errors = {}
    problem = email_problem(new_email)
    if problem:
        errors["new_email"] = problem
    elif new_email == user.email:
        errors["new_email"] = _l("That is already your email address.")
    if not passwords.check_password(user.password_hash, password or ""):
        errors["email_password"] = _l("That is not your current password.")
    if errors:
        raise FormErrors(errors)
    with db.atomic():
        User.update(pending_email=new_email).where(User.id == user.id).execute()
        audit.record("account.email_change_requested", user=user)
        if User.select().where((User.email == new_email) & (User.id != user.id)).exists():
            mail.send(
                new_email,
                _l("Someone tried to use your email address"),
                "email_change_taken",
                login_url=absolute_url("accounts.login"),
                forgot_url=absolute_url("accounts.forgot"),
            )
            return
        token = tokens.make(
            "confirm_email_change",
            {"u": user.id, "e": tokens.fingerprint(user.email), "n": tokens.fingerprint(new_email)},
        )
        mail.send(
            new_email,
            _l("Confirm your new email address"),
            "confirm_email_change",
            sensitive=True,
            confirm_url=absolute_url("accounts.confirm_email", token=token),
            hours=EMAIL_CHANGE_HOURS,
        )


def check_email_change_link(token):
    """The account an email-change link is for, if still usable (changes nothing). The new
    address is `user.pending_email`."""
    payload = tokens.read("confirm_email_change", token)
    user = _user_from(payload)
    if not (
        user.pending_email
        and tokens.same(payload.get("e"), tokens.fingerprint(user.email))
        and tokens.same(payload.get("n"), tokens.fingerprint(user.pending_email))
    ):
        raise tokens.TokenInvalid(LINK_USED)
    return user


def confirm_email_change(token, now=None):
    """Move the account to its pending address (proven by this link) and tell the old one.

    Works once: the link is bound to the old address, which no longer matches afterwards.
    An unverified account becomes verified (the link proves the address) and provisioning
    starts. The Particle customer id is opaque, so Particle needs no change.
    """
    user = check_email_change_link(token)
    now = now or utcnow()
    old_email, new_email = user.email, user.pending_email
    fields = {User.email: new_email, User.pending_email: None}
    if not user.is_verified:
        fields.update(_verified_fields(now))
    try:
        with db.atomic():
            changed = (
                User.update(fields)
                .where((User.id == user.id) & (User.email == old_email) & (User.pending_email == new_email))
                .execute()
            )
            if changed:
                audit.record("account.email_changed", user=user)
                mail.send(
                    old_email, _l("Your email address was changed"), "email_changed", new_email=new_email
                )
    except peewee.IntegrityError:
        User.update(pending_email=None).where(User.id == user.id).execute()
        raise tokens.TokenInvalid(
            _l("That address now belongs to another account, so your email address was not changed.")
        ) from None
    if not changed:
        raise tokens.TokenInvalid(LINK_USED)
    if not user.is_verified:
        audit.record("account.email_verified", user=user)
        return provisioning.attempt(user.id, now)
    return User.get_by_id(user.id)


def cancel_email_change(user):
    """Forget a pending email change (its link stops working)."""
    User.update(pending_email=None).where(User.id == user.id).execute()


# --- activity ----------------------------------------------------------------------------------


def activity(user, before=None, page_size=ACTIVITY_PAGE_SIZE):
    """One page of the account's own history, newest first: (events, cursor of the next older
    page or None). `before` is the cursor from the previous page."""
    events = audit.history(user, limit=page_size + 1, before_id=before)
    older = events[page_size - 1].id if len(events) > page_size else None
    return events[:page_size], older
