"""The support console (/support): second factor, search, customer and device pages, fleet
and reconciliation, staff actions, and "view as customer". Thin: parse input, call one
service, render or redirect.

Every route but the second-factor step is `staff_required` (staff, second factor passed);
customers get 403 everywhere here. The read-only rule while viewing lives in security.py.
"""

from flask import Blueprint
from flask import abort
from flask import current_app
from flask import flash
from flask import render_template
from flask import request
from flask import session
from flask import url_for
from flask_babel import gettext as _
from flask_login import current_user

from selfserve import htmx
from selfserve import i18n
from selfserve import input_rules
from selfserve.refusals import Refusal
from selfserve.security import limiter
from selfserve.security import rotate_login_session
from selfserve.services import audit
from selfserve.services import devices
from selfserve.services import impersonation
from selfserve.services import reconcile
from selfserve.services import staff
from selfserve.services import support
from selfserve.services.accounts import FormErrors
from selfserve.services.staff import real_user
from selfserve.services.staff import staff_required

bp = Blueprint("support", __name__, url_prefix="/support")


@bp.app_template_filter("staff_time")
def staff_time(moment):
    """A time for staff pages: the medium date and time in the reader's locale and zone. Takes
    a naive UTC datetime or Particle's ISO-8601 text; text it can't read is shown as it is."""
    return i18n.local_datetime(moment)


ENROLMENT_KEY = "totp_enrolment"  # the session key of the secret being enrolled (encrypted)


def _safe_support_next(value):
    """Only a page of the console itself (no open redirects)."""
    if (
        value
        and value.startswith("/support")
        and "//" not in value
        and "\\" not in value
        and len(value) < 500
        and not input_rules.has_control_character(value)  # a CR/LF would reach a header
    ):
        return value
    return None


def _staff_account_key():
    user = real_user()
    return f"staff:{user.id}" if user is not None else request.remote_addr


@bp.context_processor
def _helpers():
    return {
        "describe": audit.describe,
        "display_name": devices.display_name,
        "finding_label": reconcile.describe,
        "reason_max": impersonation.REASON_MAX,
    }


@bp.app_context_processor
def _view_banner():
    # templates/_banner.html (on every page) shows the time left of a staff view.
    return {"staff_view_seconds_left": impersonation.seconds_left}


# --- second factor ----------------------------------------------------------------------------


@bp.route("/second-factor", methods=["GET", "POST"])
@limiter.limit(
    lambda: current_app.config["RATE_LIMIT_SECOND_FACTOR"], methods=["POST"], key_func=_staff_account_key
)
def second_factor():
    user = real_user()
    if not user.is_staff:
        abort(403)
    next_url = _safe_support_next(request.values.get("next")) or url_for("support.home")
    if user.login_session.mfa_verified_at is not None:
        return htmx.redirect(next_url)
    enrolled = staff.is_enrolled(user)
    error = None
    if request.method == "POST":
        code = request.form.get("code", "")
        try:
            if enrolled:
                staff.verify_code(user, code, user.login_session)
            else:
                staff.confirm_enrolment(user, session.get(ENROLMENT_KEY), code, user.login_session)
        except FormErrors as exc:
            error = exc.errors["code"]
        except staff.StaffError as exc:
            flash(str(exc), "error")
            return htmx.redirect(url_for("support.second_factor", next=next_url))
        else:
            rotate_login_session()  # more rights from here on: a new session id
            flash(_("Signed in to the support console."), "success")
            return htmx.redirect(next_url)
    context = {"enrolled": enrolled, "error": error, "next_url": next_url}
    if not enrolled:
        # The secret waits, encrypted, in the session until a code confirms it.
        secret, session[ENROLMENT_KEY] = staff.enrolment_secret(user, session.get(ENROLMENT_KEY))
        context.update(secret=secret, qr=staff.qr_data_uri(staff.provisioning_uri(user, secret)))
    return render_template("support/second_factor.html", **context), (401 if error else 200)


# --- search, customer, device -------------------------------------------------------------------


@bp.get("")
@staff_required
def home():
    query = request.args.get("q")
    results, error = None, None
    if query is not None:
        try:
            results = support.search(query)
        except support.SupportError as exc:
            error = exc.message
    return render_template("support/home.html", query=query or "", results=results, error=error), (
        422 if error else 200
    )


@bp.get("/customers/<customer_id>")
@staff_required
def customer(customer_id):
    user = support.customer_or_404(customer_id)
    return render_template(
        "support/customer.html",
        overview=support.customer_overview(user, real_user()),
        viewing=getattr(current_user, "staff_view", None),
        end_causes=impersonation.END_CAUSE_LABELS,
    )


@bp.get("/devices/<device_id>")
@staff_required
def device(device_id):
    found = support.device_or_404(device_id)
    return render_template("support/device.html", overview=support.device_overview(found, real_user()))


@bp.get("/fleet")
@staff_required
def fleet():
    page = request.args.get("page", "1")
    page = int(page) if page.isdigit() and len(page) < 7 else 1
    return render_template(
        "support/fleet.html",
        fleet=support.fleet(page, request.args.get("show", "all")),
        filters=support.FLEET_FILTERS,
    )


@bp.get("/mail")
@staff_required
def mail():
    """Recent outgoing mail (the outbox): state, attempts, last error; filter by address."""
    address = (request.args.get("address") or "").strip()[:254]
    state = request.args.get("state") or ""
    return render_template(
        "support/mail.html",
        rows=support.outbox_rows(address, state, real_user()),
        address=address,
        state=state,
        states=support.OUTBOX_STATES,
        state_labels=support.OUTBOX_STATE_LABELS,
        shown_body=support.outbox_body,
    )


