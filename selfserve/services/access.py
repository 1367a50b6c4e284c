"""Who may do what with a device: the owner, and people holding a grant.

Particle allows one owner per device, so everybody else's access runs through our backend
with the owner's customer token, and this module decides it. Roles, each including the one
before:

    viewer    live values and history
    operator  also runs the device's functions
    manager   also renames it, and gives or revokes access up to their own role
    owner     alone releases or transfers it (never granted: it is Device.owner)

Deny by default: no live grant, no access. A grant is live while it is neither ended nor past
its `expires_at`; the time is checked at every lookup, so an expired grant ends by itself
with no job running. The sweep (`record_expired`) later writes the ending and its audit
rows. Ownership changes (release, transfer) end every grant of the device (`end_all`), in the
same transaction as the ownership write.

When a person's access ends, `announce_ended` sends `access_ended` (a blinker signal) with the
device id and the user id, once the change is committed (peewee's `after_commit`: a listener
that looked before the commit would still see the access): selfserve/push.py announces it to every site process,
whose open pages (server-sent events) check their viewer's access again at once and say that
it ended. Polls need nothing: their next request is a 404.
"""

import dataclasses
import logging

import peewee
from blinker import Namespace

from selfserve import i18n
from selfserve.i18n import lazy_text as _l
from selfserve.models import DeviceGroup
from selfserve.models import Grant
from selfserve.models import GroupDevice
from selfserve.models import Membership
from selfserve.models import Organisation
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.services import audit

log = logging.getLogger(__name__)

ROLES = ("viewer", "operator", "manager", "owner")
RANK = {role: rank for rank, role in enumerate(ROLES)}
GRANTABLE = ("viewer", "operator", "manager")
ROLE_LABELS = {
    "viewer": _l("Viewer: sees values and history"),
    "operator": _l("Operator: also runs the controls"),
    "manager": _l("Manager: also renames and shares"),
    "owner": _l("Owner"),
}

_signals = Namespace()
# sender: the device id (None for a grant on a group); keywords user_id (a person) or org_id
# (every member of that organisation), group_id (a grant on a group), cause: why.
access_ended = _signals.signal("selfserve.access-ended")


def at_least(role, need):
    """True when `role` includes `need` (None, no access, includes nothing)."""
    return role in RANK and RANK[role] >= RANK[need]


def live(now=None):
    """The condition for grants that give access right now."""
    now = now or utcnow()
    return Grant.ended_at.is_null() & (Grant.expires_at.is_null() | (Grant.expires_at > now))


def live_grant(user_id, device_id, now=None):
    """The live grant of `user_id` on `device_id`, or None."""
    return Grant.select().where((Grant.device == device_id) & (Grant.grantee == user_id) & live(now)).first()


def role_of(user, device, now=None):
    """The effective role of `user` on `device`: the highest of what they hold, or None.

    - "owner": they own it, or they are an admin of the organisation that owns it;
    - a granted role: a live grant on the device, or on a group of the owning organisation
      that holds the device, given to them or to an organisation they are a member of.
    At most two small indexed queries; a device's owner costs none."""
    if user is None or device.owner_id is None or getattr(user, "id", None) is None:
        return None
    if device.owner_id == user.id:
        return "owner"
    admin = (
        Membership.select(Membership.id)
        .join(Organisation)
        .where(
            (Organisation.account == device.owner_id)
            & (Membership.user == user.id)
            & (Membership.role == "admin")
        )
        .exists()
    )
    if admin:
        return "owner"
    roles = [row.role for row in Grant.select(Grant.role).where(_reaches(user.id, device) & live(now))]
    return max(roles, key=RANK.__getitem__) if roles else None


def _groups_holding(device):
    """Subquery: ids of the owning organisation's groups that hold `device` (a group of a
    former owner no longer counts, even before its rows are cleaned up)."""
    return (
        GroupDevice.select(GroupDevice.group)
        .join(DeviceGroup)
        .join(Organisation)
        .where((GroupDevice.device == device.device_id) & (Organisation.account == device.owner_id))
    )


