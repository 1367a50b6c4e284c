"""Where the Particle client keeps the access tokens it minted, so it mints each one once.

A token store is anything with `get(key) -> StoredToken | None`, `put(key, StoredToken)` and
`delete(key)`. Keys are "product" and "customer:<customer id>". Two stores exist:

- `MemoryTokenStore`: a dict, for one process (the default; tests, scripts).
- `DatabaseTokenStore(fernet)`: the `ParticleToken` table, tokens encrypted at rest, shared by
  every worker and surviving restarts (what the app uses).
"""
import contextlib
import dataclasses
import datetime
import threading
from typing import Optional

from selfserve import crypto
from selfserve import models


@dataclasses.dataclass(frozen=True)
class StoredToken:
    """An access token, when to stop using it (naive UTC; None = never) and its refresh token."""

    access_token: str
    expires_at: Optional[datetime.datetime]
    refresh_token: Optional[str] = None

    def __repr__(self):
        # Never let a token reach a log line or a traceback through repr().
        return f"StoredToken(access_token='[redacted]', expires_at={self.expires_at!r}, " \
               f"refresh_token={'[redacted]' if self.refresh_token else None})"

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

    def get(self, key):
        with self._lock:
            return self._tokens.get(key)

    def put(self, key, token):
        with self._lock:
            self._tokens[key] = token

    def delete(self, key):
        with self._lock:
            self._tokens.pop(key, None)


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

    def __init__(self, fernet):
        self._fernet = fernet

    def get(self, key):
        with _database_connection():
            row = models.ParticleToken.get_or_none(models.ParticleToken.key == key)
        if row is None:
            return None
        access_token = crypto.decrypt(self._fernet, row.token_encrypted)
        if access_token is None:
            return None
        refresh_token = None
        if row.refresh_encrypted:
            refresh_token = crypto.decrypt(self._fernet, row.refresh_encrypted)
        return StoredToken(access_token, row.expires_at, refresh_token)

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
