"""Organisations: companies (and dealers) that own devices, their members, groups and grants.

An organisation owns its devices through an account of its own (`Organisation.account`, a
User row with role "organisation" and no usable password) holding its Particle shadow
customer, created with the organisation through the provisioning steps (and the sweep, should
Particle be down). So claims, releases and function calls on its devices run exactly as for a
person's, with the organisation's customer token.

- Members: admin (everything, including what an owner does with the devices) or member
  (reaches what grants give them or the organisation). Removing a member ends their access
  at once: the access check reads the membership on every request.
- Groups: named subsets of the organisation's devices, overlapping freely. Adding or removing
  a device is idempotent (a unique pair), so two admins editing one group at the same moment
  end with the union of their additions, never a duplicate or an error.
- Grants on a group, to a person or to another organisation, optionally until a date
  (services/access.py checks them).
"""

import dataclasses
import datetime
import re
import secrets

import peewee
from flask import abort

from selfserve import passwords  # noqa: F401 - the "!" hash below is one it never accepts
from selfserve.i18n import lazy_text as _l
from selfserve.models import Device
from selfserve.models import DeviceGroup
from selfserve.models import Grant
from selfserve.models import GroupDevice
from selfserve.models import Membership
from selfserve.models import Organisation
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.services import access
from selfserve.services import audit
from selfserve.services import provisioning
from selfserve.services.accounts import normalize_email

NAME_MAX = 100
ROLES = ("admin", "member")
UNUSABLE_PASSWORD = "!"  # not an Argon2 hash: passwords.check_password is always False for it


