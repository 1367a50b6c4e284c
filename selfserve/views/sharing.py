"""Sharing a device: the Sharing section of the device page (invite, withdraw, revoke) and
the invitee's side (the emailed link, the invitation page, accepting).

Device routes go through `devices.device_for(..., need="manager")` first: anyone below
manager gets the same 404 as a stranger, with no Particle call. Withdrawing and revoking ask
for confirmation (hx-confirm in the page; a confirmation page without JavaScript).
"""

from flask import Blueprint
from flask import abort
from flask import flash
from flask import redirect
from flask import render_template
from flask import request
from flask import url_for
from flask_babel import gettext as _
from flask_login import current_user

from selfserve import device_models
from selfserve import htmx
from selfserve import tokens
from selfserve.models import Device
from selfserve.models import User
from selfserve.security import public
from selfserve.services import access
from selfserve.services import devices
from selfserve.services import sharing

bp = Blueprint("sharing", __name__)


@bp.app_template_global("shared_with_me")
def shared_with_me(user):
    """Devices I reach through others (grants, organisations), for the dashboard: one page,
    filtered by ?q= (name or serial), paged by ?page=."""
    page = request.args.get("page", "1")
    page = int(page) if page.isdigit() and len(page) < 7 else 1
    return sharing.reachable(user, page=page, query=request.args.get("q", ""))


@bp.app_template_global("device_sharing")
def device_sharing(device):
    return sharing.of_device(device)


@bp.app_context_processor
def _sharing_helpers():
    # Support's console pages show grants too (database only, read-only).
    return {
        "models": device_models,  # models.noun(key): "a window covering" in an invitation
        "role_labels_all": access.ROLE_LABELS,
        "who_can_see": access.who_can_see,
        "grants_given_on_devices_of": access.grants_given_on_devices_of,
        "grants_held_by": access.grants_held_by,
        "holder_label": access.holder_label,
        "dealers": sharing.dealers,
    }


@bp.app_template_global("invitations_for_me")
def invitations_for_me(user):
    return sharing.waiting_for(user)


def _section(device, error=None, form=None, status=200):
    """The Sharing section (htmx) or the device page with a flash (no JavaScript)."""
    if htmx.is_htmx():
        # htmx swaps only 2xx answers: the section with its message comes back as a 200.
        return render_template(
            "sharing/_device_section.html",
            device=device,
            role=device.role,
            share_error=error,
            share_form=form or {},
        )
    if error is not None:
        flash(error.message, "error")
    return redirect(url_for("devices.detail", device_id=device.device_id) + "#sharing")


@bp.post("/devices/<device_id>/sharing/invite")
def invite(device_id):
    device = devices.device_for(current_user, device_id, need="manager")
    form = {name: request.form.get(name, "")[:254] for name in ("email", "role", "until", "to_organisation")}
    try:
        invitation = sharing.invite(
            current_user,
            device,
            form["email"],
            form["role"],
            form["until"],
            to_organisation=form["to_organisation"] == "yes",
        )
    except sharing.SharingError as exc:
        return _section(device, error=exc, form=form)
    # The email is queued with the invitation (outbox): a mail server that is down only delays it.
    flash(_("Invitation sent to %(email)s.", email=invitation.email), "success")
    return _section(device)


@bp.post("/devices/<device_id>/sharing/dealer")
def grant_dealer(device_id):
    device = devices.device_for(current_user, device_id, need="manager")
    form = {name: request.form.get(name, "")[:100] for name in ("dealer", "dealer_role", "dealer_until")}
    try:
        sharing.grant_dealer(current_user, device, form["dealer"], form["dealer_role"], form["dealer_until"])
    except sharing.SharingError as exc:
        return _section(device, error=exc, form=form)
    flash(
        _("%(dealer)s has access until the end of %(day)s.", dealer=form["dealer"], day=form["dealer_until"]),
        "success",
    )
    return _section(device)


def _confirm_or_act(device, kind, thing, act, done_message):
    if request.form.get("confirmed") != "yes":
        return render_template("sharing/confirm.html", device=device, kind=kind, thing=thing)
    try:
        act()
    except sharing.SharingError as exc:
        if exc.status == 404:
            abort(404)
        return _section(device, error=exc)
    flash(done_message, "success")
    return _section(device)


