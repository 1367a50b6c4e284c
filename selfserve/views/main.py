"""The landing page and a health check."""
from flask import Blueprint
from flask import redirect
from flask import render_template
from flask import url_for
from flask_login import current_user

from selfserve.security import public

bp = Blueprint("main", __name__)


@bp.get("/")
@public
def index():
    if current_user.is_authenticated:
        return redirect(url_for("devices.dashboard"))
    return render_template("main/index.html")


@bp.get("/healthz")
@public
def healthz():
    return {"ok": True}
