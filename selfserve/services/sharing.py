"""Sharing a device with people: invitations by email, grants, revocations.

The owner, or a manager up to their own role, invites an address with a role (and an
optional end date). The invitee gets a signed link (purpose "share_invite", expires after
INVITE_DAYS) that shows the invitation with a button; they accept signed in with that
verified address (signing up first if needed: the invitation also waits on their devices
page). Accepting moves the invitation from pending with one atomic UPDATE, so a link works
once and a withdrawn invitation can't be accepted, whatever the timing. Every step is in the
audit trail of the owner and of the invitee (services/access.py records grants and endings).
"""

import dataclasses
import datetime
import logging
import secrets

import peewee

from selfserve import device_models
from selfserve import mail
from selfserve import tokens
from selfserve.i18n import lazy_text as _l
from selfserve.models import Device
from selfserve.models import Grant
from selfserve.models import Invitation
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.services import access
from selfserve.services import audit
from selfserve.services.accounts import absolute_url
from selfserve.services.accounts import email_problem
from selfserve.services.accounts import normalize_email

log = logging.getLogger(__name__)

INVITE_DAYS = 7
MAX_ACCESS_DAYS = 5 * 366  # an end date further away is a typo


class SharingError(Exception):
    """A refusal to show. `field` names the form field at fault."""

    def __init__(self, message, kind="error", status=400, field=None):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.status = status
        self.field = field


def grantable_by(role):
    """The roles someone with `role` may give (and revoke): up to their own, never owner."""
    if not access.at_least(role, "manager"):
        return ()
    return tuple(r for r in access.GRANTABLE if access.at_least(role, r))


def _name(device):
    from selfserve.services import devices

    return devices.display_name(device)


def parse_until(raw, now=None):
    """An optional end date "YYYY-MM-DD" (UTC): access ends at the end of that day. Returns a
    naive UTC datetime or None; raises SharingError for a bad or past date."""
    raw = (raw or "").strip()
    if not raw:
        return None
    try:
        day = datetime.date.fromisoformat(raw[:10])
    except ValueError:
        raise SharingError(
            _l("Enter the end date as a date, like 2030-05-31."), kind="invalid", field="until", status=422
        )
    now = now or utcnow()
    ends = datetime.datetime.combine(day + datetime.timedelta(days=1), datetime.time())
    if ends <= now:
        raise SharingError(
            _l("The end date is in the past. Pick today or a later day."),
            kind="invalid",
            field="until",
            status=422,
        )
    if ends - now > datetime.timedelta(days=MAX_ACCESS_DAYS):
        raise SharingError(
            _l("Pick an end date within five years, or none."), kind="invalid", field="until", status=422
        )
    return ends


# --- invitations ------------------------------------------------------------------------------


def invite(actor, device, email, role, until="", now=None, to_organisation=False):
    """Invite `email` to `device` with `role` (device comes from device_for, with its role).
    With `to_organisation`, whoever accepts (signed in with that address) does so for an
    organisation they administer: the grant goes to that organisation (all its members).

    Raises SharingError for a role above the actor's, a bad address or date, the owner's own
    address, or an invitation to that address already waiting. The email with the link is
    queued (outbox) in the transaction that creates the invitation, so a mail server that is
    down only delays it."""
    now = now or utcnow()
    if role not in grantable_by(getattr(device, "role", None)):
        raise SharingError(_l("You can't give that role."), kind="role", field="role", status=422)
    email = normalize_email(email)
    problem = email_problem(email)
    if problem:
        raise SharingError(problem, kind="invalid", field="email", status=422)
    access_until = parse_until(until, now)
    owner = User.get_by_id(device.owner_id)
    if email == owner.email:
        raise SharingError(_l("That is the owner's own address."), kind="invalid", field="email", status=422)
    if email == actor.email:
        raise SharingError(_l("That is your own address."), kind="invalid", field="email", status=422)
    waiting = Invitation.get_or_none(
        (Invitation.device == device.device_id)
        & (Invitation.email == email)
        & (Invitation.state == "pending")
        & (Invitation.expires_at > now)
    )
    if waiting is not None:
        raise SharingError(
            _l("An invitation to that address is already waiting. Withdraw it first to send a new one."),
            kind="duplicate",
            field="email",
            status=409,
        )
    with db.atomic():
        invitation = Invitation.create(
            device=device.device_id,
            email=email,
            role=role,
            access_until=access_until,
            invited_by=actor.id,
            created_at=now,
            expires_at=now + datetime.timedelta(days=INVITE_DAYS),
            nonce=secrets.token_hex(16),
            to_organisation=bool(to_organisation),
            mailed_at=now,  # queued below, in this transaction
        )
        audit.record(
            "sharing.invited",
            user=owner,
            actor=actor,
            device_id=device.device_id,
            name=_name(device),
            to=email,
            role=role,
            until=access.iso_moment(access_until),
            by=actor.email,
            for_organisation=bool(to_organisation) or None,
        )
        _queue_invitation_mail(invitation)
    return invitation


