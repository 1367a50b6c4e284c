"""Sign-in links by email (issue 9, finding 8): when one was last used."""

import peewee as pw
from peewee_migrate import Migrator


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    # A link, and every link sent before it, is spent once one is used.
    migrator.add_fields("user", sign_in_link_used_at=pw.DateTimeField(null=True))


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):
    migrator.remove_fields("user", "sign_in_link_used_at")
