"""Password hashing (Argon2id via argon2-cffi) and the one password rule: length.

The cost is OWASP's recommended argon2id profile (m=19 MiB, t=2, p=1): each check allocates
19 MiB, not argon2-cffi's default 64 MiB (8 concurrent sign-ins took a worker to 0.5 GB), and
takes tens of milliseconds. Hashes made with other parameters (older releases) still verify,
and are re-hashed with these at the account's next sign-in (services.accounts.authenticate).
The PASSWORD_HASH_* settings may raise the cost; only tests may lower it (config.py refuses
less outside TESTING), so the suite doesn't spend its time in Argon2.
"""

import threading

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError
from argon2.exceptions import VerificationError

from selfserve.i18n import lazy_text as _l

MIN_LENGTH = 10
MAX_LENGTH = 256

# OWASP Password Storage Cheat Sheet, argon2id: m=19456 KiB, t=2, p=1.
OWASP_MEMORY_KIB = 19 * 1024
OWASP_TIME_COST = 2
OWASP_PARALLELISM = 1

_lock = threading.Lock()
_hasher = None
# Verified against when the email is unknown, so a miss costs the same time as a hit.
_dummy_hash = None


def configure(memory_kib=OWASP_MEMORY_KIB, time_cost=OWASP_TIME_COST, parallelism=OWASP_PARALLELISM):
    """Use these Argon2id parameters for new hashes (create_app calls it with the settings)."""
    global _hasher, _dummy_hash
    hasher = PasswordHasher(memory_cost=memory_kib, time_cost=time_cost, parallelism=parallelism)
    with _lock:
        _hasher, _dummy_hash = hasher, hasher.hash("not-a-real-password-just-for-timing")


def _current():
    if _hasher is None:
        configure()
    return _hasher, _dummy_hash


def problem(password):
    """What is wrong with a new password, or None. Length only, no composition rules."""
    if len(password) < MIN_LENGTH:
        return _l("Use at least %(count)s characters.", count=MIN_LENGTH)
    if len(password) > MAX_LENGTH:
        return _l("Use at most %(count)s characters.", count=MAX_LENGTH)
    return None


def hash_password(password):
    return _current()[0].hash(password)


def check_password(password_hash, password):
    """True when `password` matches; also True-safe against malformed hashes (returns False)."""
    hasher, dummy = _current()
    try:
        return hasher.verify(password_hash or dummy, password) and bool(password_hash)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash):
    """True when the hash was made with other parameters than the current ones."""
    return _current()[0].check_needs_rehash(password_hash)