def _organisations_of(user_id):
    return Membership.select(Membership.organisation).where(Membership.user == user_id)


def _reaches(user_id, device):
    """Grants that reach `user_id` on `device` (liveness not included)."""
    on_device = (Grant.device == device.device_id) | Grant.group.in_(_groups_holding(device))
    to_user = (Grant.grantee == user_id) | Grant.grantee_org.in_(_organisations_of(user_id))
    return on_device & to_user


def active_key(device_id=None, user_id=None, group_id=None, org_id=None):
    """The one-live-grant key of a (target, holder) pair."""
    target = f"d{device_id}" if device_id is not None else f"g{group_id}"
    holder = f"u{user_id}" if user_id is not None else f"o{org_id}"
    return f"{target}:{holder}"


def grants_with_holders():
    """Grants with the person or organisation holding each, in one query (for labels); the
    query is at Grant, ready for further joins and conditions."""
    Holder = Organisation.alias()
    return (
        Grant.select(Grant, User, Holder)
        .join(User, peewee.JOIN.LEFT_OUTER, on=(Grant.grantee == User.id))
        .switch(Grant)
        .join(Holder, peewee.JOIN.LEFT_OUTER, on=(Grant.grantee_org == Holder.id))
        .switch(Grant)
    )


def grants_of_device(device_id, now=None):
    """Live grants on a device (to people and to organisations), newest first."""
    return list(
        grants_with_holders().where((Grant.device == device_id) & live(now)).order_by(Grant.id.desc())
    )


@dataclasses.dataclass
class Reach:
    """One person or organisation with access to a device, and why (a sentence)."""

    who: str
    role: str
    why: str


def _why(grant, giver):
    """Why `grant` reaches the device, as one sentence in the reader's language and zone."""
    values = {"giver": giver, "date": i18n.local_date(grant.created_at)}
    if grant.expires_at:
        values["until"] = i18n.local_datetime(grant.expires_at)
    if grant.group_id:
        values["group"] = grant.group.name
        if grant.expires_at:
            return _l(
                "Through the group %(group)s, shared by %(giver)s on %(date)s, until %(until)s", **values
            )
        return _l("Through the group %(group)s, shared by %(giver)s on %(date)s, until revoked", **values)
    if grant.expires_at:
        return _l("Shared by %(giver)s on %(date)s, until %(until)s", **values)
    return _l("Shared by %(giver)s on %(date)s, until revoked", **values)


def who_can_see(device, now=None):
    """Everyone with access to `device` and what gives it, owner first (for the owner's "Who
    can see this device" page and the support console). Database only, a fixed number of
    queries."""
    found = []
    organisation = (
        Organisation.get_or_none(Organisation.account == device.owner_id) if device.owner_id else None
    )
    if organisation is not None:
        found.append(Reach(organisation_label(organisation.name), "owner", _l("Owns the device")))
        admins = (
            Membership.select(Membership, User)
            .join(User)
            .where((Membership.organisation == organisation.id) & (Membership.role == "admin"))
            .order_by(User.email)
        )
        found += [
            Reach(row.user.email, "owner", _l("Admin of %(name)s", name=organisation.name)) for row in admins
        ]
    elif device.owner_id is not None:
        owner = User.get_by_id(device.owner_id)
        found.append(Reach(owner.email, "owner", _l("Owns the device")))
    Giver = User.alias()
    Holder = Organisation.alias()
    grants = (
        Grant.select(Grant, User, Giver, Holder, DeviceGroup)
        .join(User, peewee.JOIN.LEFT_OUTER, on=(Grant.grantee == User.id))
        .switch(Grant)
        .join(Giver, peewee.JOIN.LEFT_OUTER, on=(Grant.granted_by == Giver.id))
        .switch(Grant)
        .join(Holder, peewee.JOIN.LEFT_OUTER, on=(Grant.grantee_org == Holder.id))
        .switch(Grant)
        .join(DeviceGroup, peewee.JOIN.LEFT_OUTER, on=(Grant.group == DeviceGroup.id))
        .where(((Grant.device == device.device_id) | Grant.group.in_(_groups_holding(device))) & live(now))
        .order_by(Grant.id)
    )
    for grant in grants:
        giver = grant.granted_by.email if grant.granted_by_id else _l("a former member")
        why = _why(grant, giver)
        if grant.grantee_org_id:
            why = _l("%(why)s (every member of %(name)s)", why=why, name=grant.grantee_org.name)
        found.append(Reach(holder_label(grant), grant.role, why))
    return found


