"""The append-only audit trail. Every service that changes ownership or acts for a person
records it here; the homeowner's activity page reads it back."""

import functools
import operator
import re

from flask import has_request_context
from flask import request
from flask_babel import gettext as _
from peewee import JOIN

from selfserve import device_models
from selfserve import i18n
from selfserve.i18n import lazy_text as _l
from selfserve.models import AuditEvent
from selfserve.models import User


class _WithArgument:
    """A description with an optional "{value}": the function's argument, when there was one
    (" (40%)"), else nothing, so rows without an argument still read well; and, when recorded,
    what the device answered (" The device answered: …"). Older rows have no answer. Holds a
    lazy template: translated when the page is shown."""

    def __init__(self, template):
        self.template = template

    def format(self, **detail):
        arg = detail.get("arg")
        detail["value"] = (
            "" if arg in (None, "") else f" ({device_models.argument_text(detail.get('function'), arg)})"
        )
        if detail.get("function"):
            detail["function"] = _(detail["function"])  # recorded in English (the catalogue's label)
        text = str(self.template).format(**detail)
        answer = detail.get("answer")
        if answer:
            text = _("%(text)s. The device answered: %(answer)s", text=text, answer=_(answer))
        return text

    def __str__(self):
        return str(self.template)


class _Until(_WithArgument):
    """A sharing description with "{until}": " until <date>" when the access has an end."""

    def format(self, **detail):
        until = detail.get("until")
        # ISO text (formatted in the reader's locale and zone); older rows hold English text,
        # shown as it is.
        detail["until"] = _(" until %(date)s", date=i18n.local_datetime(until)) if until else ""
        return str(self.template).format(**detail)


