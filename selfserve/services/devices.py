"""A homeowner's devices: the ownership check, claim, release, rename, function calls.

Our database decides who owns what; the Particle claim mirrors it. Claims and releases are
two steps (database, then Particle) recorded in `Device.claim_state`:

- claim: an atomic `UPDATE ... SET owner=me, claim_state='claiming' WHERE owner IS NULL`
  picks exactly one winner before any Particle call; then `claim_device` with the winner's
  customer token; success clears claim_state, a failure puts the owner back to NULL.
- release: `claim_state='releasing'`, then the product-level unclaim, then owner NULL.

A crash between the steps leaves claim_state set; `resume_pending` (run by the sweep)
finishes the step or undoes it. If Particle says a device belongs to someone else while our
database says it's free, we don't guess: we refuse, keep it free, and log it for staff.
"""

import dataclasses
import datetime
import logging
import re

from flask import abort
from flask import current_app

from selfserve import device_models
from selfserve import i18n
from selfserve import passwords
from selfserve.i18n import lazy_text as _l
from selfserve.models import AuditEvent
from selfserve.models import ClaimAttempt
from selfserve.models import Device
from selfserve.models import NameSync
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.particle import get_client
from selfserve.particle.errors import TRANSIENT
from selfserve.particle.errors import CloudUnavailable
from selfserve.particle.errors import DeviceOffline
from selfserve.particle.errors import DeviceOwnedByOther
from selfserve.particle.errors import FunctionFailed
from selfserve.particle.errors import NotFound
from selfserve.particle.errors import ParticleError
from selfserve.particle.errors import PermissionDenied
from selfserve.particle.errors import RateLimited
from selfserve.particle.errors import uncertain
from selfserve.refusals import Refusal
from selfserve.services import access
from selfserve.services import audit
from selfserve.services import live_values
from selfserve.services import registry
from selfserve.services import steps

log = logging.getLogger(__name__)

# Failed claim attempts are counted in the database (ClaimAttempt), not with Flask-Limiter:
# - the per-serial limit protects one device's setup code from guessing spread over many
#   accounts and workers; a database counter is shared by every worker and machine without
#   extra infrastructure (Flask-Limiter's default memory:// store is per process);
# - only *wrong codes* count (an "already yours" or a cloud outage must not lock anyone out),
#   which the service knows and a response-status hook would have to guess;
# - the rule lives in the service, so it is tested without HTTP like the other rules.

NAME_MAX = 64
# Crash recovery leaves a step alone this long after it started, so the sweep never races a
# request that is still waiting for Particle.
RESUME_GRACE_SECONDS = 60


MESSAGES = {
    "wrong": _l(
        "That serial number and setup code don't match. Check both on the device's label and try again."
    ),
    "too_many": _l(
        "Too many attempts to add a device. For your security, please wait {minutes} minutes and try again."
    ),
    "not_ready": (
        _l(
            "Your account is still being set up with the device cloud. This usually takes less than "
            "a minute; please try again shortly."
        )
    ),
    "already_yours": _l("This device is already in your account."),
    "owned_by_other": (
        _l(
            "This device is registered to another account. If you have the device, the previous owner "
            "must release it from their account first (they can do that on the device's page). If you "
            "can't reach them, contact support with the serial number."
        )
    ),
    # Shown instead when the claim page offers to ask the owner (the code was right): the
    # message points to that card rather than contradicting it.
    "owned_by_other_can_ask": (
        _l(
            "This device is registered to another account. If it's yours now, ask the current owner for it below."
        )
    ),
    "busy": _l("This device is being added or released right now. Please try again in a minute."),
    "cloud_down": _l(
        "The device cloud isn't answering, so the device was not added. Nothing was changed; please try again in a minute."
    ),
    "cloud_busy": _l(
        "The device cloud is busy, so the device was not added. Nothing was changed; please try again in a minute."
    ),
    "drift": (
        _l(
            "The device cloud lists this device under another account, so we did not add it. Our "
            "support team has been told; please contact support with the serial number."
        )
    ),
    "refused": _l(
        "The device cloud refused to add this device. Nothing was changed; please contact support with the serial number."
    ),
    # A write whose answer was lost may have happened: the sweep reads it back and finishes.
    "checking_claim": (
        _l(
            "The device cloud was too slow to answer, so we are checking that the device was added. "
            "Meanwhile it shows as being added on your devices page; this finishes by itself within a "
            "few minutes."
        )
    ),
    "checking_release": (
        _l(
            "The device cloud was too slow to answer, so we are checking that the device was released. "
            "Meanwhile it shows as being released on your devices page; this finishes by itself within "
            "a few minutes."
        )
    ),
}


