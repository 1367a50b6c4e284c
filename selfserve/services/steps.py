"""Recorded multi-step jobs: one runner for account set-up, transfers, migration rows, and
whatever comes next (outbox mail, account deletion, ...).

A job is a database row whose `step` column names the next step to run (models.JobColumns
gives a model the columns). A step is a function `step(row) -> next step name or None`; it must
be idempotent, because a worker can die after the step did its work and before the runner
recorded it, and then the step runs again. A `Runner` does the rest, the same way for every
job:

- `due(now)`: rows with a step of this runner, past their backoff, and no live lease;
- `take(key)`: an atomic UPDATE of the lease, so exactly one worker runs a row at a time (the
  request that started the job, a web worker's sweep, `flask sweep`), on SQLite and PostgreSQL;
- `run(key)`: the steps one after another until none is left (the lease is released) or one
  must wait: a transient Particle error or `Retry` postpones the row with exponential backoff
  (429's Retry-After honoured); `GiveUp` (or `give_up_after` failed attempts) hands the row to
  the job's hand-back path (`on_give_up(row, reason) -> next step`, e.g. "give the device back
  to the seller"); an unexpected exception is logged and postponed like a transient one;
- `resume(now)`: the sweep's part: run every due row (crashed: its lease ran out; postponed:
  its backoff passed; new: nobody took it yet).

The sweep (selfserve/sweep.py) calls each background job's function; README "Background jobs"
says how to add one.
"""

import dataclasses
import datetime
import logging
import time

from flask import current_app

from selfserve import mail
from selfserve.models import utcnow
from selfserve.particle.errors import TRANSIENT

log = logging.getLogger(__name__)

BACKOFF_FIRST_SECONDS = 5
BACKOFF_MAX_SECONDS = 600


class Retry(Exception):
    """A step failed for now; try again after `wait` seconds (at least)."""

    def __init__(self, message, wait=None):
        super().__init__(message)
        self.wait = wait


class GiveUp(Exception):
    """A step failed for good: the runner hands the row to the job's `on_give_up`."""


def backoff_seconds(attempts):
    """Seconds to wait after the `attempts`-th failure: 5, 10, 20, ... up to 10 minutes."""
    exponent = max(0, attempts - 1)
    if exponent > 16:
        return BACKOFF_MAX_SECONDS
    return min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2**exponent)


def lease_until(now):
    """How long a worker may hold a job: longer than any one Particle call can take, so a
    lease only runs out when its worker died."""
    config = current_app.config
    call_seconds = config["PARTICLE_CONNECT_TIMEOUT"] + config["PARTICLE_READ_TIMEOUT"]
    return now + datetime.timedelta(seconds=max(120.0, 3 * call_seconds))


def send_mail(to, subject, template, context, key, sensitive=False):
    """Queue a step's email in the outbox (services/outbox.py), which sends it with its own
    retries: an email never holds up the job it reports on. A step may run twice (a worker
    died before the runner recorded it): `key` (e.g. "transfer:12:mail_offer") makes that one
    mail."""
    mail.send(to, subject, template, sensitive=sensitive, dedupe_key=key, **context)


@dataclasses.dataclass(frozen=True)
class Columns:
    """Where a job keeps its state. Models inheriting models.JobColumns use the defaults
    (`Columns.of(model)`); an older table may map its own columns, and may keep lease and
    backoff in one column (`lease_until is next_attempt_at`)."""

    step: object
    attempts: object
    next_attempt_at: object
    lease_until: object
    last_error: object

    @classmethod
    def of(cls, model):
        return cls(model.step, model.attempts, model.next_attempt_at, model.lease_until, model.last_error)


def _error_text(exc):
    return str(exc)[:500]