def invitation_link(invitation):
    token = tokens.make("share_invite", {"i": invitation.id, "n": invitation.nonce})
    return absolute_url("sharing.invitation_link", token=token)


def from_link(token):
    """The invitation a link names. Raises tokens.TokenError (bad, expired, or not this one)."""
    payload = tokens.read("share_invite", token)
    invitation = (
        Invitation.get_or_none(Invitation.id == payload.get("i"))
        if isinstance(payload.get("i"), int)
        else None
    )
    if invitation is None or not tokens.same(invitation.nonce, payload.get("n")):
        raise tokens.TokenInvalid()
    return invitation


def _queue_invitation_mail(invitation):
    """Queue the invitation's email (outbox). `invite` calls it inside the transaction that
    creates the invitation, so the email exists exactly when the invitation does; the outbox
    retries a mail server that is down."""
    device = Device.get_by_id(invitation.device_id)
    inviter = User.get_or_none(User.id == invitation.invited_by_id)
    mail.send(
        invitation.email,
        _l("A device was shared with you"),
        "share_invitation",
        sensitive=True,  # the link accepts the invitation
        dedupe_key=f"invitation:{invitation.id}",
        link=invitation_link(invitation),
        inviter=inviter.email if inviter else _l("Someone"),
        device_label=device_models.device_label(device),
        role=invitation.role,
        role_label=access.ROLE_LABELS[invitation.role],
        until=invitation.access_until,  # the email shows both in its recipient's zone
        expires=invitation.expires_at,
        to_organisation=invitation.to_organisation,
    )


def too_late_message(invitation, now=None):
    now = now or utcnow()
    if invitation.state == "accepted":
        return _l("This invitation was already accepted.")
    if invitation.state == "withdrawn":
        return _l("This invitation was withdrawn. Ask the person who sent it for a new one.")
    if invitation.state == "ended":
        return _l("This invitation ended: the device changed owner.")
    if invitation.expires_at <= now or invitation.state == "expired":
        return _l("This invitation has expired. Ask the person who sent it for a new one.")
    return None


def is_open(invitation, now=None):
    return too_late_message(invitation, now) is None


def for_invitee(user, invitation_id, now=None):
    """The invitation `invitation_id` if it was sent to `user`'s verified address, else None."""
    if not user.is_verified or not isinstance(invitation_id, int):
        return None
    return Invitation.get_or_none((Invitation.id == invitation_id) & (Invitation.email == user.email))


def waiting_for(user, now=None):
    """Open invitations sent to `user`'s verified address, with their devices, newest first."""
    if not user.is_verified:
        return []
    now = now or utcnow()
    return list(
        Invitation.select(Invitation, Device)
        .join(Device, on=(Invitation.device == Device.device_id))
        .where(
            (Invitation.email == user.email) & (Invitation.state == "pending") & (Invitation.expires_at > now)
        )
        .order_by(Invitation.id.desc())
    )


def organisations_to_accept_for(user):
    """The organisations `user` administers (an invitation to an organisation is accepted for
    one of them), by name."""
    from selfserve.services import organisations

    return [org for org in organisations.organisations_of(user) if org.my_role == "admin"]