# action -> how the activity page says it (the detail dict fills the placeholders).
DESCRIPTIONS = {
    "account.signed_up": _l("Signed up"),
    "account.signup_attempted": _l("Someone tried to sign up again with your email address"),
    "account.password_reset_requested": _l("Asked for a password reset link"),
    "account.email_verified": _l("Verified email address"),
    "account.signed_in": _l("Signed in"),
    "account.sign_in_failed": _l("Failed sign-in attempt"),
    "account.signed_out": _l("Signed out"),
    "account.password_changed": _l("Changed password"),
    "account.password_reset": _l("Reset password by email"),
    "account.email_change_requested": _l("Asked to change email address"),
    "account.email_changed": _l("Changed email address"),
    "account.preferences_changed": _l("Changed language or time zone"),
    "account.provisioned": _l("Account connected to the device cloud"),
    "account.deletion_scheduled": _l("Asked to delete the account (on {due})"),
    "account.deletion_cancelled": _l("Undid the deletion of the account"),
    "account.deletion_started": _l("The deletion of the account started"),
    "account.deleted": _l("Account deleted"),
    "device.claimed": _l("Added device {name}"),
    "device.released": _l("Released device {name}"),
    "device.renamed": _l("Renamed device {old} to {new}"),
    "device.function_called": _WithArgument(_l("Asked {name}: {function}{value}")),
    "device.transferred_out": _l("Transferred device {name} to its new owner"),
    "device.transferred_in": _l("Device {name} was transferred to you"),
    "device.migrated_in": _l("Device {name} was moved into your account by the manufacturer"),
    "transfer.offered": _l("Offered device {name} to {to}"),
    "transfer.cancelled": _l("Cancelled the transfer of device {name}"),
    "transfer.declined": _l("Declined the transfer of device {name}"),
    "transfer.accepted": _l("Accepted the transfer of device {name}"),
    "transfer.approved": _l("The transfer of device {name} started"),
    "transfer.requested": _l("Asked the owner of device {name} to transfer it"),
    "transfer.request_received": _l("Someone holding device {name} asked for it"),
    "transfer.owner_approved": _l("Agreed to transfer device {name}"),
    "transfer.objected": _l("Objected to the transfer of device {name}"),
    "transfer.unanswered": _l("The owner of device {name} didn't answer your request: support decides"),
    "transfer.failed_returned": _l("The transfer of device {name} failed; it stays with its owner"),
    # Sharing (services/access.py, services/sharing.py): "user" is the owner for the plain
    # action, the person given or losing access for "_for_me" / "access_received".
    "sharing.invited": _Until(_l("Invited {to} as {role} of device {name}{until}")),
    "sharing.invitation_withdrawn": _l("Withdrew the invitation of {to} to device {name}"),
    "sharing.invitation_accepted": _l("{to} accepted the invitation to device {name} as {role}"),
    "sharing.granted": _Until(_l("Gave {to} {role} access to device {name}{until}")),
    "sharing.access_received": _Until(_l("You were given {role} access to device {name}{until}")),
    "sharing.revoked": _l("Revoked the {role} access of {to} to device {name}"),
    "sharing.revoked_for_me": _l("Your {role} access to device {name} was revoked"),
    "sharing.expired": _l("The {role} access of {to} to device {name} ended on its end date"),
    "sharing.expired_for_me": _l("Your {role} access to device {name} ended on its end date"),
    "sharing.ended_by_release": _l("The access of {to} to device {name} ended: the device was released"),
    "sharing.ended_by_release_for_me": _l("Your access to device {name} ended: its owner released it"),
    "sharing.ended_by_transfer": _l("The access of {to} to device {name} ended: the device was transferred"),
    "sharing.ended_by_transfer_for_me": _l("Your access to device {name} ended: it has a new owner"),
    # ..._org / _for_org: on the activity page of the organisation given or losing access.
    "sharing.access_received_org": _Until(
        _l("The organisation was given {role} access to device {name}{until}")
    ),
    "sharing.revoked_for_org": _l("The organisation's {role} access to device {name} was revoked"),
    "sharing.expired_for_org": _l("The organisation's {role} access to device {name} ended on its end date"),
    "sharing.ended_by_release_for_org": _l(
        "The organisation's access to device {name} ended: its owner released it"
    ),
    "sharing.ended_by_transfer_for_org": _l(
        "The organisation's access to device {name} ended: it has a new owner"
    ),
    "sharing.dealer_declined": _l("Gave {to} no access to device {name} when adding it"),
    # A grant given while adding a device whose adding was then undone (ended at the next claim).
    "sharing.ended_by_unclaim": _l("The access of {to} to device {name} ended: adding the device was undone"),
    "sharing.ended_by_unclaim_for_me": _l("Your access to device {name} ended: adding it was undone"),
    "sharing.ended_by_unclaim_for_org": _l(
        "The organisation's access to device {name} ended: adding it was undone"
    ),
    "org.created": _l("Created the organisation {organisation}"),
    "org.member_added": _l("Added {to} to the organisation as {role}"),
    "org.member_added_me": _l("You were added to the organisation {organisation} as {role}"),
    "org.member_removed": _l("Removed {to} from the organisation"),
    "org.member_removed_me": _l("You were removed from the organisation {organisation}"),
    "org.admin_handed_on": _l("{to} became admin of the organisation {organisation}: its last admin left"),
    "org.group_created": _l("Created the group {group}"),
    "org.group_devices_added": _l("Put {count} device(s) in the group {group}"),
    "org.group_devices_removed": _l("Took {count} device(s) out of the group {group}"),
    "org.group_alerts_to_members": _l("The alerts of the group {group} go to its people"),
    "org.group_alerts_to_admins": _l("The alerts of the group {group} go to the admins"),
    "staff.alert": _l("Alert for staff: {reason}"),
    "support.viewed": _l("Support viewed your account"),
    "support.view_started": _l("Support viewed your account"),
    "support.view_ended": _l("Support stopped viewing your account"),
    "support.page_viewed": _l("Support looked at {page}"),
    "support.console_viewed": _l("Support looked at your account in the support console"),
    "support.console_viewed_device": _l("Support looked at device {name} in the support console"),
    "support.mail_viewed": _l("Support looked at the emails sent to your email address"),
    "support.resent_verification": _l("Support sent you a new verification email"),
    "support.released_device": _l("Support released device {name} from your account"),
    "support.retried": _l("Support retried {operation}"),
    "support.cancelled": _l("Support cancelled {operation}"),
    "support.decided_transfer": _l("Support decided the transfer request: {decision}"),
    "support.reconciled": _l("Support compared the database with the device cloud"),
    "staff.created": _l("Staff account created"),
    "staff.second_factor_enrolled": _l("Set up the authenticator app"),
    "staff.second_factor_passed": _l("Confirmed sign-in with the authenticator app"),
    "staff.second_factor_failed": _l("Wrong authenticator code"),
    "staff.second_factor_reset": _l("Authenticator app reset by an operator"),
}


def record(action, user=None, actor=None, device_id=None, **detail):
    """Append one event. `user` is whose account it concerns, `actor` who acted (defaults to
    `user`). Never pass secrets in `detail`: it is shown to the homeowner."""
    ip = request.remote_addr if has_request_context() else None
    return AuditEvent.create(
        action=action,
        user=user,
        actor=actor if actor is not None else user,
        device_id=device_id,
        detail=detail or None,
        ip=ip,
    )


# The descriptions speak to the homeowner ("your account"); staff read them about the customer.
# Pairs of translated phrases: a translation that keeps the phrase (German "Ihr Konto") reads
# right for staff too.
_FOR_STAFF = (
    (_l("your account"), _l("the customer's account")),
    (_l("your email address"), _l("the customer's email address")),
    (_l("goes to you"), _l("goes to the customer")),
    (_l("transferred to you"), _l("transferred to the customer")),
    (_l("sent you"), _l("sent the customer")),
)


# How an erased person is named on audit rows (services/erasure.anonymous_label writes it, in
# English, into the rows' details); put into the reader's language when shown.
_ANONYMOUS = re.compile(r"deleted account #(\d+)")


