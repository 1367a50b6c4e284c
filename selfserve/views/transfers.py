"""Transfers: offer a device to a new owner, answer an offer, ask the owner for a device, and
the emailed links. Thin: parse input, call one service function, render or redirect.

Emailed links only show a page with a button (GET); the button's POST acts, because mail
scanners fetch links. Links work once: the transfer's state decides.
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

from selfserve import device_models
from selfserve import htmx
from selfserve import i18n
from selfserve import tokens
from selfserve.models import Device
from selfserve.models import User
from selfserve.security import limiter
from selfserve.security import public
from selfserve.security import verified_required
from selfserve.services import devices
from selfserve.services import transfers

bp = Blueprint("transfers", __name__)


def _request_limit():
    return current_app.config["RATE_LIMIT_TRANSFER_REQUEST"]


def _account_key():
    return "transfer-request:" + str(current_user.id)


@bp.record_once
def _keep_tokens_out_of_logs(state):
    tokens.install_log_redaction()


@bp.app_template_global("transfer_of")
def transfer_of(device):
    """The device's open transfer its owner is party to (the device page's panel; the
    dashboard's cards read theirs with one query, in devices.overview)."""
    return transfers.open_transfer_for_owner(device)


@bp.app_template_global("transfers_dashboard")
def transfers_dashboard(user):
    """Incoming offers and open requests of `user` (dashboard panel)."""
    return transfers.dashboard_of(user)


@bp.app_template_global("transfer_needs_answer")
def transfer_needs_answer(transfer):
    """A request that never completes on silence (the owner's pages say so)."""
    return transfers.needs_owner_answer(transfer)


@bp.app_template_global("transfer_role")
def transfer_role(user, transfer):
    return transfers.role_of(user, transfer)


@bp.app_template_filter("transfer_label")
def transfer_label(transfer):
    return transfers.label(transfer)


@bp.app_template_filter("masked_email")
def masked_email(email):
    return transfers.mask_email(email)


def _transfer_or_404(transfer_id):
    transfer = transfers.visible_to(current_user, transfer_id)
    if transfer is None:
        abort(404)
    return transfer


def _context(transfer, **extra):
    device = Device.get_by_id(transfer.device_id)
    model = device_models.get(device.model)
    return {
        "transfer": transfer,
        "device": device,
        "model": model,
        "device_label": transfers.device_label(device),
        "role": transfers.role_of(current_user, transfer),
        "me": current_user,
        **extra,
    }


# --- the seller starts --------------------------------------------------------------------------


@bp.route("/devices/<device_id>/transfer", methods=["GET", "POST"])
@verified_required
def start(device_id):
    device = devices.device_for(current_user, device_id, need="owner")
    context = {
        "device": device,
        "name": devices.display_name(device),
        "model": device_models.get(device.model),
        "days": transfers.OFFER_DAYS,
        "open_transfer": transfers.open_transfer_for_owner(device),
    }
    if request.method == "GET":
        return render_template("transfers/start.html", email="", error=None, **context)
    email = request.form.get("email", "")[:254]
    try:
        transfer = transfers.offer(
            current_user, device, email, confirmed=request.form.get("confirmed") == "yes"
        )
    except transfers.TransferError as exc:
        return render_template("transfers/start.html", email=email, error=exc, **context), exc.status
    # The offer's email is a step of the transfer job, queued in the outbox (which retries the
    # mail server) by this request or, after a double submit or a crash, by the job's resume.
    flash(
        _(
            "We emailed the offer to %(buyer_email)s. It is open until %(date)s.",
            buyer_email=transfer.buyer_email,
            date=i18n.local_date(transfer.expires_at),
        ),
        "success",
    )
    return htmx.redirect(url_for("devices.detail", device_id=device.device_id))


@bp.post("/transfers/<int:transfer_id>/cancel")
def cancel(transfer_id):
    transfer = _transfer_or_404(transfer_id)
    try:
        transfers.cancel(current_user, transfer)
    except transfers.TransferError as exc:
        flash(exc.message, "error")
        return htmx.redirect(url_for("transfers.detail", transfer_id=transfer.id))
    flash(_("The transfer was cancelled."), "success")
    if transfer.kind == "offer":
        return htmx.redirect(url_for("devices.detail", device_id=transfer.device_id))
    return htmx.redirect(url_for("devices.dashboard"))


# --- one transfer (seller or buyer) -------------------------------------------------------------


@bp.get("/transfers/<int:transfer_id>")
def detail(transfer_id):
    transfer = _transfer_or_404(transfer_id)
    return render_template("transfers/detail.html", **_context(transfer, error=None))


def _act(transfer_id, action, done_message):
    transfer = _transfer_or_404(transfer_id)
    try:
        transfer = action(current_user, transfer)
    except transfers.TransferError as exc:
        return render_template(
            "transfers/detail.html", **_context(transfers.get(transfer.id), error=exc)
        ), exc.status
    flash(done_message(transfer), "success" if transfer.state not in ("moving", "returning") else "info")
    if transfer.state == "done" and transfer.buyer_id == current_user.id:
        return htmx.redirect(url_for("devices.detail", device_id=transfer.device_id))
    return htmx.redirect(url_for("transfers.detail", transfer_id=transfer.id))


