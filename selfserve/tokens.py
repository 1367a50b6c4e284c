"""Signed, expiring tokens for links sent by email: one salt and one max age per purpose.

A token signed for one purpose never verifies for another (itsdangerous "The Salt"). Payloads
bind what must still be true when the link is used (a fingerprint of the current email, of the
current password hash, ...), so a link dies as soon as that changes: that is how links work
once. Tokens are only ever put in emails and the URLs they link to, never in logs (see
`RedactTokenPaths`).
"""

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass

from flask import current_app
from itsdangerous import BadData
from itsdangerous import SignatureExpired
from itsdangerous import TimestampSigner
from itsdangerous import URLSafeTimedSerializer

from selfserve.i18n import lazy_text as _l


@dataclass(frozen=True)
class Purpose:
    salt: str
    max_age: int  # seconds


# Other areas add their purposes here (one line each); a salt is never reused.
PURPOSES = {
    "verify_email": Purpose(salt="selfserve.verify-email.v1", max_age=48 * 3600),
    "reset_password": Purpose(salt="selfserve.reset-password.v1", max_age=3600),
    "confirm_email_change": Purpose(salt="selfserve.confirm-email-change.v1", max_age=24 * 3600),
    # A throttled owner's way in (services/accounts.py send_sign_in_link): short, used once.
    "sign_in_link": Purpose(salt="selfserve.sign-in-link.v1", max_age=15 * 60),
    # Transfers (services/transfers/): the buyer's offer link, the owner's approve/object links.
    "transfer_offer": Purpose(salt="selfserve.transfer-offer.v1", max_age=7 * 24 * 3600),
    "transfer_answer": Purpose(salt="selfserve.transfer-answer.v1", max_age=8 * 24 * 3600),
    # Sharing (services/sharing.py): an invitation to a role on a device.
    "share_invite": Purpose(salt="selfserve.share-invite.v1", max_age=7 * 24 * 3600),
    # A claim's dealer step: this person proved this device's label (never leaves the site).
    "claim_dealer": Purpose(salt="selfserve.claim-dealer.v1", max_age=15 * 60),
    # Alerts (services/alerts.py): one-click unsubscribe from a kind of alert, from any alert mail.
    "alert_unsubscribe": Purpose(salt="selfserve.alert-unsubscribe.v1", max_age=400 * 24 * 3600),
}


class TokenError(Exception):
    """The link can't be used. `message` is safe to show."""

    message = _l("This link is not valid. Please check that you copied all of it, or ask for a new one.")

    def __init__(self, message=None):
        super().__init__(message or self.message)
        if message:
            self.message = message


class TokenExpired(TokenError):
    message = _l("This link has expired. Please ask for a new one.")


class TokenInvalid(TokenError):
    pass


def _serializer(purpose, issued_at=None):
    spec = PURPOSES[purpose]
    signer_kwargs = {}
    signer = TimestampSigner
    if issued_at is not None:
        signer = _FixedTimeSigner
        signer_kwargs = {"issued_at": int(issued_at)}
    return URLSafeTimedSerializer(
        current_app.config["SECRET_KEY"], salt=spec.salt, signer=signer, signer_kwargs=signer_kwargs
    )


class _FixedTimeSigner(TimestampSigner):
    """Signs with a given issue time (tests make expired links with it)."""

    def __init__(self, *args, issued_at, **kwargs):
        super().__init__(*args, **kwargs)
        self._issued_at = issued_at

    def get_timestamp(self):
        return self._issued_at


def make(purpose, payload, issued_at=None):
    """A URL-safe signed token carrying `payload` (a small JSON-able dict) for `purpose`.

    `issued_at` (unix seconds) is for tests that need an old link; real links use now.
    """
    return _serializer(purpose, issued_at).dumps(payload)


def read(purpose, token):
    """The payload of a token made for `purpose`. Raises TokenExpired or TokenInvalid."""
    spec = PURPOSES[purpose]
    if not isinstance(token, str) or not token or len(token) > 1000:
        raise TokenInvalid()
    try:
        payload = _serializer(purpose).loads(token, max_age=spec.max_age)
    except SignatureExpired as exc:
        raise TokenExpired() from exc
    except BadData as exc:
        raise TokenInvalid() from exc
    if not isinstance(payload, dict):
        raise TokenInvalid()
    return payload


def fingerprint(value):
    """A short keyed hash of `value` to bind into a payload (the payload itself is readable)."""
    key = current_app.config["SECRET_KEY"].encode()
    return hmac.new(key, b"fingerprint:" + value.encode(), hashlib.sha256).hexdigest()[:24]


def same(a, b):
    """Constant-time comparison of two fingerprints (either may be missing)."""
    return isinstance(a, str) and isinstance(b, str) and hmac.compare_digest(a, b)


# URL paths that carry a token. Access logs (werkzeug, gunicorn) print request lines; these
# paths are cut down to their prefix so links never land in a log file.
_SLASH = r"(?:/|%(?:25)*2[Ff])"  # also percent-encoded (a link inside another URL's `next`)
_TOKEN_PATH = re.compile(
    rf"({_SLASH}(?:verify|reset|confirm-email|login{_SLASH}link|transfers{_SLASH}offer|transfers{_SLASH}answer|share"
    rf"|alerts{_SLASH}unsubscribe){_SLASH})[A-Za-z0-9_.\-]+"
)


# Query parameters that may carry a secret: a label's setup code in a hand-made claim link.
# Also percent-encoded, once or more, as when the link sits in another URL's `next`
# ("/login?next=%2Fclaim%3Fcode%3DR2DX7GHU"): "?", "&" and "=" then read %3F, %26 and %3D
# (%253F... when encoded twice), and an encoded space or dash may sit inside the value.
_ENCODED = r"%(?:25)*"
_SECRET_QUERY = re.compile(
    rf"((?:[?&]|{_ENCODED}3[Ff]|{_ENCODED}26)(?:code|setup_code)(?:=|{_ENCODED}3[Dd]))"
    rf"(?:[A-Za-z0-9_.~+\-]|{_ENCODED}(?:2[0BbDd]))+"
)


class RedactTokenPaths(logging.Filter):
    """A logging filter that replaces tokens in request paths (and setup codes in query
    strings) with '<redacted>'."""

    def filter(self, record):
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to fix
            return True
        if _TOKEN_PATH.search(message) or _SECRET_QUERY.search(message):
            message = _TOKEN_PATH.sub(r"\1<redacted>", message)
            record.msg = _SECRET_QUERY.sub(r"\1<redacted>", message)
            record.args = None
        return True


def install_log_redaction():
    """Attach the redaction filter to the access loggers (idempotent)."""
    for name in ("werkzeug", "gunicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokenPaths) for f in logger.filters):
            logger.addFilter(RedactTokenPaths())
