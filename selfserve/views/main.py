"""The landing page, the Help page (how to reach support) and a health check."""

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


@bp.get("/help", endpoint="help")
@public
def help_page():
    """How to reach support and what to tell them; public, so people who can't sign in find it."""
    return render_template("main/help.html")


@bp.get("/healthz")
@public
def healthz():
    return {"ok": True}
