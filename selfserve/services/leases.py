"""Named leases in the database: one process at a time runs a background job, across every
worker and machine that shares the database (SQLite or PostgreSQL alike).

`take(name, seconds)` inserts the lease row if it is missing, then moves `until` into the
future with one atomic UPDATE that only matches when the lease is free (expired) or already
ours. A holder that dies simply lets it run out; `release` gives it back early. The rows live in
the `listenerlease` table (one named lease per row), which the event stream's leader uses too.
"""

import datetime
import os
import socket
import threading
import uuid

from selfserve.models import ListenerLease as JobLease
from selfserve.models import utcnow

# This process (and thread): a holder id that differs between workers and machines.
_PROCESS = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_id():
    return f"{_PROCESS}:{threading.get_ident() % 100000}"[:64]


def take(name, seconds, holder=None, now=None):
    """True when `holder` (this thread by default) now holds lease `name` for `seconds`."""
    holder = holder or holder_id()
    now = now or utcnow()
    JobLease.insert(name=name, holder=None, until=None).on_conflict_ignore().execute()
    taken = (
        JobLease.update(holder=holder, until=now + datetime.timedelta(seconds=seconds))
        .where(
            (JobLease.name == name)
            & (JobLease.until.is_null() | (JobLease.until < now) | (JobLease.holder == holder))
        )
        .execute()
    )
    return taken == 1


def release(name, holder=None):
    holder = holder or holder_id()
    JobLease.update(holder=None, until=None).where(
        (JobLease.name == name) & (JobLease.holder == holder)
    ).execute()
