"""The support console: find customers and devices, see the fleet and anything stuck, and
the staff actions outside "view as customer" (each with a required reason, audited against
the customer with the staff member as actor).

Staff actions call the areas' own services (accounts, provisioning, devices) instead of
re-implementing them: a release by support is the homeowner's release, done on their behalf.
"""

import dataclasses
import datetime
import logging

from selfserve.i18n import lazy_text as _l
from selfserve.models import AuditEvent
from selfserve.models import Device
from selfserve.models import DeviceSnapshot
from selfserve.models import MigrationRow
from selfserve.models import Transfer
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.particle import get_client
from selfserve.particle.errors import NotFound
from selfserve.particle.errors import ParticleError
from selfserve.refusals import Refusal
from selfserve.services import accounts
from selfserve.services import audit
from selfserve.services import devices
from selfserve.services import impersonation
from selfserve.services import outbox
from selfserve.services import provisioning
from selfserve.services import reconcile
from selfserve.services import registry
from selfserve.services import transfers

log = logging.getLogger(__name__)

SEARCH_MIN = 3
SEARCH_LIMIT = 25
FLEET_PAGE_SIZE = 50
ACTIVITY_LIMIT = 50
# Provisioning that has not finished this long after verification counts as stuck.
PROVISIONING_STUCK_SECONDS = 5 * 60


class SupportError(Refusal):
    """A staff request that can't be done; `message` says why."""

    def __init__(self, message, status=400):
        super().__init__(message, status=status)


def check_reason(reason):
    """The cleaned reason of a staff action, or SupportError (every action needs one)."""
    try:
        return impersonation.check_reason(reason)
    except impersonation.ViewRefused as exc:
        raise SupportError(exc.message, 422) from None


# --- search ---------------------------------------------------------------------------------


@dataclasses.dataclass
class SearchResults:
    query: str
    customers: list
    devices: list


def search(query):
    """Customers by (partial) email, devices by (partial) device id or serial number.
    Raises SupportError for a query too short to be useful."""
    text = " ".join((query or "").split())[:254]
    if len(text) < SEARCH_MIN:
        raise SupportError(
            _l(
                "Type at least %(count)s characters of an email address, device id or serial number.",
                count=SEARCH_MIN,
            ),
            422,
        )
    customers = list(
        User.select()
        .where((User.role == "customer") & User.email.contains(text.lower()))
        .order_by(User.email)
        .limit(SEARCH_LIMIT)
    )
    lowered = text.lower()
    condition = Device.serial_number.contains(registry.normalize_serial(text))
    if all(char in "0123456789abcdef" for char in lowered):
        condition = condition | Device.device_id.contains(lowered)
    found = list(Device.select().where(condition).order_by(Device.serial_number).limit(SEARCH_LIMIT))
    owners = (
        {
            user.id: user
            for user in User.select().where(User.id.in_([d.owner_id for d in found if d.owner_id]))
        }
        if found
        else {}
    )
    for device in found:
        device.owner_account = owners.get(device.owner_id)
    return SearchResults(text, customers, found)


# --- customer and device pages --------------------------------------------------------------


def customer_or_404(customer_id):
    """The customer account `customer_id` (an int or digits), else 404. Staff accounts are
    not customers here."""
    from flask import abort

    user = None
    if isinstance(customer_id, int) or (
        isinstance(customer_id, str) and customer_id.isdigit() and len(customer_id) < 12
    ):
        user = User.get_or_none(User.id == int(customer_id))
    if user is None or user.is_staff:
        abort(404)
    return user


@dataclasses.dataclass
class CustomerOverview:
    user: User
    devices: list
    transfers: list
    activity: list
    views: list
    provisioning_stuck: bool


def customer_overview(user, staff=None):
    """Everything the customer page shows, from the database only. Looking is recorded on
    the customer's activity (as `staff`): everything support does leaves a trace they see."""
    if staff is not None:
        audit.record("support.console_viewed", user=user, actor=staff)
    owned = list(Device.select().where(Device.owner == user.id).order_by(Device.claimed_at, Device.device_id))
    return CustomerOverview(
        user=user,
        devices=owned,
        transfers=transfers_of(user),
        activity=audit.history(user, limit=ACTIVITY_LIMIT),
        views=impersonation.views_of(user),
        provisioning_stuck=_provisioning_stuck(user, utcnow()),
    )


@dataclasses.dataclass
class DeviceOverview:
    device: Device
    owner: User
    particle: dict  # Particle's product view (None: not in the product or unreadable)
    particle_error: str
    disagreements: list  # [(kind, label, detail)]
    snapshot: object
    findings: list  # from the latest reconciliation run


