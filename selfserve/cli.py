"""Operator commands (`flask --app wsgi <command>`)."""


def init_app(app):
    for command in _commands():
        app.cli.add_command(command)


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
