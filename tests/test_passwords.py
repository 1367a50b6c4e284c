"""Argon2id with OWASP's recommended cost (19 MiB, not 64), older hashes upgraded at sign-in,
and a cheap profile that only the tests may use."""

import pytest
from argon2 import PasswordHasher
from helpers import PASSWORD
from helpers import make_user

from selfserve import config as config_module
from selfserve import passwords
from selfserve.models import User
from selfserve.services import accounts

OWASP_PREFIX = "$argon2id$v=19$m=19456,t=2,p=1$"


@pytest.fixture
def owasp_cost(app_config):
    """The production cost (conftest lowers it for speed)."""
    for key in ("PASSWORD_HASH_MEMORY_KIB", "PASSWORD_HASH_TIME_COST", "PASSWORD_HASH_PARALLELISM"):
        app_config[key] = config_module.DEFAULTS[key]
    return app_config


def test_new_hashes_use_the_owasp_profile(owasp_cost, app):
    assert passwords.hash_password(PASSWORD).startswith(OWASP_PREFIX)
    assert config_module.DEFAULTS["PASSWORD_HASH_MEMORY_KIB"] == 19456


def test_a_hash_of_an_older_release_is_upgraded_at_the_next_sign_in(owasp_cost, app):
    # argon2-cffi's defaults, which earlier releases used: 64 MiB, 3 passes, 4 lanes.
    old_hash = PasswordHasher().hash(PASSWORD)
    assert old_hash.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    user = make_user("old@example.com", PASSWORD, provisioned=False)
    User.update(password_hash=old_hash).where(User.id == user.id).execute()

    assert accounts.authenticate("old@example.com", "not the password") is None
    assert User.get_by_id(user.id).password_hash == old_hash  # a failed sign-in changes nothing

    assert accounts.authenticate("old@example.com", PASSWORD).id == user.id
    upgraded = User.get_by_id(user.id).password_hash
    assert upgraded.startswith(OWASP_PREFIX)
    assert not passwords.needs_rehash(upgraded)
    # The same password still signs in, against the new hash.
    assert accounts.authenticate("old@example.com", PASSWORD).id == user.id
    assert User.get_by_id(user.id).password_hash == upgraded


def test_only_the_tests_may_hash_below_the_owasp_cost(app_config):
    production = {
        **app_config,
        "TESTING": False,
        "SECRET_KEY": "production-secret-key-" + "0123456789abcdef" * 2,
        "BASE_URL": "https://devices.example.com",
    }
    for key, cheap in (
        ("PASSWORD_HASH_MEMORY_KIB", 8),
        ("PASSWORD_HASH_TIME_COST", 1),
        ("PASSWORD_HASH_PARALLELISM", 0),
    ):
        with pytest.raises(config_module.ConfigError, match=f"SELFSERVE_{key}"):
            config_module.check_password_hashing({**production, **config_module.DEFAULTS, key: cheap})
    config_module.check_password_hashing(
        {**production, **config_module.DEFAULTS, "PASSWORD_HASH_MEMORY_KIB": 65536}
    )
    config_module.check_password_hashing(app_config)  # the suite's cheap profile, under TESTING