def _accepting_organisation(user, invitation, organisation_id):
    """The organisation `user` accepts `invitation` for: one they administer, chosen when
    they run several. Raises SharingError."""
    mine = organisations_to_accept_for(user)
    if not mine:
        raise SharingError(
            _l(
                "This invitation is for an organisation. You need to be an admin of one to accept it: "
                "create an organisation, or ask an admin of yours to forward it."
            ),
            kind="not_admin",
            status=403,
        )
    if organisation_id is None and len(mine) == 1:
        return mine[0]
    chosen = next((org for org in mine if org.id == organisation_id), None)
    if chosen is None:
        raise SharingError(
            _l("Choose the organisation you accept it for."), kind="invalid", field="organisation", status=422
        )
    return chosen


def accept(user, invitation, now=None, organisation_id=None):
    """Accept `invitation` as `user` (signed in, verified, the invited address); for an
    invitation to an organisation, on behalf of one they administer (`organisation_id`, needed
    when they run several). Returns the Grant. Raises SharingError: wrong account, not
    verified, not an admin, or too late (withdrawn, used, expired, the device changed hands,
    the inviter lost the right to give that role)."""
    now = now or utcnow()
    if not user.is_verified:
        raise SharingError(
            _l("Verify your email address first, then accept the invitation."), kind="unverified", status=409
        )
    if user.email != invitation.email:
        raise SharingError(
            _l(
                "This invitation is for %(email)s. Sign in with that address to accept it.",
                email=invitation.email,
            ),
            kind="wrong_account",
            status=403,
        )
    with db.atomic():
        taken = (
            Invitation.update(state="accepted", decided_at=now, decided_by=user.id)
            .where(
                (Invitation.id == invitation.id)
                & (Invitation.state == "pending")
                & (Invitation.expires_at > now)
            )
            .execute()
        )
        fresh = Invitation.get_by_id(invitation.id)
        if not taken:
            raise SharingError(
                too_late_message(fresh, now) or _l("This invitation can't be accepted."),
                kind="too_late",
                status=410,
            )
        # After the too-late check (a withdrawn invitation says so first); a refusal here rolls
        # the acceptance back, so the invitation stays open for the right organisation.
        holder = (
            _accepting_organisation(user, invitation, organisation_id) if invitation.to_organisation else None
        )
        device = Device.get_by_id(invitation.device_id)
        inviter = User.get_or_none(User.id == invitation.invited_by_id)
        inviter_role = access.role_of(inviter, device, now) if inviter else None
        if device.claim_state is not None or invitation.role not in grantable_by(inviter_role):
            # Rolled back with the transaction: the invitation stays as it was.
            raise SharingError(
                _l(
                    "This invitation is no longer valid: the person who sent it can't give that access any more."
                ),
                kind="too_late",
                status=410,
            )
        if device.owner_id == user.id or (holder is not None and device.owner_id == holder.account_id):
            raise SharingError(_l("This device is already yours."), kind="too_late", status=409)
        grant = access.give(
            device,
            user if holder is None else None,
            invitation.role,
            inviter,
            expires_at=invitation.access_until,
            via="invitation",
            now=now,
            grantee_org=holder,
        )
        Invitation.update(grant=grant.id).where(Invitation.id == invitation.id).execute()
        # Who accepted: the person, or an organisation and the admin who accepted for it (put
        # into words when shown, audit.describe).
        to = (
            {"to": user.email}
            if holder is None
            else {"to_organisation": holder.name, "accepted_by": user.email}
        )
        for concerned in (device.owner_id, holder.account_id if holder is not None else None):
            if concerned is not None:
                audit.record(
                    "sharing.invitation_accepted",
                    user=concerned,
                    actor=user,
                    device_id=device.device_id,
                    name=_name(device),
                    role=invitation.role,
                    **to,
                )
    return grant