class OrgError(Exception):
    """A refusal to show; `field` names the form field at fault."""

    def __init__(self, message, status=400, field=None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field


def _clean_name(raw, too_short=None):
    """`too_short`: the refusal for a name under 2 characters (a whole sentence per kind of
    name, so translators see each)."""
    name = re.sub(r"\s+", " ", raw or "").strip()
    if len(name) < 2:
        raise OrgError(too_short or _l("Enter a name of at least 2 characters."), 422, field="name")
    if len(name) > NAME_MAX or any(ord(ch) < 32 for ch in name):
        raise OrgError(
            _l("Use at most %(count)s letters, digits, spaces and punctuation.", count=NAME_MAX),
            422,
            field="name",
        )
    return name


# --- the organisation ---------------------------------------------------------------------------


def create(creator, name, kind="company", now=None):
    """Create an organisation with `creator` as its first admin, and its Particle customer
    (at once when the cloud answers, else by the sweep). Raises OrgError."""
    now = now or utcnow()
    if not creator.is_verified:
        raise OrgError(_l("Verify your email address first."), 409)
    if kind not in ("company", "dealer"):
        raise OrgError(_l("Unknown kind of organisation."), 422)
    name = _clean_name(name)
    try:
        with db.atomic():
            account = User.create(
                email=f"org-{secrets.token_hex(8)}@organisations.invalid",
                password_hash=UNUSABLE_PASSWORD,
                role="organisation",
                email_verified_at=now,
                provisioning_state=provisioning.PENDING,
                particle_customer_id=provisioning.new_customer_id(),
            )
            organisation = Organisation.create(name=name, kind=kind, account=account, created_by=creator.id)
            Membership.create(organisation=organisation, user=creator, role="admin")
            audit.record("org.created", user=creator, organisation=name)
            audit.record("org.created", user=account, actor=creator, organisation=name)
    except peewee.IntegrityError:
        raise OrgError(_l("An organisation with that name exists already."), 409, field="name")
    if provisioning.take(account.id, now):
        provisioning.attempt(account.id, now)
    return organisation


def membership(user, organisation_id):
    """`user`'s Membership of organisation `organisation_id` (with the organisation), or None."""
    if user is None or not getattr(user, "is_authenticated", False) or not isinstance(organisation_id, int):
        return None
    return (
        Membership.select(Membership, Organisation)
        .join(Organisation)
        .where((Membership.organisation == organisation_id) & (Membership.user == user.id))
        .first()
    )


def org_for(user, organisation_id, need="member"):
    """The organisation if `user` is a member (an admin when `need` is "admin"), else 404 (the
    same answer as an unknown id: outsiders learn nothing)."""
    found = membership(user, organisation_id)
    if found is None or (need == "admin" and found.role != "admin"):
        abort(404)
    organisation = found.organisation
    organisation.my_role = found.role
    return organisation


def organisations_of(user):
    """The organisations `user` belongs to, with their role, by name."""
    rows = (
        Membership.select(Membership, Organisation)
        .join(Organisation)
        .where(Membership.user == user.id)
        .order_by(Organisation.name)
    )
    found = []
    for row in rows:
        row.organisation.my_role = row.role
        found.append(row.organisation)
    return found


def account_of(organisation):
    return User.get_by_id(organisation.account_id)


# --- members --------------------------------------------------------------------------------------


def add_member(admin, organisation, email, role="member"):
    """Add the person with this (verified) address. Raises OrgError."""
    if role not in ROLES:
        raise OrgError(_l("Choose admin or member."), 422, field="role")
    person = User.get_or_none(User.email == normalize_email(email))
    if person is None or person.role != "customer" or not person.is_verified:
        raise OrgError(
            _l("There is no verified account with that address. Ask them to sign up first."),
            422,
            field="email",
        )
    try:
        with db.atomic():
            Membership.create(organisation=organisation.id, user=person.id, role=role)
    except peewee.IntegrityError:
        raise OrgError(_l("They are a member already."), 409, field="email")
    _audit_both(admin, person, organisation, "org.member_added", role=role)
    return person


def remove_member(admin, organisation, user_id):
    """Remove a member: every access they had through the organisation ends at once. The last
    admin can't be removed (someone must run it). Raises OrgError."""
    with db.atomic():
        row = Membership.get_or_none(
            (Membership.organisation == organisation.id) & (Membership.user == user_id)
        )
        if row is None:
            raise OrgError(_l("They are not a member."), 404)
        if row.role == "admin":
            admins = Membership.select().where(
                (Membership.organisation == organisation.id) & (Membership.role == "admin")
            )
            if admins.count() <= 1:
                raise OrgError(_l("They are the last admin. Make someone else admin first."), 409)
        person = User.get_by_id(user_id)
        end_membership(row, organisation, admin, person.email, role=row.role)
        audit.record(
            "org.member_removed_me",
            user=person,
            actor=admin,
            to=person.email,
            organisation=organisation.name,
            role=row.role,
        )
    return person


def end_membership(membership, organisation, actor, named, **detail):
    """Delete `membership`, record it on the organisation's trail, naming who left `named`
    (their address; an erased account's anonymous label), and announce the access it gave as
    ended once the caller's transaction commits. False when the row was gone already."""
    if not Membership.delete().where(Membership.id == membership.id).execute():
        return False
    audit.record(
        "org.member_removed",
        user=organisation.account_id,
        actor=actor,
        to=named,
        organisation=organisation.name,
        **detail,
    )
    access.announce_ended(None, user_id=membership.user_id, org_id=organisation.id, cause="removed")
    return True


def members(organisation):
    return list(
        Membership.select(Membership, User)
        .join(User)
        .where(Membership.organisation == organisation.id)
        .order_by(User.email)
    )


def _audit_both(admin, person, organisation, action, **detail):
    audit.record(
        action,
        user=organisation.account_id,
        actor=admin,
        to=person.email,
        organisation=organisation.name,
        **detail,
    )
    audit.record(
        action + "_me", user=person, actor=admin, to=person.email, organisation=organisation.name, **detail
    )


# --- groups ---------------------------------------------------------------------------------------


def create_group(admin, organisation, name):
    name = _clean_name(name, _l("Enter a group name of at least 2 characters."))
    try:
        with db.atomic():
            group = DeviceGroup.create(organisation=organisation.id, name=name)
    except peewee.IntegrityError:
        raise OrgError(_l("There is a group with that name already."), 409, field="name")
    audit.record("org.group_created", user=organisation.account_id, actor=admin, group=name)
    return group


def group_of(organisation, group_id):
    group = DeviceGroup.get_or_none(
        (DeviceGroup.id == group_id) & (DeviceGroup.organisation == organisation.id)
    )
    if group is None:
        abort(404)
    return group


def _owned_devices(organisation, device_ids):
    ids = [d for d in device_ids if isinstance(d, str)]
    found = list(
        Device.select(Device.device_id).where(
            Device.device_id.in_(ids) & (Device.owner == organisation.account_id)
        )
    )
    if len(found) != len(set(ids)):
        raise OrgError(_l("Only devices of the organisation can be put in its groups."), 422, field="devices")
    return [d.device_id for d in found]


def add_to_group(admin, organisation, group, device_ids):
    """Put devices in a group (idempotent: already there counts as done). Returns how many
    were new."""
    ids = _owned_devices(organisation, device_ids)
    if not ids:
        return 0
    before = GroupDevice.select().where(GroupDevice.group == group.id).count()
    # INSERT ... ON CONFLICT DO NOTHING: two admins adding the same device both succeed.
    GroupDevice.insert_many([{"group": group.id, "device": d} for d in ids]).on_conflict_ignore().execute()
    added = GroupDevice.select().where(GroupDevice.group == group.id).count() - before
    audit.record(
        "org.group_devices_added", user=organisation.account_id, actor=admin, group=group.name, count=len(ids)
    )
    return max(added, 0)


def remove_from_group(admin, organisation, group, device_ids):
    """Take devices out of a group (idempotent). Access given by grants on the group ends for
    them at once."""
    removed = (
        GroupDevice.delete()
        .where(
            (GroupDevice.group == group.id)
            & GroupDevice.device.in_([d for d in device_ids if isinstance(d, str)])
        )
        .execute()
    )
    audit.record(
        "org.group_devices_removed",
        user=organisation.account_id,
        actor=admin,
        group=group.name,
        count=removed,
    )
    if removed:
        access.announce_ended(None, group_id=group.id, cause="ungrouped")
    return removed


@dataclasses.dataclass
class GroupView:
    group: DeviceGroup
    devices: list
    grants: list


def overview(organisation, now=None):
    """The organisation area: members, groups with their devices and grants, devices in no
    group. Database only; a fixed number of queries whatever the size."""
    groups = list(
        DeviceGroup.select().where(DeviceGroup.organisation == organisation.id).order_by(DeviceGroup.name)
    )
    by_group = {g.id: GroupView(group=g, devices=[], grants=[]) for g in groups}
    rows = (
        GroupDevice.select(GroupDevice, Device)
        .join(Device)
        .where(GroupDevice.group.in_([g.id for g in groups]))
        .order_by(Device.name, Device.serial_number)
    )
    for row in rows:
        by_group[row.group_id].devices.append(row.device)
    grants = (
        access.grants_with_holders()
        .where(Grant.group.in_([g.id for g in groups]) & access.live(now))
        .order_by(Grant.id)
    )
    for grant in grants:
        by_group[grant.group_id].grants.append(grant)
    devices = list(
        Device.select()
        .where(Device.owner == organisation.account_id)
        .order_by(Device.name, Device.serial_number)
    )
    return {"members": members(organisation), "groups": list(by_group.values()), "devices": devices}


# --- grants on groups -----------------------------------------------------------------------------


def grant_group(admin, organisation, group, role, email="", organisation_name="", expires_at=None, now=None):
    """Give a person (by verified address) or another organisation (by name) `role` on every
    device of `group`, optionally until `expires_at`. Replaces a live grant of the same pair."""
    now = now or utcnow()
    if role not in access.GRANTABLE:
        raise OrgError(_l("Choose viewer, operator or manager."), 422, field="role")
    person = holder_org = None
    if email:
        person = User.get_or_none(User.email == normalize_email(email))
        if person is None or person.role != "customer" or not person.is_verified:
            raise OrgError(_l("There is no verified account with that address."), 422, field="email")
        key = access.active_key(group_id=group.id, user_id=person.id)
    elif organisation_name:
        holder_org = Organisation.get_or_none(Organisation.name == organisation_name.strip())
        if holder_org is None or holder_org.id == organisation.id:
            raise OrgError(_l("There is no other organisation with that name."), 422, field="organisation")
        key = access.active_key(group_id=group.id, org_id=holder_org.id)
    else:
        raise OrgError(_l("Enter an address or an organisation."), 422, field="email")
    with db.atomic():
        Grant.update(ended_at=now, ended_by=admin.id, end_cause="replaced", active_key=None).where(
            Grant.active_key == key
        ).execute()
        grant = Grant.create(
            group=group.id,
            grantee=person.id if person else None,
            grantee_org=holder_org.id if holder_org else None,
            role=role,
            granted_by=admin.id,
            expires_at=expires_at,
            active_key=key,
            created_at=now,
        )
        detail = {"on_group": group.name, "role": role, **access.holder_detail(person, holder_org)}
        detail["by"] = admin.email
        if expires_at:
            detail["until"] = access.iso_moment(expires_at)
        audit.record("sharing.granted", user=organisation.account_id, actor=admin, **detail)
        if person is not None:
            audit.record("sharing.access_received", user=person, actor=admin, **detail)
    return grant


def revoke_group_grant(admin, organisation, grant_id):
    grant = (
        Grant.select()
        .join(DeviceGroup, on=(Grant.group == DeviceGroup.id))
        .where(
            (Grant.id == grant_id) & (DeviceGroup.organisation == organisation.id) & Grant.ended_at.is_null()
        )
        .first()
    )
    if grant is None:
        raise OrgError(_l("There is no such access."), 404)
    access.revoke(grant, admin)
    return grant


# --- activity -------------------------------------------------------------------------------------

ACTIVITY_PAGE_SIZE = 50
# What a member (not an admin) sees of the organisation's trail: what it shares and is given,
# its groups, and its devices; not who joined or left (membership is for admins to follow).
MEMBER_ACTIVITY_PREFIXES = ("sharing.", "org.group", "org.created", "device.", "transfer.")


def activity(organisation, role, before=None, page_size=ACTIVITY_PAGE_SIZE):
    """One page of the organisation's audit trail, newest first: every grant, revocation,
    invitation, acceptance and expiry concerning it (given on its devices and groups, or to
    it), membership and group changes. Admins see all of it; members see it without the
    membership changes. Returns (events, cursor of the next older page or None)."""
    events = audit.history(
        organisation.account_id,
        limit=page_size + 1,
        before_id=before,
        action_prefixes=None if role == "admin" else MEMBER_ACTIVITY_PREFIXES,
    )
    older = events[page_size - 1].id if len(events) > page_size else None
    return events[:page_size], older


def claim(admin, organisation, serial, setup_code):
    """Add a device to the organisation from its label (the devices service's claim, as the
    organisation's account)."""
    from selfserve.services import devices

    return devices.claim(account_of(organisation), serial, setup_code)


def until_from_days(days, now=None):
    """An end `days` days from now (None for 0 or nothing)."""
    if not days:
        return None
    return (now or utcnow()) + datetime.timedelta(days=int(days))
