"""Staff accounts and their second factor (TOTP).

Staff (role "staff" or "admin") are created only by the operator's `create-staff` command;
no route of the site changes a role. They sign in on the same /login with a password and
then a TOTP code from an authenticator app: on the first sign-in the secret is shown once as
a QR code (and as text for manual entry) and enrolled by confirming one code. Staff routes
need a login session that passed the second factor (`LoginSession.mfa_verified_at`).

The secret is stored encrypted (crypto.fernet_for). A code works once: the accepted time
step is saved with an atomic UPDATE, so a replayed or concurrently reused code is refused.
"""

import base64
import datetime
import functools
import io
import secrets

import click
import peewee
import pyotp
import qrcode
import qrcode.image.svg
from flask import current_app
from flask.cli import with_appcontext

from selfserve import crypto
from selfserve import passwords
from selfserve.i18n import lazy_text as _l
from selfserve.models import LoginSession
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.refusals import Refusal
from selfserve.services import audit
from selfserve.services.accounts import FormErrors
from selfserve.services.accounts import checked_credentials
from selfserve.services.accounts import normalize_email

ROLES = ("staff", "admin")
ISSUER = "selfserve support"
# Codes from the previous and next 30 s step are accepted too (clock drift on phones).
VALID_WINDOW = 1
CODE_LENGTH = 6


class StaffError(Refusal):
    """An operator or staff mistake with a message to show."""


# --- accounts -----------------------------------------------------------------------------


def create_staff(email, password, role="staff"):
    """Create a staff account (verified, no device-cloud customer). Refuses an address that
    already has an account: a customer never becomes staff, and an existing staff member is
    changed with other commands. Raises StaffError / FormErrors."""
    if role not in ROLES:
        raise StaffError(_l("The role must be one of: %(join)s.", join=", ".join(ROLES)))
    email = checked_credentials(email, password)
    if User.select().where(User.email == email).exists():
        raise StaffError(
            _l(
                "That address already has an account. Staff accounts must be new accounts: "
                "a customer account is never turned into a staff account."
            )
        )
    try:
        with db.atomic():
            user = User.create(
                email=email,
                password_hash=passwords.hash_password(password),
                role=role,
                email_verified_at=utcnow(),
            )
    except peewee.IntegrityError:
        raise StaffError(_l("That address already has an account.")) from None
    audit.record("staff.created", user=user, actor=None, role=role)
    return user


def enrol_with_secret(user, secret):
    """Enrol `user` with a known secret, without the QR step. Only for the demo, whose staff
    account needs a second factor a newcomer can read off the demo mailbox page."""
    User.update(totp_secret_encrypted=crypto.encrypt(_fernet(), secret), totp_enrolled_at=utcnow()).where(
        User.id == user.id
    ).execute()


def reset_second_factor(email):
    """Forget a staff member's authenticator (a lost phone): the next sign-in enrols anew and
    every session of theirs ends. Raises StaffError for an unknown or non-staff address."""
    user = User.get_or_none(User.email == normalize_email(email))
    if user is None or not user.is_staff:
        raise StaffError(_l("No staff account has that address."))
    User.update(totp_secret_encrypted=None, totp_enrolled_at=None, totp_last_step=None).where(
        User.id == user.id
    ).execute()
    LoginSession.update(ended_at=utcnow()).where(
        (LoginSession.user == user) & LoginSession.ended_at.is_null()
    ).execute()
    audit.record("staff.second_factor_reset", user=user, actor=None)
    return User.get_by_id(user.id)


# --- TOTP -----------------------------------------------------------------------------------


def _fernet():
    return crypto.fernet_for(current_app.config)


def _secret(user):
    if not user.totp_secret_encrypted:
        return None
    return crypto.decrypt(_fernet(), user.totp_secret_encrypted)


def is_enrolled(user):
    return user.totp_enrolled_at is not None and bool(user.totp_secret_encrypted)


def enrolment_secret(user, sealed=None):
    """The secret to enrol, and the same sealed (encrypted) for the session: `sealed` from an
    earlier call keeps it stable across reloads (the QR code already scanned stays valid).
    Nothing is stored until a code confirms it (GET pages change nothing)."""
    if not user.is_staff:
        raise StaffError(_l("Only staff have a second factor."))
    if is_enrolled(user):
        raise StaffError(_l("The authenticator is already set up."))
    secret = crypto.decrypt(_fernet(), sealed) if sealed else None
    if not secret:
        secret = pyotp.random_base32()
        sealed = crypto.encrypt(_fernet(), secret)
    return secret, sealed


def provisioning_uri(user, secret):
    return pyotp.TOTP(secret).provisioning_uri(name=user.email, issuer_name=ISSUER)