class DeviceError(Refusal):
    """A refusal the homeowner should read (see selfserve/refusals.py); `device` the device
    when relevant."""

    def __init__(self, message, kind="error", field=None, device=None, status=400):
        super().__init__(message, kind=kind, field=field, status=status)
        self.device = device


@dataclasses.dataclass
class FunctionResult:
    ok: bool
    message: str
    return_value: int = None
    # The device accepted it; the page now follows what it reports (static/js/devices.js).
    pending: bool = False


# --- lookups -------------------------------------------------------------------------------


def parse_device_id(raw):
    """24 lowercase hex, or None: malformed ids never reach the database or Particle."""
    return registry.normalize_device_id(raw) if raw and len(raw) == 24 else None


def device_for(user, device_id, need="owner"):
    """The device `device_id` if `user` may act on it with role `need`, else a 404.

    The one access check every device route goes through. `need` is the least role the
    route requires (services/access.py: viewer < operator < manager < owner; deny by default,
    so a caller that names nothing gets owner-only). The device comes back with `role` set to
    the user's effective role on it. Another customer's device, a device shared with a lesser
    role, an ended or expired grant, an unknown or malformed id and a device with a claim,
    release or transfer in flight all answer the same 404, and none of them calls Particle.
    """
    if need not in access.RANK:
        raise ValueError(f"unknown role {need!r}")
    parsed = parse_device_id(device_id)
    if parsed is None or user is None or not getattr(user, "is_authenticated", False):
        abort(404)
    device = Device.get_or_none(
        (Device.device_id == parsed) & Device.owner.is_null(False) & Device.claim_state.is_null()
    )
    role = access.role_of(user, device) if device is not None else None
    if not access.at_least(role, need):
        abort(404)
    device.role = role
    return device


def owner_of(device):
    """The account whose Particle customer holds the device (every call runs as them)."""
    return User.get_by_id(device.owner_id)


# Audit actions that mean "this device left `user`'s account", and how to say it.
LEFT_ACCOUNT = {
    "device.transferred_out": "transferred",
    "device.released": "released",
    "support.released_device": "released_by_support",
}


@dataclasses.dataclass
class FormerOwnership:
    """How a device left the user's account: `how` is a LEFT_ACCOUNT value, `at` when."""

    how: str
    at: datetime.datetime


def former_ownership(user, device_id):
    """How and when `device_id` left `user`'s account, if `user` owned it before and doesn't
    now; else None. Reads only this user's own audit trail (no Particle call), so a stranger
    learns nothing about a device they never had (their answer stays the plain 404)."""
    parsed = parse_device_id(device_id)
    if parsed is None or user is None or not getattr(user, "is_authenticated", False):
        return None
    if Device.select().where((Device.device_id == parsed) & (Device.owner == user.id)).exists():
        return None  # still (or again) theirs, e.g. a claim or release being finished
    event = (
        AuditEvent.select()
        .where(
            (AuditEvent.user == user.id)
            & (AuditEvent.device_id == parsed)
            & AuditEvent.action.in_(list(LEFT_ACCOUNT))
        )
        .order_by(AuditEvent.id.desc())
        .first()
    )
    if event is None:
        return None
    return FormerOwnership(how=LEFT_ACCOUNT[event.action], at=event.at)


def devices_of(user):
    """`user`'s devices, ready to use, in the order they were added."""
    query = Device.select().where((Device.owner == user.id) & Device.claim_state.is_null())
    return list(query.order_by(Device.claimed_at, Device.device_id))


def pending_of(user):
    """`user`'s devices with a claim or release still being finished."""
    return list(Device.select().where((Device.owner == user.id) & Device.claim_state.is_null(False)))


@dataclasses.dataclass
class Overview:
    """What the dashboard shows: ready devices with their stored snapshots and the open
    transfer each owner is party to, and devices whose claim or release is still being
    finished."""

    devices: list
    snapshots: dict
    transfers: dict
    pending: list


