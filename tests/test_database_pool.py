"""The PostgreSQL connection pool (models.PostgresPool): a connection handed back moments ago
is lent again without a liveness round trip, and one that sat idle longer is checked first,
so a connection the server killed is replaced, never lent. Runs against the machine's
PostgreSQL whichever database the rest of the suite uses (it creates no tables)."""

import os

import psycopg2
import pytest

from selfserve.models import PostgresPool
from selfserve.models import parse_db_url

URL = os.environ.get("SELFSERVE_TEST_POSTGRES_URL") or "postgresql://postgres@127.0.0.1:5432/test"


class CountingPool(PostgresPool):
    """Counts the liveness checks peewee's pool makes (its `SELECT 1`; the fixture counts)."""

    pings = 0


@pytest.fixture
def pool(monkeypatch):
    from playhouse.pool import PooledPostgresqlDatabase

    checked = PooledPostgresqlDatabase._is_closed

    def counting(self, conn):
        CountingPool.pings += 1
        return checked(self, conn)

    monkeypatch.setattr(PooledPostgresqlDatabase, "_is_closed", counting)
    CountingPool.pings = 0
    database = CountingPool(**parse_db_url(URL), max_connections=2, stale_timeout=300)
    yield database
    database.close_all()


def backend_pid(database):
    with database.connection_context():
        return database.execute_sql("SELECT pg_backend_pid()").fetchone()[0]


def test_a_connection_returned_moments_ago_is_lent_without_a_round_trip(pool):
    first = backend_pid(pool)
    assert backend_pid(pool) == first  # the same connection, lent again
    assert CountingPool.pings == 0


def test_an_idle_connection_is_checked_and_a_killed_one_replaced(pool, monkeypatch):
    first = backend_pid(pool)
    monkeypatch.setattr(CountingPool, "PING_AFTER_IDLE_SECONDS", 0.0)  # as if idle for long
    with psycopg2.connect(URL) as admin, admin.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", (first,))
    second = backend_pid(pool)
    assert CountingPool.pings == 1
    assert second != first  # the dead connection was replaced, not lent