def device_or_404(device_id):
    from flask import abort

    parsed = devices.parse_device_id(device_id)
    device = Device.get_or_none(Device.device_id == parsed) if parsed else None
    if device is None:
        abort(404)
    return device


def device_overview(device, staff=None):
    """The registry row, its owner here, Particle's product view (one product-token read)
    and where the two disagree. Looking is recorded on the owner's activity (as `staff`)."""
    from selfserve.services import live_values

    owner = User.get_or_none(User.id == device.owner_id) if device.owner_id else None
    if staff is not None and owner is not None:
        audit.record(
            "support.console_viewed_device",
            user=owner,
            actor=staff,
            device_id=device.device_id,
            name=devices.display_name(device),
        )
    particle_view, particle_error = None, ""
    disagreements = []
    try:
        answer = get_client().get_product_device(device.device_id)
    except NotFound:
        answer = None
    except ParticleError as exc:
        answer, particle_error = None, exc.user_message
    if answer is not None:
        particle_view = {
            "owner": (answer.get("owner") or None) and str(answer["owner"]).lower(),
            "online": bool(answer.get("online", answer.get("connected"))),
            "last_heard": answer.get("last_heard"),
            "name": answer.get("name"),
            "serial_number": answer.get("serial_number"),
            "firmware_version": answer.get("firmware_version"),
        }
    if not particle_error:
        device.owner = owner
        customers = {}
        if particle_view and particle_view["owner"]:
            known = User.get_or_none(User.particle_customer_id == particle_view["owner"])
            if known is not None:
                customers[particle_view["owner"]] = known
        for kind, detail in reconcile.compare(device, particle_view, customers):
            disagreements.append((kind, reconcile.KINDS[kind], detail))
    latest = reconcile.latest_run()
    findings = reconcile.drift_by_device(latest).get(device.device_id, [])
    return DeviceOverview(
        device=device,
        owner=owner,
        particle=particle_view,
        particle_error=particle_error,
        disagreements=disagreements,
        snapshot=live_values.last_known(device),
        findings=findings,
    )


# --- fleet and stuck work -------------------------------------------------------------------


FLEET_FILTERS = {
    "all": _l("All devices"),
    "claimed": _l("Claimed"),
    "free": _l("Not claimed"),
    "in_flight": _l("Claim or release in progress"),
    "drift": _l("Drift in the last reconciliation"),
}


@dataclasses.dataclass
class Fleet:
    # [(device, owner or None, snapshot row or None, Particle's status at the last run or None, [findings])]
    rows: list
    page: int
    pages: int
    total: int
    filter: str
    run: object  # the latest ReconcileRun or None
    findings: list  # every finding of that run
    stuck: dict