def _moved_message(transfer):
    if transfer.state == "done":
        return _("The device is now in your account.")
    if transfer.state == "failed_returned":
        return _(
            "The device could not be moved; it stays with its previous owner. Our support team has been told."
        )
    return _("The device is being moved to your account. This finishes by itself, usually within minutes.")


@bp.post("/transfers/<int:transfer_id>/accept")
@verified_required
def accept(transfer_id):
    return _act(transfer_id, transfers.accept, _moved_message)


@bp.post("/transfers/<int:transfer_id>/decline")
def decline(transfer_id):
    return _act(
        transfer_id, transfers.decline, lambda t: _("You declined the offer. The owner has been told.")
    )


@bp.post("/transfers/<int:transfer_id>/approve")
def approve(transfer_id):
    return _act(
        transfer_id,
        transfers.approve,
        lambda t: (
            _("Thank you. The device is leaving your account.")
            if t.state != "done"
            else _("The device was transferred.")
        ),
    )


@bp.post("/transfers/<int:transfer_id>/object")
def object_to(transfer_id):
    return _act(
        transfer_id,
        transfers.object_to,
        lambda t: _("You objected. The request is closed and the device stays in your account."),
    )


# --- the buyer starts (from the claim form) -----------------------------------------------------


@bp.post("/transfers/request")
@verified_required
@limiter.limit(_request_limit, key_func=_account_key)
@limiter.limit(_request_limit)
def request_device():
    try:
        transfer = transfers.request_device(current_user, request.form.get("proof", ""))
    except transfers.TransferError as exc:
        flash(exc.message, "error")
        return htmx.redirect(url_for("devices.claim"))
    if transfers.needs_owner_answer(transfer):
        flash(
            _(
                "We asked the owner. This device changed hands recently or was yours before, so it moves only if the owner agrees; without an answer within %(days)s days, support decides.",
                days=transfers.OBJECTION_DAYS,
            ),
            "success",
        )
    else:
        flash(
            _(
                "We asked the owner. If they don't object within %(days)s days, the device moves to your account by itself.",
                days=transfers.OBJECTION_DAYS,
            ),
            "success",
        )
    return htmx.redirect(url_for("transfers.detail", transfer_id=transfer.id))


# --- emailed links ------------------------------------------------------------------------------


def _link_error(error):
    status = 410 if isinstance(error, tokens.TokenExpired) else 400
    return render_template("transfers/link_error.html", message=error.message), status


@bp.get("/transfers/offer/<token>")
@public
def offer_link(token):
    try:
        transfer = transfers.from_offer_link(token)
    except tokens.TokenError as exc:
        return _link_error(exc)
    if transfer.state != "offered":
        return render_template("transfers/link_error.html", message=transfers.too_late_message(transfer)), 410
    if current_user.is_authenticated and transfers.role_of(current_user, transfer) == "buyer":
        return htmx.redirect(url_for("transfers.detail", transfer_id=transfer.id))
    if not current_user.is_authenticated:
        # "Create an account" from here pre-fills the address the device was offered to.
        from selfserve.views.accounts import SIGNUP_EMAIL

        session[SIGNUP_EMAIL] = transfer.buyer_email
    device = Device.get_by_id(transfer.device_id)
    return render_template(
        "transfers/offer_link.html",
        transfer=transfer,
        device=device,
        model=device_models.get(device.model),
        device_label=transfers.device_label(device),
        # After signing in, go to the offer itself; the token never goes into a ?next= URL
        # (access logs would keep it).
        here=url_for("transfers.detail", transfer_id=transfer.id),
    )


@bp.route("/transfers/answer/<token>", methods=["GET", "POST"])
@public
def answer_link(token):
    try:
        transfer, action = transfers.from_answer_link(token)
    except tokens.TokenError as exc:
        return _link_error(exc)
    device = Device.get_by_id(transfer.device_id)
    context = {
        "transfer": transfer,
        "action": action,
        "device": device,
        "token": token,
        "device_label": transfers.device_label(device),
        "error": None,
    }
    if request.method == "GET":
        if transfer.state != "requested":
            return render_template(
                "transfers/link_error.html", message=transfers.too_late_message(transfer)
            ), 410
        return render_template("transfers/answer.html", **context)
    owner = User.get_or_none(User.id == transfer.seller_id)
    try:
        if action == "approve":
            transfer = transfers.approve(owner, transfer)
        else:
            transfer = transfers.object_to(owner, transfer)
    except transfers.TransferError as exc:
        return render_template("transfers/answer.html", **{**context, "error": exc}), exc.status
    return render_template("transfers/answered.html", **{**context, "transfer": transfer})
