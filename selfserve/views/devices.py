"""Device pages: dashboard, claim, device page with live values and functions, rename, release.

Every route that names a device goes through `devices.device_for` (the one access check)
before anything else, naming the least role it needs (viewer: page and values; operator:
functions; manager: rename; owner: release), so a device the user may not use that way is a
404 without any Particle call.
Fragments (summary, values, function result) answer htmx requests; a plain request for one
is sent to the device page instead.
"""

import datetime
from urllib.parse import urlencode

from flask import Blueprint
from flask import abort
from flask import current_app
from flask import flash
from flask import make_response
from flask import redirect as flask_redirect
from flask import render_template
from flask import request
from flask import url_for
from flask_babel import format_timedelta
from flask_babel import gettext as _
from flask_login import current_user
from markupsafe import Markup
from markupsafe import escape
from werkzeug.exceptions import NotFound

from selfserve import charts
from selfserve import device_models
from selfserve import htmx
from selfserve import i18n
from selfserve import sse
from selfserve import tokens
from selfserve.models import utcnow
from selfserve.security import limiter
from selfserve.security import public
from selfserve.security import verified_required
from selfserve.services import access
from selfserve.services import devices
from selfserve.services import history
from selfserve.services import live_values
from selfserve.services import sharing

bp = Blueprint("devices", __name__)

NAME_ECHO_MAX = 200  # a rejected name is shown back for correction, but never a huge one


@bp.app_template_filter("device_age")
def device_age(moment, now=None):
    """How long ago, in the reader's language: "just now", "12 seconds ago", "vor 5 Minuten"."""
    if moment is None:
        return _("never")
    seconds = int(((now or utcnow()) - moment).total_seconds())
    if seconds < 2:
        return _("just now")
    return format_timedelta(datetime.timedelta(seconds=-seconds), add_direction=True, threshold=1.5)


@bp.app_template_filter("device_since")
def device_since(moment, now=None):
    """A moment for "Offline since …" in the reader's zone: the time today, else date and time."""
    if moment is None:
        return _("never")
    return i18n.local_moment(moment, now)


@bp.app_template_filter("device_iso")
def device_iso(moment):
    if moment is None:
        return ""
    return moment.replace(microsecond=0).isoformat() + "Z"


@bp.app_template_filter("device_title")
def device_title(device):
    """The device's name for headings, its serial kept in one piece (no break after a dash)."""
    if device.name:
        return escape(device.name)
    return Markup('{} <span class="serial">{}</span>').format(
        device_models.label(device.model), device.serial_number
    )


@bp.app_template_filter("serial")
def serial(device):
    """The serial number in a span that never breaks across lines."""
    return Markup('<span class="serial">{}</span>').format(device.serial_number)


def _page_context(device, **extra):
    return {
        "device": device,
        "role": device.role,
        "can": lambda need: access.at_least(device.role, need),
        "role_labels": access.ROLE_LABELS,
        "model": device_models.get(device.model),
        "name": devices.display_name(device),
        "poll_seconds": _poll_seconds(),
        "push": _push_enabled(),
        "fast_poll_seconds": int(current_app.config.get("VALUES_POLL_SECONDS", 5)),
        **extra,
    }


def _poll_seconds():
    """How often pages poll our cache: rarely while changes are pushed to them (the fallback
    for a push connection that can't be held is in static/js/devices.js)."""
    if current_app.config.get("PUSH_ENABLED", True):
        return int(current_app.config.get("PUSH_FALLBACK_POLL_SECONDS", 60))
    return int(current_app.config.get("VALUES_POLL_SECONDS", 5))


def _push_enabled():
    return bool(current_app.config.get("PUSH_ENABLED", True))


# --- dashboard and claim -------------------------------------------------------------------


@bp.get("/devices")
def dashboard():
    overview = devices.overview(current_user)
    return render_template(
        "devices/dashboard.html",
        overview=overview,
        names=devices.display_name,
        models=device_models,
        # Pushed cards don't poll (static/js/devices.js polls them only if the push fails).
        summary_poll_seconds=0 if _push_enabled() else _poll_seconds() * 3,
        push=_push_enabled(),
        fast_poll_seconds=int(current_app.config.get("VALUES_POLL_SECONDS", 5)),
    )