@bp.post("/fleet/reconcile")
@staff_required
def reconcile_now():
    result = reconcile.run(trigger="console", started_by=real_user())
    if result.status == "done":
        flash(
            _(
                "Reconciliation finished: %(findings_count)s finding(s) in %(devices_checked)s devices. Nothing was changed.",
                findings_count=result.findings_count,
                devices_checked=result.devices_checked,
            ),
            "success",
        )
    else:
        flash(_("Reconciliation failed: %(error)s", error=result.error), "error")
    return htmx.redirect(url_for("support.fleet"))


# --- view as customer -----------------------------------------------------------------------------


@bp.post("/customers/<customer_id>/view")
@staff_required
def start_view(customer_id):
    target = support.customer_or_404(customer_id)
    try:
        impersonation.start_view(real_user(), target.id, request.form.get("reason", ""))
    except impersonation.ViewRefused as exc:
        if exc.status == 403:
            abort(403)
        flash(exc.message, "error")
        return htmx.redirect(url_for("support.customer", customer_id=target.id))
    flash(
        _(
            "You are viewing as %(email)s, read-only, for %(minutes)s minutes.",
            email=target.email,
            minutes=impersonation.view_minutes(),
        ),
        "info",
    )
    return htmx.redirect(url_for("devices.dashboard"))


@bp.post("/view/end")
@staff_required
def end_view():
    ended = impersonation.end_current_view(current_user._get_current_object())
    if ended is None:
        flash(_("That view had already ended."), "info")
        return htmx.redirect(url_for("support.home"))
    flash(_("The view has ended. Everything you looked at was recorded."), "success")
    return htmx.redirect(url_for("support.customer", customer_id=ended.customer_id))


# --- staff actions (each needs a reason) -----------------------------------------------------------


def _action_done(message, target_url):
    flash(message, "success")
    return htmx.redirect(target_url)


def _action_refused(message, target_url):
    flash(message, "error")
    return htmx.redirect(target_url)


@bp.post("/customers/<customer_id>/resend-verification")
@staff_required
def resend_verification(customer_id):
    target = support.customer_or_404(customer_id)
    back = url_for("support.customer", customer_id=target.id)
    try:
        support.resend_verification(real_user(), target, request.form.get("reason", ""))
    except support.SupportError as exc:
        return _action_refused(exc.message, back)
    return _action_done(_("A new verification link was sent to %(email)s.", email=target.email), back)


@bp.post("/customers/<customer_id>/retry-setup")
@staff_required
def retry_provisioning(customer_id):
    target = support.customer_or_404(customer_id)
    back = url_for("support.customer", customer_id=target.id)
    try:
        result = support.retry_provisioning(real_user(), target, request.form.get("reason", ""))
    except support.SupportError as exc:
        return _action_refused(exc.message, back)
    if result.provisioning_state == "ready":
        return _action_done(_("The account is now set up with the device cloud."), back)
    return _action_refused(
        _(
            "The setup failed again: %(error)s. It will keep retrying.",
            error=result.provisioning_error or _("no answer"),
        ),
        back,
    )


@bp.post("/devices/<device_id>/release")
@staff_required
def release_device(device_id):
    found = support.device_or_404(device_id)
    back = url_for("support.device", device_id=found.device_id)
    if request.form.get("confirm") != "yes":
        return _action_refused(_("Tick the box to confirm the release."), back)
    try:
        support.release_device(real_user(), found, request.form.get("reason", ""))
    except Refusal as exc:  # the support rules' or the devices service's
        return _action_refused(exc.message, back)
    return _action_done(_("The device was released. It no longer belongs to anyone."), back)


def _step_action(device_id, action):
    found = support.device_or_404(device_id)
    back = url_for("support.device", device_id=found.device_id)
    try:
        after = action(real_user(), found, request.form.get("reason", ""))
    except support.SupportError as exc:
        return _action_refused(exc.message, back)
    if after.claim_state is None:
        return _action_done(_("Done: nothing is in progress for this device any more."), back)
    return _action_refused(
        _(
            "Still in progress (%(claim_state)s): the device cloud did not answer. The sweep keeps trying.",
            claim_state=after.claim_state,
        ),
        back,
    )


@bp.post("/devices/<device_id>/retry")
@staff_required
def retry_step(device_id):
    return _step_action(device_id, support.retry_device_step)


@bp.post("/devices/<device_id>/cancel")
@staff_required
def cancel_step(device_id):
    return _step_action(device_id, support.cancel_device_step)


@bp.post("/transfers/<int:transfer_id>/decide")
@staff_required
def decide_transfer(transfer_id):
    # The form sits on the customer page and in the fleet's stuck list: go back to that page.
    back = _safe_support_next(request.form.get("next")) or url_for("support.fleet")
    try:
        transfer = support.decide_transfer(
            real_user(),
            transfer_id,
            request.form.get("outcome", ""),
            request.form.get("reason", ""),
            confirmed=request.form.get("confirm") == "yes",
        )
    except support.SupportError as exc:
        if exc.status == 404:
            abort(404)
        return _action_refused(exc.message, back)
    if transfer.state == "kept":
        return _action_done(
            _("Decided: the device stays with its owner. Both sides are emailed the outcome."), back
        )
    if transfer.state == "done":
        return _action_done(
            _("Decided: the device is now in the requester's account. Both sides are emailed."), back
        )
    if transfer.state == "failed_returned":
        return _action_refused(
            _(
                "Decided, but the device cloud refused the move: the device stays with its owner. "
                "See the alert on the fleet page."
            ),
            back,
        )
    flash(
        _(
            "Decided: the device is moving to the requester. The device cloud did not answer yet; the sweep "
            "finishes the move by itself and both sides are emailed then."
        ),
        "info",
    )
    return htmx.redirect(back)
