"""Support staff viewing the site as a customer ("view as customer").

As in indico's `modules/auth/util.py` and django-hijack: started by POST only, staff only,
a banner on every page, audited, reversible. Ours is also read-only and time-limited:

- A view is a StaffView row bound to the staff member's login session (rotated when the view
  starts and when it ends). While it is live, security.py's user loader makes the customer
  `current_user` (with `viewed_by` = the staff member and `staff_view` = the row), and its
  read-only wall refuses every state-changing request but "end view" and every Particle write.
- It ends by the End button, by itself after STAFF_VIEW_MINUTES (checked on every request and
  by the sweep), or when the staff session ends. Each end is recorded once (atomic UPDATE).
- Audited against the customer (user = customer, actor = staff, with the reason): start,
  end, and every full page viewed; the homeowner's activity page shows them.
"""

import datetime
import logging

from flask import current_app
from flask import flash
from flask import has_request_context

from selfserve.i18n import lazy_text as _l
from selfserve.models import LoginSession
from selfserve.models import StaffView
from selfserve.models import User
from selfserve.models import utcnow
from selfserve.refusals import Refusal
from selfserve.services import audit

log = logging.getLogger(__name__)

# How the support customer page says why a view ended (the row keeps the key).
END_CAUSE_LABELS = {"ended": _l("ended"), "expired": _l("expired"), "signed_out": _l("signed out")}

REASON_MIN = 3
REASON_MAX = 500


class ViewRefused(Refusal):
    """A view that may not start; `message` says why."""

    def __init__(self, message, status=400):
        super().__init__(message, status=status)


def view_minutes():
    return int(current_app.config["STAFF_VIEW_MINUTES"])


def _live(now):
    return StaffView.ended_at.is_null() & (StaffView.expires_at > now)


def live_view(login_session, now=None):
    """The live view of this login session, or None. An expired one is ended (audited)."""
    view = (
        StaffView.select()
        .where((StaffView.login_session == login_session.id) & StaffView.ended_at.is_null())
        .order_by(StaffView.id.desc())
        .first()
    )
    if view is None:
        return None
    if view.expires_at <= (now or utcnow()):
        if end_view(view, "expired") and has_request_context():
            flash(
                _l(
                    "Your view of the account ended by itself after %(minutes)s minutes.",
                    minutes=view_minutes(),
                ),
                "info",
            )
        return None
    return view


def effective_user(staff, login_session):
    """Who `current_user` is for this staff session: the viewed customer while a view is live
    (with `viewed_by` and `staff_view` set), else the staff member."""
    view = live_view(login_session)
    if view is None:
        return staff
    customer = User.get_by_id(view.customer_id)
    customer.login_session = login_session
    customer.viewed_by = staff
    customer.staff_view = view
    view.staff = staff
    view.customer = customer
    return customer


def check_reason(reason):
    reason = " ".join((reason or "").split())
    if len(reason) < REASON_MIN:
        raise ViewRefused(_l("Give a reason: a ticket reference or a few words on why."), 422)
    if len(reason) > REASON_MAX:
        raise ViewRefused(_l("Keep the reason under %(count)s characters.", count=REASON_MAX), 422)
    return reason


def start_view(staff, customer_id, reason, now=None):
    """Start viewing as customer `customer_id` in the current request's staff session.

    Rotates the login session and binds the new view to the new session. Raises ViewRefused:
    not staff or no second factor (403), unknown customer (404), another staff account or
    oneself, a view already live (views don't nest), or a missing reason.
    """
    from selfserve.security import rotate_login_session

    if (
        staff is None
        or not staff.is_staff
        or staff.login_session is None
        or staff.login_session.mfa_verified_at is None
    ):
        raise ViewRefused(_l("Only staff who passed the second factor can view as a customer."), 403)
    if getattr(staff, "staff_view", None) is not None or live_view(staff.login_session, now) is not None:
        raise ViewRefused(_l("You are already viewing an account. End that view first."), 409)
    customer = User.get_or_none(User.id == customer_id) if isinstance(customer_id, int) else None
    if customer is None:
        raise ViewRefused(_l("There is no such customer."), 404)
    if customer.id == staff.id:
        raise ViewRefused(_l("You can't view as yourself."), 403)
    if customer.is_staff:
        raise ViewRefused(_l("Staff accounts can't be viewed as a customer."), 403)
    reason = check_reason(reason)
    now = now or utcnow()
    new_session = rotate_login_session()
    view = StaffView.create(
        staff=staff.id,
        customer=customer.id,
        login_session=new_session.id,
        reason=reason,
        started_at=now,
        expires_at=now + datetime.timedelta(minutes=view_minutes()),
    )
    audit.record("support.view_started", user=customer, actor=staff, reason=reason, minutes=view_minutes())
    log.info("Staff %s started viewing account %s", staff.id, customer.id)
    return view


def end_view(view, cause="ended", now=None):
    """End `view` (cause: ended | expired | signed_out). True if this call ended it; a view
    already ended is left alone (recorded once)."""
    now = now or utcnow()
    done = (
        StaffView.update(ended_at=now, end_cause=cause)
        .where((StaffView.id == view.id) & StaffView.ended_at.is_null())
        .execute()
    )
    if not done:
        return False
    minutes = max(0, int((now - view.started_at).total_seconds() // 60))
    audit.record(
        "support.view_ended",
        user=User.get_or_none(User.id == view.customer_id),
        actor=User.get_or_none(User.id == view.staff_id),
        reason=view.reason,
        cause=cause,
        minutes=minutes,
    )
    log.info("Staff view %s ended (%s)", view.id, cause)
    return True


def end_current_view(user):
    """The End button: end the current request's view and rotate the session. Returns the
    ended view, or None when there was none (it had expired or ended in another tab)."""
    from selfserve.security import rotate_login_session

    view = getattr(user, "staff_view", None)
    if view is None:
        return None
    end_view(view, "ended")
    rotate_login_session()
    return view


def record_page_view(view, page):
    """Audit one page the staff member looked at while viewing (against the customer)."""
    audit.record(
        "support.page_viewed",
        user=User.get_or_none(User.id == view.customer_id),
        actor=User.get_or_none(User.id == view.staff_id),
        page=page[:200],
        reason=view.reason,
    )


def seconds_left(view, now=None):
    return max(0, int((view.expires_at - (now or utcnow())).total_seconds()))


def end_stale_views(now=None):
    """Sweep: end views past their time and views whose login session ended (the staff
    member signed out, timed out or closed the browser). Returns how many were ended."""
    now = now or utcnow()
    stale = (
        StaffView.select(StaffView)
        .join(LoginSession)
        .where(
            StaffView.ended_at.is_null()
            & ((StaffView.expires_at <= now) | LoginSession.ended_at.is_null(False))
        )
    )
    ended = 0
    for view in list(stale):
        cause = "expired" if view.expires_at <= now else "signed_out"
        if end_view(view, cause, now):
            ended += 1
    return ended


def views_of(customer, limit=20):
    """Recent staff views of `customer`'s account, newest first (for the customer page)."""
    return list(
        StaffView.select().where(StaffView.customer == customer.id).order_by(StaffView.id.desc()).limit(limit)
    )