def grants_given_on_devices_of(user, now=None):
    """Live grants on the devices `user` owns (support's customer page)."""
    from selfserve.models import Device

    return list(
        grants_with_holders()
        .join(Device, on=(Grant.device == Device.device_id))
        .where((Device.owner == user.id) & live(now))
        .order_by(Grant.device, Grant.id)
    )


def grants_held_by(user, now=None):
    """Live grants `user` holds on other people's devices (support's customer page)."""
    return list(Grant.select().where((Grant.grantee == user.id) & live(now)).order_by(Grant.id))


# --- changes ----------------------------------------------------------------------------------


def give(device, grantee, role, granted_by, expires_at=None, via=None, now=None, grantee_org=None):
    """Give `grantee` (a person) or `grantee_org` (an organisation: all its members) `role` on
    `device`, replacing a live grant they hold; audited for the owner and a person grantee.
    `via` names how ("invitation", "direct", "dealer"). Returns the Grant.

    Callers check that `granted_by` may give that role (services/sharing.py)."""
    if role not in GRANTABLE:
        raise ValueError(f"not a grantable role: {role!r}")
    now = now or utcnow()
    if grantee is not None:
        key = active_key(device_id=device.device_id, user_id=grantee.id)
    else:
        key = active_key(device_id=device.device_id, org_id=grantee_org.id)
    with db.atomic():
        # A grant that expired but whose ending the sweep hasn't recorded yet still holds the key.
        _end_where(
            (Grant.active_key == key) & Grant.expires_at.is_null(False) & (Grant.expires_at <= now),
            "expired",
            None,
            now,
        )
        previous = Grant.get_or_none(Grant.active_key == key)
        if previous is not None:
            Grant.update(ended_at=now, ended_by=granted_by.id, end_cause="replaced", active_key=None).where(
                Grant.id == previous.id
            ).execute()
        try:
            with db.atomic():
                grant = Grant.create(
                    device=device.device_id,
                    grantee=grantee.id if grantee is not None else None,
                    grantee_org=grantee_org.id if grantee_org is not None else None,
                    role=role,
                    granted_by=granted_by.id,
                    expires_at=expires_at,
                    active_key=key,
                    created_at=now,
                )
        except peewee.IntegrityError as exc:
            # Two grants for the same person at the same moment: the other one won.
            raise ConcurrentChange() from exc
        detail = {
            "name": _device_name(device),
            "role": role,
            **holder_detail(grantee, grantee_org),
            "by": granted_by.email,
            "until": iso_moment(expires_at),
            "via": via,
        }
        audit.record(
            "sharing.granted", user=_owner_of(device), actor=granted_by, device_id=device.device_id, **detail
        )
        if grantee is not None:
            audit.record(
                "sharing.access_received",
                user=grantee,
                actor=granted_by,
                device_id=device.device_id,
                **detail,
            )
        else:
            # On the receiving organisation's activity page too.
            audit.record(
                "sharing.access_received_org",
                user=grantee_org.account_id,
                actor=granted_by,
                device_id=device.device_id,
                **detail,
            )
    if previous is not None and not at_least(role, previous.role):
        announce_ended(
            device.device_id,
            user_id=grantee.id if grantee is not None else None,
            org_id=grantee_org.id if grantee_org is not None else None,
            cause="replaced",
        )
    return grant