def overview(user):
    """The dashboard's data, from the database only (no Particle call), with one query for
    the open transfers of all its cards."""
    from selfserve.services import transfers  # transfers imports this module

    ready = devices_of(user)
    return Overview(
        devices=ready,
        snapshots=live_values.last_known_many(ready),
        transfers=transfers.owner_transfers_of(ready),
        pending=pending_of(user),
    )


def display_name(device):
    """The homeowner's name for the device, or its model and serial until they name it."""
    if device.name:
        return device.name
    return f"{device_models.label(device.model)} {device.serial_number}"


# --- claim ----------------------------------------------------------------------------------


def claim_problem(user):
    """Why `user` can't claim devices yet (a message), or None."""
    if not user.is_verified:
        return _l("Please verify your email address first.")
    if user.provisioning_state != "ready" or not user.particle_customer_id:
        return MESSAGES["not_ready"]
    return None


def normalize_serial(raw):
    """A serial number as stored: no whitespace, uppercase, at most 64 characters."""
    return re.sub(r"\s+", "", raw or "").upper()[:64]


def claim(user, serial, setup_code, ask_dealer=True):
    """Add the device with this label (serial + setup code) to `user`'s account.

    A device the registry says was sold through a dealer (who asks for access) is not claimed
    yet: DeviceError kind "dealer_choice" (with the device) asks the homeowner first.

    Returns the Device, or raises DeviceError with a specific message. The setup code is
    checked against its hash with the same work whether or not the serial exists, and only
    ever leaves this function as a yes/no.
    """
    serial = normalize_serial(serial)
    setup_code = registry.normalize_setup_code(setup_code)
    problem = claim_problem(user)
    if problem:
        raise DeviceError(problem, kind="not_ready", status=409)
    if not serial:
        raise DeviceError(
            _l("Enter the serial number from the device's label."), kind="invalid", field="serial", status=422
        )
    if not setup_code:
        raise DeviceError(
            _l("Enter the setup code from the device's label."),
            kind="invalid",
            field="setup_code",
            status=422,
        )
    _check_attempts(user, serial)

    device = Device.get_or_none(Device.serial_number == serial)
    # Unknown serial: verify against a dummy hash anyway, so both cases cost the same.
    matches = passwords.check_password(device.setup_code_hash if device else None, setup_code[:128])
    if device is None or not matches:
        _record_failure(user, serial)
        log.info("Claim attempt with a wrong serial or setup code (user %s)", user.id)
        raise DeviceError(MESSAGES["wrong"], kind="wrong", status=422)

    if ask_dealer and device.owner_id is None and device.claim_state is None:
        from selfserve.services import sharing

        if sharing.dealer_at_claim(device) is not None:
            # The label is right: the homeowner chooses the dealer's access first (the view
            # shows the choice with a signed token, and claim_checked finishes).
            raise DeviceError("", kind="dealer_choice", device=device, status=200)
    return claim_checked(user, device)


def claim_checked(user, device):
    """Claim `device`, whose label `user` has proved (claim's checks passed, or a signed token
    of this user and device that they did)."""
    device = Device.get_by_id(device.device_id)
    if device.owner_id == user.id:
        if device.claim_state == "claiming" and _older_than_grace(device):
            # An earlier attempt of this user stopped half-way: finish it now.
            return _claim_on_particle(user, device)
        if device.claim_state is None:
            raise DeviceError(MESSAGES["already_yours"], kind="already_yours", device=device, status=409)
        raise DeviceError(MESSAGES["busy"], kind="busy", status=409)
    if device.owner_id is not None:
        raise DeviceError(MESSAGES["owned_by_other"], kind="owned_by_other", device=device, status=409)
    if device.claim_state is not None:
        raise DeviceError(MESSAGES["busy"], kind="busy", status=409)

    _ensure_in_product(device)

    now = utcnow()
    won = (
        Device.update(owner=user.id, claim_state="claiming", claim_state_at=now, claim_error=None)
        .where((Device.device_id == device.device_id) & Device.owner.is_null() & Device.claim_state.is_null())
        .execute()
    )
    if won != 1:
        # Someone else's claim (or this user's other tab) got there first.
        current = Device.get_by_id(device.device_id)
        if current.owner_id == user.id:
            raise DeviceError(MESSAGES["busy"], kind="busy", status=409)
        raise DeviceError(MESSAGES["owned_by_other"], kind="owned_by_other", device=device, status=409)
    # A fresh owner starts clean (grants of an earlier claim that was undone end now).
    access.end_stale(device.device_id)
    return _claim_on_particle(user, device)


