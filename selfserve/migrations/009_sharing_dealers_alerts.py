"""Sharing, second round (issue 11, 13): the dealer a device was sold through, invitations to
organisations, and who gets a shared device's alerts."""

import peewee as pw
from peewee_migrate import Migrator


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    # The registry may name the dealer (organisation name) a device was sold through.
    migrator.add_fields("device", sold_through=pw.CharField(max_length=100, null=True))
    # An invitation accepted on behalf of an organisation the accepting person administers.
    migrator.add_fields("invitation", to_organisation=pw.BooleanField(default=False))
    # A group whose devices' alerts go to the people it is shared with (not the admins).
    migrator.add_fields("devicegroup", alerts_to_members=pw.BooleanField(default=False))

    # A grantee's opt-in to a shared device's alerts.
    @migrator.create_model
    class AlertOptIn(pw.Model):
        id = pw.AutoField()
        user = pw.ForeignKeyField(
            column_name="user_id", field="id", model=migrator.orm["user"], on_delete="CASCADE"
        )
        device = pw.ForeignKeyField(
            column_name="device_id", field="device_id", model=migrator.orm["device"], on_delete="CASCADE"
        )

        class Meta:
            table_name = "alertoptin"
            indexes = [(("user", "device"), True), (("device", "user"), False)]


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):
    migrator.remove_model("alertoptin")
    migrator.remove_fields("devicegroup", "alerts_to_members")
    migrator.remove_fields("invitation", "to_organisation")
    migrator.remove_fields("device", "sold_through")