class ConcurrentChange(Exception):
    """Someone else changed the same access at the same moment; nothing was done here."""


def revoke(grant, actor, now=None):
    """End one grant (audited for the owner and the grantee). Returns False when it had
    already ended (nothing written)."""
    now = now or utcnow()
    with db.atomic():
        ended = _end_where((Grant.id == grant.id) & Grant.ended_at.is_null(), "revoked", actor, now)
    return bool(ended)


def end_all(device_id, cause, actor=None, owner_id=None, name=None, now=None):
    """End every grant on `device_id` because its ownership changed (`cause`: released,
    transferred). Call inside the transaction that changes the owner, with the owner it had
    (`owner_id`) and its name then (`name`), for their activity pages; `access_ended` goes
    out when that transaction commits. Returns how many."""
    from selfserve.models import Invitation

    now = now or utcnow()
    # Invitations still waiting die with the grants: the new owner invites whom they like.
    Invitation.update(state="ended", decided_at=now).where(
        (Invitation.device == device_id) & (Invitation.state == "pending")
    ).execute()
    # Out of the former owner's groups: grants on those groups no longer reach it.
    GroupDevice.delete().where(GroupDevice.device == device_id).execute()
    # The former owner's own pages (and their organisation's members') end too.
    announce_ended(device_id, user_id=owner_id, cause=cause)
    return _end_where(
        (Grant.device == device_id) & Grant.ended_at.is_null(),
        cause,
        actor,
        now,
        owner_id=owner_id,
        name=name,
    )


def end_stale(device_id, now=None):
    """End grants still live on `device_id` as a fresh claim of it starts: only a claim that
    was undone can leave any (a dealer's access chosen for a claim the cloud never confirmed);
    release and transfer end theirs. Each is audited for whoever gave it. Returns how many."""
    now = now or utcnow()
    stale = list(Grant.select().where((Grant.device == device_id) & Grant.ended_at.is_null()))
    ended = 0
    for grant in stale:
        with db.atomic():
            ended += _end_where(
                (Grant.id == grant.id) & Grant.ended_at.is_null(),
                "unclaimed",
                None,
                now,
                owner_id=grant.granted_by_id,
            )
    return ended


def record_expired(now=None, limit=500):
    """Write the ending (and audit rows) of grants whose time ran out. Access already ended at
    `expires_at` (every lookup checks it); this only records it. Safe in several workers:
    each grant is ended by one atomic UPDATE. A background job (create_app's list)."""
    now = now or utcnow()
    due = (
        Grant.select(Grant.id)
        .where(Grant.ended_at.is_null() & Grant.expires_at.is_null(False) & (Grant.expires_at <= now))
        .limit(limit)
    )
    ids = [row.id for row in due]
    if not ids:
        return 0
    with db.atomic():
        ended = _end_where(Grant.id.in_(ids) & Grant.ended_at.is_null(), "expired", None, now)
    return ended


_END_ACTIONS = {
    "revoked": "sharing.revoked",
    "released": "sharing.ended_by_release",
    "transferred": "sharing.ended_by_transfer",
    "expired": "sharing.expired",
    "unclaimed": "sharing.ended_by_unclaim",
}


