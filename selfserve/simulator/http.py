"""HTTP plumbing shared by the simulator's Particle API and control API: answers, bodies."""

import json

from werkzeug.wrappers import Response

JSON_TYPE = "application/json; charset=utf-8"
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


class Answer(Exception):
    """Raised anywhere in a handler to answer at once with this status, body and headers."""

    def __init__(self, status, body, headers=None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}

    def response(self):
        return json_response(self.status, self.body, self.headers)


def dumps(body):
    return json.dumps(body, separators=(",", ":"))


def json_response(status, body, headers=None):
    """Compact JSON, `application/json; charset=utf-8`, as the 2017+ cloud answers."""
    response = Response(dumps(body), status=status, content_type=JSON_TYPE)
    response.headers["Access-Control-Allow-Origin"] = "*"
    for name, value in (headers or {}).items():
        response.headers[name] = str(value)
    return response


def text_response(status, text, headers=None):
    response = Response(text, status=status, content_type="text/plain; charset=utf-8")
    response.headers["Access-Control-Allow-Origin"] = "*"
    for name, value in (headers or {}).items():
        response.headers[name] = str(value)
    return response


def oauth_error(error, description, status=None, headers=None):
    """The OAuth library's error family (fixed statuses, no-store headers)."""
    statuses = {
        "invalid_request": 400,
        "invalid_client": 400,
        "invalid_grant": 400,
        "invalid_scope": 400,
        "unauthorized_client": 400,
        "invalid_token": 401,
        "rate_limit_exceeded": 429,
        "server_error": 503,
    }
    all_headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if error == "invalid_client":
        all_headers["WWW-Authenticate"] = 'Basic realm="Service"'
    all_headers.update(headers or {})
    return Answer(status or statuses[error], {"error": error, "error_description": description}, all_headers)


def parse_body(request):
    """The request body as a dict of values and how it came: ("json" | "form" | None).

    /v1 endpoints take JSON and form bodies alike. Values keep their JSON types.
    """
    mimetype = request.mimetype
    if mimetype == "application/json" or mimetype.endswith("+json"):
        raw = request.get_data(cache=True)
        if not raw.strip():
            return {}, "json"
        try:
            data = json.loads(raw)
        except ValueError:
            # Invented wording: the real cloud's answer to broken JSON is not recorded.
            raise Answer(400, {"ok": False, "error": "Invalid JSON body"})
        if not isinstance(data, dict):
            raise Answer(400, {"ok": False, "error": "Invalid JSON body"})
        return data, "json"
    if mimetype in FORM_TYPES:
        return request.form.to_dict(), "form"
    return {}, None


def text_value(value):
    """A body value as text (JSON bodies may carry numbers or booleans)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def truthy(value):
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")
