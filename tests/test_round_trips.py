"""Fewer round trips for statements run very often (models.execute_together,
transaction_opening_with, at_commit), on the suite's database: what they save must not change
what a transaction means (all or nothing, in order, and on SQLite no failed write because
another connection committed in between)."""

import threading

import peewee
import pytest
from helpers import count_queries

from selfserve import models
from selfserve.models import EventCount
from selfserve.models import at_commit
from selfserve.models import db
from selfserve.models import execute_together
from selfserve.models import raw_sql
from selfserve.models import transaction_opening_with

COUNT = "INSERT INTO eventcount (key, count) VALUES (?, ?)"


def insert(key, count=1):
    return (raw_sql(COUNT), [key, count])


def keys():
    return sorted(row.key for row in EventCount.select())


def test_opening_statements_belong_to_the_transaction(app):
    with transaction_opening_with(
        insert("a"), (raw_sql("SELECT count FROM eventcount WHERE key = ?"), ["a"])
    ) as opened:
        assert opened.fetchone()[0] == 1  # the last opening statement's result
        execute_together(insert("b"), insert("c", 3))
    assert keys() == ["a", "b", "c"]

    with pytest.raises(RuntimeError), transaction_opening_with(insert("d")):
        execute_together(insert("e"))
        raise RuntimeError("the event failed half-way")
    assert keys() == ["a", "b", "c"]  # nothing of it stayed


def test_opening_inside_an_outer_transaction_is_a_savepoint(app):
    with db.atomic():
        execute_together(insert("outer"))
        with pytest.raises(RuntimeError), transaction_opening_with(insert("inner")):
            raise RuntimeError
        with transaction_opening_with(insert("kept")) as opened:
            assert opened is not None
    assert keys() == ["kept", "outer"]


def test_statements_at_commit_run_with_it_and_never_after_a_rollback(app):
    with db.atomic():
        execute_together(insert("first"))
        at_commit(*insert("last"))
    assert keys() == ["first", "last"]

    with pytest.raises(RuntimeError), db.atomic():
        at_commit(*insert("dropped"))
        raise RuntimeError
    with db.atomic():
        execute_together(insert("next"))  # a rolled-back transaction's leftovers don't run here
    assert keys() == ["first", "last", "next"]

    at_commit(*insert("now"))  # outside a transaction: at once
    assert "now" in keys()


def test_a_failed_opening_leaves_no_transaction_behind(app):
    with (
        pytest.raises(peewee.DatabaseError),
        transaction_opening_with((raw_sql("SELECT no_such_column FROM eventcount"), [])),
    ):
        pass
    with db.atomic():
        execute_together(insert("after"))  # the same connection: not stuck in an aborted transaction
    assert keys() == ["after"]


def test_a_statement_at_commit_from_an_after_commit_callback_runs(app):
    """An explicit `txn.commit()` runs the after_commit callbacks before the next BEGIN: a
    statement queued there would be dropped by that BEGIN, so it runs at once."""
    with db.atomic() as transaction:
        execute_together(insert("first"))
        db.after_commit(lambda: at_commit(*insert("from_callback")))
        transaction.commit()
        execute_together(insert("second"))
    assert keys() == ["first", "from_callback", "second"]


def test_on_postgresql_begin_and_commit_travel_with_statements(app):
    with count_queries() as queries, transaction_opening_with(insert("a")):
        execute_together(insert("b"), insert("c"))
        at_commit(*insert("d"))
    if models.is_postgres():
        assert [query.split("', ")[0].strip("('\"") for query in queries] == [
            "BEGIN; INSERT INTO eventcount (key, count) VALUES (%s, %s)",
            "INSERT INTO eventcount (key, count) VALUES (%s, %s); INSERT INTO eventcount (key, count) VALUES (%s, %s)",
            "INSERT INTO eventcount (key, count) VALUES (%s, %s); COMMIT",
        ]
    else:
        assert len(queries) == 4  # SQLite: one statement at a time, in-process
    assert keys() == ["a", "b", "c", "d"]


def test_on_sqlite_a_transaction_that_reads_first_still_writes_when_another_commits(app):
    """WAL: a transaction that begins by reading would fail its write with "database is
    locked" if another connection committed after its read; the opening takes the write lock."""
    other_done = threading.Event()
    failures = []

    def other_writer():
        try:
            with db.connection_context():
                execute_together(insert("other"))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            failures.append(error)
        other_done.set()

    with transaction_opening_with((raw_sql("SELECT count(*) FROM eventcount"), [])):
        writer = threading.Thread(target=other_writer)
        writer.start()
        other_done.wait(0.5)  # PostgreSQL: it commits now; SQLite: it waits for our lock
        execute_together(insert("ours"))
    writer.join(15)
    assert not failures
    assert keys() == ["other", "ours"]
