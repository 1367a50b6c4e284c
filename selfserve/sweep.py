"""The background sweep: runs the app's background jobs, which finish multi-step work a crash or
an outage interrupted (account set-up, claims and releases, transfers, migration rows) and do
timed work (ending stale support views, ...).

The jobs are one explicit list, given by `create_app` to `init_app` (no job registers itself
when its module is imported). Each job is a function without arguments that must be safe with
several workers running it at once (jobs with steps use services/steps.py `Runner`, whose
leases make that so) and must return quickly when there is nothing to do.

Where it runs:
- in every web worker: a daemon thread, started by the worker's first request, sweeps every
  SWEEP_SECONDS (0 disables it, e.g. when a dedicated worker runs `flask sweep`);
- in `flask --app wsgi sweep`, a process of its own for a dedicated worker (`--once` for cron);
- never as a side effect of another CLI command (they handle no request).
Tests call `run_once(app)` themselves (SWEEP_SECONDS is 0 there).
"""

import dataclasses
import logging
import time

import click
from flask import current_app
from flask.cli import with_appcontext

from selfserve import background

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Job:
    """A background job: `run()` does one round of its work and returns something to log
    (a count, a dict of counts). `name` defaults to the function's dotted name."""

    run: object
    name: str = None

    def __post_init__(self):
        if self.name is None:
            object.__setattr__(self, "name", f"{self.run.__module__}.{self.run.__qualname__}")


def init_app(app, jobs):
    """Give the app its background jobs, start the sweep thread at the first request (web
    workers only) and add the `sweep` command."""
    jobs = list(jobs)
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"background job names must be unique: {names}")
    app.extensions["background_jobs"] = jobs

    @app.before_request
    def _start_sweep_in_web_worker():
        if app.extensions.get("sweep") is None:
            start(app)

    app.cli.add_command(sweep_command)


def jobs(app):
    """The app's background jobs, in the order they run."""
    return list(app.extensions.get("background_jobs", ()))


def run_once(app):
    """Run every job once inside an app context; a failing one doesn't stop the others.

    Returns {job name: its result, or the exception it raised}.
    """
    from selfserve import models

    results = {}
    with app.app_context():
        opened_here = models.db.is_closed()
        models.db.connect(reuse_if_open=True)
        try:
            for job in jobs(app):
                try:
                    results[job.name] = job.run()
                except Exception as exc:  # noqa: BLE001 - keep sweeping the other jobs
                    log.exception("Background job %s failed", job.name)
                    results[job.name] = exc
        finally:
            if opened_here and not models.db.is_closed():
                models.db.close()
    return results


def _interval(app):
    return float(app.config.get("SWEEP_SECONDS") or 0)


def start(app):
    """Start the sweep thread (once now, then every SWEEP_SECONDS) unless SWEEP_SECONDS is 0;
    return it (or None). One thread per app, however often it is called."""
    return background.start(app, "sweep", lambda: run_once(app), _interval(app), at_once=True)


def _summary(results):
    return "\n".join(f"  {name}: {result!r}" for name, result in results.items())


@click.command("sweep")
@click.option("--once", is_flag=True, help="Run every background job once and exit (e.g. from cron).")
@click.option(
    "--interval",
    type=float,
    default=None,
    help="Seconds between rounds (default: SWEEP_SECONDS, or 30 when that is 0).",
)
@with_appcontext
def sweep_command(once, interval):
    """Run the background jobs: a dedicated worker (set SWEEP_SECONDS=0 for the web workers
    then). Safe next to web workers that sweep too; stop it with Ctrl-C or SIGTERM."""
    app = current_app._get_current_object()
    if interval is None:
        interval = _interval(app) or 30.0
    click.echo(f"Background jobs: {', '.join(job.name for job in jobs(app))}")
    while True:
        started = time.monotonic()
        results = run_once(app)
        click.echo(_summary(results))
        failed = [name for name, result in results.items() if isinstance(result, Exception)]
        if once:
            if failed:
                raise click.ClickException(f"failed: {', '.join(failed)} (see the log)")
            return
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
