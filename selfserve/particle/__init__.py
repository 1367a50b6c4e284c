"""The one way to talk to the Particle Cloud (client.py) and a local stand-in (simulator.py)."""

from flask import current_app
from flask import g
from flask import has_request_context

from selfserve.particle.client import ParticleClient

# Requests a read-only request may still send: minting a token is how a read gets authorised.
_ALLOWED_WHILE_READ_ONLY = frozenset({("POST", "/oauth/token")})


class ReadOnlyRequest(Exception):
    """A Particle write was attempted during a read-only request (a staff "view as customer").

    Not a ParticleError on purpose: no service may mistake it for a cloud failure and carry on.
    """

    user_message = "This is a read-only view: nothing can be changed on the device cloud."


def forbid_writes():
    """Refuse every Particle write for the rest of this request (reads still work)."""
    g.particle_read_only = True


def writes_forbidden():
    return has_request_context() and g.get("particle_read_only", False)


class GuardedParticleClient(ParticleClient):
    """ParticleClient with a second wall for read-only requests: any method other than GET
    (except token minting) raises ReadOnlyRequest before anything is sent."""

    def _request(self, method, path, **kwargs):
        if method != "GET" and (method, path) not in _ALLOWED_WHILE_READ_ONLY and writes_forbidden():
            raise ReadOnlyRequest(f"{method} {path} refused: read-only request")
        return super()._request(method, path, **kwargs)


def init_app(app):
    """Build the app's client from config; tokens are cached in the database, encrypted."""
    from selfserve.crypto import fernet_for
    from selfserve.particle.token_store import DatabaseTokenStore

    app.extensions["particle"] = GuardedParticleClient(
        api_url=app.config["PARTICLE_API_URL"],
        product=app.config["PARTICLE_PRODUCT"],
        client_id=app.config["PARTICLE_CLIENT_ID"],
        client_secret=app.config["PARTICLE_CLIENT_SECRET"],
        connect_timeout=app.config["PARTICLE_CONNECT_TIMEOUT"],
        read_timeout=app.config["PARTICLE_READ_TIMEOUT"],
        customer_token_lifetime=app.config["PARTICLE_CUSTOMER_TOKEN_LIFETIME"],
        token_store=DatabaseTokenStore(fernet_for(app.config)),
    )

    @app.errorhandler(ReadOnlyRequest)
    def _read_only(exc):
        from selfserve import htmx

        return htmx.error_response(exc.user_message, 403, "Read-only view")


def get_client():
    """The app's ParticleClient."""
    return current_app.extensions["particle"]