def fleet(page=1, filter_name="all"):
    """One page of every device with its claim state, last known online state and drift from
    the latest reconciliation, plus the run's findings and the stuck work."""
    filter_name = filter_name if filter_name in FLEET_FILTERS else "all"
    run = reconcile.latest_run()
    drift = reconcile.drift_by_device(run)
    query = Device.select()
    if filter_name == "claimed":
        query = query.where(Device.owner.is_null(False) & Device.claim_state.is_null())
    elif filter_name == "free":
        query = query.where(Device.owner.is_null() & Device.claim_state.is_null())
    elif filter_name == "in_flight":
        query = query.where(Device.claim_state.is_null(False))
    elif filter_name == "drift":
        query = query.where(Device.device_id.in_(list(drift) or [""]))
    total = query.count()
    pages = max(1, -(-total // FLEET_PAGE_SIZE))
    page = min(max(1, page), pages)
    rows = list(query.order_by(Device.serial_number).paginate(page, FLEET_PAGE_SIZE))
    owner_ids = {d.owner_id for d in rows if d.owner_id}
    owners = {u.id: u for u in User.select().where(User.id.in_(list(owner_ids)))} if owner_ids else {}
    ids = [d.device_id for d in rows]
    snapshots = (
        {s.device_id: s for s in DeviceSnapshot.select().where(DeviceSnapshot.device_id.in_(ids))}
        if ids
        else {}
    )
    seen_by_particle = reconcile.particle_status(run)
    return Fleet(
        rows=[
            (
                d,
                owners.get(d.owner_id),
                snapshots.get(d.device_id),
                seen_by_particle.get(d.device_id),
                drift.get(d.device_id, []),
            )
            for d in rows
        ],
        page=page,
        pages=pages,
        total=total,
        filter=filter_name,
        run=run,
        findings=reconcile.findings_of(run) if run is not None and run.status == "done" else [],
        stuck=stuck(),
    )


def _provisioning_stuck(user, now):
    if user.provisioning_state != provisioning.PENDING:
        return False
    since = user.email_verified_at or user.created_at
    return user.provisioning_attempts > 0 or now - since > datetime.timedelta(
        seconds=PROVISIONING_STUCK_SECONDS
    )


def stuck(now=None):
    """Work that has not finished: account setups, claims and releases past the sweep's
    grace, transfers needing staff, failed migration rows, staff alerts."""
    now = now or utcnow()
    pending_accounts = [
        user
        for user in User.select().where(User.provisioning_state == provisioning.PENDING).order_by(User.id)
        if _provisioning_stuck(user, now)
    ]
    cutoff = now - datetime.timedelta(seconds=devices.RESUME_GRACE_SECONDS)
    steps = list(
        Device.select()
        .where(
            Device.claim_state.in_(DEVICE_STEPS)
            & (Device.claim_state_at.is_null() | (Device.claim_state_at <= cutoff))
        )
        .order_by(Device.claim_state_at)
    )
    owners = (
        {u.id: u for u in User.select().where(User.id.in_([d.owner_id for d in steps if d.owner_id]))}
        if steps
        else {}
    )
    for device in steps:
        device.owner_account = owners.get(device.owner_id)
    return {
        "provisioning": pending_accounts,
        "device_steps": steps,
        "transfers": transfers_needing_staff(now),
        "migrations": failed_migrations(),
        "alerts": staff_alerts(),
    }


def staff_alerts(limit=50):
    """Newest "staff.alert" audit events (areas raise them when work failed for good)."""
    query = AuditEvent.select().where(AuditEvent.action == "staff.alert")
    return list(query.order_by(AuditEvent.id.desc()).limit(limit))


# Claim steps of the devices service; other claim_state values belong to other areas
# (transfers set "transferring") and are finished by their own resumers.
DEVICE_STEPS = ("claiming", "releasing")
# A move (release, claim, record) normally finishes within a sweep or two; one running longer
# than this is worth a look. Offers and requests inside their answer windows are not stuck.
TRANSFER_STUCK_SECONDS = 15 * 60


def transfers_of(user):
    """The customer's transfers (as seller or buyer), newest first."""
    query = Transfer.select().where((Transfer.seller == user) | (Transfer.buyer == user))
    return list(query.order_by(Transfer.id.desc()).limit(50))


def transfers_needing_staff(now=None):
    """Objected requests (staff decide them) and moves running longer than they should."""
    now = now or utcnow()
    cutoff = now - datetime.timedelta(seconds=TRANSFER_STUCK_SECONDS)
    slow_move = Transfer.state.in_(("moving", "returning")) & (
        Transfer.decided_at.is_null() | (Transfer.decided_at <= cutoff)
    )
    query = Transfer.select().where(Transfer.state.in_(("objected", "unanswered")) | slow_move)
    return list(query.order_by(Transfer.id).limit(100))


def failed_migrations():
    """Migration rows that failed for good."""
    return list(MigrationRow.select().where(MigrationRow.state == "failed").limit(100))


# --- outgoing mail --------------------------------------------------------------------------------

OUTBOX_STATES = outbox.STATES
OUTBOX_STATE_LABELS = outbox.STATE_LABELS


def outbox_rows(address="", state="", staff=None):
    """The newest outbox rows (at most outbox.STAFF_PAGE_SIZE), for one address when given.
    Looking at an account holder's mail is recorded on their activity (as `staff`), as
    opening their customer page is."""
    if staff is not None and address:
        customer = User.get_or_none(User.email == address.strip().lower())
        if customer is not None:
            audit.record("support.mail_viewed", user=customer, actor=staff)
    return outbox.recent(address=address or None, state=state or None)


def outbox_body(row):
    """What staff may read of a mail: its body, except a security mail's (sign-in and reset
    links, invitations, offers: whoever holds the link can act on it)."""
    return outbox.shown_body(row)


# --- staff actions (each with a reason, audited) ----------------------------------------------


def resend_verification(staff, customer, reason):
    """Queue a new verification link for the customer (outbox). Raises SupportError (already
    verified)."""
    reason = check_reason(reason)
    if customer.is_verified:
        raise SupportError(_l("This address is already verified."), 409)
    with db.atomic():
        accounts.send_verification(customer)
        audit.record("support.resent_verification", user=customer, actor=staff, reason=reason)


def release_device(staff, device, reason):
    """Release a device from its owner (theft, returns) through the devices service, as the
    owner's own release. Raises SupportError, or devices.DeviceError when the cloud fails
    (then nothing changed)."""
    reason = check_reason(reason)
    owner = User.get_or_none(User.id == device.owner_id) if device.owner_id else None
    if owner is None:
        raise SupportError(_l("This device has no owner, so there is nothing to release."), 409)
    if device.claim_state is not None:
        raise SupportError(
            _l("A claim or release of this device is in progress; retry or cancel that instead."), 409
        )
    name = devices.display_name(device)
    devices.release(owner, device)
    audit.record(
        "support.released_device",
        user=owner,
        actor=staff,
        device_id=device.device_id,
        name=name,
        reason=reason,
    )
    log.info("Staff %s released device %s", staff.id, device.device_id)


def retry_provisioning(staff, customer, reason):
    """Try the customer's account setup again now (ignoring the backoff). Returns the
    account; SupportError if nothing is pending."""
    reason = check_reason(reason)
    if customer.provisioning_state != provisioning.PENDING:
        raise SupportError(_l("This account's setup is not waiting for anything."), 409)
    User.update(provisioning_next_at=None).where(
        (User.id == customer.id) & (User.provisioning_state == provisioning.PENDING)
    ).execute()
    audit.record("support.retried", user=customer, actor=staff, operation="account setup", reason=reason)
    return provisioning.resume_user(User.get_by_id(customer.id))


def _step_label(device, state):
    action = {"claiming": "adding", "releasing": "release"}.get(state, state)
    return f"the {action} of {devices.display_name(device)}"


def _run_step_now(device):
    """Let the devices service's own resumer finish this device's step now (it waits a grace
    period after a step started; support doesn't)."""
    long_ago = utcnow() - datetime.timedelta(seconds=devices.RESUME_GRACE_SECONDS + 1)
    Device.update(claim_state_at=long_ago).where(
        (Device.device_id == device.device_id) & Device.claim_state.is_null(False)
    ).execute()
    devices.resume_pending()
    return Device.get_by_id(device.device_id)


def retry_device_step(staff, device, reason):
    """Finish a stuck claim or release now. Returns the device as it is afterwards."""
    reason = check_reason(reason)
    state = device.claim_state
    if state is None:
        raise SupportError(_l("Nothing is in progress for this device."), 409)
    if state not in DEVICE_STEPS:
        raise SupportError(
            _l("This device is busy with another operation (%(state)s); it finishes by itself.", state=state),
            409,
        )
    owner = User.get_or_none(User.id == device.owner_id) if device.owner_id else None
    audit.record(
        "support.retried",
        user=owner,
        actor=staff,
        device_id=device.device_id,
        operation=_step_label(device, state),
        reason=reason,
    )
    return _run_step_now(device)


def cancel_device_step(staff, device, reason):
    """Undo a stuck claim or release: a claim is turned into a release (the device goes back
    to nobody, also on Particle), a release into a claim (it stays with its owner, also on
    Particle); the devices service's resumer carries it out. Returns the device afterwards."""
    reason = check_reason(reason)
    state = device.claim_state
    owner = User.get_or_none(User.id == device.owner_id) if device.owner_id else None
    if state is None:
        raise SupportError(_l("Nothing is in progress for this device."), 409)
    if owner is None:
        raise SupportError(_l("This device has no owner here; retry the step instead."), 409)
    reverse = {"claiming": "releasing", "releasing": "claiming"}.get(state)
    if reverse is None:
        raise SupportError(_l("Support can't cancel a step “%(state)s”.", state=state), 409)
    if reverse == "claiming" and not owner.particle_customer_id:
        raise SupportError(
            _l("The owner's account isn't set up with the device cloud, so the release can't be undone."), 409
        )
    changed = (
        Device.update(claim_state=reverse)
        .where((Device.device_id == device.device_id) & (Device.claim_state == state))
        .execute()
    )
    if not changed:
        raise SupportError(_l("The step finished or changed meanwhile. Reload the page."), 409)
    audit.record(
        "support.cancelled",
        user=owner,
        actor=staff,
        device_id=device.device_id,
        operation=_step_label(device, state),
        reason=reason,
    )
    return _run_step_now(device)


def decide_transfer(staff, transfer_id, outcome, reason, confirmed=False):
    """Decide a disputed transfer (a request its owner objected to) through the transfers
    service: outcome "requester" moves the device (the staff member must confirm that),
    "owner" keeps it. The reason is checked first, so a form sent without one explains
    itself whatever it points at. Returns the transfer afterwards; raises SupportError (404
    for an unknown transfer)."""
    check_reason(reason)
    transfer = transfers.get(transfer_id) if isinstance(transfer_id, int) else None
    if transfer is None:
        raise SupportError(_l("There is no such transfer."), 404)
    if outcome == "requester" and not confirmed:
        raise SupportError(_l("Tick the box to confirm that the device leaves its owner's account."), 422)
    try:
        return transfers.decide_dispute(staff, transfer, outcome, reason)
    except transfers.TransferError as exc:
        raise SupportError(exc.message, exc.status) from None