@bp.get("/devices/live")
def dashboard_live():
    """Server-sent events: each card's summary, pushed when its device changes."""
    if not _push_enabled():
        abort(404)
    device_ids = [device.device_id for device in devices.devices_of(current_user)]

    def render(user, changed, check):
        found = []
        for device_id in sorted(changed):
            try:
                device = devices.device_for(user, device_id, need="viewer")
            except NotFound:
                # Left the account (released, transferred): the card says so and stops changing.
                found.append((f"summary-{device_id}", render_template("devices/_access_ended.html")))
                continue
            snapshot = _pushed_snapshot(device, check)
            html = render_template(
                "devices/_summary.html",
                snapshot=snapshot,
                model=device_models.get(device.model),
                device=device,
            )
            found.append((f"summary-{device.device_id}", html))
        return found

    return sse.stream(device_ids, render)


def _pushed_snapshot(device, check):
    """A pushed change comes from the cache; a periodic check may read Particle (only for
    values older than the device's heartbeat plus a grace, or firmware that doesn't publish)."""
    if check:
        live_values.watch(device.device_id, 2 * float(current_app.config.get("VALUES_POLL_SECONDS", 5)) + 60)
        return live_values.current(device)
    return live_values.last_known(device)


def _claim_limit(setting):
    return lambda: current_app.config[setting]


def _claim_account_key():
    # Limits are checked before the sign-in is: an anonymous request is keyed by its address.
    return f"claim-account:{getattr(current_user, 'id', None) or request.remote_addr}"


def _claim_serial_key():
    return "claim-serial:" + devices.normalize_serial(request.form.get("serial"))


# Every claim costs an Argon2 check and, for an owned device, a proof row: limited per account
# and per serial, right code or wrong, before any of that work (Flask-Limiter's store: shared
# by every worker with RATELIMIT_STORAGE_URI=redis://...). Wrong codes have their own, tighter
# count in the database (services/devices.py).
@bp.route("/devices/claim", methods=["GET", "POST"])
@limiter.limit(_claim_limit("RATE_LIMIT_CLAIM"), methods=["POST"], key_func=_claim_account_key)
@limiter.limit(_claim_limit("RATE_LIMIT_CLAIM_SERIAL"), methods=["POST"], key_func=_claim_serial_key)
@verified_required
def claim():
    if request.method == "GET":
        return _claim_page()
    if "claim_token" in request.form:
        return _claim_with_dealer_choice()
    serial = request.form.get("serial", "")
    try:
        device = devices.claim(current_user, serial, request.form.get("setup_code", ""))
    except devices.DeviceError as exc:
        if exc.kind == "dealer_choice":
            return _dealer_choice_page(exc.device)
        if (finished := _claim_goes_on_elsewhere(exc)) is not None:
            return finished
        proof = None
        if exc.kind == "owned_by_other" and exc.device is not None:
            # The code was right: offer to ask the owner, by an opaque server-side record.
            from selfserve.services import transfers

            proof = transfers.remember_possession(current_user, exc.device)
            # Point to the "ask the owner" card below instead of contradicting it.
            exc.message = devices.MESSAGES["owned_by_other_can_ask"]
        # The serial is echoed back for correction; the setup code never is.
        return _claim_page(error=exc, serial=serial, status=exc.status, transfer_proof=proof)
    flash(_("%(name)s was added to your account.", name=devices.display_name(device)), "success")
    return htmx.redirect(url_for("devices.detail", device_id=device.device_id))


def _claim_goes_on_elsewhere(exc):
    """The page for a claim this form has no more to do with, or None: the cloud's answer was
    lost (the claim stays recorded and the sweep finishes it), or the device is already
    theirs."""
    if exc.kind == "checking":
        flash(exc.message, "info")
        return htmx.redirect(url_for("devices.dashboard"))
    if exc.kind == "already_yours":
        flash(exc.message, "info")
        return htmx.redirect(url_for("devices.detail", device_id=exc.device.device_id))
    return None


def _dealer_choice_page(device, error=None, status=200):
    """The claim's second step: the dealer the device was sold through asks for access; the
    homeowner chooses (no access preselected). The setup code is not sent back: a signed token
    says this person proved this device's label."""
    context = {
        "device": device,
        "ask": sharing.dealer_at_claim(device),
        "claim_token": sharing.claim_token(current_user, device),
        "role_labels": access.ROLE_LABELS,
        "error": error,
    }
    if htmx.is_htmx():
        return render_template("devices/_claim_dealer.html", **context)
    return render_template("devices/claim.html", dealer_step=True, **context), status


