"""The person's language and time zone (issue 12, part 6), stored on the account. The alert
settings' time zone becomes the account's (one time zone for pages, emails and alerts)."""

import peewee as pw
from peewee_migrate import Migrator


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    migrator.add_fields(
        "user",
        locale=pw.CharField(null=True, max_length=8),
        seen_locale=pw.CharField(null=True, max_length=8),
        time_zone=pw.CharField(null=True, max_length=64),
    )
    # Keep the zone people already gave for their alerts.
    migrator.sql(
        'UPDATE "user" SET time_zone = (SELECT a.time_zone FROM alertsetting a WHERE a.user_id = "user".id) '
        "WHERE EXISTS (SELECT 1 FROM alertsetting a WHERE a.user_id = \"user\".id AND a.time_zone <> 'UTC')"
    )
    migrator.remove_fields("alertsetting", "time_zone")


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):
    migrator.add_fields("alertsetting", time_zone=pw.CharField(default="UTC", max_length=64))
    migrator.sql(
        'UPDATE alertsetting SET time_zone = (SELECT u.time_zone FROM "user" u WHERE u.id = alertsetting.user_id) '
        'WHERE EXISTS (SELECT 1 FROM "user" u WHERE u.id = alertsetting.user_id AND u.time_zone IS NOT NULL)'
    )
    migrator.remove_fields("user", "locale", "seen_locale", "time_zone")