@bp.post("/devices/<device_id>/sharing/invitations/<int:invitation_id>/withdraw")
def withdraw(device_id, invitation_id):
    device = devices.device_for(current_user, device_id, need="manager")
    invitation = next((i for i in sharing.of_device(device).invitations if i.id == invitation_id), None)
    if invitation is None or invitation.role not in sharing.grantable_by(device.role):
        abort(404)
    return _confirm_or_act(
        device,
        "withdraw",
        invitation,
        lambda: sharing.withdraw(current_user, device, invitation_id),
        _("The invitation of %(email)s was withdrawn.", email=invitation.email),
    )


@bp.post("/devices/<device_id>/sharing/grants/<int:grant_id>/revoke")
def revoke(device_id, grant_id):
    device = devices.device_for(current_user, device_id, need="manager")
    grant = next((g for g in access.grants_of_device(device.device_id) if g.id == grant_id), None)
    if grant is None or grant.role not in sharing.grantable_by(device.role):
        abort(404)
    return _confirm_or_act(
        device,
        "revoke",
        grant,
        lambda: sharing.revoke(current_user, device, grant_id),
        _("The access of %(holder_label)s was revoked.", holder_label=access.holder_label(grant)),
    )


@bp.get("/devices/<device_id>/access")
def who_can_see(device_id):
    """Who can see this device, and why (the owner's page; staff see it in the console)."""
    device = devices.device_for(current_user, device_id, need="owner")
    return render_template(
        "sharing/who.html",
        device=device,
        name=devices.display_name(device),
        reach=access.who_can_see(device),
    )


# --- the invitee ---------------------------------------------------------------------------------


def _invitation_context(invitation):
    device = Device.get_by_id(invitation.device_id)
    inviter = User.get_or_none(User.id == invitation.invited_by_id)
    return {
        "invitation": invitation,
        "device": device,
        "my_organisations": sharing.organisations_to_accept_for(current_user)
        if invitation.to_organisation and current_user.is_authenticated
        else [],
        "inviter_email": inviter.email if inviter else None,
        "role_label": access.ROLE_LABELS[invitation.role],
        "too_late": sharing.too_late_message(invitation),
        # After signing in, come back to the invitation by its id: the token never goes into a
        # ?next= URL (access logs would keep it).
        "here": url_for("sharing.invitation", invitation_id=invitation.id),
    }


@bp.get("/share/<token>")
@public
def invitation_link(token):
    """The emailed link: shows the invitation and, to the invited account, a button to accept
    (a POST). Nothing changes on GET."""
    try:
        invitation = sharing.from_link(token)
    except tokens.TokenError as exc:
        status = 410 if isinstance(exc, tokens.TokenExpired) else 400
        return render_template("sharing/link_error.html", message=exc.message), status
    context = _invitation_context(invitation)
    if context["too_late"]:
        return render_template("sharing/link_error.html", message=context["too_late"]), 410
    return render_template("sharing/invitation.html", **context)


@bp.get("/invitations/<int:invitation_id>")
def invitation(invitation_id):
    found = sharing.for_invitee(current_user, invitation_id)
    if found is None:
        abort(404)
    return render_template("sharing/invitation.html", **_invitation_context(found))


@bp.post("/invitations/<int:invitation_id>/accept")
def accept(invitation_id):
    found = sharing.for_invitee(current_user, invitation_id)
    if found is None:
        abort(404)
    chosen = request.form.get("organisation", "")
    try:
        sharing.accept(
            current_user,
            found,
            organisation_id=int(chosen) if chosen.isdigit() and len(chosen) < 10 else None,
        )
    except sharing.SharingError as exc:
        context = _invitation_context(sharing.for_invitee(current_user, invitation_id))
        return render_template("sharing/invitation.html", error=exc, **context), exc.status
    flash(_("The device is shared with you now."), "success")
    return htmx.redirect(url_for("devices.detail", device_id=found.device_id))
