"""Typed errors for everything the Particle Cloud can answer, so callers branch on types.

Every error carries Particle's own message (`message`), the HTTP status (`status`, None when
no answer came) and the parsed body (`body`), never a token: the client scrubs tokens before
raising (and a token is never part of Particle's error bodies anyway).
"""

from selfserve.i18n import lazy_text as _l


class ParticleError(Exception):
    """Base class. `user_message` is safe and specific enough to show to a homeowner."""

    user_message = _l("The device cloud answered with an error. Please try again.")

    def __init__(self, message="", status=None, body=None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body

    def __str__(self):
        return f"{type(self).__name__}({self.status}): {self.message}"


class BadRequest(ParticleError):
    """400: the request was malformed or refused (includes OAuth invalid_request/invalid_grant)."""

    user_message = _l("The device cloud refused the request.")


class InvalidClient(BadRequest):
    """400 invalid_client: our OAuth client id/secret are wrong. An operator must fix config."""

    user_message = _l("The device cloud rejected this site's credentials. Support has been told.")


class CustomerExists(BadRequest):
    """400 customer_exists: the shadow customer is already there (safe to mint a token)."""


class TokenInvalid(ParticleError):
    """401: the access token is unknown, revoked or expired."""

    user_message = _l("The device cloud did not accept our credentials. Please try again.")


class PermissionDenied(ParticleError):
    """403: not yours, or no such device (Particle answers both the same way)."""

    user_message = _l("The device cloud says this device is not available to your account.")


class DeviceOwnedByOther(PermissionDenied):
    """403 on claim: "That belongs to someone else."."""

    user_message = _l("This device is registered to another account in the device cloud.")


class NotFound(ParticleError):
    """404: unknown variable, function, device (claim) or product."""

    user_message = _l("The device cloud does not know that device or value.")


class DeviceOffline(ParticleError):
    """408 (or the legacy 400 "Timed out."): the device did not answer."""

    user_message = _l("The device is offline or not answering right now.")


class RateLimited(ParticleError):
    """429: slow down. `retry_after` is seconds to wait, when the cloud said."""

    user_message = _l("The device cloud is busy. Please try again in a minute.")

    def __init__(self, message="", status=429, body=None, retry_after=None):
        super().__init__(message, status, body)
        self.retry_after = retry_after


class CloudUnavailable(ParticleError):
    """Timeouts, connection errors and 5xx: the cloud could not be reached or failed."""

    user_message = _l("The device cloud is not reachable right now. Please try again in a minute.")


class TokenRequestsSuspended(CloudUnavailable):
    """Our own breaker: token requests failed repeatedly, so we pause them (protects the IP
    from Particle's 30-minute lockout after 10 failures in a row)."""

    user_message = _l("The device cloud is not reachable right now. Please try again in a few minutes.")


class FunctionFailed(ParticleError):
    """A function call answered 200 but with ok:false or no return_value."""

    user_message = _l("The device did not carry out the command.")


# Worth trying again later: the cloud was unreachable, failed or asked us to slow down. A
# CloudUnavailable from a write does not say the write did not happen: see `uncertain`.
TRANSIENT = (CloudUnavailable, RateLimited)


def uncertain(exc):
    """True when a write that raised `exc` may have happened, or may still happen: no answer
    came (a timeout, a dropped connection: status None) or a gateway gave up waiting for
    Particle (502, 504). The caller reads the state back before deciding to retry, undo or go
    on. Any other answer (a 429, another 5xx, a refusal) and our own token breaker (nothing was
    sent) say the write was not done."""
    return (
        isinstance(exc, CloudUnavailable)
        and not isinstance(exc, TokenRequestsSuspended)
        and exc.status in (None, 502, 504)
    )
