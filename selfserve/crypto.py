"""Symmetric encryption for secrets at rest (Particle tokens, TOTP secrets)."""

import base64
import hashlib

from cryptography.fernet import Fernet
from cryptography.fernet import InvalidToken


def fernet_for(config):
    """A Fernet built from TOKEN_ENCRYPTION_KEY, or derived from SECRET_KEY when unset."""
    key = config.get("TOKEN_ENCRYPTION_KEY") or ""
    if key:
        return Fernet(key.encode() if isinstance(key, str) else key)
    digest = hashlib.sha256(b"selfserve-at-rest:" + config["SECRET_KEY"].encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def encrypt(fernet, text):
    return fernet.encrypt(text.encode()).decode()


def decrypt(fernet, token):
    """The plaintext, or None when the ciphertext can't be read (e.g. the key rotated)."""
    try:
        return fernet.decrypt(token.encode()).decode()
    except InvalidToken:
        return None
