"""Operator commands (`flask --app wsgi <command>`)."""


def init_app(app):
    for command in _commands():
        app.cli.add_command(command)


def _commands():
    """Commands are defined next to the services they drive."""
    from selfserve.services import registry

    commands = [registry.import_registry_command]
    return commands