def _claim_with_dealer_choice():
    token = request.form.get("claim_token", "")[:500]
    try:
        device, grant = sharing.claim_with_dealer_choice(
            current_user, token, request.form.get("dealer_access", "none")
        )
    except tokens.TokenError:
        error = devices.DeviceError(_("This step took too long. Enter the label again."), kind="expired")
        return _claim_page(error=error, status=400)
    except sharing.SharingError as exc:
        return _dealer_choice_page(
            sharing.device_of_claim_token(current_user, token), error=exc, status=exc.status
        )
    except devices.DeviceError as exc:
        # Checking: the dealer choice is kept (a grant waiting for the claim, or none chosen).
        return _claim_goes_on_elsewhere(exc) or _claim_page(error=exc, status=exc.status)
    message = _("%(name)s was added to your account.", name=devices.display_name(device))
    if grant is not None:
        message += _(
            " %(name)s has %(role)s access; you can revoke it in Sharing at any time.",
            name=grant.grantee_org.name,
            role=i18n.role_name(grant.role),
        )
    flash(message, "success")
    return htmx.redirect(url_for("devices.detail", device_id=device.device_id))


@bp.get("/claim")
@public  # checks the sign-in itself, after taking the setup code out of the query
def claim_from_label():
    """Where the label's QR code points. The serial and code are in the URL fragment, which
    never reaches us; static/js/devices.js copies them into the form.

    A link with them in the query string (a label printed that way, a link typed by hand) is
    sent to the fragment form at once, before the sign-in redirect would copy the code into
    its `next` and on into pages, later requests and access logs."""
    if "code" in request.args or "serial" in request.args:
        fragment = urlencode({name: request.args.get(name, "")[:64] for name in ("serial", "code")})
        return flask_redirect(url_for("devices.claim_from_label") + "#" + fragment)
    if not current_user.is_authenticated:
        return current_app.login_manager.unauthorized()
    return _label_claim_page()


@verified_required
def _label_claim_page():
    return _claim_page(from_label=True)


def _claim_page(error=None, serial="", status=200, from_label=False, transfer_proof=None):
    context = {
        "error": error,
        "transfer_proof": transfer_proof,
        "serial": serial[:64],
        "problem": devices.claim_problem(current_user),
        "from_label": from_label,
    }
    if htmx.is_htmx():
        # htmx swaps only 2xx answers: the form with its message comes back as a 200.
        return render_template("devices/_claim_form.html", **context)
    return render_template("devices/claim.html", **context), status


# --- one device -------------------------------------------------------------------------------


@bp.get("/devices/<device_id>")
def detail(device_id):
    try:
        device = devices.device_for(current_user, device_id, need="viewer")
    except NotFound:
        # A device this user gave away or released: say so (still a 404). Anyone else gets
        # the plain 404, whatever the device.
        former = devices.former_ownership(current_user, device_id)
        if former is None:
            raise
        return render_template("devices/former.html", former=former), 404
    # The shell never waits on Particle: it shows the stored snapshot, then polls.
    snapshot = live_values.last_known(device)
    return render_template("devices/detail.html", **_page_context(device, snapshot=snapshot))


@bp.get("/devices/<device_id>/live")
def live(device_id):
    """Server-sent events: the device page's values, pushed when the device changes."""
    device = devices.device_for(current_user, device_id, need="viewer")
    if not _push_enabled():
        abort(404)

    def render(user, changed, check):
        try:
            current = devices.device_for(user, device.device_id, need="viewer")
        except NotFound:
            # Access ended (revoked, expired, released...): no more values; the page says so.
            raise sse.Gone([("values", render_template("devices/_access_ended.html"))]) from None
        snapshot = _pushed_snapshot(current, check)
        return [
            ("values", render_template("devices/_values.html", **_page_context(current, snapshot=snapshot)))
        ]

    return sse.stream([device.device_id], render)


@bp.get("/devices/<device_id>/summary")
def summary(device_id):
    return _live_fragment(device_id, "devices/_summary.html")


@bp.get("/devices/<device_id>/values")
def values(device_id):
    return _live_fragment(device_id, "devices/_values.html")


