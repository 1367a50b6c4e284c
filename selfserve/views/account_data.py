"""A person's own data: download it (JSON, or a zip of CSV files), delete the account (with a
grace period to undo it), and support's list of pending deletions. Thin: parse input, call one
service, render or redirect. The rules are in services/data_export.py and services/erasure.py.
"""

from flask import Blueprint
from flask import Response
from flask_babel import gettext as _
from flask_login import current_user

from selfserve import htmx
from selfserve import models
from selfserve.security import READ_ONLY_MESSAGE
from selfserve.services import data_export

bp = Blueprint("account_data", __name__)


def _me():
    return current_user._get_current_object()


def _viewing_as_support():
    return getattr(current_user, "staff_view", None) is not None


def _streamed(chunks, user):
    """The body, produced while the response is sent (after the request ended): it holds a
    pooled connection of its own while it reads, and hands it back when done or abandoned."""
    opened = models.db.is_closed()
    if opened:
        models.db.connect()
    try:
        yield from chunks(user)
    finally:
        if opened and not models.db.is_closed():
            models.db.close()


def _download(chunks, mimetype, extension):
    user = _me()
    response = Response(_streamed(chunks, user), mimetype=mimetype)
    response.headers["Content-Disposition"] = _(
        'attachment; filename="%(filename)s"', filename=data_export.filename(user, extension)
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
