"""Token stores: the in-memory default and the encrypted database store (SQLite or PostgreSQL)."""

import datetime
import threading

import pytest
from cryptography.fernet import Fernet

from selfserve import crypto
from selfserve import models
from selfserve.particle.token_store import DatabaseTokenStore
from selfserve.particle.token_store import MemoryTokenStore
from selfserve.particle.token_store import StoredToken

ACCESS = "1234567890abcdef1234567890abcdef12345678"
REFRESH = "abcdefabcdefabcdefabcdefabcdefabcdefabcd"
WHEN = datetime.datetime(2031, 5, 6, 7, 8, 9)


@pytest.fixture
def database(db_url):
    """The test database, bound and emptied of tokens, with no connection left open."""
    models.init_db(db_url)
    with models.db.connection_context():
        models.ParticleToken.delete().execute()
    yield models.db
    if not models.db.is_closed():
        models.db.close()


@pytest.fixture
def fernet():
    return Fernet(Fernet.generate_key())


def test_stored_token_usable_until_its_expiry():
    now = datetime.datetime(2030, 1, 1)
    assert StoredToken(ACCESS, now + datetime.timedelta(seconds=1)).usable(now)
    assert not StoredToken(ACCESS, now).usable(now)
    assert StoredToken(ACCESS, None).usable(now)


def test_stored_token_repr_hides_both_tokens():
    text = repr(StoredToken(ACCESS, WHEN, REFRESH)) + str(StoredToken(ACCESS, WHEN, REFRESH))
    assert ACCESS not in text and REFRESH not in text and "2031" in text


def test_memory_store_round_trip():
    store = MemoryTokenStore()
    assert store.get("product") is None
    store.put("product", StoredToken(ACCESS, WHEN, REFRESH))
    assert store.get("product") == StoredToken(ACCESS, WHEN, REFRESH)
    store.put("product", StoredToken(REFRESH, None))
    assert store.get("product") == StoredToken(REFRESH, None)
    store.delete("product")
    store.delete("product")  # deleting a missing key is fine
    assert store.get("product") is None


def test_database_store_round_trip_encrypted(database, fernet):
    store = DatabaseTokenStore(fernet)
    store.put("customer:abc", StoredToken(ACCESS, WHEN, REFRESH))
    assert store.get("customer:abc") == StoredToken(ACCESS, WHEN, REFRESH)
    with models.db.connection_context():
        row = models.ParticleToken.get(models.ParticleToken.key == "customer:abc")
    assert ACCESS not in row.token_encrypted and REFRESH not in row.refresh_encrypted
    assert crypto.decrypt(fernet, row.token_encrypted) == ACCESS

    store.put("customer:abc", StoredToken(REFRESH, None))  # overwrite, no refresh token
    assert store.get("customer:abc") == StoredToken(REFRESH, None, None)
    with models.db.connection_context():
        assert models.ParticleToken.select().count() == 1
    store.delete("customer:abc")
    assert store.get("customer:abc") is None
    assert store.get("never-stored") is None


def test_database_store_with_another_key_reads_nothing(database, fernet):
    DatabaseTokenStore(fernet).put("product", StoredToken(ACCESS, WHEN, REFRESH))
    other = DatabaseTokenStore(Fernet(Fernet.generate_key()))
    assert other.get("product") is None
    other.put("product", StoredToken(REFRESH, WHEN))  # the client then stores a new token
    assert other.get("product") == StoredToken(REFRESH, WHEN)


def test_database_store_undecryptable_refresh_token_is_dropped(database, fernet):
    store = DatabaseTokenStore(fernet)
    store.put("product", StoredToken(ACCESS, WHEN, REFRESH))
    with models.db.connection_context():
        models.ParticleToken.update(refresh_encrypted="garbage").execute()
    assert store.get("product") == StoredToken(ACCESS, WHEN, None)


class CountingFernet(Fernet):
    decrypted = 0

    def decrypt(self, token, ttl=None):
        CountingFernet.decrypted += 1
        return super().decrypt(token, ttl)


def test_database_store_decrypts_a_token_once_until_it_changes(database):
    key = Fernet.generate_key()
    store, other_worker = DatabaseTokenStore(CountingFernet(key)), DatabaseTokenStore(Fernet(key))
    store.put("customer:abc", StoredToken(ACCESS, WHEN, REFRESH))
    CountingFernet.decrypted = 0
    for _ in range(6):  # a live refresh: the device, then each variable
        assert store.get("customer:abc") == StoredToken(ACCESS, WHEN, REFRESH)
    assert CountingFernet.decrypted == 2  # the access and the refresh token, once each

    # Another worker refreshes the token: the next read returns the new one, not a cached one.
    other_worker.put("customer:abc", StoredToken(REFRESH, WHEN))
    assert store.get("customer:abc") == StoredToken(REFRESH, WHEN, None)
    other_worker.delete("customer:abc")
    assert store.get("customer:abc") is None


def test_database_store_leaves_connections_as_it_found_them(database, fernet):
    store = DatabaseTokenStore(fernet)
    assert models.db.is_closed()
    store.put("product", StoredToken(ACCESS, WHEN))
    assert store.get("product").access_token == ACCESS
    assert models.db.is_closed()  # opened and closed its own connection

    models.db.connect()
    connection = models.db.connection()
    store.put("product", StoredToken(REFRESH, WHEN))
    assert store.get("product").access_token == REFRESH
    assert not models.db.is_closed() and models.db.connection() is connection  # reused


def test_database_store_from_many_threads(database, fernet):
    store = DatabaseTokenStore(fernet)
    failures = []

    def work(index):
        try:
            key = f"customer:t{index}"
            store.put(key, StoredToken(f"{index:040x}", WHEN))
            assert store.get(key).access_token == f"{index:040x}"
        except Exception as exc:  # noqa: BLE001 (reported below)
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not failures, failures
    with models.db.connection_context():
        assert models.ParticleToken.select().count() == 8


def test_the_token_breaker_is_shared_by_clients_using_one_database(app, sim):
    """Two clients (as two workers) on one database: their failed token requests add up, so
    together they stop before Particle's 10-in-a-row IP lockout, and both see the pause."""
    from selfserve import config
    from selfserve.crypto import fernet_for
    from selfserve.particle import errors
    from selfserve.particle.client import ParticleClient
    from selfserve.particle.token_store import DatabaseTokenStore

    def worker():
        return ParticleClient(
            api_url=sim.url,
            product=config.DEMO_PARTICLE_PRODUCT,
            client_id=config.DEMO_PARTICLE_CLIENT_ID,
            client_secret=config.DEMO_PARTICLE_CLIENT_SECRET,
            token_store=DatabaseTokenStore(fernet_for(app.config)),
            token_failure_limit=4,
        )

    first, second = worker(), worker()
    sim.add_fault("POST", "/oauth/token", count=None, status=503)
    for client in (first, second, first, second):
        with pytest.raises(errors.CloudUnavailable):
            client.product_token()
    for client in (first, second):
        with pytest.raises(errors.TokenRequestsSuspended):
            client.product_token()
    assert sim.counters()["routes"]["POST /oauth/token"] == 4