def _live_fragment(device_id, template):
    """A fragment with the device's live values (from the shared cache); without htmx the
    device page, which includes the same fragment."""
    device = devices.device_for(current_user, device_id, need="viewer")
    if not htmx.is_htmx():
        return flask_redirect(url_for("devices.detail", device_id=device.device_id))
    snapshot = live_values.current(device)
    return render_template(template, **_page_context(device, snapshot=snapshot))


def _history_window():
    window = request.args.get("window", "24h")
    if window not in history.WINDOWS:
        abort(400, description="Choose a window of 24h, 7d or 30d.")
    return window


@bp.get("/devices/<device_id>/history")
def history_charts(device_id):
    """Charts of the model's main values over a window, each with a table and a CSV link: a
    fragment the device page loads, or a page of its own without htmx."""
    device = devices.device_for(current_user, device_id, need="viewer")
    window = _history_window()
    data = history.chart(device, window)
    step = history.WINDOWS[window][1] == "raw"
    drawn = [(series, charts.draw(series, data.start, data.end, step)) for series in data.series]
    context = _page_context(device, chart=data, drawn=drawn, window=window, windows=history.WINDOW_LABELS)
    if htmx.is_htmx():
        return render_template("devices/_history.html", **context)
    return render_template("devices/history.html", **context)


@bp.get("/devices/<device_id>/history.csv")
def history_csv(device_id):
    device = devices.device_for(current_user, device_id, need="viewer")
    window = _history_window()
    response = make_response(history.csv_text(device, window))
    response.headers["Content-Type"] = "text/csv; charset=utf-8"
    filename = f"{device.serial_number}-{window}.csv".replace('"', "")
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@bp.post("/devices/<device_id>/functions/<function_name>")
def call_function(device_id, function_name):
    device = devices.device_for(current_user, device_id, need="operator")
    arg = request.form.get("arg", "")
    try:
        result = devices.call_function(
            current_user, device, function_name, arg, confirmed=request.form.get("confirmed") == "yes"
        )
    except devices.DeviceError as exc:
        if exc.kind == "unknown_function":
            abort(404)
        if exc.kind == "confirm":
            function = device_models.get(device.model).function(function_name)
            context = _page_context(device, function=function, arg=arg, question=exc.message)
            if htmx.is_htmx():
                return render_template("devices/_confirm_function.html", **context)
            return render_template("devices/confirm_function.html", **context)
        result = devices.FunctionResult(False, exc.message)
    if htmx.is_htmx():
        response = make_response(render_template("devices/_function_result.html", result=result))
        if result.ok:
            # The values region listens for this and re-reads the (invalidated) snapshot.
            response.headers["HX-Trigger"] = "device-changed"
        return response
    flash(result.message, "success" if result.ok else "error")
    return flask_redirect(url_for("devices.detail", device_id=device.device_id))


@bp.post("/devices/<device_id>/rename")
def rename(device_id):
    device = devices.device_for(current_user, device_id, need="manager")
    error = None
    try:
        device = devices.rename(current_user, device, request.form.get("name", ""))
    except devices.DeviceError as exc:
        error = exc
    if htmx.is_htmx():
        return render_template(
            "devices/_name.html",
            **_page_context(
                device,
                rename_error=error,
                renamed=error is None,
                typed_name=request.form.get("name", "")[:NAME_ECHO_MAX],
            ),
        )
    if error:
        flash(error.message, "error")
    else:
        flash(_("Renamed to %(name)s.", name=device.name), "success")
    return flask_redirect(url_for("devices.detail", device_id=device.device_id))


@bp.route("/devices/<device_id>/release", methods=["GET", "POST"])
def release(device_id):
    device = devices.device_for(current_user, device_id, need="owner")
    if request.method == "GET":
        return render_template("devices/release.html", **_page_context(device))
    name = devices.display_name(device)
    try:
        devices.release(current_user, device)
    except devices.DeviceError as exc:
        if exc.kind == "checking":
            flash(exc.message, "info")
            return htmx.redirect(url_for("devices.dashboard"))
        if htmx.is_htmx():
            return render_template("devices/_release_form.html", **_page_context(device, error=exc))
        return render_template("devices/release.html", **_page_context(device, error=exc)), exc.status
    flash(_("%(name)s was released. It is no longer in your account.", name=name), "success")
    return htmx.redirect(url_for("devices.dashboard"))
