"""Blueprints (thin: parse input, call one service function, render or redirect) and errors."""

import logging

from flask_babel import gettext as _
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from selfserve import htmx
from selfserve.i18n import lazy_text as _l
from selfserve.particle.errors import ParticleError
from selfserve.refusals import Refusal

log = logging.getLogger(__name__)

ERROR_MESSAGES = {
    400: _l("That request could not be understood."),
    403: _l("You don't have access to that."),
    404: _l("We couldn't find that page."),
    405: _l("That action isn't available here."),
    410: _l("That is no longer available."),
    413: _l("That is too large to send."),
    415: _l("That kind of content isn't accepted here."),
    429: _l("Too many attempts. Please wait a little and try again."),
}

# Headings of the error page where werkzeug's names ("Not Found") read like a machine talking.
ERROR_TITLES = {
    400: _l("Not understood"),
    403: _l("No access"),
    404: _l("Page not found"),
    405: _l("Not available here"),
    410: _l("No longer available"),
    413: _l("Too large"),
    415: _l("Not accepted"),
    429: _l("Too many attempts"),
}


def support_contact(config):
    """Template values for reaching support: `support_email`, `support_phone` ("" when unset)
    and `support_phone_link` (a tel: URI of the phone number's digits, "" when unset)."""
    phone = str(config.get("SUPPORT_PHONE") or "").strip()
    dialable = "".join(ch for ch in phone if ch.isdigit() or ch == "+")
    return {
        "support_email": str(config.get("SUPPORT_EMAIL") or "").strip(),
        "support_phone": phone,
        "support_phone_link": f"tel:{dialable}" if dialable else "",
    }


def register(app):
    from selfserve.views import account_data
    from selfserve.views import accounts
    from selfserve.views import alerts
    from selfserve.views import devices
    from selfserve.views import hooks
    from selfserve.views import main
    from selfserve.views import organisations
    from selfserve.views import sharing
    from selfserve.views import support
    from selfserve.views import transfers

    for module in (
        main,
        accounts,
        account_data,
        devices,
        transfers,
        sharing,
        organisations,
        alerts,
        support,
        hooks,
    ):
        app.register_blueprint(module.bp)
    if app.config.get("DEMO"):
        from selfserve.views import demo

        app.register_blueprint(demo.bp)

    @app.context_processor
    def _support_contact():
        # Pages and emails (mail.send renders through the same templates) say how to reach support.
        return support_contact(app.config)

    @app.errorhandler(CSRFError)
    def _csrf_error(exc):
        return htmx.error_response(
            _("This form has expired. Please reload the page and try again."), 400, _("Form expired")
        )

    @app.errorhandler(Refusal)
    def _refused(exc):
        # What a view didn't catch to show next to a form: the message, with its status.
        return htmx.error_response(
            exc.message, exc.status, ERROR_TITLES.get(exc.status, _("That didn't work"))
        )

    @app.errorhandler(ParticleError)
    def _particle_error(exc):
        # A safety net: services normally turn these into specific messages themselves.
        log.warning("Particle error reached a view: %s", exc)
        return htmx.error_response(exc.user_message, 503, _("Device cloud unavailable"))

    @app.errorhandler(HTTPException)
    def _http_error(exc):
        if exc.code == 429 and getattr(exc, "response", None) is not None:
            # A rate limit with its own page (on_breach), e.g. sign-in keeps its form.
            return exc.response
        message = ERROR_MESSAGES.get(exc.code, exc.description)
        return htmx.error_response(message, exc.code, ERROR_TITLES.get(exc.code, _("Error")))

    @app.errorhandler(Exception)
    def _unexpected(exc):
        log.exception("Unhandled error")
        return htmx.error_response(
            _("Something went wrong on our side. Nothing was lost; please try again."), 500, _("Error")
        )