def _end_where(condition, cause, actor, now, owner_id=None, name=None):
    """End the grants matching `condition` (each by an atomic UPDATE, so a grant is ended and
    audited once however many workers race) and audit each for the owner and the grantee."""
    from selfserve.models import Device

    Holder = Organisation.alias()
    rows = list(
        Grant.select(Grant, User, Device, DeviceGroup, Holder)
        .join(User, peewee.JOIN.LEFT_OUTER, on=(Grant.grantee == User.id))
        .switch(Grant)
        .join(Device, peewee.JOIN.LEFT_OUTER, on=(Grant.device == Device.device_id))
        .switch(Grant)
        .join(DeviceGroup, peewee.JOIN.LEFT_OUTER, on=(Grant.group == DeviceGroup.id))
        .switch(Grant)
        .join(Holder, peewee.JOIN.LEFT_OUTER, on=(Grant.grantee_org == Holder.id))
        .where(condition)
    )
    ended = []
    for grant in rows:
        done = (
            Grant.update(
                ended_at=now,
                ended_by=actor.id if actor is not None else None,
                end_cause=cause,
                active_key=None,
            )
            .where((Grant.id == grant.id) & Grant.ended_at.is_null())
            .execute()
        )
        if not done:
            continue
        ended.append(grant)
        detail = {
            **({"name": name} if name else target_detail(grant)),
            "role": grant.role,
            **holder_detail(grant.grantee, grant.grantee_org),
            "by": actor.email if actor is not None else None,
        }
        action = _END_ACTIONS[cause]
        owner = owner_id if owner_id is not None else _target_owner(grant)
        if owner is not None:
            audit.record(action, user=owner, actor=actor, device_id=grant.device_id, **detail)
        if grant.grantee_id is not None:
            audit.record(
                action + "_for_me", user=grant.grantee_id, actor=actor, device_id=grant.device_id, **detail
            )
        elif grant.grantee_org.account_id != owner:
            audit.record(
                action + "_for_org",
                user=grant.grantee_org.account_id,
                actor=actor,
                device_id=grant.device_id,
                **detail,
            )
    # Tell live pages once this transaction commits (they re-check with device_for).
    for grant in ended:
        announce_ended(
            grant.device_id,
            user_id=grant.grantee_id,
            org_id=grant.grantee_org_id,
            group_id=grant.group_id,
            cause=cause,
        )
    return len(ended)


def organisation_label(name):
    """An organisation where people are listed ("organisation Acme"), in the reader's language."""
    return _l("organisation %(name)s", name=name)


def holder_label(grant):
    """Who a grant is to: the person's address or the organisation's name (in the reader's
    language)."""
    if grant.grantee_id is not None:
        return grant.grantee.email
    return organisation_label(grant.grantee_org.name)


def holder_detail(grantee, grantee_org):
    """Who a grant is to, for an audit row: "to" (an address) or "to_organisation" (a name),
    put into words when the row is shown (audit.describe), in the reader's language."""
    if grantee is not None:
        return {"to": grantee.email}
    return {"to_organisation": grantee_org.name}


def target_detail(grant):
    """What a grant is on, for an audit row: "name" (the device's) or "on_group" (the group's
    name, put into words by audit.describe)."""
    if grant.device_id is not None:
        return {"name": _device_name(grant.device)}
    return {"on_group": grant.group.name}


def iso_moment(moment):
    """A moment for an audit row: ISO text (naive UTC), formatted in the reader's locale and
    zone when shown (audit.describe)."""
    return moment.isoformat(timespec="seconds") if moment else None


def _target_owner(grant):
    if grant.device_id is not None:
        return grant.device.owner_id
    return Organisation.get_by_id(grant.group.organisation_id).account_id


def announce_ended(device_id, *, cause, user_id=None, org_id=None, group_id=None):
    """Send `access_ended` for an access that ended in the caller's transaction, once it
    commits: a listener that looked before the commit would still see the access (and a
    rolled-back ending announces nothing). The only way the signal is sent."""
    _after_commit(
        lambda: access_ended.send(device_id, user_id=user_id, org_id=org_id, group_id=group_id, cause=cause)
    )


def _after_commit(callback):
    """Run `callback` (an access_ended send) once the caller's transaction commits (at once
    outside one; never if it rolls back)."""
    db.after_commit(lambda: _run(callback))


def _run(callback):
    try:
        callback()
    except Exception:  # noqa: BLE001 - a listener's failure must not undo an ending
        log.exception("access_ended listener failed")


def _device_name(device):
    from selfserve.services import devices

    return devices.display_name(device)


def _owner_of(device):
    return device.owner_id
