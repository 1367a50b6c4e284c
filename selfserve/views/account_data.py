"""A person's own data: download it (JSON, or a zip of CSV files), delete the account (with a
grace period to undo it), and support's list of pending deletions. Thin: parse input, call one
service, render or redirect. The rules are in services/data_export.py and services/erasure.py.
"""

from flask import Blueprint
from flask import Response
from flask import current_app
from flask import flash
from flask import render_template
from flask import request
from flask import session
from flask import stream_with_context
from flask import url_for
from flask_babel import format_date
from flask_babel import gettext as _
from flask_login import current_user
from flask_login import user_logged_in

from selfserve import htmx
from selfserve.security import READ_ONLY_MESSAGE
from selfserve.security import end_login_session
from selfserve.security import limiter
from selfserve.services import audit
from selfserve.services import data_export
from selfserve.services import erasure
from selfserve.services.staff import staff_required

bp = Blueprint("account_data", __name__)


def _me():
    return current_user._get_current_object()


def _viewing_as_support():
    return getattr(current_user, "staff_view", None) is not None


def _download(chunks, mimetype, extension):
    user = _me()
    # The body is produced while the response is sent: stream_with_context keeps the request
    # (its language, and the database connection the request holds until it ends) meanwhile.
    response = Response(stream_with_context(chunks(user)), mimetype=mimetype)
    response.headers["Content-Disposition"] = (
        f'attachment; filename="{data_export.filename(user, extension)}"'
    )
    return response


# --- export ------------------------------------------------------------------------------------------


@bp.get("/account/data.json")
def export_json():
    # A GET, so the read-only wall lets it through: a copy of someone's data is theirs alone,
    # so support viewing the account gets the site's read-only refusal here.
    if _viewing_as_support():
        return htmx.error_response(READ_ONLY_MESSAGE, 403, _("Read-only view"))
    return _download(data_export.json_chunks, "application/json", "json")


@bp.get("/account/data.zip")
def export_csv():
    if _viewing_as_support():
        return htmx.error_response(READ_ONLY_MESSAGE, 403, _("Read-only view"))
    return _download(data_export.csv_zip_chunks, "application/zip", "zip")


# --- delete the account ------------------------------------------------------------------------------


def _account_key():
    return "account:" + str(current_user.id)


def _confirm_page(errors=None, status=200):
    return render_template(
        "account_data/delete.html",
        errors=errors or {},
        grace_days=erasure.grace().days,
        organisations=[m for m in _memberships()],
    ), status


def _memberships():
    from selfserve.services import organisations

    return organisations.organisations_of(_me())


@bp.route("/account/delete", methods=["GET", "POST"])
@limiter.limit(
    lambda: current_app.config["RATE_LIMIT_ACCOUNT_CHANGE"], methods=["POST"], key_func=_account_key
)
def delete():
    """GET: what deleting does, and the password to confirm (a plain form: no JavaScript
    needed). POST: schedule it; every session ends, this one too."""
    if request.method == "GET":
        if erasure.pending_of(_me()) is not None:
            return htmx.redirect(url_for("account_data.deletion_scheduled"))
        return _confirm_page()
    try:
        deletion = erasure.schedule(_me(), request.form.get("password", ""))
    except erasure.ErasureError as exc:
        if exc.field:
            return _confirm_page({exc.field: exc.message}, exc.status)
        raise
    end_login_session()
    flash(
        _(
            "Your account will be deleted on %(date)s. You are signed out everywhere; sign in before then to undo it.",
            date=format_date(deletion.due_at, "long"),
        ),
        "info",
    )
    return htmx.redirect(url_for("accounts.login"))


@bp.get("/account/delete/scheduled")
def deletion_scheduled():
    deletion = erasure.pending_of(_me())
    if deletion is None:
        session.pop(DELETION_PENDING, None)
        return htmx.redirect(url_for("accounts.settings"))
    return render_template("account_data/scheduled.html", deletion=deletion)


@bp.post("/account/delete/undo")
def undo_delete():
    # Only the person, signed in: staff viewing the account are refused by the read-only wall.
    undone = erasure.cancel(_me())
    session.pop(DELETION_PENDING, None)
    if undone:
        flash(_("Your account will not be deleted. Welcome back."), "success")
    return htmx.redirect(url_for("accounts.settings"))


# --- while a deletion is scheduled, a sign-in lands on its page ---------------------------------------

# Session key set at sign-in when the account has a scheduled deletion: every page then shows
# the deletion's page until the person undoes it or signs out (a session flag, so other
# people's requests pay no query for it).
DELETION_PENDING = "deletion_pending"
_OPEN_WHILE_PENDING = frozenset(
    {
        "account_data.deletion_scheduled",
        "account_data.undo_delete",
        "account_data.export_json",
        "account_data.export_csv",
        "accounts.logout",
        "static",
    }
)


@user_logged_in.connect
def _remember_pending_deletion(sender, user, **extra):
    """Every way in (password, emailed sign-in link) passes here: a scheduled deletion marks
    the session; an account whose deletion already started gets no session at all (a password
    reset mailed before it started must not let anyone back in while it runs)."""
    if getattr(user, "role", None) != "customer":
        return
    state = erasure.state_of(user)
    if state == erasure.SCHEDULED:
        session[DELETION_PENDING] = True
    elif state == erasure.RUNNING:  # once done, the account is no longer a customer's
        end_login_session()
        flash(_("This account is being deleted, as its owner asked."), "error")


@bp.before_app_request
def _show_pending_deletion():
    if not session.get(DELETION_PENDING) or request.endpoint in _OPEN_WHILE_PENDING:
        return None
    if request.endpoint is None or not current_user.is_authenticated:
        return None
    if erasure.pending_of(_me()) is None:  # undone elsewhere (another browser)
        session.pop(DELETION_PENDING, None)
        return None
    return htmx.redirect(url_for("account_data.deletion_scheduled"))


# --- support: pending deletions ----------------------------------------------------------------------


@bp.get("/support/deletions")
@staff_required
def pending_deletions():
    return render_template(
        "account_data/support_deletions.html",
        pending=erasure.pending_for_staff(),
        done=erasure.recently_done(),
        label=audit.anonymous_name,
        step_labels=erasure.STEP_LABELS,
    )
