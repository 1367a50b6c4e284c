"""Versioned schema migrations (peewee-migrate): the only way the database's tables change.

Migration files live in selfserve/migrations/ (`NNN_name.py`, applied in order, each in a
transaction, recorded in the `migratehistory` table). `flask db upgrade` applies the missing
ones; the demo, the bench and the tests build their database through the same files, so a model
change without its migration fails the tests (and `schema.drift()` names what is missing).

A database made before migrations existed (by `create_tables`, up to main at a8f1969) has our
tables but no history: `upgrade` checks its columns are those of 001_initial and records it as
being at 001, then applies the rest.
"""

import logging
import pathlib
import subprocess
import sys

import peewee
from peewee_migrate import Migrator
from peewee_migrate import Router
from peewee_migrate.router import compile_migrations

MIGRATIONS_DIR = pathlib.Path(__file__).parent / "migrations"
HISTORY_TABLE = "migratehistory"
BASELINE = "001_initial"
# Any fixed number: PostgreSQL advisory lock that keeps two `flask db upgrade` runs apart.
_PG_LOCK_KEY = 5_173_229_041

log = logging.getLogger("selfserve.schema")


class SchemaError(RuntimeError):
    """The database can't be upgraded safely as it is (the message says why and what to do)."""


def _concrete(database):
    return database.obj if isinstance(database, peewee.DatabaseProxy) else database


def _router(database):
    return Router(_concrete(database), migrate_dir=MIGRATIONS_DIR, migrate_table=HISTORY_TABLE, logger=log)


def available():
    """Migration names in the repository, in the order they apply."""
    return _router(peewee.SqliteDatabase(":memory:")).todo


def applied(database):
    """Migration names recorded in the database (without creating anything)."""
    database = _concrete(database)
    if not database.table_exists(HISTORY_TABLE):
        return []
    cursor = database.execute_sql(f'SELECT name FROM "{HISTORY_TABLE}" ORDER BY id')
    return [row[0] for row in cursor.fetchall()]


def pending(database):
    """Migrations not applied yet (what `upgrade` would run)."""
    done = set(applied(database))
    return [name for name in available() if name not in done]


def upgrade(database):
    """Apply every pending migration; returns their names. Safe to run again (a no-op)."""
    database = _concrete(database)
    postgres = isinstance(database, peewee.PostgresqlDatabase)
    with database.connection_context():
        if postgres:
            database.execute_sql("SELECT pg_advisory_lock(%s)", (_PG_LOCK_KEY,))
        try:
            _adopt_unversioned(database)
            return _router(database).run()
        finally:
            if postgres:
                database.execute_sql("SELECT pg_advisory_unlock(%s)", (_PG_LOCK_KEY,))


def _schema_after(names):
    """{table: {column, ...}} as the given migrations leave it (replayed without a database)."""
    router = _router(peewee.SqliteDatabase(":memory:"))
    migrator = Migrator(router.database)
    for name in names:
        router.run_one(name, migrator, fake=True)
    return migrator, {
        model._meta.table_name: {field.column_name for field in model._meta.sorted_fields}
        for model in migrator.orm
    }


def _adopt_unversioned(database):
    """Record a pre-migration database as being at the baseline, after checking its columns."""
    if database.table_exists(HISTORY_TABLE) or not database.table_exists("user"):
        return
    _, expected = _schema_after([BASELINE])
    differences = []
    for table, columns in sorted(expected.items()):
        if not database.table_exists(table):
            differences.append(f"table {table} is missing")
            continue
        present = {column.name for column in database.get_columns(table)}
        if present != columns:
            missing, extra = sorted(columns - present), sorted(present - columns)
            differences.append(f"{table}: missing {missing or 'nothing'}, unexpected {extra or 'nothing'}")
    if differences:
        raise SchemaError(
            "This database has tables but no migration history, and they are not the schema of "
            f"{BASELINE} (main at a8f1969): " + "; ".join(differences) + ". Upgrade it with that "
            "release first, or make it match by hand, then run `flask db upgrade` again."
        )
    router = _router(database)
    router.model.create(name=BASELINE)
    log.warning("Recorded an unversioned database as being at %s", BASELINE)


def drift(models=None):
    """Model changes that no migration makes yet, as the code a new migration would need.

    Empty when selfserve/models.py and selfserve/migrations/ agree."""
    if models is None:
        from selfserve.models import ALL_MODELS as models
    migrator, _ = _schema_after(available())
    return compile_migrations(migrator, list(models)).strip()


def create(name, empty=False):
    """Write the next migration file: the model changes no migration makes yet (see `drift`),
    or an empty one to fill in by hand (data migrations). Returns its path, or None when
    there is nothing to migrate."""
    from selfserve.models import ALL_MODELS

    router = _router(peewee.SqliteDatabase(":memory:"))
    written = router.create(name, auto=False if empty else list(ALL_MODELS))
    if not written:
        return None
    path = MIGRATIONS_DIR / f"{written}.py"
    _tidy(path)
    return path


_HEADER = '''"""{title}"""

import peewee as pw
from peewee_migrate import Migrator


'''


def _tidy(path):
    """Replace peewee-migrate's template header by ours and format the file like the code."""
    text = path.read_text(encoding="utf-8")
    body = text[text.index("def migrate(") :]
    for boilerplate in (
        '    """Write your migrations here."""\n',
        '    """Write your rollback migrations here."""\n',
    ):
        body = body.replace(boilerplate, "    # Say why, when it is not obvious from the operations.\n", 1)
    path.write_text(
        _HEADER.format(title=path.stem.split("_", 1)[1].replace("_", " ").capitalize() + ".") + body
    )
    ruff = pathlib.Path(sys.executable).with_name("ruff")
    if ruff.exists():
        subprocess.run([str(ruff), "check", "--fix", "-q", str(path)], check=False)
        subprocess.run([str(ruff), "format", "-q", str(path)], check=False)


def init_app(app):
    """Refuse to serve pages on a database that misses migrations (a deploy that skipped
    `flask db upgrade`): a clear 503 and a log line instead of errors deep in every page. The
    check costs one query at start-up, and one per request only while migrations are missing."""
    from selfserve.models import db

    with db.connection_context():
        behind = pending(db)
    if not behind:
        return
    log.error("The database misses migrations %s: run `flask db upgrade`.", ", ".join(behind))
    state = {"behind": True}

    @app.before_request
    def _refuse_while_behind():
        if not state["behind"]:
            return None
        if not pending(db):
            state["behind"] = False
            return None
        return "The site is being upgraded. Please try again in a few minutes.", 503


def upgrade_url(url):
    """Bind the database at `url` and apply its pending migrations (the demo and the bench)."""
    from selfserve import models

    return upgrade(models.init_db(url))