def _check_attempts(user, serial):
    since = utcnow() - datetime.timedelta(seconds=_setting("CLAIM_WINDOW_SECONDS"))
    limits = (
        (f"user:{user.id}", _setting("CLAIM_MAX_FAILURES_PER_ACCOUNT")),
        (f"serial:{serial}", _setting("CLAIM_MAX_FAILURES_PER_SERIAL")),
    )
    for key, limit in limits:
        failures = ClaimAttempt.select().where((ClaimAttempt.key == key) & (ClaimAttempt.at > since))
        if failures.count() >= limit:
            oldest = failures.order_by(ClaimAttempt.at).first()
            window = datetime.timedelta(seconds=_setting("CLAIM_WINDOW_SECONDS"))
            wait = (oldest.at + window) - utcnow()
            minutes = max(1, int(wait.total_seconds() // 60) + 1)
            log.warning("Claim attempts blocked for %s", key.split(":")[0])
            raise DeviceError(MESSAGES["too_many"].format(minutes=minutes), kind="too_many", status=429)


def _record_failure(user, serial):
    now = utcnow()
    ClaimAttempt.insert_many(
        [{"key": f"user:{user.id}", "at": now}, {"key": f"serial:{serial}", "at": now}]
    ).execute()
    # Keep the table small: anything outside every window is useless.
    cutoff = now - datetime.timedelta(seconds=2 * _setting("CLAIM_WINDOW_SECONDS"))
    ClaimAttempt.delete().where(ClaimAttempt.at < cutoff).execute()


def _setting(key):
    return int(current_app.config[key])


def _ensure_in_product(device):
    """A device whose registry import into the product failed is added now (idempotent)."""
    if device.in_product:
        return
    try:
        get_client().add_device_to_product(device.device_id)
    except TRANSIENT as exc:
        raise DeviceError(_transient_message(exc), kind="cloud", status=503)
    except ParticleError as exc:
        log.error("Device %s could not be added to the product: %s", device.device_id, exc)
        raise DeviceError(MESSAGES["refused"], kind="refused", status=502)
    Device.update(in_product=True).where(Device.device_id == device.device_id).execute()


def _transient_message(exc):
    return MESSAGES["cloud_busy"] if isinstance(exc, RateLimited) else MESSAGES["cloud_down"]


def _older_than_grace(device):
    started = device.claim_state_at
    return started is None or utcnow() - started > datetime.timedelta(seconds=RESUME_GRACE_SECONDS)


def _claim_on_particle(user, device, undo_on_transient=True):
    """Second step of a claim we won: claim on Particle, then finish or undo.

    A cloud outage that answered (429, 5xx) undoes the claim (the homeowner is told to try
    again), except for the sweep (`undo_on_transient=False`), which leaves it to be retried. An
    uncertain failure (no answer: the claim may land later) or a refusal is read back first: a
    device the customer owns is finished (§15.4: what re-claiming your own device answers is not
    confirmed); an uncertain one that isn't theirs yet stays "claiming" and the homeowner is
    told it is being checked: the sweep reads it back, claims again (idempotent for the same
    customer) and finishes.
    """
    try:
        get_client().claim_device(user.particle_customer_id, device.device_id)
    except DeviceOwnedByOther as exc:
        if _owned_by(user, device):
            return _finish_claim(device, user)
        _undo_claim(device, user, "Particle says the device belongs to someone else")
        log.error(
            "Ownership drift: device %s is free in our database but claimed on Particle (%s)",
            device.device_id,
            exc,
        )
        raise DeviceError(MESSAGES["drift"], kind="drift", status=409)
    except TRANSIENT as exc:
        if uncertain(exc):
            if _owned_by(user, device):
                return _finish_claim(device, user)
            log.warning(
                "Claim of %s: no answer from the cloud (%s); left for the sweep", device.device_id, exc
            )
            if not undo_on_transient:
                raise
            raise DeviceError(MESSAGES["checking_claim"], kind="checking", device=device, status=202)
        log.warning("Claim of %s not done, the cloud failed: %s", device.device_id, exc)
        if not undo_on_transient:
            raise
        _undo_claim(device, user, None)
        raise DeviceError(_transient_message(exc), kind="cloud", status=503)
    except ParticleError as exc:
        if _owned_by(user, device):
            return _finish_claim(device, user)
        _undo_claim(device, user, f"claim refused: {type(exc).__name__}")
        log.error("Claim of %s refused by Particle: %s", device.device_id, exc)
        raise DeviceError(MESSAGES["refused"], kind="refused", status=502)
    return _finish_claim(device, user)


def _owned_by(user, device):
    """Read back: is the device claimed to `user`'s customer on Particle? False when that can't
    be read now (the caller then decides as if it weren't)."""
    try:
        return get_client().owns_device(user.particle_customer_id, device.device_id)
    except ParticleError as exc:
        log.warning("Reading back the owner of %s failed: %s", device.device_id, exc)
        return False


def _released_on_particle(device, user):
    """Read back: has the device no owner on Particle now? None when that can't be told now."""
    try:
        return get_client().device_is_free(device.device_id, previous_owner=user.particle_customer_id)
    except ParticleError as exc:
        log.warning("Reading back the owner of %s failed: %s", device.device_id, exc)
        return None


def _finish_claim(device, user):
    now = utcnow()
    done = (
        Device.update(claim_state=None, claim_state_at=None, claimed_at=now, name=None, claim_error=None)
        .where(
            (Device.device_id == device.device_id)
            & (Device.owner == user.id)
            & (Device.claim_state == "claiming")
        )
        .execute()
    )
    device = Device.get_by_id(device.device_id)
    if done:
        live_values.forget(device.device_id)  # never show the previous owner's values
        audit.record("device.claimed", user=user, device_id=device.device_id, name=display_name(device))
    elif device.owner_id != user.id or device.claim_state is not None:
        # Someone (the sweep) undid our step while we waited for Particle: staff must look.
        log.error("Claim of %s finished on Particle but was undone here meanwhile", device.device_id)
        raise DeviceError(MESSAGES["busy"], kind="busy", status=409)
    return device


def _undo_claim(device, user, error):
    Device.update(owner=None, claim_state=None, claim_state_at=None, claim_error=error).where(
        (Device.device_id == device.device_id)
        & (Device.owner == user.id)
        & (Device.claim_state == "claiming")
    ).execute()


# --- release --------------------------------------------------------------------------------


def release(user, device):
    """Take the device out of `user`'s account (Particle unclaim through the product, then
    our database). Raises DeviceError: kind "cloud" or "refused" when the cloud answered that
    it did nothing (the device stays theirs), kind "checking" when the answer was lost (the
    release stays recorded and the sweep finishes it)."""
    name = display_name(device)
    started = (
        Device.update(claim_state="releasing", claim_state_at=utcnow())
        .where(
            (Device.device_id == device.device_id) & (Device.owner == user.id) & Device.claim_state.is_null()
        )
        .execute()
    )
    if started != 1:
        raise DeviceError(MESSAGES["busy"], kind="busy", status=409)
    try:
        get_client().remove_device_owner(device.device_id)
    except NotFound:
        # §15.3: what /owner answers for a device nobody owns is not confirmed: read it back.
        released = _released_on_particle(device, user)
        if released is None:
            raise DeviceError(MESSAGES["checking_release"], kind="checking", device=device, status=202)
        if not released:
            _undo_release(device, user)
            log.error("Release of %s answered 404 but the device still has an owner", device.device_id)
            raise DeviceError(RELEASE_REFUSED, kind="refused", status=502)
    except TRANSIENT as exc:
        if uncertain(exc):
            # The unclaim may have happened, or happen later: finish if it did, else the sweep
            # unclaims again (idempotent) and finishes. The homeowner asked to release it.
            if not _released_on_particle(device, user):
                log.warning(
                    "Release of %s: no answer from the cloud (%s); left for the sweep", device.device_id, exc
                )
                raise DeviceError(MESSAGES["checking_release"], kind="checking", device=device, status=202)
        else:
            _undo_release(device, user)
            message = _l(
                "The device cloud isn't answering, so the device was not released. It is still yours; please try again in a minute."
            )
            if isinstance(exc, RateLimited):
                message = _l(
                    "The device cloud is busy, so the device was not released. It is still yours; please try again in a minute."
                )
            raise DeviceError(message, kind="cloud", status=503)
    except ParticleError as exc:
        _undo_release(device, user)
        log.error("Release of %s refused by Particle: %s", device.device_id, exc)
        raise DeviceError(RELEASE_REFUSED, kind="refused", status=502)
    _finish_release(device, user, name)


RELEASE_REFUSED = _l(
    "The device cloud refused to release this device. It is still yours; please contact support."
)


def _finish_release(device, user, name):
    with db.atomic():
        done = (
            Device.update(
                owner=None,
                name=None,
                claimed_at=None,
                claim_state=None,
                claim_state_at=None,
                claim_error=None,
            )
            .where(
                (Device.device_id == device.device_id)
                & (Device.owner == user.id)
                & (Device.claim_state == "releasing")
            )
            .execute()
        )
        if done:
            audit.record("device.released", user=user, device_id=device.device_id, name=name)
            # Whoever holds the label next starts clean: nobody keeps access through the old owner.
            access.end_all(device.device_id, "released", actor=user, owner_id=user.id, name=name)
    if done:
        live_values.forget(device.device_id)
        # An offer or a request waiting on this device ends with the ownership (the next owner
        # must never see a stranger's offer on their device page); its buyer is emailed.
        from selfserve.services import transfers

        transfers.close_on_release(device.device_id)


def _undo_release(device, user):
    Device.update(claim_state=None, claim_state_at=None).where(
        (Device.device_id == device.device_id)
        & (Device.owner == user.id)
        & (Device.claim_state == "releasing")
    ).execute()


# --- crash recovery ---------------------------------------------------------------------------


def resume_pending(grace_seconds=None):
    """Finish or undo claims and releases a crash left half-done. Safe in several workers.

    claiming: claim on Particle again (idempotent for the same customer) and finish; a
    permanent refusal undoes it; drift is refused and logged. releasing: unclaim again and
    finish. A cloud outage leaves the step for the next sweep. Returns counts per outcome.
    """
    grace = RESUME_GRACE_SECONDS if grace_seconds is None else grace_seconds
    cutoff = utcnow() - datetime.timedelta(seconds=grace)
    counts = {"claimed": 0, "released": 0, "undone": 0, "retry_later": 0}
    # Only the states this module owns: a transfer's "transferring" is resumed by services/transfers.
    stuck = Device.select().where(
        Device.claim_state.in_(["claiming", "releasing"])
        & (Device.claim_state_at.is_null() | (Device.claim_state_at <= cutoff))
    )
    for device in list(stuck):
        # Take the step over with an atomic touch, so two sweeping workers don't both run it.
        taken = (
            Device.update(claim_state_at=utcnow())
            .where(
                (Device.device_id == device.device_id)
                & (Device.claim_state == device.claim_state)
                & (Device.claim_state_at.is_null() | (Device.claim_state_at <= cutoff))
            )
            .execute()
        )
        if not taken:
            continue
        owner = User.get_or_none(User.id == device.owner_id) if device.owner_id else None
        if owner is None:
            # The account is gone (or the row is inconsistent): nobody can be waiting for it.
            Device.update(owner=None, claim_state=None, claim_state_at=None).where(
                Device.device_id == device.device_id
            ).execute()
            counts["undone"] += 1
            continue
        try:
            if device.claim_state == "claiming":
                if not owner.particle_customer_id:
                    _undo_claim(device, owner, "the owner has no device-cloud account")
                    counts["undone"] += 1
                    continue
                _claim_on_particle(owner, device, undo_on_transient=False)
                counts["claimed"] += 1
            elif device.claim_state == "releasing":
                _resume_release(device, owner)
                counts["released"] += 1
        except DeviceError:
            counts["undone"] += 1
        except TRANSIENT:
            counts["retry_later"] += 1  # the cloud is down: the next sweep tries again
    return counts


def _resume_release(device, owner):
    try:
        get_client().remove_device_owner(device.device_id)
    except NotFound:
        released = _released_on_particle(device, owner)
        if released is None:
            raise CloudUnavailable("could not read back the owner after a 404") from None
        if not released:
            _refused_resume(device, "release answered 404 but the device still has an owner")
    except TRANSIENT as exc:
        if not (uncertain(exc) and _released_on_particle(device, owner)):
            raise
    except ParticleError as exc:
        _refused_resume(device, f"release refused: {type(exc).__name__}")
    _finish_release(device, owner, display_name(device))


def _refused_resume(device, reason):
    log.error("Resuming the release of %s: %s; left for staff", device.device_id, reason)
    Device.update(claim_error=reason).where(Device.device_id == device.device_id).execute()
    raise DeviceError("refused", kind="refused")


# --- rename and functions ---------------------------------------------------------------------


def particle_name(name, device):
    """A Particle-safe device name (letters, digits, _ and -, at most 63) for our free text."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:63]
    return slug or f"device_{device.serial_number}"[:63]


def rename(user, device, new_name):
    """Rename the device here and on Particle. Raises DeviceError (nothing renamed) on bad
    input or when the cloud answers that it failed. When its answer is lost the new name is
    kept and sent again by the name job (`push_name_later`) until Particle has it."""
    name = re.sub(r"\s+", " ", (new_name or "")).strip()
    if not name:
        raise DeviceError(_l("Enter a name for the device."), kind="invalid", field="name", status=422)
    if len(name) > NAME_MAX:
        raise DeviceError(
            _l("Use at most %(count)s characters.", count=NAME_MAX),
            kind="invalid",
            field="name",
            status=422,
        )
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        raise DeviceError(
            _l("Use letters, digits, spaces and punctuation only."), kind="invalid", field="name", status=422
        )
    old = display_name(device)
    if name == device.name:
        return device
    owner = owner_of(device)
    try:
        # As the owner's customer: a manager's rename runs through our backend.
        get_client().rename_device(owner.particle_customer_id, device.device_id, particle_name(name, device))
    except TRANSIENT as exc:
        if not uncertain(exc):
            raise DeviceError(
                _l(
                    "The device cloud isn't answering, so the name was not changed. Please try again in a minute."
                ),
                kind="cloud",
                status=503,
            ) from exc
        # The new name may have reached Particle, or reach it later: keep the homeowner's name
        # and send it again until Particle answers, so both end with it (never Particle only).
        log.warning(
            "Rename of %s: no answer from the cloud (%s); the name is sent again", device.device_id, exc
        )
        push_name_later(device.device_id)
    except ParticleError as exc:
        log.warning("Rename of %s refused: %s", device.device_id, exc)
        raise DeviceError(
            _l("The device cloud refused the new name. Please try again or contact support."),
            kind="refused",
            status=502,
        )
    Device.update(name=name).where(
        (Device.device_id == device.device_id) & (Device.owner == owner.id)
    ).execute()
    device.name = name
    audit.record(
        "device.renamed",
        user=owner,
        actor=user,
        device_id=device.device_id,
        old=old,
        new=name,
        name=name,
        **_by(user, owner),
    )
    return device


def push_name_later(device_id):
    """Record that Particle must be sent the device's current name (due now, for the sweep)."""
    NameSync.insert(device_id=device_id, step="push").on_conflict(
        conflict_target=[NameSync.device_id],
        update={
            NameSync.step: "push",
            NameSync.attempts: 0,
            NameSync.next_attempt_at: None,
            NameSync.last_error: None,
        },
    ).execute()


def _step_push_name(sync):
    """Send the device's current name to Particle with its owner's token; again if the name
    changed meanwhile. A device that left its owner needs nothing: whoever has it names it."""
    device = Device.get_or_none(Device.device_id == sync.device_id)
    if device is None or device.owner_id is None or device.claim_state is not None:
        return None
    owner = User.get_by_id(device.owner_id)
    sent = particle_name(device.name or "", device)
    try:
        get_client().rename_device(owner.particle_customer_id, device.device_id, sent)
    except TRANSIENT:
        raise  # postponed; sending the same name again is harmless
    except ParticleError as exc:
        log.error("Sending the name of %s to Particle was refused: %s", device.device_id, exc)
        raise steps.GiveUp(f"rename refused: {type(exc).__name__}")
    current = Device.get_by_id(device.device_id)
    return "push" if particle_name(current.name or "", current) != sent else None


NAME_SYNC = steps.Runner("Sending the name of", NameSync, {"push": _step_push_name})


def push_pending_names(now=None):
    """The background job: send the names whose rename answer was lost. Returns how many ran."""
    return NAME_SYNC.resume(now)


def _by(actor, owner):
    """Audit detail naming who acted on the owner's device when it wasn't the owner."""
    return {} if actor.id == owner.id else {"by": actor.email}


def call_function(user, device, function_name, raw_arg="", confirmed=False):
    """Run one of the model's functions on the device and say how it went.

    Raises DeviceError for a function the model doesn't have (404), a bad argument (422) or a
    missing confirmation (kind "confirm"); Particle trouble comes back as FunctionResult(ok=False).
    """
    model = device_models.get(device.model)
    function = model.function(function_name) if model else None
    if function is None:
        raise DeviceError(
            _l("That action isn't available for this device."), kind="unknown_function", status=404
        )
    arg, problem = function.parse_arg(raw_arg)
    if problem:
        raise DeviceError(problem, kind="invalid", field="arg", status=422)
    if function.confirm and not confirmed:
        raise DeviceError(function.confirm, kind="confirm", status=409)
    warning = function.argument.warns(arg) if function.argument else ""
    if warning and not confirmed:
        # A value the device allows but guards against: say what will happen, then ask.
        raise DeviceError(warning, kind="confirm", status=409)
    name = display_name(device)
    # Every call runs as the owner's customer, whoever pressed the button (a grantee's access
    # is ours to decide; Particle only knows the owner).
    owner = owner_of(device)
    try:
        return_value = get_client().call_function(
            owner.particle_customer_id, device.device_id, function.name, arg
        )
    except DeviceOffline:
        live_values.mark_offline(device.device_id)
        return FunctionResult(
            False,
            _l(
                "The device is offline or not answering, so “%(label)s” was not done. Try again when it is back online.",
                label=function.label,
            ),
        )
    except NotFound:
        return FunctionResult(
            False,
            _l(
                "The device doesn't know “%(label)s”. Its firmware may need an update; please contact support.",
                label=function.label,
            ),
        )
    except FunctionFailed:
        return FunctionResult(
            False, _l("The device did not carry out “%(label)s”. Please try again.", label=function.label)
        )
    except RateLimited:
        return FunctionResult(
            False, _l("The device cloud is busy, so the command was not sent. Please try again in a minute.")
        )
    except CloudUnavailable as exc:
        if exc.status is None:
            # A timeout: the command may have reached the device before the answer got lost.
            live_values.invalidate(device.device_id)
            return FunctionResult(
                False,
                _l(
                    "We didn't hear back from the device cloud in time. The command may or may not have reached the device; check its values before trying again."
                ),
            )
        return FunctionResult(
            False,
            _l(
                "The device cloud isn't answering, so the command was not sent. Please try again in a minute."
            ),
        )
    except PermissionDenied:
        log.error(
            "Function call on %s denied by Particle although the database says %s owns it",
            device.device_id,
            owner.id,
        )
        return FunctionResult(
            False,
            _l("The device cloud says this device is not available to your account. Please contact support."),
        )
    except ParticleError as exc:
        log.warning("Function %s on %s failed: %s", function.name, device.device_id, exc)
        return FunctionResult(
            False, _l("“%(label)s” failed: %(reason)s", label=function.label, reason=exc.user_message)
        )
    live_values.invalidate(device.device_id)
    refused = return_value is not None and return_value < 0
    answer = function.answer_for(return_value) if refused else function.pending_text(arg)
    audit.record(
        "device.function_called",
        user=owner,
        actor=user,
        device_id=device.device_id,
        function=i18n.english(function.label),  # stored in English, translated when shown
        name=name,
        arg=arg or None,
        result="refused" if refused else "done",
        **_by(user, owner),
        # What the device answered, in the catalogue's words (the activity page shows it).
        answer=i18n.english(answer),
    )
    if refused:
        return FunctionResult(False, answer, return_value)
    return FunctionResult(True, answer, return_value, pending=True)