class Runner:
    """Runs the recorded steps of one kind of job. See the module docstring.

    name          how logs name a row ("Transfer 12")
    model, steps  the peewee model and {step name: function(row) -> next step or None}; the
                  mapping is read at each call, so a step added later (or replaced by a test)
                  counts
    columns       where the job state lives (default: the models.JobColumns columns)
    on_give_up    function(row, reason) -> next step (the hand-back path); without one a
                  given-up row stops (step None) with `last_error` saying why
    give_up_after failed attempts of one step after which the runner gives up (None: never;
                  backoff tops out at BACKOFF_MAX_SECONDS)
    error_text    function(exception) -> what `last_error` records (default: its text)
    keep_error    function(row) -> True to keep `last_error` when a step succeeds
    quick_retries (config key, default) of a list of short pauses: a transient failure inside
                  a request (someone is waiting on the page) is tried again after each pause
                  before the row is postponed
    """

    def __init__(
        self,
        name,
        model,
        steps,
        *,
        columns=None,
        on_give_up=None,
        give_up_after=None,
        error_text=_error_text,
        keep_error=None,
        quick_retries=None,
    ):
        self.name = name
        self.model = model
        self.steps = steps
        self.columns = columns or Columns.of(model)
        self.key = model._meta.primary_key
        self.on_give_up = on_give_up
        self.give_up_after = give_up_after
        self.error_text = error_text
        self.keep_error = keep_error
        self.quick_retries = quick_retries

    # --- taking work --------------------------------------------------------------------------

    def due(self, now):
        """The condition of rows a worker may take now."""
        c = self.columns
        return (
            c.step.in_(list(self.steps))
            & (c.next_attempt_at.is_null() | (c.next_attempt_at <= now))
            & (c.lease_until.is_null() | (c.lease_until <= now))
        )

    def take(self, key, now=None):
        """Take the row for this worker. True for exactly one taker until the lease runs out."""
        now = now or utcnow()
        query = self.model.update({self.columns.lease_until: lease_until(now)})
        return query.where((self.key == key) & self.due(now)).execute() == 1

    def lease(self, now=None):
        """The lease to write when a row is created or started by the caller itself (in the
        same statement), so no sweep takes it before the caller runs it."""
        return lease_until(now or utcnow())

    # --- running ------------------------------------------------------------------------------

    def _get(self, key):
        return self.model.get(self.key == key)

    def run(self, key, holding_lease=True):
        """Run the row's steps until none is left or one must wait; return the row afterwards.
        The caller holds the lease (`take()`, or it wrote `lease()` itself) unless
        `holding_lease=False`, in which case the row runs only if it can be taken now."""
        if not holding_lease and not self.take(key):
            return self._get(key)
        pauses = []
        if self.quick_retries:
            setting, default = self.quick_retries
            pauses = list(current_app.config.get(setting, default))
        c = self.columns
        while True:
            row = self._get(key)
            step = getattr(row, c.step.name)
            if step not in self.steps:
                break
            try:
                next_step = self.steps[step](row)
            except GiveUp as exc:
                if self._give_up(row, step, str(exc)) is None:
                    return self._get(key)
                continue
            except (Retry, *TRANSIENT) as exc:
                wait = getattr(exc, "retry_after", None) or getattr(exc, "wait", None)
                if isinstance(exc, TRANSIENT) and pauses and (wait is None or wait <= 1):
                    # A blip while someone waits on the page: try again right away, briefly.
                    time.sleep(pauses.pop(0))
                    continue
                if self._out_of_attempts(row):
                    reason = f"gave up after {self._attempts(row) + 1} attempts: {self.error_text(exc)}"
                    if self._give_up(row, step, reason) is None:
                        return self._get(key)
                    continue
                self.postpone(row, step, exc, wait)
                return self._get(key)
            except Exception as exc:  # noqa: BLE001 - an unexpected bug must not stop the others
                log.exception("%s %s: step %s failed unexpectedly", self.name, key, step)
                self.postpone(row, step, exc, None)
                return self._get(key)
            self._advance(key, step, next_step)
        self.release(key)
        return self._get(key)

    def _attempts(self, row):
        return getattr(row, self.columns.attempts.name)

    def _out_of_attempts(self, row):
        return self.give_up_after is not None and self._attempts(row) + 1 >= self.give_up_after

    def _advance(self, key, step, next_step):
        """Record that `step` is done (only if nobody else moved the row meanwhile)."""
        c = self.columns
        changes = {c.step: next_step, c.attempts: 0}
        if c.next_attempt_at is not c.lease_until:
            changes[c.next_attempt_at] = None
        if not (self.keep_error and self.keep_error(self._get(key))):
            changes[c.last_error] = None
        self.model.update(changes).where((self.key == key) & (c.step == step)).execute()

    def release(self, key):
        """Hand the lease back (the row is finished, or waits for a person)."""
        self.model.update({self.columns.lease_until: None}).where(self.key == key).execute()

    def postpone(self, row, step, exc, wait=None):
        """Try `step` again after a growing backoff, at least `wait` seconds (and hand back
        the lease)."""
        c = self.columns
        key = getattr(row, self.key.name)
        attempts = self._attempts(row) + 1
        message = self.error_text(exc)
        delay = max(backoff_seconds(attempts), float(wait or 0))
        changes = {
            c.attempts: c.attempts + 1,
            c.next_attempt_at: utcnow() + datetime.timedelta(seconds=delay),
            c.last_error: message,
        }
        if c.lease_until is not c.next_attempt_at:
            changes[c.lease_until] = None
        self.model.update(changes).where((self.key == key) & (c.step == step)).execute()
        log.warning(
            "%s %s: step %s postponed %.0f s (attempt %d): %s", self.name, key, step, delay, attempts, message
        )

    def _give_up(self, row, step, reason):
        """The hand-back path: the job's `on_give_up` decides the next step (None: stop)."""
        c = self.columns
        key = getattr(row, self.key.name)
        log.error("%s %s: giving up at step %s: %s", self.name, key, step, reason)
        next_step = self.on_give_up(row, reason) if self.on_give_up else None
        changes = {c.step: next_step, c.attempts: 0, c.last_error: reason[:500]}
        if c.next_attempt_at is not c.lease_until:
            changes[c.next_attempt_at] = None
        if next_step is None:
            changes[c.lease_until] = None
        self.model.update(changes).where((self.key == key) & (c.step == step)).execute()
        return next_step

    def resume(self, now=None, limit=50):
        """The sweep: run every due row (at most `limit`). Safe with several workers. Returns
        how many rows this worker ran."""
        now = now or utcnow()
        keys = [
            getattr(row, self.key.name)
            for row in self.model.select(self.key).where(self.due(now)).order_by(self.key).limit(limit)
        ]
        ran = 0
        for key in keys:
            if self.take(key, now):
                self.run(key)
                ran += 1
        return ran
