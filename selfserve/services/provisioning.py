"""Creating the Particle shadow customer of a verified account: crash-safe and resumable.

The sequence is a record of idempotent steps, so a crash or a Particle outage at any point
ends in the right state without an operator:

1. On verification (one atomic UPDATE) the account gets `provisioning_state = "pending"` and
   an opaque customer id ("c" + 24 hex, never derived from the email) is saved BEFORE Particle
   is called.
2. A worker takes the work with an atomic UPDATE that moves `provisioning_next_at` (a lease)
   into the future; only the worker whose UPDATE matched calls Particle. The job runs through
   the one job runner (services/steps.py), mapped onto the account's provisioning columns.
3. `create_customer(id)` is idempotent (an existing customer counts as done), so repeating it
   after a crash creates nothing new.
4. Success sets "ready"; a failure records a user-safe message and a backoff.

`resume_pending()` is run by the background sweep; `resume_user()` by the account's own
status poll, so a pending account finishes even when no sweep runs.
"""

import logging
import secrets

from selfserve.i18n import lazy_text as _l
from selfserve.models import User
from selfserve.models import utcnow
from selfserve.particle import get_client
from selfserve.particle.errors import CustomerExists
from selfserve.particle.errors import ParticleError
from selfserve.services import audit
from selfserve.services import steps

log = logging.getLogger(__name__)

PENDING = "pending"
READY = "ready"

UNEXPECTED_ERROR = _l("Something went wrong on our side. We'll keep trying automatically.")


# Called with the account once its Particle customer exists (e.g. services/migration.py claims
# the devices its owner was invited for). A failing callback is logged; its own sweep catches up.
READY_CALLBACKS = []


def on_ready(callback):
    """Register `callback(user)` to run when an account's provisioning finishes (once each)."""
    if callback not in READY_CALLBACKS:
        READY_CALLBACKS.append(callback)
    return callback


def _run_ready_callbacks(user):
    for callback in list(READY_CALLBACKS):
        try:
            callback(user)
        except Exception:  # noqa: BLE001 - provisioning itself succeeded
            log.exception("Ready callback %s failed for account %s", callback.__qualname__, user.id)


def new_customer_id():
    """An opaque, lowercase Particle customer id: "c" + 24 hex characters."""
    return "c" + secrets.token_hex(12)


def _step_create_customer(user):
    """The one step of a pending account: create its Particle customer (idempotent: an
    existing customer counts as done), then mark the account ready."""
    if not user.particle_customer_id:
        # Saved before Particle hears of it; a concurrent writer's id wins if there was one.
        User.update(particle_customer_id=new_customer_id()).where(
            (User.id == user.id) & User.particle_customer_id.is_null()
        ).execute()
        user = User.get_by_id(user.id)
    try:
        get_client().create_customer(user.particle_customer_id)
    except CustomerExists:
        pass  # an earlier attempt got through but its answer was lost: done
    except ParticleError as exc:
        # Nothing here is permanent for us: retried with backoff, the person sees why.
        raise steps.Retry(exc.user_message, wait=getattr(exc, "retry_after", None)) from exc
    finished = (
        User.update(provisioning_state=READY, provisioning_error=None, provisioning_next_at=None)
        .where((User.id == user.id) & (User.provisioning_state == PENDING))
        .execute()
    )
    if finished:
        audit.record("account.provisioned", user=user, actor=None)
        log.info("Provisioned account %s", user.id)
        _run_ready_callbacks(User.get_by_id(user.id))
    return READY


def _error_text(exc):
    """What the account page shows while provisioning waits (never an internal detail)."""
    if isinstance(exc, steps.Retry):
        return str(exc)
    if isinstance(exc, ParticleError):
        return exc.user_message
    return UNEXPECTED_ERROR


# The account's own columns hold the job: the state is the step ("pending" runs, "ready" and
# None don't), and one column is both the lease and the backoff.
RUNNER = steps.Runner(
    "Provisioning account",
    User,
    {PENDING: _step_create_customer},
    columns=steps.Columns(
        step=User.provisioning_state,
        attempts=User.provisioning_attempts,
        next_attempt_at=User.provisioning_next_at,
        lease_until=User.provisioning_next_at,
        last_error=User.provisioning_error,
    ),
    error_text=_error_text,
    # The step itself clears the error and the backoff when the account becomes ready.
    keep_error=lambda user: True,
)


def take(user_id, now=None):
    """Take the provisioning of one account for this worker. True for exactly one taker."""
    return RUNNER.take(user_id, now)


def attempt(user_id, now=None):
    """Create the Particle customer of an account this worker has taken; return the account.

    Only call after `take()` returned True (or after the verification UPDATE, which takes the
    lease in the same statement).
    """
    return RUNNER.run(user_id)


def resume_user(user, now=None):
    """Finish `user`'s provisioning if it is pending and due; return the fresh account.

    Safe to call on every page view or poll: it does nothing unless the backoff has passed and
    no other worker holds the work.
    """
    if user.provisioning_state != PENDING:
        return user
    now = now or utcnow()
    if take(user.id, now):
        return attempt(user.id, now)
    return User.get_by_id(user.id)


def resume_pending(now=None, limit=50):
    """Retry every pending account whose backoff has passed; return how many became ready.

    Several workers may run this at once: each account goes to the one whose `take()` matched.
    """
    now = now or utcnow()
    due_ids = [row.id for row in User.select(User.id).where(RUNNER.due(now)).order_by(User.id).limit(limit)]
    ready = 0
    for user_id in due_ids:
        if take(user_id, now) and attempt(user_id, now).provisioning_state == READY:
            ready += 1
    return ready
