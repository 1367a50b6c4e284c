"""Creating the Particle shadow customer of a verified account: crash-safe and resumable.

The sequence is a record of idempotent steps, so a crash or a Particle outage at any point
ends in the right state without an operator:

1. On verification (one atomic UPDATE) the account gets `provisioning_state = "pending"` and
   an opaque customer id ("c" + 24 hex, never derived from the email) is saved BEFORE Particle
   is called.
2. A worker takes the work with an atomic UPDATE that moves `provisioning_next_at` (a lease)
   into the future; only the worker whose UPDATE matched calls Particle.
3. `create_customer(id)` is idempotent (an existing customer counts as done), so repeating it
   after a crash creates nothing new.
4. Success sets "ready"; a failure records a user-safe message and a backoff.

`resume_pending()` is run by the background sweep; `resume_user()` by the account's own
status poll, so a pending account finishes even when no sweep runs.
"""

import datetime
import logging
import secrets

from selfserve import sweep
from selfserve.models import User
from selfserve.models import utcnow
from selfserve.particle import get_client
from selfserve.particle.errors import CustomerExists
from selfserve.particle.errors import ParticleError
from selfserve.services import audit
from selfserve.services.steps import backoff_seconds
from selfserve.services.steps import lease_until

log = logging.getLogger(__name__)

PENDING = "pending"
READY = "ready"

UNEXPECTED_ERROR = "Something went wrong on our side. We'll keep trying automatically."


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


def _due(now):
    return (User.provisioning_state == PENDING) & (
        User.provisioning_next_at.is_null() | (User.provisioning_next_at <= now)
    )


def take(user_id, now=None):
    """Take the provisioning of one account for this worker. True for exactly one taker."""
    now = now or utcnow()
    taken = (
        User.update(provisioning_next_at=lease_until(now)).where((User.id == user_id) & _due(now)).execute()
    )
    return taken == 1


def attempt(user_id, now=None):
    """Create the Particle customer of an account this worker has taken; return the account.

    Only call after `take()` returned True (or after the verification UPDATE, which takes the
    lease in the same statement).
    """
    now = now or utcnow()
    user = User.get_by_id(user_id)
    if user.provisioning_state != PENDING:
        return user
    if not user.particle_customer_id:
        # Saved before Particle hears of it; a concurrent writer's id wins if there was one.
        User.update(particle_customer_id=new_customer_id()).where(
            (User.id == user_id) & User.particle_customer_id.is_null()
        ).execute()
        user = User.get_by_id(user_id)
    try:
        get_client().create_customer(user.particle_customer_id)
    except CustomerExists:
        pass  # an earlier attempt got through but its answer was lost: done
    except ParticleError as exc:
        return _failed(user, now, exc.user_message, exc)
    except Exception as exc:  # noqa: BLE001 - one bad account must not stop the sweep
        log.exception("Provisioning account %s failed unexpectedly", user.id)
        return _failed(user, now, UNEXPECTED_ERROR, exc)
    finished = (
        User.update(provisioning_state=READY, provisioning_error=None, provisioning_next_at=None)
        .where((User.id == user_id) & (User.provisioning_state == PENDING))
        .execute()
    )
    if finished:
        audit.record("account.provisioned", user=user, actor=None)
        log.info("Provisioned account %s", user.id)
        _run_ready_callbacks(User.get_by_id(user_id))
    return User.get_by_id(user_id)


def _failed(user, now, message, exc):
    attempts = user.provisioning_attempts + 1
    User.update(
        provisioning_attempts=User.provisioning_attempts + 1,
        provisioning_error=message,
        provisioning_next_at=now + datetime.timedelta(seconds=backoff_seconds(attempts)),
    ).where((User.id == user.id) & (User.provisioning_state == PENDING)).execute()
    # The exception text never holds a token (the client scrubs them); the email is not logged.
    log.warning("Provisioning account %s failed (attempt %d): %s", user.id, attempts, exc)
    return User.get_by_id(user.id)


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
    due_ids = [row.id for row in User.select(User.id).where(_due(now)).order_by(User.id).limit(limit)]
    ready = 0
    for user_id in due_ids:
        if take(user_id, now) and attempt(user_id, now).provisioning_state == READY:
            ready += 1
    return ready


sweep.register(resume_pending)
