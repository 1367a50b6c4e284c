"""The organisation area: members, groups, the devices of each group, grants on groups.

Every route goes through `organisations.org_for(user, id, need=...)`: someone outside the
organisation (or a member on an admin's route) gets the same 404 as an unknown id. Plain forms
(POST, then back to the page with a message); removing a member or revoking asks first.
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

from selfserve.security import verified_required
from selfserve.services import access
from selfserve.services import alert_recipients
from selfserve.services import audit
from selfserve.services import organisations
from selfserve.services import sharing

bp = Blueprint("organisations", __name__)


def _back(organisation, anchor=""):
    return redirect(url_for("organisations.detail", organisation_id=organisation.id) + anchor)


def _done(organisation, action, message, anchor="", confirm=None):
    """Every change of the organisation area: run `action`, then back to the page with
    `message` (or the refusal; a missing thing is a 404). With `confirm` (a question), a form
    without confirmed=yes gets a page asking it first, whose button posts here again (pages
    with JavaScript ask with hx-confirm and send confirmed=yes)."""
    if confirm is not None and request.form.get("confirmed") != "yes":
        return render_template(
            "organisations/confirm.html",
            organisation=organisation,
            question=confirm,
            action=request.script_root + request.path,
        )
    try:
        action()
    except (organisations.OrgError, sharing.SharingError) as exc:
        if exc.status == 404:
            abort(404)
        flash(exc.message, "error")
        return _back(organisation, anchor)
    flash(message, "success")
    return _back(organisation, anchor)


@bp.route("/organisations", methods=["GET", "POST"])
@verified_required
def index():
    if request.method == "POST":
        try:
            organisation = organisations.create(current_user, request.form.get("name", ""))
        except organisations.OrgError as exc:
            flash(exc.message, "error")
            return redirect(url_for("organisations.index"))
        flash(_("%(name)s was created. You are its admin.", name=organisation.name), "success")
        return _back(organisation)
    return render_template("organisations/index.html", mine=organisations.organisations_of(current_user))


@bp.get("/organisations/<int:organisation_id>")
def detail(organisation_id):
    organisation = organisations.org_for(current_user, organisation_id)
    return render_template(
        "organisations/detail.html",
        organisation=organisation,
        overview=organisations.overview(organisation),
        is_admin=organisation.my_role == "admin",
        roles=access.GRANTABLE,
        holder_label=access.holder_label,
    )


@bp.get("/organisations/<int:organisation_id>/activity")
def activity(organisation_id):
    """The organisation's activity, newest first, paged by ?before= (a cursor)."""
    organisation = organisations.org_for(current_user, organisation_id)
    before = request.args.get("before")
    if before is not None:
        if not before.isdigit() or len(before) > 18:
            abort(400)
        before = int(before)
    events, older = organisations.activity(organisation, organisation.my_role, before)
    return render_template(
        "organisations/activity.html",
        organisation=organisation,
        events=events,
        older=older,
        describe=audit.describe,
        first_page=before is None,
        is_admin=organisation.my_role == "admin",
    )


@bp.post("/organisations/<int:organisation_id>/members")
def add_member(organisation_id):
    organisation = organisations.org_for(current_user, organisation_id, need="admin")
    email = request.form.get("email", "")[:254]
    return _done(
        organisation,
        lambda: organisations.add_member(
            current_user, organisation, email, request.form.get("role", "member")
        ),
        _("%(email)s is a member now.", email=email),
        "#members",
    )


@bp.post("/organisations/<int:organisation_id>/members/<int:user_id>/remove")
def remove_member(organisation_id, user_id):
    organisation = organisations.org_for(current_user, organisation_id, need="admin")
    return _done(
        organisation,
        lambda: organisations.remove_member(current_user, organisation, user_id),
        _("The member was removed."),
        "#members",
        confirm=_("Remove this member? Their access through the organisation ends at once."),
    )


@bp.post("/organisations/<int:organisation_id>/groups")
def create_group(organisation_id):
    organisation = organisations.org_for(current_user, organisation_id, need="admin")
    name = request.form.get("name", "")[:200]
    return _done(
        organisation,
        lambda: organisations.create_group(current_user, organisation, name),
        _("The group was created."),
        "#groups",
    )


def _device_ids(organisation):
    """Device ids from the form's checkboxes (`device`), or serials typed in `serials`."""
    from selfserve.models import Device

    ids = request.form.getlist("device")[:5000]
    serials = [
        s.strip().upper() for s in request.form.get("serials", "").replace(",", " ").split() if s.strip()
    ]
    if serials:
        ids += [
            d.device_id
            for d in Device.select(Device.device_id).where(
                Device.serial_number.in_(serials[:5000]) & (Device.owner == organisation.account_id)
            )
        ]
    return ids


@bp.post("/organisations/<int:organisation_id>/groups/<int:group_id>/devices")
def group_devices(organisation_id, group_id):
    organisation = organisations.org_for(current_user, organisation_id, need="admin")
    group = organisations.group_of(organisation, group_id)
    ids = _device_ids(organisation)
    if request.form.get("remove") == "yes":
        action = lambda: organisations.remove_from_group(current_user, organisation, group, ids)  # noqa: E731
        message = _("Taken out of %(name)s.", name=group.name)
    else:
        action = lambda: organisations.add_to_group(current_user, organisation, group, ids)  # noqa: E731
        message = _("Added to %(name)s.", name=group.name)
    return _done(organisation, action, message, f"#group-{group.id}")


@bp.post("/organisations/<int:organisation_id>/groups/<int:group_id>/grants")
def grant_group(organisation_id, group_id):
    organisation = organisations.org_for(current_user, organisation_id, need="admin")
    group = organisations.group_of(organisation, group_id)

    def act():
        until = sharing.parse_until(request.form.get("until", ""))
        organisations.grant_group(
            current_user,
            organisation,
            group,
            request.form.get("role", ""),
            email=request.form.get("email", "")[:254].strip(),
            organisation_name=request.form.get("organisation", "")[:100],
            expires_at=until,
        )

    return _done(organisation, act, _("Access to %(name)s given.", name=group.name), f"#group-{group.id}")


@bp.post("/organisations/<int:organisation_id>/groups/<int:group_id>/alerts")
def group_alerts(organisation_id, group_id):
    """Where the alerts of the group's devices go: its people, or the admins (the default)."""
    organisation = organisations.org_for(current_user, organisation_id, need="admin")
    group = organisations.group_of(organisation, group_id)
    to_members = request.form.get("to_members") == "yes"
    return _done(
        organisation,
        lambda: alert_recipients.set_group_routing(current_user, organisation, group, to_members),
        _("The alerts of %(name)s go to its people now.", name=group.name)
        if to_members
        else _("The alerts of %(name)s go to the admins now.", name=group.name),
        f"#group-{group.id}",
    )


@bp.post("/organisations/<int:organisation_id>/grants/<int:grant_id>/revoke")
def revoke_grant(organisation_id, grant_id):
    organisation = organisations.org_for(current_user, organisation_id, need="admin")
    return _done(
        organisation,
        lambda: organisations.revoke_group_grant(current_user, organisation, grant_id),
        _("The access was revoked."),
        "#groups",
        confirm=_("Revoke this access? It ends at once."),
    )
