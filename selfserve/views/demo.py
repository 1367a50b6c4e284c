"""Demo only: a local mailbox showing the emails the site sent (registered when DEMO is on)."""

import re

import pyotp
from flask import Blueprint
from flask import current_app
from flask import render_template
from markupsafe import Markup
from markupsafe import escape

from selfserve import demo
from selfserve import device_models
from selfserve.demo import read_mailbox
from selfserve.security import public

bp = Blueprint("demo", __name__, url_prefix="/demo")

_URL = re.compile(r"https?://[^\s<>\"]+")


@bp.app_template_filter("linkify")
def linkify(text):
    """Escape `text`, keep its line breaks and make its http(s) links clickable."""
    escaped = str(escape(text))
    linked = _URL.sub(lambda m: f'<a href="{m.group(0)}">{m.group(0)}</a>', escaped)
    return Markup(linked.replace("\n", "<br>\n"))


def demo_labels():
    """What the demo devices' labels say (serial, setup code, QR link), so someone with only a
    browser can add one. Demo only: real setup codes are never shown in a page."""
    import json

    from selfserve.services import registry

    with open(demo.FIXTURES, encoding="utf-8") as handle:
        fixtures = json.load(handle)["devices"]
    labels = []
    for device in fixtures:
        notes = []
        if not device.get("online", True):
            notes.append("offline")
        if device.get("latency"):
            notes.append(f"slow ({device['latency']} s)")
        labels.append(
            {
                "serial": device["serial_number"],
                "code": device["setup_code"],
                "model": device_models.label(device["model"]),
                "notes": ", ".join(notes),
                "link": registry.label_url(device["serial_number"], device["setup_code"]),
            }
        )
    return labels


@bp.get("/mailbox")
@public
def mailbox():
    messages = read_mailbox(current_app.config.get("DEMO_MAILBOX_DIR"))
    staff_code = pyotp.TOTP(demo.DEMO_STAFF_TOTP_SECRET).now()
    return render_template(
        "demo/mailbox.html",
        mails=messages,
        labels=demo_labels(),
        staff_email=demo.DEMO_STAFF_EMAIL,
        staff_password=demo.DEMO_STAFF_PASSWORD,
        staff_code=staff_code,
    )
