"""Transfers: a device changes hands between two accounts, without ever being lost.

Particle has no transfer between customers (particle-cloud-api.md §14): a transfer is the
product-level unclaim of the seller's claim, then a claim with the buyer's customer token. A
crash between the two must never lose the device, so our database stays the source of truth
and every transfer is a recorded sequence of idempotent steps (`Transfer.step` is the next
one to run):

    offer:    offered --accept-------------------> moving
    request:  requested --approve / no objection-> moving
    moving:   release -> claim -> reset_name -> record -> mail_done_buyer -> mail_done_seller
              (state done after record)
    returning (the buyer's claim failed for good):
              return_release -> return_claim -> return_record -> mail_returned_* (failed_returned)
    dispute:  objected --support gives it to the requester--> moving (mails mail_given_*)
              objected --support keeps it with the owner-----> kept -> mail_kept_*

- Until `record` runs, the device row stays owned by the seller; while the move runs its
  `claim_state` is "transferring" (a value only this package sets or clears), so device pages,
  claims and releases refuse it and devices.resume_pending leaves it alone.
- `release` = remove_device_owner (idempotent: an unclaimed device answers the same);
  `claim` = claim_device with the buyer's token (claiming your own device again succeeds);
  `record` = the database write, in one transaction with the transfer's state and the audit.
- Emails are their own steps: a mail server that is down retries them later and never holds
  up the ownership move.
- A worker takes a transfer with an atomic UPDATE of `lease_until` (as provisioning does), so
  several workers, the request that accepted and the sweep never run one step twice at once.
  Transient Particle errors (timeouts, 5xx, 429) are retried with backoff (429's Retry-After
  honoured); permanent ones stop with a clear state (back to the seller, staff alerted).

The sections, one module each (this package re-exports their public functions, so callers
use `services.transfers.offer(...)` and never a section):

    common    states, TransferError, lookups and helpers every section uses
    offers    offer, accept, decline, cancel; offers expire
    requests  ask the recorded owner for a device; approve, object; unopposed requests move
    disputes  support decides an objected request
    links     the signed links the emails carry
    move      starting the move, its steps and emails, and the runner that runs them

The steps run through the one job runner (services/steps.py `Runner`, `move.RUNNER`);
`resume_pending` is the background job registered in create_app. See README "Background
jobs" and "Transfers and migration".
"""

from selfserve.models import utcnow
from selfserve.services.transfers.common import CLOSED_STATES
from selfserve.services.transfers.common import OBJECTION_DAYS
from selfserve.services.transfers.common import OFFER_DAYS
from selfserve.services.transfers.common import OPEN_STATES
from selfserve.services.transfers.common import PROOF_MINUTES
from selfserve.services.transfers.common import REQUESTS_PER_DAY
from selfserve.services.transfers.common import STATE_LABELS
from selfserve.services.transfers.common import TRANSFERRING
from selfserve.services.transfers.common import Dashboard
from selfserve.services.transfers.common import TransferError
from selfserve.services.transfers.common import dashboard_of
from selfserve.services.transfers.common import device_label
from selfserve.services.transfers.common import get
from selfserve.services.transfers.common import label
from selfserve.services.transfers.common import mask_email
from selfserve.services.transfers.common import needs_owner_answer
from selfserve.services.transfers.common import open_transfer_for_owner
from selfserve.services.transfers.common import open_transfer_of
from selfserve.services.transfers.common import owner_party_to
from selfserve.services.transfers.common import owner_transfers_of
from selfserve.services.transfers.common import role_of
from selfserve.services.transfers.common import too_late_message
from selfserve.services.transfers.common import visible_to
from selfserve.services.transfers.disputes import DISPUTE_OUTCOMES
from selfserve.services.transfers.disputes import decide_dispute
from selfserve.services.transfers.links import answer_link
from selfserve.services.transfers.links import from_answer_link
from selfserve.services.transfers.links import from_offer_link
from selfserve.services.transfers.links import offer_link
from selfserve.services.transfers.move import MAILS
from selfserve.services.transfers.move import RUNNER
from selfserve.services.transfers.move import STEPS
from selfserve.services.transfers.move import run_step
from selfserve.services.transfers.move import take
from selfserve.services.transfers.offers import accept
from selfserve.services.transfers.offers import cancel
from selfserve.services.transfers.offers import close_on_release
from selfserve.services.transfers.offers import decline
from selfserve.services.transfers.offers import expire_lapsed
from selfserve.services.transfers.offers import offer
from selfserve.services.transfers.requests import approve
from selfserve.services.transfers.requests import complete_unopposed
from selfserve.services.transfers.requests import object_to
from selfserve.services.transfers.requests import remember_possession
from selfserve.services.transfers.requests import request_device

__all__ = [
    "CLOSED_STATES",
    "DISPUTE_OUTCOMES",
    "MAILS",
    "OBJECTION_DAYS",
    "OFFER_DAYS",
    "OPEN_STATES",
    "PROOF_MINUTES",
    "REQUESTS_PER_DAY",
    "RUNNER",
    "STATE_LABELS",
    "STEPS",
    "TRANSFERRING",
    "Dashboard",
    "TransferError",
    "accept",
    "answer_link",
    "approve",
    "cancel",
    "close_on_release",
    "complete_unopposed",
    "dashboard_of",
    "decide_dispute",
    "decline",
    "device_label",
    "expire_lapsed",
    "from_answer_link",
    "from_offer_link",
    "get",
    "label",
    "mask_email",
    "object_to",
    "offer",
    "offer_link",
    "needs_owner_answer",
    "open_transfer_for_owner",
    "open_transfer_of",
    "owner_transfers_of",
    "owner_party_to",
    "remember_possession",
    "request_device",
    "resume_pending",
    "role_of",
    "run_step",
    "take",
    "too_late_message",
    "visible_to",
]


def resume_pending(now=None, limit=50):
    """The sweep: expire lapsed offers, start unopposed requests, and run every due step
    (crashed, postponed or new). Safe with several workers. Returns counts."""
    now = now or utcnow()
    counts = {"expired": expire_lapsed(now), "started": complete_unopposed(now)}
    counts["ran"] = RUNNER.resume(now, limit)
    return counts
