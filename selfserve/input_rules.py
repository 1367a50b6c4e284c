"""One input rule for the whole site, applied before any view, limiter or CSRF check runs.

- Text in a query string or a form may not hold NUL or other control characters (Unicode
  category Cc: C0, DEL, C1). PostgreSQL refuses NUL in text outright, and no field of ours
  has a use for the others; they are refused with a 400 and a message before anything is
  read from or written to the database (so no session is rotated, no row half-written).
  Form values may keep tab, CR and LF (what a browser sends for a multi-line box); a query
  string, a field name and any `next` value may not (a CR/LF there ends up in a header).
- Integer route converters are bounded to what every database stores (64-bit signed): a
  larger id is a 404 like any id that doesn't exist, not an OverflowError deep in SQLite.
"""

import unicodedata

from flask import request
from werkzeug.routing import IntegerConverter

from selfserve import htmx
from selfserve.i18n import lazy_text as _l

# The largest id any of our tables can hold (BIGINT / SQLite INTEGER).
MAX_ID = 2**63 - 1

# Allowed in form values only (a textarea's line breaks, a pasted tab).
_FORM_WHITESPACE = frozenset("\t\r\n")

# Fields whose value becomes part of a URL or a header: no line breaks even in a form.
_STRICT_FIELDS = frozenset({"next"})

CONTROL_CHARACTER_MESSAGE = _l(
    "Something you entered contains a character we can't accept (an invisible control "
    "character such as NUL or a line break). Please remove it and try again."
)


class BoundedIntConverter(IntegerConverter):
    """`<int:...>` that matches 0 .. 2**63-1 only (a `max` given in the rule still wins)."""

    def __init__(self, url_map, fixed_digits=0, min=None, max=None, signed=False):
        super().__init__(url_map, fixed_digits=fixed_digits, min=min, max=MAX_ID if max is None else max)


def has_control_character(text, allowed=frozenset()):
    """True if `text` holds a control character (Unicode Cc) other than those `allowed`."""
    return any(unicodedata.category(ch) == "Cc" and ch not in allowed for ch in text)


def request_problem():
    """The name of the first query or form field (or field name) breaking the rule, or None."""
    for key, value in request.args.items(multi=True):
        if has_control_character(key) or has_control_character(value):
            return key
    if request.method in ("POST", "PUT", "PATCH", "DELETE"):
        for key, value in request.form.items(multi=True):
            allowed = frozenset() if key in _STRICT_FIELDS else _FORM_WHITESPACE
            if has_control_character(key) or has_control_character(value, allowed):
                return key
    return None


def init_app(app):
    """Install the converter (before any blueprint adds rules) and the request check (before
    every other before_request hook that reads input: the limiter, CSRF, the login)."""
    app.url_map.converters["int"] = BoundedIntConverter

    @app.before_request
    def _refuse_control_characters():
        if request_problem() is not None:
            return htmx.error_response(CONTROL_CHARACTER_MESSAGE, 400, _l("Character not accepted"))
        return None
