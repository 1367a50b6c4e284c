"""Configuration: defaults in code, deployment values and secrets from SELFSERVE_* env vars.

Every setting the code reads is a key of DEFAULTS (tests/test_config.py checks it), documented
in the README's settings table. Each can be overridden by an environment variable of the same
name with the prefix SELFSERVE_ (SELFSERVE_DATABASE_URL, SELFSERVE_RATE_LIMIT_LOGIN, ...), parsed
to the type of its default (a bad value refuses to start with a clear error).
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
    # Connection pool of each worker process: at most this many connections (request threads +
    # live-value readers + the sweep; with PostgreSQL keep workers x size under its
    # max_connections), each replaced after RECYCLE seconds; a caller waits up to WAIT seconds.
    "DATABASE_POOL_SIZE": 32,
    "DATABASE_POOL_RECYCLE_SECONDS": 300,
    "DATABASE_POOL_WAIT_SECONDS": 10,
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
    # The listener's lease (one holder per deployment), how often others try to take it over,
    # the least time between two stream opens (Particle allows 100 per 5 minutes per address),
    # and how long a silent stream is trusted before it is opened again.
    "EVENT_STREAM_LEASE_SECONDS": 40.0,
    "EVENT_STREAM_LEASE_POLL_SECONDS": 10.0,
    "EVENT_STREAM_MIN_OPEN_SECONDS": 6.0,
    "EVENT_STREAM_SILENCE_SECONDS": 35.0,
    # Pages: server-sent events push changes; pages also poll our cache every
    # PUSH_FALLBACK_POLL_SECONDS while pushed (VALUES_POLL_SECONDS when the push can't be held).
    "PUSH_ENABLED": True,
    "PUSH_FALLBACK_POLL_SECONDS": 60,
    # Fan-out of changes between workers and machines: "" = PostgreSQL LISTEN/NOTIFY when the
    # database is PostgreSQL, else in-process only; "redis://host:6379/0" = Redis pub/sub.
    "PUSH_BROKER_URL": "",
    # An open page's stream ends after this long (the browser opens a new one); the session and
    # the device are checked again at every push anyway.
    "PUSH_STREAM_MAX_SECONDS": 3600.0,
    # History: raw value changes kept this many days, hourly rollups (min, max, mean, last)
    # this many (396 = 13 months); the background sweep rolls up and purges.
    "HISTORY_RAW_DAYS": 7.0,
    "HISTORY_ROLLUP_DAYS": 396.0,
    # Alerts: an episode that ends and comes back within ALERT_REOPEN_SECONDS is the same
    # episode (and its "resolved" waits that long); reminders while one lasts; a release or
    # claim step unfinished this long is "stuck".
    "ALERT_REOPEN_SECONDS": 600.0,
    "ALERT_REMINDER_HOURS": 24.0,
    "ALERT_STUCK_MINUTES": 60.0,
    # Sharing: the access a device's dealer (named by the registry) asks for at claim: "none"
    # (don't ask), "viewer" or "operator". The homeowner chooses; "no access" is the default.
    "DEALER_ACCESS_AT_CLAIM": "viewer",
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
    # Reverse proxies in front of the app that append to X-Forwarded-For and set
    # X-Forwarded-Proto (1 behind one TLS proxy). 0 ignores those headers: a client could
    # forge them. Rate limits and the audit trail key on the client address this yields.
    "TRUSTED_PROXIES": 0,
    # Sessions. The cookie is Secure (sent over https only); turn it off only where the site
    # is served over plain http: a closed intranet, the demo, the tests, the bench.
    "SESSION_IDLE_SECONDS": 30 * 60,
    "SESSION_ABSOLUTE_SECONDS": 12 * 3600,
    "SESSION_COOKIE_SECURE": True,
    # Argon2id cost of password and setup-code hashes: OWASP's recommended profile (19 MiB, 2
    # passes, 1 lane). Raise it if you like; lower is refused outside the tests.
    "PASSWORD_HASH_MEMORY_KIB": 19 * 1024,
    "PASSWORD_HASH_TIME_COST": 2,
    "PASSWORD_HASH_PARALLELISM": 1,
    # A support person's read-only view of a customer's account ends by itself after this.
    "STAFF_VIEW_MINUTES": 30,
    # --- Rate limits -------------------------------------------------------------------------
    # Where the counters live: "memory://" counts in each process; "redis://host:port" shares
    # them across workers and machines (needed with more than one worker).
    "RATELIMIT_STORAGE_URI": "memory://",
    # Requests (Flask-Limiter syntax "N per period", several joined by "; "), counted per client
    # address (ip), per address typed into the form (email), or per signed-in account.
    "RATE_LIMIT_LOGIN": "20 per minute; 200 per hour",  # ip
    # Failed sign-ins are counted per address typed AND client address together (a guesser
    # locks out only themselves), under a slower ceiling per typed address from anywhere (many
    # guessers at once); an owner caught by either can ask for a sign-in link by email.
    "RATE_LIMIT_LOGIN_EMAIL_SOURCE": "10 per 15 minutes",  # email + ip, failed attempts only
    "RATE_LIMIT_LOGIN_EMAIL": "30 per hour; 100 per day",  # email, failed attempts only
    "RATE_LIMIT_SIGN_IN_LINK": "10 per hour",  # ip: asking for a sign-in link, or using one
    "RATE_LIMIT_SIGN_IN_LINK_EMAIL": "3 per hour",  # email: sign-in links sent
    "RATE_LIMIT_SIGNUP": "20 per hour",  # ip
    "RATE_LIMIT_SIGNUP_EMAIL": "3 per hour",  # email
    "RATE_LIMIT_FORGOT": "20 per hour",  # ip
    "RATE_LIMIT_FORGOT_EMAIL": "3 per hour",  # email
    "RATE_LIMIT_RESET": "20 per hour",  # ip
    "RATE_LIMIT_RESEND": "3 per 15 minutes",  # account
    "RATE_LIMIT_RESEND_IP": "30 per hour",  # ip
    "RATE_LIMIT_ACCOUNT_CHANGE": "10 per hour",  # account: guessing the current password
    "RATE_LIMIT_SECOND_FACTOR": "10 per 5 minutes",  # staff account: guessing the TOTP code
    "RATE_LIMIT_TRANSFER_REQUEST": "5 per hour",  # account, and ip: asking for someone's device
    # Claims (adding a device by its label), right code or wrong, before any Argon2 check: per
    # account, and per serial number from every account together. Wrong codes are also
    # counted on their own, tighter, in the database (CLAIM_MAX_FAILURES_* below).
    "RATE_LIMIT_CLAIM": "10 per minute; 30 per hour",  # account
    "RATE_LIMIT_CLAIM_SERIAL": "10 per hour",  # serial number
    # Asking for other people's devices is rare: at most this many requests per account a day.
    "TRANSFER_REQUESTS_PER_DAY": 3,
    # A request for a device that changed hands less than this many days before it was asked
    # for (or from someone who owned it before) never completes on silence: the owner agrees,
    # or support decides (services/transfers/common.py needs_owner_answer).
    "TRANSFER_RECENT_OWNER_CHANGE_DAYS": 30,
    # Account deletion: days between asking and the deletion (signing in meanwhile undoes it).
    "ACCOUNT_DELETION_GRACE_DAYS": 7.0,
    # Wrong setup codes: a claim is refused after this many failures within the window, per
    # account and per serial number (counted in the database, so shared by every worker).
    "CLAIM_WINDOW_SECONDS": 15 * 60,
    "CLAIM_MAX_FAILURES_PER_ACCOUNT": 10,
    "CLAIM_MAX_FAILURES_PER_SERIAL": 5,
    # Calls to Particle made by `migrate-devices`: paced to this rate (well under Particle's
    # ~33/s per IP, leaving room for the site; 0 = unpaced), and a 429 waited out inline at most
    # this many times before the row is left to the sweep.
    "MIGRATION_REQUESTS_PER_SECOND": 20.0,
    "MIGRATION_MAX_INLINE_RATE_WAITS": 5,
    # --- Background work ---------------------------------------------------------------------
    # Background sweep that resumes interrupted multi-step work (provisioning, claims, ...).
    "SWEEP_SECONDS": 30,
    # A transfer's move retries a transient Particle failure while the person waits on the page,
    # after each of these pauses (seconds, comma-separated), before leaving it to the sweep.
    "TRANSFER_QUICK_RETRY_SECONDS": (0.2, 0.5),
    # The outbox (every email): a mail that keeps failing for a temporary reason (server down,
    # 4xx, timeout) is retried with backoff (5 s doubling up to 10 min) and marked failed after
    # this many attempts (20: about 2.5 hours); each round of the sender sends at most OUTBOX_BATCH.
    "OUTBOX_MAX_ATTEMPTS": 20,
    "OUTBOX_BATCH": 100,
    # Finished mail (sent, failed, skipped) is deleted this many days after it finished.
    "OUTBOX_KEEP_DAYS": 30.0,
    # Demo mode: local http, bundled simulator, emails shown locally.
    "DEMO": False,
    "DEMO_MAILBOX_DIR": "",
}

RATE_LIMIT_PREFIX = "RATE_LIMIT_"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _parse(key, raw, default):
    """`raw` (an environment variable's text) as the type of `default`; ConfigError if it isn't."""
    text = raw.strip()
    try:
        if isinstance(default, bool):
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        kind = {
            bool: "true or false",
            int: "a whole number",
            float: "a number",
            tuple: "comma-separated numbers",
        }
        raise ConfigError(f"SELFSERVE_{key}={raw!r} is not {kind[type(default)]}.") from None
    return raw


def from_env(environ=None):
    """Return DEFAULTS overridden by SELFSERVE_* environment variables, parsed to their types."""
    environ = os.environ if environ is None else environ
    config = dict(DEFAULTS)
    for key, default in DEFAULTS.items():
        raw = environ.get("SELFSERVE_" + key)
        if raw is not None:
            config[key] = _parse(key, raw, default)
    return config


def check_password_hashing(config):
    """Only the tests may hash passwords below OWASP's recommended Argon2id cost."""
    if config.get("TESTING"):
        return
    floors = {
        "PASSWORD_HASH_MEMORY_KIB": 19 * 1024,
        "PASSWORD_HASH_TIME_COST": 2,
        "PASSWORD_HASH_PARALLELISM": 1,
    }
    for key, floor in floors.items():
        if int(config[key]) < floor:
            raise ConfigError(
                f"Refusing to start: SELFSERVE_{key} below {floor} makes password hashes cheap to guess."
            )


def check_rate_limits(config):
    """Refuse to start with a rate limit Flask-Limiter can't read (it would only fail at the
    first request of that route, and fail open or closed depending on the version)."""
    from limits import parse_many

    for key in DEFAULTS:
        if key.startswith(RATE_LIMIT_PREFIX):
            try:
                parse_many(str(config[key]))
            except ValueError:
                raise ConfigError(
                    f"SELFSERVE_{key}={config[key]!r} is not a rate limit like '10 per hour' or '20 per minute; 200 per hour'."
                ) from None


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
