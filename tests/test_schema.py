"""Schema migrations: the models and the migration files agree, a database of the previous
release (main at a8f1969, made by create_tables, no migration history) upgrades with its data
intact on SQLite and PostgreSQL, and the app refuses to serve a database that misses some."""

import datetime
import os

import peewee
import pytest
import schema_a8f1969 as old
from playhouse.db_url import connect

from selfserve import models
from selfserve import schema

TEST_DATABASE_URL = os.environ.get("SELFSERVE_TEST_DATABASE_URL", "")
WHEN = datetime.datetime(2026, 3, 4, 5, 6, 7)


def _drop_everything(database):
    for table in database.get_tables():
        database.execute_sql(f'DROP TABLE IF EXISTS "{table}" CASCADE')


@pytest.fixture
def empty_database(tmp_path):
    """Yield a function giving an empty database for a kind ("sqlite" or "postgresql")."""
    opened = []

    def make(kind):
        if kind == "sqlite":
            database = connect(f"sqlite:///{tmp_path}/upgrade.db", pragmas={"foreign_keys": 1})
        else:
            database = connect(TEST_DATABASE_URL)
            with database.connection_context():
                _drop_everything(database)
        opened.append(database)
        return database

    yield make
    for database in opened:
        if not database.is_closed():
            database.close()
    if TEST_DATABASE_URL:
        # The shared test database now holds this test's tables: rebuild it for the next test.
        from helpers import POSTGRES_MIGRATED

        POSTGRES_MIGRATED.discard(TEST_DATABASE_URL)


def _previous_release_with_data(database):
    """The schema of main at a8f1969 as create_tables made it, with one row in every table."""
    old.db.initialize(database)
    with database.connection_context():
        database.create_tables(old.ALL_MODELS)
        owner = old.User.create(
            email="owner@example.com",
            password_hash="$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
            created_at=WHEN,
            email_verified_at=WHEN,
            particle_customer_id="c0123456789abcdef01234567",
            provisioning_state="ready",
            provisioning_attempts=2,
            totp_last_step=2**40,
            password_changed_at=WHEN,
        )
        buyer = old.User.create(
            email="buyer@example.com", password_hash="x", role="staff", password_changed_at=WHEN
        )
        session = old.LoginSession.create(id="a" * 64, user=owner, created_at=WHEN, user_agent="Firefox")
        device = old.Device.create(
            device_id="0123456789abcdef01234567",
            serial_number="WIN-0001",
            setup_code_hash="$argon2id$code",
            model="window",
            in_product=True,
            owner=owner,
            name="Kitchen blind",
            claimed_at=WHEN,
        )
        old.ClaimAttempt.create(key="serial:WIN-0001", at=WHEN)
        old.DeviceSnapshot.create(device_id=device.device_id, values={"position": {"value": 40}}, online=True)
        old.ParticleToken.create(key="customer:c0", token_encrypted="gAAAA-token", expires_at=WHEN)
        old.TokenBreaker.create(name="product", failures=3, reason="timeout")
        old.AuditEvent.create(
            at=WHEN,
            user=owner,
            actor=buyer,
            action="device.claim",
            device_id=device.device_id,
            detail={"a": [1, 2]},
        )
        old.StaffView.create(
            staff=buyer, customer=owner, login_session=session, reason="ticket 42", expires_at=WHEN
        )
        run = old.ReconcileRun.create(
            trigger="cli", status="done", findings_count=1, particle_status={"x": {"online": False}}
        )
        old.ReconcileFinding.create(
            run=run, device_id=device.device_id, kind="owner_mismatch", detail={"ours": "a"}
        )
        old.Transfer.create(
            device=device,
            kind="offer",
            state="offered",
            open_device=device.device_id,
            seller=owner,
            buyer_email="buyer@example.com",
            expires_at=WHEN,
            step=None,
            attempts=1,
        )
        old.PossessionProof.create(id="b" * 64, user=buyer, device=device, expires_at=WHEN)
        old.MigrationRow.create(
            device_id="fedcba9876543210fedcba98", email="field@example.com", state="invited", user=owner
        )
        return {
            model._meta.table_name: list(model.select().order_by(*_order(model)).dicts())
            for model in old.ALL_MODELS
        }


