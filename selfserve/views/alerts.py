"""Alert choices, the test alert, the alerts log, and the one-click unsubscribe from a mail.

Thin: the rules are in services/alerts.py. The unsubscribe link is public (the signed token
is the proof) and its POST is exempt from CSRF: RFC 8058 mail clients post
`List-Unsubscribe=One-Click` to it without any session; a GET only shows a button.
"""

from flask import Blueprint
from flask import flash
from flask import redirect
from flask import render_template
from flask import request
from flask import url_for
from flask_babel import gettext as _
from flask_babel import ngettext
from flask_login import current_user

from selfserve import htmx
from selfserve import tokens
from selfserve.security import csrf
from selfserve.security import public
from selfserve.services import alert_recipients
from selfserve.services import alerts
from selfserve.services import sharing

bp = Blueprint("alerts", __name__)


def _shared_page():
    page = request.args.get("page", "1")
    page = int(page) if page.isdigit() and len(page) < 7 else 1
    return sharing.reachable(current_user, page=page, query=request.args.get("q", ""))


def _page(errors=None, form=None, status=200):
    setting = alerts.settings_of(current_user.id)
    shared = _shared_page()
    shown = [device.device_id for group in shared.groups for device in group.devices]
    return (
        render_template(
            "alerts/settings.html",
            setting=setting,
            kinds=alerts.KINDS,
            modes=alerts.MODES,
            mode_of=alerts.mode_of,
            errors=errors or {},
            form=form,
            log=alerts.log_of(current_user),
            shared=shared,
            opted=alert_recipients.opted_in(current_user, shown),
        ),
        status,
    )


@bp.route("/account/alerts", methods=["GET", "POST"])
def settings():
    if request.method == "GET":
        return _page()
    form = request.form
    try:
        alerts.save_settings(
            current_user,
            {kind: form[f"mode_{kind}"] for kind in alerts.KINDS if f"mode_{kind}" in form},
            time_zone=form.get("time_zone")
            or None,  # the account settings page sets it; kept for older forms
            quiet_from=form.get("quiet_from") or None,
            quiet_until=form.get("quiet_until") or None,
            faults_in_quiet=form.get("faults_in_quiet") == "yes",
            digest_hour=form.get("digest_hour") or None,
        )
    except alerts.AlertError as exc:
        return _page(errors={exc.field: exc.message}, form=form, status=400)
    flash(_("Your alert choices are saved."), "success")
    return htmx.redirect(url_for("alerts.settings"))


@bp.post("/account/alerts/shared")
def shared_devices():
    """Opt in to (or out of) the alerts of devices shared with me: the ones the form showed."""
    form = request.form
    chosen = alert_recipients.set_opt_ins(
        current_user, form.getlist("shown")[:500], form.getlist("device")[:500]
    )
    flash(
        ngettext(
            "You get the alerts of %(num)d of these shared devices.",
            "You get the alerts of %(num)d of these shared devices.",
            len(chosen),
        )
        if chosen
        else _("You get no alerts of these shared devices."),
        "success",
    )
    page = form.get("page", "1")
    page = page if page.isdigit() and len(page) < 7 else "1"
    return htmx.redirect(url_for("alerts.settings", page=page) + "#shared-alerts")


@bp.post("/account/alerts/test")
def send_test():
    alerts.send_test(current_user)
    flash(_("A test alert is on its way to %(email)s.", email=current_user.email), "success")
    return htmx.redirect(url_for("alerts.settings"))


@bp.get("/account/alerts/log")
def log():
    """The alerts log as a fragment (the activity page loads it); the settings page otherwise."""
    if not htmx.is_htmx():
        return redirect(url_for("alerts.settings") + "#alerts-log")
    return render_template("alerts/_log.html", log=alerts.log_of(current_user))


@bp.route("/alerts/unsubscribe/<token>", methods=["GET", "POST"])
@public
@csrf.exempt
def unsubscribe(token):
    try:
        user, kinds = alerts.read_unsubscribe(token)
    except tokens.TokenError as exc:
        # Not found, like any URL that names nothing: a forged or cut-off link.
        return render_template("alerts/unsubscribe.html", error=exc.message), 404
    labels = [alerts.KINDS[kind].label for kind in kinds]
    if request.method == "GET":
        return render_template("alerts/unsubscribe.html", token=token, labels=labels)
    alerts.turn_off(user.id, kinds)
    return render_template("alerts/unsubscribe.html", done=True, labels=labels)
