"""The one way to talk to the Particle Cloud (client.py) and a local stand-in (simulator.py)."""
from flask import current_app


def init_app(app):
    """Build the app's client from config; tokens are cached in the database, encrypted."""
    from selfserve.crypto import fernet_for
    from selfserve.particle.client import ParticleClient
    from selfserve.particle.token_store import DatabaseTokenStore

    app.extensions["particle"] = ParticleClient(
        api_url=app.config["PARTICLE_API_URL"],
        product=app.config["PARTICLE_PRODUCT"],
        client_id=app.config["PARTICLE_CLIENT_ID"],
        client_secret=app.config["PARTICLE_CLIENT_SECRET"],
        connect_timeout=app.config["PARTICLE_CONNECT_TIMEOUT"],
        read_timeout=app.config["PARTICLE_READ_TIMEOUT"],
        customer_token_lifetime=app.config["PARTICLE_CUSTOMER_TOKEN_LIFETIME"],
        token_store=DatabaseTokenStore(fernet_for(app.config)),
    )


def get_client():
    """The app's ParticleClient."""
    return current_app.extensions["particle"]
