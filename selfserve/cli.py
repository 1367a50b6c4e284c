"""Operator commands (`flask --app wsgi <command>`)."""

import click
from flask.cli import AppGroup


def init_app(app):
    app.cli.add_command(db_commands)
    for command in _commands():
        app.cli.add_command(command)


db_commands = AppGroup("db", help="Schema migrations (selfserve/migrations/).")


@db_commands.command("upgrade")
def db_upgrade():
    """Apply the migrations this database misses (run it at every deploy, before the workers)."""
    from selfserve import models
    from selfserve import schema

    try:
        done = schema.upgrade(models.db)
    except schema.SchemaError as error:
        raise click.ClickException(str(error))
    click.echo("Applied: " + ", ".join(done) if done else "The database is up to date.")


@db_commands.command("status")
def db_status():
    """List the migrations, applied or pending; exits 1 when some are pending."""
    from selfserve import models
    from selfserve import schema

    with models.db.connection_context():
        done = set(schema.applied(models.db))
    names = schema.available()
    for name in names:
        click.echo(f"{'applied' if name in done else 'PENDING'}  {name}")
    if not done and names:
        click.echo(
            "(no migration history: `flask db upgrade` creates the tables, or adopts a database made before migrations)"
        )
    if any(name not in done for name in names):
        raise SystemExit(1)


@db_commands.command("create")
@click.argument("name")
@click.option("--empty", is_flag=True, help="An empty migration to write by hand (a data migration).")
def db_create(name, empty):
    """Write the next migration in selfserve/migrations/ from the changes in models.py."""
    from selfserve import schema

    path = schema.create(name, empty=empty)
    if path is None:
        raise click.ClickException(
            "models.py and the migrations agree: nothing to migrate (use --empty to write one by hand)."
        )
    click.echo(
        f"Wrote {path}: read it, adjust it if needed (say why in a comment), commit it with the model change."
    )


def _commands():
    """Commands are defined next to the services they drive."""
    from selfserve.services import migration
    from selfserve.services import reconcile
    from selfserve.services import registry
    from selfserve.services import staff

    commands = [
        registry.import_registry_command,
        staff.create_staff_command,
        staff.reset_second_factor_command,
        reconcile.reconcile_command,
        migration.migrate_devices_command,
    ]
    return commands