def withdraw(actor, device, invitation_id, now=None):
    """Withdraw a pending invitation on `device` (from device_for(need="manager")). A manager
    may withdraw invitations up to their own role. Raises SharingError (404 when there is no
    such open invitation on this device)."""
    now = now or utcnow()
    invitation = Invitation.get_or_none(
        (Invitation.id == invitation_id) & (Invitation.device == device.device_id)
    )
    if invitation is None or invitation.role not in grantable_by(device.role):
        raise SharingError(_l("There is no such invitation."), kind="missing", status=404)
    with db.atomic():
        done = (
            Invitation.update(state="withdrawn", decided_at=now, decided_by=actor.id)
            .where((Invitation.id == invitation.id) & (Invitation.state == "pending"))
            .execute()
        )
        if not done:
            raise SharingError(
                too_late_message(Invitation.get_by_id(invitation.id), now) or _l("Already closed."),
                kind="too_late",
                status=409,
            )
        audit.record(
            "sharing.invitation_withdrawn",
            user=device.owner_id,
            actor=actor,
            device_id=device.device_id,
            name=_name(device),
            to=invitation.email,
            role=invitation.role,
            by=actor.email,
        )
    return invitation


def revoke(actor, device, grant_id, now=None):
    """Revoke a live grant on `device` (from device_for(need="manager")); a manager may revoke
    grants up to their own role. Raises SharingError (404 when there is no such live grant)."""
    grant = Grant.get_or_none((Grant.id == grant_id) & (Grant.device == device.device_id) & access.live(now))
    if grant is None or grant.role not in grantable_by(device.role):
        raise SharingError(_l("There is no such access to revoke."), kind="missing", status=404)
    if not access.revoke(grant, actor, now):
        raise SharingError(_l("That access had already ended."), kind="too_late", status=409)
    return grant


# --- dealers ---------------------------------------------------------------------------------------


def grant_dealer(actor, device, organisation_name, role, until, now=None):
    """Give a dealer (an organisation of kind "dealer": every member of it) `role` on `device`
    until the end of day `until` (required: a dealer's access is for a visit, not for ever).
    The owner, or a manager up to their role. Raises SharingError."""
    from selfserve.models import Organisation

    now = now or utcnow()
    if role not in grantable_by(getattr(device, "role", None)):
        raise SharingError(_l("You can't give that role."), kind="role", field="dealer_role", status=422)
    dealer = Organisation.get_or_none(
        (Organisation.name == (organisation_name or "").strip()) & (Organisation.kind == "dealer")
    )
    if dealer is None:
        raise SharingError(
            _l("There is no dealer with that name."), kind="invalid", field="dealer", status=422
        )
    expires_at = parse_until(until, now)
    if expires_at is None:
        raise SharingError(
            _l("Give the last day of the visit: a dealer's access always ends."),
            kind="invalid",
            field="dealer_until",
            status=422,
        )
    return access.give(
        device, None, role, actor, expires_at=expires_at, via="dealer", now=now, grantee_org=dealer
    )


@dataclasses.dataclass
class DealerAsk:
    """What a device's dealer asks for at claim: the organisation and the role."""

    dealer: object  # Organisation
    role: str


CLAIM_TOKEN = "claim_dealer"
DEALER_ROLES_AT_CLAIM = ("viewer", "operator")  # never manager: a dealer doesn't share on


def dealer_at_claim(device):
    """The dealer the registry says `device` was sold through, and the access it asks for
    (DEALER_ACCESS_AT_CLAIM), or None: no dealer named, no such dealer organisation here, or
    the company asks for none."""
    from flask import current_app

    from selfserve.models import Organisation

    role = current_app.config.get("DEALER_ACCESS_AT_CLAIM", "none")
    if role not in DEALER_ROLES_AT_CLAIM or not device.sold_through:
        return None
    dealer = Organisation.get_or_none(
        (Organisation.name == device.sold_through) & (Organisation.kind == "dealer")
    )
    return DealerAsk(dealer=dealer, role=role) if dealer is not None else None


def claim_token(user, device):
    """A signed token saying `user` proved `device`'s label (for the dealer step of the claim,
    so the setup code is never sent back to the page)."""
    return tokens.make(CLAIM_TOKEN, {"d": device.device_id, "u": user.id})


def device_of_claim_token(user, token):
    """The device a claim token of `user` names. Raises tokens.TokenError."""
    payload = tokens.read(CLAIM_TOKEN, token)
    if payload.get("u") != user.id or not isinstance(payload.get("d"), str):
        raise tokens.TokenInvalid()
    device = Device.get_or_none(Device.device_id == payload["d"])
    if device is None:
        raise tokens.TokenInvalid()
    return device


