"""Configuration: defaults in code, deployment values and secrets from SELFSERVE_* env vars.

Every key in DEFAULTS can be overridden by an environment variable of the same name with the
prefix SELFSERVE_ (SELFSERVE_DATABASE_URL, SELFSERVE_PARTICLE_CLIENT_SECRET, ...). Values are
parsed to the type of their default.
"""

import os

# Demo settings of the bundled Particle Cloud simulator. They are public on purpose: the demo
# and the tests run against a local simulator, never against the real cloud.
DEMO_PARTICLE_PRODUCT = "4242"
DEMO_PARTICLE_CLIENT_ID = "selfserve-server-4242"
DEMO_PARTICLE_CLIENT_SECRET = "5e1f5e7e5e1f5e7e5e1f5e7e5e1f5e7e5e1f5e7e"

DEFAULTS = {
    "SECRET_KEY": "",
    # Key for encrypting cached Particle tokens at rest; derived from SECRET_KEY when empty.
    "TOKEN_ENCRYPTION_KEY": "",
    "DATABASE_URL": "sqlite:///instance/selfserve.db",
    "BASE_URL": "",  # used in emails; the request's host when empty
    # Particle Cloud
    "PARTICLE_API_URL": "https://api.particle.io",
    "PARTICLE_PRODUCT": "",
    "PARTICLE_CLIENT_ID": "",
    "PARTICLE_CLIENT_SECRET": "",
    "PARTICLE_CONNECT_TIMEOUT": 3.05,
    "PARTICLE_READ_TIMEOUT": 20.0,
    "PARTICLE_CUSTOMER_TOKEN_LIFETIME": 86400,
    # Live values: how long one upstream read serves every viewer, how long an offline
    # device is remembered so polls don't pay the timeout again, how often pages poll.
    "VALUES_CACHE_SECONDS": 4.0,
    "OFFLINE_REMEMBER_SECONDS": 60.0,
    "VALUES_POLL_SECONDS": 5,
    # Device events (README "Live by events"): values from a device's own events need no read
    # from Particle for its heartbeat plus EVENTS_GRACE_SECONDS; EVENTS_DEFAULT_HEARTBEAT_SECONDS
    # when an event doesn't say its heartbeat.
    "EVENTS_GRACE_SECONDS": 60.0,
    "EVENTS_DEFAULT_HEARTBEAT_SECONDS": 300.0,
    # The product webhook's secret (HTTP Basic password, or "Authorization: Bearer <secret>");
    # empty: the webhook endpoint answers 404.
    "PARTICLE_WEBHOOK_SECRET": "",
    "PARTICLE_WEBHOOK_MAX_BYTES": 65536,
    # The product event stream: one listener per deployment (a lease in the database).
    "EVENT_STREAM": True,
    # Pages: server-sent events push changes; pages also poll our cache every
    # PUSH_FALLBACK_POLL_SECONDS while pushed (VALUES_POLL_SECONDS when the push can't be held).
    "PUSH_ENABLED": True,
    "PUSH_FALLBACK_POLL_SECONDS": 60,
    # Fan-out of changes between workers and machines: "" = PostgreSQL LISTEN/NOTIFY when the
    # database is PostgreSQL, else in-process only; "redis://host:6379/0" = Redis pub/sub.
    "PUSH_BROKER_URL": "",
    # History: raw value changes kept this many days, hourly rollups (min, max, mean, last)
    # this many (396 = 13 months); the background sweep rolls up and purges.
    "HISTORY_RAW_DAYS": 7.0,
    "HISTORY_ROLLUP_DAYS": 396.0,
    # Mail (SMTP)
    "MAIL_SERVER": "localhost",
    "MAIL_PORT": 25,
    "MAIL_USE_TLS": False,
    "MAIL_USE_SSL": False,
    "MAIL_USERNAME": "",
    "MAIL_PASSWORD": "",
    "MAIL_SENDER": "selfserve <no-reply@selfserve.example>",
    "MAIL_TIMEOUT": 10.0,
    # How customers reach support: shown on the Help page (linked from every page's footer)
    # and in emails. SUPPORT_PHONE is shown only when set (e.g. "+44 20 7946 0000").
    "SUPPORT_EMAIL": "support@selfserve.example",
    "SUPPORT_PHONE": "",
    # Rate limits: "memory://" per process; "redis://host:port" shares them across workers.
    "RATELIMIT_STORAGE_URI": "memory://",
    # Reverse proxies in front of the app that append to X-Forwarded-For and set
    # X-Forwarded-Proto (1 behind one TLS proxy). 0 ignores those headers: a client could
    # forge them. Rate limits and the audit trail key on the client address this yields.
    "TRUSTED_PROXIES": 0,
    # Sessions
    "SESSION_IDLE_SECONDS": 30 * 60,
    "SESSION_ABSOLUTE_SECONDS": 12 * 3600,
    # Background sweep that resumes interrupted multi-step work (provisioning, claims, ...).
    "SWEEP_SECONDS": 30,
    # Demo mode: local http, bundled simulator, emails shown locally.
    "DEMO": False,
    "DEMO_MAILBOX_DIR": "",
}


def _parse(value, default):
    if isinstance(default, bool):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def from_env(environ=None):
    """Return DEFAULTS overridden by SELFSERVE_* environment variables."""
    environ = os.environ if environ is None else environ
    config = dict(DEFAULTS)
    for key, default in DEFAULTS.items():
        raw = environ.get("SELFSERVE_" + key)
        if raw is not None:
            config[key] = _parse(raw, default)
    return config


def demo_particle_settings():
    """Settings that point the client at the bundled simulator's demo product."""
    return {
        "PARTICLE_PRODUCT": DEMO_PARTICLE_PRODUCT,
        "PARTICLE_CLIENT_ID": DEMO_PARTICLE_CLIENT_ID,
        "PARTICLE_CLIENT_SECRET": DEMO_PARTICLE_CLIENT_SECRET,
    }


class ConfigError(RuntimeError):
    """The app was asked to start for real without the settings it needs."""


def check_production(config):
    """Refuse to start outside tests and the demo without real secrets and Particle settings."""
    if config.get("TESTING") or config.get("DEMO"):
        return
    missing = [
        key
        for key in ("SECRET_KEY", "PARTICLE_PRODUCT", "PARTICLE_CLIENT_ID", "PARTICLE_CLIENT_SECRET")
        if not config.get(key)
    ]
    if missing:
        names = ", ".join("SELFSERVE_" + key for key in missing)
        raise ConfigError(f"Refusing to start: set {names} (or run the demo: bin/demo).")
    if len(config["SECRET_KEY"]) < 32:
        raise ConfigError("Refusing to start: SELFSERVE_SECRET_KEY must be at least 32 characters.")
    # Without BASE_URL, emailed links (verify, password reset, transfers) would be built from
    # the request's Host header, which the sender of the request chooses: a reset requested
    # with "Host: evil.example" would mail the victim a link that hands its token to evil.example.
    if not str(config.get("BASE_URL") or "").startswith(("https://", "http://")):
        raise ConfigError(
            "Refusing to start: set SELFSERVE_BASE_URL to the site's public address (https://...): "
            "emailed links are built from it."
        )
