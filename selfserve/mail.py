"""Outgoing mail. Messages are rendered from templates/emails/<name>.txt.

Every email goes through the outbox (services/outbox.py): `send` renders the message and
queues it in the current database transaction; the outbox's sender `deliver`s it over SMTP
later, with retries. No request waits for, or fails because of, the mail server.
"""

import email.policy
import logging
import smtplib
import socket
import ssl
from email.message import EmailMessage
from email.utils import make_msgid

from flask import current_app
from flask import render_template
from flask_babel import gettext

from selfserve import i18n

log = logging.getLogger(__name__)


class MailError(RuntimeError):
    """The SMTP server could not be reached or refused the message. `permanent` is True when
    retrying can't help (a 5xx about this message: recipient refused, message rejected)."""

    def __init__(self, message, permanent=False):
        super().__init__(message)
        self.permanent = permanent


def init_app(app):
    app.extensions["mail"] = True


def render(to, subject, template, **context):
    """(subject, body) of templates/emails/<template>.txt for `to`, in the recipient's language
    and time zone (a lazy `subject` is translated here too)."""
    with i18n.as_recipient(*i18n.recipient_preferences(to)):
        # A plain subject may be a lazy one that was stored (steps keep their mail in the
        # database, in English): look it up in the catalogue too.
        subject = gettext(subject) if isinstance(subject, str) else str(subject)
        return subject, render_template(f"emails/{template}.txt", **context)


def send(to, subject, template, headers=None, sensitive=False, dedupe_key=None, **context):
    """Queue the email templates/emails/<template>.txt to `to` (with extra `headers`, e.g.
    List-Unsubscribe) in the outbox, in the caller's transaction. `sensitive`: the body holds a
    link that signs in or resets (never shown to staff). `dedupe_key`: queue it only once (a
    step that may run twice). Returns the outbox row (or None when the key was queued)."""
    from selfserve.services import outbox

    subject, body = render(to, subject, template, **context)
    return outbox.enqueue(
        to,
        subject,
        body,
        kind=template,
        headers=headers,
        sensitive=sensitive,
        dedupe_key=dedupe_key,
    )


def _permanent(exc):
    """Whether an SMTP failure is about this message for good (5xx for the recipient or the
    data). Refusals of our sender or our login are 5xx too, but they are our configuration,
    not the message: those are retried, so fixing the settings sends the queue."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        return bool(codes) and all(500 <= code < 600 for code in codes)
    if isinstance(exc, (smtplib.SMTPSenderRefused, smtplib.SMTPAuthenticationError)):
        return False
    if isinstance(exc, smtplib.SMTPResponseException):
        return 500 <= exc.smtp_code < 600
    return False


def describe(exc):
    """A short, address-free account of a failure, for the outbox's last_error."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        code, text = next(iter(exc.recipients.values()), (0, b""))
        return f"recipient refused: {code} {_text(text)}"
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"{type(exc).__name__}: {exc.smtp_code} {_text(exc.smtp_error)}"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _text(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value)[:300]


def deliver(to, subject, body, headers=None):
    """Send one rendered message over SMTP now. Raises MailError (`permanent` says whether
    trying again can help)."""
    config = current_app.config
    # A header such as List-Unsubscribe holds one long URL with no place to fold it: allow
    # lines up to RFC 5322's 998 characters so it stays a plain <URL> instead of being
    # RFC 2047-encoded (which one-click unsubscribe clients don't read).
    message = (
        EmailMessage(policy=email.policy.default.clone(max_line_length=998)) if headers else EmailMessage()
    )
    message["From"] = config["MAIL_SENDER"]
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="selfserve")
    for name, value in (headers or {}).items():
        message[name] = value
    message.set_content(body)
    try:
        if config["MAIL_USE_SSL"]:
            smtp = smtplib.SMTP_SSL(
                config["MAIL_SERVER"],
                config["MAIL_PORT"],
                timeout=config["MAIL_TIMEOUT"],
                context=ssl.create_default_context(),
            )
        else:
            smtp = smtplib.SMTP(config["MAIL_SERVER"], config["MAIL_PORT"], timeout=config["MAIL_TIMEOUT"])
        with smtp:
            if config["MAIL_USE_TLS"] and not config["MAIL_USE_SSL"]:
                smtp.starttls(context=ssl.create_default_context())
            if config["MAIL_USERNAME"]:
                smtp.login(config["MAIL_USERNAME"], config["MAIL_PASSWORD"])
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        raise MailError(describe(exc), permanent=_permanent(exc)) from exc
