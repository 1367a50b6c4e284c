"""The product webhook: Particle POSTs every product device's events here (README, "Taking the
events in"). A machine endpoint: JSON answers, no session, no CSRF (Particle has neither); the
shared secret is the authentication, compared in constant time.

Particle throttles a host that answers more errors than successes (reference §16), so every
authenticated, well-formed event gets a 200, also when it is ignored (unknown device or event
name, a repeat, older than what we hold): the answer says which.
"""

import hmac
import json

from flask import Blueprint
from flask import current_app
from flask import jsonify
from flask import request

from selfserve.security import csrf
from selfserve.security import limiter
from selfserve.security import public
from selfserve.security import sessionless
from selfserve.services import device_events

bp = Blueprint("hooks", __name__)


def _answer(status, **body):
    response = jsonify(body)
    response.status_code = status
    return response


def _authorized(secret):
    """The secret as HTTP Basic password (any user name) or `Authorization: Bearer <secret>`."""
    expected = secret.encode()
    header = request.headers.get("Authorization", "")
    offered = b""
    if header[:7].lower() == "bearer ":
        offered = header[7:].strip().encode()
    elif request.authorization is not None and request.authorization.type == "basic":
        offered = (request.authorization.password or "").encode()
    # compare_digest on bytes takes the same time wherever they differ.
    return hmac.compare_digest(offered, expected)


def _body():
    """The event as a dict from a JSON or form body; None when malformed. Reads at most
    PARTICLE_WEBHOOK_MAX_BYTES + 1 bytes (the caller checked the declared length)."""
    limit = int(current_app.config["PARTICLE_WEBHOOK_MAX_BYTES"])
    if request.mimetype == "application/x-www-form-urlencoded":
        return request.form.to_dict()
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        return "too_large"
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


@bp.post("/hooks/particle")
@public
@sessionless
@csrf.exempt
# No limit applies to it (Particle paces its own deliveries and the secret shuts others out);
# exempt, the limiter doesn't spend its per-request bookkeeping on every event either.
@limiter.exempt
def particle():
    secret = current_app.config.get("PARTICLE_WEBHOOK_SECRET") or ""
    if not secret:
        return _answer(404, ok=False, error="No webhook is configured.")
    if not _authorized(secret):
        response = _answer(401, ok=False, error="Wrong or missing secret.")
        response.headers["WWW-Authenticate"] = 'Basic realm="particle-webhook"'
        return response
    limit = int(current_app.config["PARTICLE_WEBHOOK_MAX_BYTES"])
    if request.content_length is not None and request.content_length > limit:
        return _answer(413, ok=False, error=f"The body is larger than {limit} bytes.")
    body = _body()
    if body == "too_large":
        return _answer(413, ok=False, error=f"The body is larger than {limit} bytes.")
    if body is None or not isinstance(body.get("event"), str):
        return _answer(
            400, ok=False, error='Expected a JSON object with "event", "data", "coreid", "published_at".'
        )
    result = device_events.ingest(
        body.get("event"), body.get("data"), body.get("coreid"), body.get("published_at")
    )
    return _answer(200, ok=True, result=result)
