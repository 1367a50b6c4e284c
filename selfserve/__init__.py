"""selfserve: homeowners look after their own Particle-based controllers."""

import secrets

from flask import Flask

from selfserve import config as config_module


def create_app(test_config=None):
    """Build the app: config -> db -> i18n -> security -> particle -> mail -> views -> errors -> cli ->
    background jobs.

    `test_config` overrides everything (tests and the demo pass it); otherwise values come from
    the code defaults and SELFSERVE_* environment variables, and the app refuses to start
    without a real SECRET_KEY and Particle settings.
    """
    app = Flask(__name__, template_folder="../templates", static_folder="../static")
    settings = config_module.from_env()
    if test_config:
        settings.update(test_config)
    app.config.update(settings)
    config_module.check_production(app.config)
    config_module.check_rate_limits(app.config)
    config_module.check_password_hashing(app.config)

    from selfserve import passwords

    passwords.configure(
        memory_kib=app.config["PASSWORD_HASH_MEMORY_KIB"],
        time_cost=app.config["PASSWORD_HASH_TIME_COST"],
        parallelism=app.config["PASSWORD_HASH_PARALLELISM"],
    )
    if app.config.get("TRUSTED_PROXIES"):
        from werkzeug.middleware.proxy_fix import ProxyFix

        # Behind a proxy every request comes from the proxy's address: without this, per-address
        # rate limits would count the whole site as one client (and lock everyone out).
        hops = int(app.config["TRUSTED_PROXIES"])
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)
    if not app.config["SECRET_KEY"]:
        # Only tests and the demo get here (check_production refused everything else).
        app.config["SECRET_KEY"] = secrets.token_hex(32)
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        # SESSION_COOKIE_SECURE is a setting (config.DEFAULTS): on, unless the site is served
        # over plain http (the demo, the tests, the bench, a closed intranet).
        SESSION_COOKIE_NAME="selfserve_session",
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session
    )

    from selfserve import models

    models.init_db(
        app.config["DATABASE_URL"],
        pool_size=app.config["DATABASE_POOL_SIZE"],
        pool_recycle_seconds=app.config["DATABASE_POOL_RECYCLE_SECONDS"],
        pool_wait_seconds=app.config["DATABASE_POOL_WAIT_SECONDS"],
    )

    @app.before_request
    def _db_connect():
        models.db.connect(reuse_if_open=True)

    @app.teardown_request
    def _db_close(exc):
        if not models.db.is_closed():
            models.db.close()

    from selfserve import schema

    schema.init_app(app)

    from selfserve import i18n

    # Language and time zone of each page and email (Flask-Babel), before anything renders.
    i18n.init_app(app)

    from selfserve import security

    security.init_app(app)

    from selfserve import particle

    particle.init_app(app)

    from selfserve import mail

    mail.init_app(app)

    from selfserve import views

    views.register(app)

    from selfserve import htmx

    htmx.init_app(app)

    from selfserve import cli

    cli.init_app(app)

    from selfserve import push

    # Changes reach open pages of every worker (PostgreSQL NOTIFY, Redis, or in-process).
    push.init_app(app)

    _background_jobs(app)
    # Start-up used a pooled connection (the schema check): close it, so that no connection
    # is inherited by forked workers (gunicorn --preload) and shared between processes.
    models.close_idle_connections()
    return app


def _background_jobs(app):
    """The one list of background jobs (README "Background jobs" says how to add one). The
    sweep runs them in every web worker every SWEEP_SECONDS and in `flask sweep`."""
    from selfserve import event_stream
    from selfserve import sweep
    from selfserve.services import access
    from selfserve.services import alerts
    from selfserve.services import devices
    from selfserve.services import erasure
    from selfserve.services import history
    from selfserve.services import impersonation
    from selfserve.services import migration
    from selfserve.services import outbox
    from selfserve.services import provisioning
    from selfserve.services import transfers

    sweep.init_app(
        app,
        [
            sweep.Job(provisioning.resume_pending),  # accounts waiting for their Particle customer
            sweep.Job(devices.resume_pending),  # claims and releases a crash left half-done
            sweep.Job(devices.push_pending_names),  # renames whose answer was lost
            sweep.Job(transfers.resume_pending),  # transfer steps, offer expiry, unopposed requests
            sweep.Job(migration.resume_pending),  # devices in the field moving to their owners
            sweep.Job(impersonation.end_stale_views),  # support views past their time
            sweep.Job(history.maintain),  # hourly rollups of device values, retention (one at a time)
            sweep.Job(access.record_expired),  # audit grants that ended on their date (access ended then)
            sweep.Job(alerts.run_timers),  # offline past grace, stuck steps, reminders; sends due alerts
            sweep.Job(erasure.resume_pending),  # account deletions whose grace ended, and their steps
            sweep.Job(event_stream.keep_listening),  # this process's product event-stream listener
            sweep.Job(outbox.purge_finished),  # finished mail past OUTBOX_KEEP_DAYS
            # Last, so mail the jobs above queued leaves in the same round.
            sweep.Job(outbox.send_due),  # every email: queued with its change, sent with retries
        ],
    )
    # Mail leaves as soon as the transaction that queued it commits: a sender thread per web
    # worker, started with the sweep (the sweep's send_due is the fallback).
    outbox.init_app(app)
    # Alerts leave as soon as they are decided: a sender thread per web worker, started with
    # the sweep at the first request (the sweep's run_timers is the fallback).
    alerts.init_app(app)
    # A verified owner gets the devices they were invited for at once (the sweep is the fallback).
    provisioning.on_ready(migration.claim_for_new_account)
