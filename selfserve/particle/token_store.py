"""Where the Particle client keeps the access tokens it minted, so it mints each one once.

A token store is anything with `get(key) -> StoredToken | None`, `put(key, StoredToken)` and
`delete(key)`. Keys are "product" and "customer:<customer id>". It also keeps the state of the
token-request breaker (`paused()`, `record_token_failure(...)`, `record_token_success()`), so
that every worker sharing a store shares one count of failed token requests: Particle locks
the whole IP out after 10 in a row, whichever process sent them. Two stores exist:

- `MemoryTokenStore`: a dict, for one process (the default; tests, scripts).
- `DatabaseTokenStore(fernet)`: the `ParticleToken` table, tokens encrypted at rest, shared by
  every worker and surviving restarts (what the app uses).
"""

import collections
import contextlib
import dataclasses
import datetime
import threading

from selfserve import crypto
from selfserve import models


@dataclasses.dataclass(frozen=True)
class StoredToken:
    """An access token, when to stop using it (naive UTC; None = never) and its refresh token."""

    access_token: str
    expires_at: datetime.datetime | None
    refresh_token: str | None = None

    def __repr__(self):
        # Never let a token reach a log line or a traceback through repr().
        return (
            f"StoredToken(access_token='[redacted]', expires_at={self.expires_at!r}, "
            f"refresh_token={'[redacted]' if self.refresh_token else None})"
        )

    def usable(self, now=None):
        """True when the token has not reached its (early) expiry time."""
        if self.expires_at is None:
            return True
        return (now or models.utcnow()) < self.expires_at


class MemoryTokenStore:
    """Tokens in a dict, for one process. Thread-safe."""

    def __init__(self):
        self._tokens = {}
        self._lock = threading.Lock()
        self._failures = 0
        self._paused_until = None  # naive UTC
        self._reason = ""

    def paused(self):
        """Why token requests are paused right now, or None."""
        with self._lock:
            if self._paused_until is not None and models.utcnow() < self._paused_until:
                return self._reason
            return None

    def record_token_failure(self, limit, pause_seconds, immediately=False):
        """Count a failed token request; pause token requests for `pause_seconds` when this is
        the `limit`-th failure in a row (or `immediately`). Returns the reason if it paused."""
        with self._lock:
            self._failures += 1
            reason = _pause_reason(self._failures, limit, immediately)
            if reason:
                self._paused_until = models.utcnow() + datetime.timedelta(seconds=pause_seconds)
                self._reason = reason
            return reason

    def record_token_success(self):
        with self._lock:
            self._failures = 0
            self._paused_until = None

    def get(self, key):
        with self._lock:
            return self._tokens.get(key)

    def put(self, key, token):
        with self._lock:
            self._tokens[key] = token

    def delete(self, key):
        with self._lock:
            self._tokens.pop(key, None)


def _pause_reason(failures, limit, immediately):
    if immediately:
        return "the cloud rejected our client credentials"
    if failures >= limit:
        return f"{failures} failed token requests in a row"
    return None


@contextlib.contextmanager
def _database_connection():
    """Reuse the thread's open connection (a Flask request), or open one for this call only."""
    if models.db.is_closed():
        with models.db.connection_context():
            yield
    else:
        yield


class DatabaseTokenStore:
    """Tokens in the `ParticleToken` table, encrypted with `fernet`.

    A row that can't be decrypted (the key rotated, the row was tampered with) reads as
    missing, so the client simply mints a new token. Works inside and outside a request.
    """

    # Decrypted rows, keyed by their ciphertext: a live refresh reads the same token for the
    # device and each variable, and it is decrypted once per mint, not once per read. A row
    # replaced by another worker has a new ciphertext, so the cache never serves a stale token.
    _PLAINTEXT_CACHE_SIZE = 1024

    def __init__(self, fernet):
        self._fernet = fernet
        self._plaintext = collections.OrderedDict()
        self._plaintext_lock = threading.Lock()

    def get(self, key):
        with _database_connection():
            row = models.ParticleToken.get_or_none(models.ParticleToken.key == key)
        if row is None:
            return None
        access_token = self._decrypt(row.token_encrypted)
        if access_token is None:
            return None
        refresh_token = None
        if row.refresh_encrypted:
            refresh_token = self._decrypt(row.refresh_encrypted)
        return StoredToken(access_token, row.expires_at, refresh_token)

    def _decrypt(self, ciphertext):
        with self._plaintext_lock:
            if ciphertext in self._plaintext:
                self._plaintext.move_to_end(ciphertext)
                return self._plaintext[ciphertext]
        plaintext = crypto.decrypt(self._fernet, ciphertext)
        if plaintext is not None:
            with self._plaintext_lock:
                self._plaintext[ciphertext] = plaintext
                while len(self._plaintext) > self._PLAINTEXT_CACHE_SIZE:
                    self._plaintext.popitem(last=False)
        return plaintext

    def put(self, key, token):
        values = {
            models.ParticleToken.token_encrypted: crypto.encrypt(self._fernet, token.access_token),
            models.ParticleToken.refresh_encrypted: (
                crypto.encrypt(self._fernet, token.refresh_token) if token.refresh_token else None
            ),
            models.ParticleToken.expires_at: token.expires_at,
        }
        with _database_connection():
            (
                models.ParticleToken.insert({models.ParticleToken.key: key, **values})
                .on_conflict(conflict_target=[models.ParticleToken.key], update=values)
                .execute()
            )

    def delete(self, key):
        with _database_connection():
            models.ParticleToken.delete().where(models.ParticleToken.key == key).execute()

    # The breaker: one row shared by every worker using this database.

    def paused(self):
        with _database_connection():
            row = models.TokenBreaker.get_or_none(models.TokenBreaker.name == _BREAKER)
        if row is not None and row.paused_until is not None and models.utcnow() < row.paused_until:
            return row.reason
        return None

    def record_token_failure(self, limit, pause_seconds, immediately=False):
        breaker = models.TokenBreaker
        with _database_connection(), models.db.atomic():
            breaker.insert(name=_BREAKER, failures=0).on_conflict_ignore().execute()
            # Increment in the database, not in Python: several workers may fail at once.
            breaker.update(failures=breaker.failures + 1).where(breaker.name == _BREAKER).execute()
            failures = breaker.get(breaker.name == _BREAKER).failures
            reason = _pause_reason(failures, limit, immediately)
            if reason:
                until = models.utcnow() + datetime.timedelta(seconds=pause_seconds)
                breaker.update(paused_until=until, reason=reason).where(breaker.name == _BREAKER).execute()
        return reason

    def record_token_success(self):
        breaker = models.TokenBreaker
        with _database_connection():
            breaker.update(failures=0, paused_until=None).where(breaker.name == _BREAKER).execute()


_BREAKER = "token-requests"