def claim_with_dealer_choice(user, token, choice):
    """Finish a claim whose label `user` proved (`token`), with their choice of the dealer's
    access: "none" (the default) or the role the dealer asks for. The grant is an ordinary
    grant to the dealer organisation (audited, revocable on the Sharing section). Returns
    (device, grant or None). Raises tokens.TokenError, SharingError, devices.DeviceError."""
    from selfserve.services import devices

    device = device_of_claim_token(user, token)
    ask = dealer_at_claim(device)
    if choice not in ("none", ask.role if ask else "none"):
        raise SharingError(
            _l("Choose what access the dealer gets."), kind="invalid", field="dealer_access", status=422
        )
    problem = devices.claim_problem(user)
    if problem:
        raise devices.DeviceError(problem, kind="not_ready", status=409)
    try:
        device = devices.claim_checked(user, device)
    except devices.DeviceError as exc:
        # The cloud's answer was lost and the sweep finishes the claim: the choice holds for it
        # (the dealer reaches the device once it is added; an undone claim's grant ends at the
        # next claim: access.end_stale).
        exc.dealer_grant = None
        claimed = Device.get_by_id(device.device_id)
        if exc.kind == "checking" and ask is not None and choice != "none" and claimed.owner_id == user.id:
            exc.dealer_grant = access.give(
                claimed, None, ask.role, user, via="dealer at claim", grantee_org=ask.dealer
            )
        raise
    if ask is None:
        return device, None
    if choice == "none":
        audit.record(
            "sharing.dealer_declined",
            user=user,
            actor=user,
            device_id=device.device_id,
            name=_name(device),
            to_organisation=ask.dealer.name,
            role=ask.role,
        )
        return device, None
    grant = access.give(device, None, ask.role, user, via="dealer at claim", grantee_org=ask.dealer)
    return device, grant


def dealers():
    """The dealers one can give access to, by name."""
    from selfserve.models import Organisation

    return list(Organisation.select().where(Organisation.kind == "dealer").order_by(Organisation.name))


# --- what pages show ---------------------------------------------------------------------------


@dataclasses.dataclass
class DeviceSharing:
    """The Sharing section of a device page: live grants and open invitations, and what the
    viewer may do with them."""

    grants: list
    invitations: list
    can_give: tuple


def of_device(device, now=None):
    now = now or utcnow()
    invitations = list(
        Invitation.select()
        .where(
            (Invitation.device == device.device_id)
            & (Invitation.state == "pending")
            & (Invitation.expires_at > now)
        )
        .order_by(Invitation.id.desc())
    )
    return DeviceSharing(
        grants=access.grants_of_device(device.device_id, now),
        invitations=invitations,
        can_give=grantable_by(getattr(device, "role", None)),
    )


# --- every device a person can reach ---------------------------------------------------------------

PAGE_SIZE = 50


@dataclasses.dataclass
class ReachGroup:
    owner_label: str  # the owner's address, or the organisation's name
    group_name: str  # None: not through a group (own devices, direct grants, ungrouped)
    devices: list  # Device rows, each with `role`


@dataclasses.dataclass
class ReachPage:
    groups: list
    total: int  # rows (a device in two groups counts twice)
    page: int
    pages: int
    query: str


