"""What every recorded multi-step job shares (account set-up, transfers, migration rows): how
long a worker may hold a job, how long to wait after a failure, and the "try again later"
signal a step raises. Each job type keeps its own steps; the sweep resumes them."""

import datetime
import logging

from flask import current_app

from selfserve import mail

log = logging.getLogger(__name__)

BACKOFF_FIRST_SECONDS = 5
BACKOFF_MAX_SECONDS = 600


class Retry(Exception):
    """A step failed for now; try again after `wait` seconds (at least)."""

    def __init__(self, message, wait=None):
        super().__init__(message)
        self.wait = wait


def backoff_seconds(attempts):
    """Seconds to wait after the `attempts`-th failure: 5, 10, 20, ... up to 10 minutes."""
    exponent = max(0, attempts - 1)
    if exponent > 16:
        return BACKOFF_MAX_SECONDS
    return min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2**exponent)


def lease_until(now):
    """How long a worker may hold a job: longer than any one Particle call can take, so a
    lease only runs out when its worker died."""
    config = current_app.config
    call_seconds = config["PARTICLE_CONNECT_TIMEOUT"] + config["PARTICLE_READ_TIMEOUT"]
    return now + datetime.timedelta(seconds=max(120.0, 3 * call_seconds))


def send_mail(to, subject, template, context, attempts, max_attempts, job):
    """Send a step's email. True when sent; on failure raise Retry while attempts remain, and
    False once given up: an email never holds up the job it reports on."""
    try:
        mail.send(to, subject, template, **context)
    except mail.MailError as exc:
        if attempts + 1 >= max_attempts:
            log.error("%s: giving up on email %s after %d attempts", job, template, attempts + 1)
            return False
        raise Retry(f"email not sent: {exc}")
    return True