def qr_data_uri(text):
    """`text` as a QR code in an SVG data: URI (an <img>; the CSP allows data: images)."""
    image = qrcode.make(text, image_factory=qrcode.image.svg.SvgPathImage, box_size=8, border=2)
    buffer = io.BytesIO()
    image.save(buffer)
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode()


def _normalize_code(code):
    return "".join((code or "").split())


def _matching_step(secret, code, now):
    """The time step `code` belongs to (this, the previous or the next one), or None."""
    code = _normalize_code(code)
    if len(code) != CODE_LENGTH or not code.isdigit() or not secret:
        return None
    totp = pyotp.TOTP(secret)
    moment = now.replace(tzinfo=datetime.UTC)
    for offset in range(-VALID_WINDOW, VALID_WINDOW + 1):
        at = moment + datetime.timedelta(seconds=offset * totp.interval)
        if secrets.compare_digest(totp.at(at), code):
            return totp.timecode(at)
    return None


def _accept_code(user, secret, code, now=None):
    """The time step `code` belongs to if it is valid and not used before (then marked
    used), else None."""
    step = _matching_step(secret, code, now or utcnow())
    if step is None:
        return None
    used = (
        User.update(totp_last_step=step)
        .where((User.id == user.id) & (User.totp_last_step.is_null() | (User.totp_last_step < step)))
        .execute()
    )
    return step if used else None


def confirm_enrolment(user, sealed, code, login_session, now=None):
    """Enrol the secret shown to the staff member (`sealed`, from enrolment_secret) with a
    first code; the session counts as verified. Raises FormErrors (wrong code), StaffError
    (already enrolled, e.g. in another tab)."""
    secret, _ = enrolment_secret(user, sealed)
    now = now or utcnow()
    step = _matching_step(secret, code, now)
    if step is None:
        audit.record("staff.second_factor_failed", user=user)
        raise FormErrors({"code": _l("That code is not right. Enter the 6 digits your app shows now.")})
    enrolled = (
        User.update(
            totp_secret_encrypted=crypto.encrypt(_fernet(), secret), totp_enrolled_at=now, totp_last_step=step
        )
        .where((User.id == user.id) & User.totp_enrolled_at.is_null())
        .execute()
    )
    if not enrolled:
        raise StaffError(
            _l("The authenticator was just set up in another window. Sign in again with its code.")
        )
    _mark_verified(login_session, now)
    audit.record("staff.second_factor_enrolled", user=user)


def verify_code(user, code, login_session, now=None):
    """Check a sign-in code and mark the session verified. Raises FormErrors."""
    if not is_enrolled(user):
        raise StaffError(_l("The authenticator is not set up yet."))
    if _accept_code(user, _secret(user), code, now) is None:
        audit.record("staff.second_factor_failed", user=user)
        raise FormErrors(
            {
                "code": _l(
                    "That code is not right (or was already used). Enter the 6 digits your app shows now."
                )
            }
        )
    _mark_verified(login_session, now or utcnow())
    audit.record("staff.second_factor_passed", user=user)


def _mark_verified(login_session, now):
    LoginSession.update(mfa_verified_at=now).where(LoginSession.id == login_session.id).execute()
    login_session.mfa_verified_at = now


# --- the guard of every staff route -----------------------------------------------------------


def real_user():
    """The person signed in: the staff member even while they view as a customer."""
    from flask_login import current_user

    if not current_user.is_authenticated:
        return None
    return getattr(current_user, "viewed_by", None) or current_user._get_current_object()


def staff_required(view):
    """Staff only, with the second factor passed: customers get 403 (deny-by-default already
    sent anonymous people to sign in; security.py sends staff to the second factor)."""
    from flask import abort

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        user = real_user()
        if user is None or not user.is_staff or user.login_session.mfa_verified_at is None:
            abort(403)
        return view(*args, **kwargs)

    return wrapper


# --- operator commands -------------------------------------------------------------------------


@click.command("create-staff")
@click.argument("email")
@click.option("--role", type=click.Choice(ROLES), default="staff", show_default=True)
@click.password_option(help="Prompted (hidden, twice) when not given.")
@with_appcontext
def create_staff_command(email, role, password):
    """Create a support staff account. They set up an authenticator app on first sign-in."""
    db.connect(reuse_if_open=True)
    try:
        user = create_staff(email, password, role)
    except FormErrors as exc:
        raise click.ClickException("; ".join(exc.errors.values())) from None
    except StaffError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"Created {user.role} account {user.email}. On first sign-in they set up an authenticator app."
    )


@click.command("reset-staff-second-factor")
@click.argument("email")
@with_appcontext
def reset_second_factor_command(email):
    """Forget a staff member's authenticator app (lost phone) and sign them out everywhere."""
    db.connect(reuse_if_open=True)
    try:
        user = reset_second_factor(email)
    except StaffError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{user.email} sets up a new authenticator app on the next sign-in.")