def anonymous_name(user_id):
    """An erased person, as pages show them: the anonymous label in the reader's language."""
    return _l("deleted account #%(number)s", number=user_id)


def _in_words(stored):
    """An audit row's detail with its parts put into words in the reader's language: the
    organisation a grant is to ("to_organisation", and "accepted_by" who accepted for it), the
    group it is on ("on_group"), a due date (ISO text; older rows hold English text, shown as it
    is), and an erased person's anonymous label (erasure.anonymous_label)."""
    detail = {
        key: _ANONYMOUS.sub(lambda found: str(anonymous_name(found.group(1))), value)
        if isinstance(value, str)
        else value
        for key, value in stored.items()
    }
    organisation = detail.get("to_organisation")
    if organisation and "to" not in detail:
        if detail.get("accepted_by"):
            detail["to"] = _(
                "organisation %(name)s (accepted by %(email)s)",
                name=organisation,
                email=detail["accepted_by"],
            )
        else:
            detail["to"] = _("organisation %(name)s", name=organisation)
    if detail.get("on_group") and "name" not in detail:
        detail["name"] = _("group %(name)s", name=detail["on_group"])
    if detail.get("due"):
        detail["due"] = i18n.local_date(detail["due"])
    return detail


def describe(event, for_staff=False):
    """A human sentence for an event, addressed to the homeowner, or about them `for_staff`."""
    template = DESCRIPTIONS.get(event.action, event.action)
    detail = _in_words(event.detail or {})
    detail.setdefault("name", event.device_id or _("a device"))
    if "role" in detail:
        detail["role"] = i18n.role_name(detail["role"])
    try:
        text = template.format(**detail)
    except (KeyError, IndexError, ValueError):
        text = str(template)
    if detail.get("by") and event.action.startswith(("device.", "sharing.")):
        # Someone other than the account holder acted (a person the device is shared with).
        if event.actor_id != event.user_id:
            text = _("%(text)s (by %(by)s)", text=text, by=detail["by"])
    if for_staff:
        for homeowner_words, staff_words in _FOR_STAFF:
            text = text.replace(str(homeowner_words), str(staff_words))
    return text


def history(user, limit=100, before_id=None, action_prefixes=None):
    """The newest events of `user`'s account, newest first, each with its actor loaded in the
    same query (the activity pages show who did it: one query per row otherwise). Only
    actions starting with one of `action_prefixes`, when given (what an organisation's
    members may see of its trail)."""
    actor = User.alias()
    query = (
        AuditEvent.select(AuditEvent, actor)
        .join(actor, JOIN.LEFT_OUTER, on=AuditEvent.actor)
        .switch(AuditEvent)
        .where(AuditEvent.user == user)
    )
    if action_prefixes:
        query = query.where(
            functools.reduce(operator.or_, (AuditEvent.action.startswith(p) for p in action_prefixes))
        )
    if before_id is not None:
        query = query.where(AuditEvent.id < before_id)
    return list(query.order_by(AuditEvent.id.desc()).limit(limit))


# --- support's visits, folded -----------------------------------------------------------------

_VISIT_ACTIONS = ("support.view_started", "support.page_viewed", "support.view_ended")


class SupportVisit:
    """One read-only visit by support, folded from its start, page views and end: who (staff),
    the reason they gave, how long, and the pages seen (in the order seen, once each)."""

    is_visit = True

    def __init__(self, newest):
        self.events = [newest]
        self.actor = newest.actor
        self.actor_id = newest.actor_id
        self.user_id = newest.user_id
        self.ip = None
        self.reason = (newest.detail or {}).get("reason", "")

    def accepts(self, event):
        return (
            event.action in _VISIT_ACTIONS
            and event.actor_id == self.actor_id
            and (event.detail or {}).get("reason", "") == self.reason
            and self.events[-1].action != "support.view_started"  # that one began this visit
        )

    @property
    def at(self):
        return self.events[-1].at  # when it started (events run newest first)

    @property
    def minutes(self):
        ended = next((e for e in self.events if e.action == "support.view_ended"), None)
        if ended is not None and "minutes" in (ended.detail or {}):
            return int(ended.detail["minutes"])
        return max(0, int((self.events[0].at - self.events[-1].at).total_seconds() // 60))

    @property
    def pages(self):
        seen = []
        for event in reversed(self.events):
            page = (event.detail or {}).get("page")
            if event.action == "support.page_viewed" and page and page not in seen:
                seen.append(page)
        return seen


def fold_support_visits(events):
    """The activity list with each support visit as one entry (SupportVisit) instead of a row per
    page; other events unchanged. `events` run newest first."""
    entries = []
    for event in events:
        last = entries[-1] if entries else None
        if isinstance(last, SupportVisit) and last.accepts(event):
            last.events.append(event)
        elif event.action in _VISIT_ACTIONS and event.actor_id != event.user_id:
            entries.append(SupportVisit(event))
        else:
            entries.append(event)
    return entries