def _order(model):
    return [model._meta.primary_key]


KINDS = ["sqlite"] + (["postgresql"] if TEST_DATABASE_URL.startswith("postgres") else [])


@pytest.mark.parametrize("kind", KINDS)
def test_previous_release_upgrades_with_its_data_intact(empty_database, kind):
    database = empty_database(kind)
    before = _previous_release_with_data(database)

    applied = schema.upgrade(database)

    # The unversioned database is recorded at the baseline; every later migration ran.
    assert applied == schema.available()[1:]
    with database.connection_context():
        assert schema.applied(database) == schema.available()
        assert schema.pending(database) == []
        models.db.initialize(database)
        current = {model._meta.table_name: model for model in models.ALL_MODELS}
        for table, rows in before.items():
            model = current[table]
            after = list(model.select().order_by(*_order(model)).dicts())
            assert len(after) == len(rows), table
            for old_row, new_row in zip(rows, after, strict=True):
                assert {key: new_row[key] for key in old_row} == old_row, table
        # And the upgraded database works with today's models.
        assert models.Device.get().owner.email == "owner@example.com"
    # A second upgrade has nothing to do.
    assert schema.upgrade(database) == []


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_database_gets_the_whole_schema(empty_database, kind):
    database = empty_database(kind)

    assert schema.upgrade(database) == schema.available()

    with database.connection_context():
        for model in models.ALL_MODELS:
            columns = {column.name for column in database.get_columns(model._meta.table_name)}
            assert columns == {field.column_name for field in model._meta.sorted_fields}, model


def test_an_unversioned_database_that_is_not_the_previous_release_is_refused(empty_database):
    database = empty_database("sqlite")
    _previous_release_with_data(database)
    with database.connection_context():
        database.execute_sql('ALTER TABLE "device" ADD COLUMN "colour" TEXT')

    with pytest.raises(schema.SchemaError, match=r"device: missing nothing, unexpected \['colour'\]"):
        schema.upgrade(database)
    with database.connection_context():
        assert schema.applied(database) == []  # nothing recorded, nothing half-done


def test_models_and_migrations_agree():
    """A model change without its migration fails here (and the app's tables would lack it)."""
    assert schema.drift() == "", "models.py changed without a migration: run `flask db create NAME`"


def test_drift_names_a_model_change_no_migration_makes():
    class Gadget(models.BaseModel):
        label = peewee.CharField(max_length=20)

    code = schema.drift(models.ALL_MODELS + [Gadget])
    assert "create_model" in code and "class Gadget" in code and "label" in code


def test_flask_db_commands(tmp_path, app_config):
    from selfserve import create_app

    url = f"sqlite:///{tmp_path}/cli.db"
    models.init_db(url)  # an empty database: the app starts, but refuses pages until upgraded
    app = create_app({**app_config, "DATABASE_URL": url})
    runner = app.test_cli_runner()

    status = runner.invoke(args=["db", "status"])
    assert status.exit_code == 1 and "PENDING  001_initial" in status.output
    assert app.test_client().get("/login").status_code == 503

    upgrade = runner.invoke(args=["db", "upgrade"])
    assert upgrade.exit_code == 0, upgrade.output
    assert "Applied: 001_initial" in upgrade.output
    assert runner.invoke(args=["db", "upgrade"]).output.strip() == "The database is up to date."
    status = runner.invoke(args=["db", "status"])
    assert status.exit_code == 0 and "applied  001_initial" in status.output
    # The same app serves pages once the migrations are in, without a restart.
    assert app.test_client().get("/login").status_code == 200

    create = runner.invoke(args=["db", "create", "nothing_changed"])
    assert create.exit_code != 0 and "nothing to migrate" in create.output
