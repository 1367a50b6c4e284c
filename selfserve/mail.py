"""Outgoing mail over SMTP. Messages are rendered from templates/emails/<name>.txt."""

import email.policy
import logging
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import make_msgid

from flask import current_app
from flask import render_template
from flask_babel import gettext

from selfserve import i18n
from selfserve.i18n import lazy_text as _l

log = logging.getLogger(__name__)


class MailError(RuntimeError):
    """The SMTP server could not be reached or refused the message."""


def init_app(app):
    app.extensions["mail"] = True


def send(to, subject, template, headers=None, **context):
    """Render templates/emails/<template>.txt and send it to `to`, with extra `headers`
    (e.g. List-Unsubscribe). Raises MailError."""
    config = current_app.config
    # A header such as List-Unsubscribe holds one long URL with no place to fold it: allow
    # lines up to RFC 5322's 998 characters so it stays a plain <URL> instead of being
    # RFC 2047-encoded (which one-click unsubscribe clients don't read).
    message = (
        EmailMessage(policy=email.policy.default.clone(max_line_length=998)) if headers else EmailMessage()
    )
    # In the recipient's language and time zone (a lazy `subject` is translated here too).
    with i18n.as_recipient(*i18n.recipient_preferences(to)):
        # A plain subject may be a lazy one that was stored (steps keep their mail in the
        # database, in English): look it up in the catalogue too.
        subject = gettext(subject) if isinstance(subject, str) else str(subject)
        body = render_template(f"emails/{template}.txt", **context)
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
        log.warning("Could not send %r mail: %s", template, type(exc).__name__)
        raise MailError(_l("We could not send the email right now. Please try again shortly.")) from exc
