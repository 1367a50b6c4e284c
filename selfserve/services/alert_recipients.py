"""Who is told about a device's alerts (issue 13, "Who gets them"), and the choices that decide
it: services/alerts.py asks `of_device` when it writes notices and `may_still_hear` when it
sends them.

- A person's device: its owner.
- An organisation's device: the people a group holding it is shared with, for each of its groups
  marked "alerts to its people" (`DeviceGroup.alerts_to_members`, chosen by an admin); when no
  such group holds it, or nobody has access through one, the organisation's admins.
- Anyone else who can see the device (viewer and up, through any grant) and opted in to its
  alerts (`AlertOptIn`, set on the alert settings page).

Access is read again when a notice is sent: a transfer, a release or a revoked or expired grant
stops that person's alerts at once (the notice is cancelled), as the page stops showing values.
"""

from selfserve.models import AlertOptIn
from selfserve.models import Device
from selfserve.models import DeviceGroup
from selfserve.models import Grant
from selfserve.models import GroupDevice
from selfserve.models import Membership
from selfserve.models import Organisation
from selfserve.models import User
from selfserve.models import db
from selfserve.services import access


def of_device(device_id, owner_id):
    """The user ids told about `device_id`'s episodes (owned by `owner_id`), without repeats."""
    if owner_id is None:
        return []
    organisation = Organisation.get_or_none(Organisation.account == owner_id)
    people = [owner_id] if organisation is None else _routed_by(organisation, device_id)
    if device_id is None:
        return people
    device = Device.get_or_none(Device.device_id == device_id)
    if device is None:
        return people
    for row in AlertOptIn.select(AlertOptIn.user).where(AlertOptIn.device == device_id):
        if row.user_id not in people and access.role_of(User(id=row.user_id), device) is not None:
            people.append(row.user_id)
    return people


def _routed_by(organisation, device_id):
    """The people an organisation sends `device_id`'s alerts to: those its alert groups holding
    the device are shared with, else its admins."""
    people = []
    if device_id is not None:
        groups = DeviceGroup.select(DeviceGroup.id).where(
            (DeviceGroup.organisation == organisation.id)
            & DeviceGroup.alerts_to_members
            & DeviceGroup.id.in_(GroupDevice.select(GroupDevice.group).where(GroupDevice.device == device_id))
        )
        grants = Grant.select(Grant.grantee, Grant.grantee_org).where(Grant.group.in_(groups) & access.live())
        holder_orgs = []
        for grant in grants:
            if grant.grantee_id is not None and grant.grantee_id not in people:
                people.append(grant.grantee_id)
            elif grant.grantee_org_id is not None:
                holder_orgs.append(grant.grantee_org_id)
        if holder_orgs:
            members = Membership.select(Membership.user).where(Membership.organisation.in_(holder_orgs))
            people += [row.user_id for row in members.order_by(Membership.user) if row.user_id not in people]
    if not people:
        admins = Membership.select(Membership.user).where(
            (Membership.organisation == organisation.id) & (Membership.role == "admin")
        )
        people = [row.user_id for row in admins.order_by(Membership.user)]
    return people


def may_still_hear(user_id, device_id):
    """Whether `user_id` may still be told about `device_id` now: they can still see it (a
    transfer, release, revoke or expiry since the decision says no)."""
    if device_id is None:
        return True
    device = Device.get_or_none(Device.device_id == device_id)
    return device is not None and access.role_of(User(id=user_id), device) is not None


# --- the choices ---------------------------------------------------------------------------------


def opted_in(user, device_ids):
    """Which of `device_ids` `user` opted in to."""
    rows = AlertOptIn.select(AlertOptIn.device).where(
        (AlertOptIn.user == user.id) & AlertOptIn.device.in_(list(device_ids))
    )
    return {row.device_id for row in rows}


def set_opt_ins(user, shown_ids, chosen_ids):
    """Opt `user` in to the alerts of `chosen_ids` and out of the rest of `shown_ids` (the
    devices the form showed). Only devices they can see now count (others are ignored: a
    forged id changes nothing). Returns the ids now opted in among those shown."""
    shown = [d for d in dict.fromkeys(shown_ids) if isinstance(d, str)][:500]
    visible = {
        device.device_id
        for device in Device.select().where(Device.device_id.in_(shown))
        if access.role_of(user, device) is not None
    }
    wanted = visible & set(chosen_ids)
    with db.atomic():
        AlertOptIn.delete().where(
            (AlertOptIn.user == user.id) & AlertOptIn.device.in_(list(visible - wanted))
        ).execute()
        if wanted:
            AlertOptIn.insert_many(
                [{"user": user.id, "device": device_id} for device_id in sorted(wanted)]
            ).on_conflict_ignore().execute()
    return wanted


def set_group_routing(admin, organisation, group, on):
    """Send the alerts of `group`'s devices to the people it is shared with (`on`), or back to
    the admins. Audited for the organisation."""
    from selfserve.services import audit

    DeviceGroup.update(alerts_to_members=bool(on)).where(DeviceGroup.id == group.id).execute()
    audit.record(
        "org.group_alerts_to_members" if on else "org.group_alerts_to_admins",
        user=organisation.account_id,
        actor=admin,
        group=group.name,
    )