def reachable(user, page=1, query="", exclude_own=True, per_page=PAGE_SIZE, now=None):
    """Every device `user` can reach (owned, through an organisation they run, or granted to
    them or their organisations on the device or on a group), one row per (device, group),
    grouped by owner and group, filtered by name or serial, one page at a time.

    A fixed number of queries whatever the fleet: one union for the rows (with the best role
    of each), one count, one for the page's devices and owners."""
    from selfserve.models import DeviceGroup
    from selfserve.models import GroupDevice
    from selfserve.models import Membership
    from selfserve.models import Organisation

    now = now or utcnow()
    null_group = peewee.SQL("NULL")
    rank_of_grant = peewee.Case(Grant.role, [(role, rank) for role, rank in access.RANK.items()], 0)
    my_orgs = Membership.select(Membership.organisation).where(Membership.user == user.id)
    admin_accounts = (
        Organisation.select(Organisation.account)
        .join(Membership)
        .where((Membership.user == user.id) & (Membership.role == "admin"))
    )
    to_me = (Grant.grantee == user.id) | Grant.grantee_org.in_(my_orgs)
    owner_rank = access.RANK["owner"]

    parts = []
    if not exclude_own:
        parts.append(
            Device.select(
                Device.device_id, null_group.alias("group_name"), peewee.Value(owner_rank).alias("rank")
            ).where(Device.owner == user.id)
        )
    # Devices of organisations I run: every device, once per group it is in (or none).
    parts.append(
        Device.select(
            Device.device_id, DeviceGroup.name.alias("group_name"), peewee.Value(owner_rank).alias("rank")
        )
        .join(GroupDevice, peewee.JOIN.LEFT_OUTER, on=(GroupDevice.device == Device.device_id))
        .join(DeviceGroup, peewee.JOIN.LEFT_OUTER, on=(GroupDevice.group == DeviceGroup.id))
        .where(Device.owner.in_(admin_accounts))
    )
    # Grants on groups, to me or my organisations (only groups of the device's owner count).
    parts.append(
        GroupDevice.select(
            GroupDevice.device, DeviceGroup.name.alias("group_name"), rank_of_grant.alias("rank")
        )
        .join(DeviceGroup, on=(GroupDevice.group == DeviceGroup.id))
        .join(Organisation, on=(DeviceGroup.organisation == Organisation.id))
        .join(Grant, on=(Grant.group == DeviceGroup.id))
        .join(Device, on=(GroupDevice.device == Device.device_id))
        .where(to_me & access.live(now) & (Device.owner == Organisation.account))
    )
    # Grants on single devices.
    parts.append(
        Grant.select(Grant.device, null_group.alias("group_name"), rank_of_grant.alias("rank")).where(
            Grant.device.is_null(False) & to_me & access.live(now)
        )
    )
    union = parts[0]
    for part in parts[1:]:
        union = union | part
    reach = union.alias("reach")
    rows_query = (
        peewee.Select(
            from_list=[reach],
            columns=[Device.device_id, reach.c.group_name, peewee.fn.MAX(reach.c.rank).alias("rank")],
        )
        .join(Device, on=(Device.device_id == reach.c.device_id))
        .where(Device.claim_state.is_null() & Device.owner.is_null(False))
        # By the device's primary key, so its other columns may be ordered by (PostgreSQL).
        .group_by(Device.device_id, reach.c.group_name)
    )
    query = (query or "").strip()[:64]
    if query:
        pattern = f"%{query}%"
        rows_query = rows_query.where(Device.name**pattern | Device.serial_number**pattern)
    total = peewee.Select(from_list=[rows_query.alias("counted")], columns=[peewee.fn.COUNT(peewee.SQL("*"))])
    total = total.bind(db).scalar() or 0
    pages = max(1, -(-total // per_page))
    page = min(max(1, page), pages)
    ordered = rows_query.order_by(
        Device.owner, reach.c.group_name, Device.name, Device.serial_number, Device.device_id
    )
    rows = list(ordered.bind(db).offset((page - 1) * per_page).limit(per_page).tuples())
    ids = {row[0] for row in rows}
    Owner = User.alias()
    found = {
        device.device_id: device
        for device in Device.select(Device, Owner)
        .join(Owner, on=(Device.owner == Owner.id))
        .where(Device.device_id.in_(list(ids)))
    }
    org_names = {
        org.account_id: org.name
        for org in Organisation.select().where(Organisation.account.in_([d.owner_id for d in found.values()]))
    }
    groups = []
    for device_id, group_name, rank in rows:
        device = found[device_id]
        owner_label = org_names.get(device.owner_id) or device.owner.email
        if not groups or (groups[-1].owner_label, groups[-1].group_name) != (owner_label, group_name):
            groups.append(ReachGroup(owner_label=owner_label, group_name=group_name, devices=[]))
        copy = Device(**device.__data__)
        copy.role = access.ROLES[rank]
        groups[-1].devices.append(copy)
    return ReachPage(groups=groups, total=total, page=page, pages=pages, query=query)
