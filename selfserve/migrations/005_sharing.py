"""Sharing: device grants and invitations."""

import peewee as pw
from peewee_migrate import Migrator


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    # Sharing (services/access.py, services/sharing.py): grants of a role on a device to a
    # person, and emailed invitations to one.

    @migrator.create_model
    class Grant(pw.Model):
        id = pw.AutoField()
        device = pw.ForeignKeyField(
            column_name="device_id", field="device_id", model=migrator.orm["device"], on_delete="CASCADE"
        )
        grantee = pw.ForeignKeyField(
            column_name="grantee_id", field="id", model=migrator.orm["user"], on_delete="CASCADE"
        )
        role = pw.CharField(max_length=16)
        created_at = pw.DateTimeField()
        granted_by = pw.ForeignKeyField(
            column_name="granted_by_id",
            field="id",
            model=migrator.orm["user"],
            null=True,
            on_delete="SET NULL",
        )
        expires_at = pw.DateTimeField(index=True, null=True)
        ended_at = pw.DateTimeField(null=True)
        ended_by = pw.ForeignKeyField(
            column_name="ended_by_id", field="id", model=migrator.orm["user"], null=True, on_delete="SET NULL"
        )
        end_cause = pw.CharField(max_length=16, null=True)
        active_key = pw.CharField(max_length=64, null=True, unique=True)

        class Meta:
            table_name = "device_grant"
            indexes = [(("grantee", "ended_at"), False)]

    @migrator.create_model
    class Invitation(pw.Model):
        id = pw.AutoField()
        device = pw.ForeignKeyField(
            column_name="device_id", field="device_id", model=migrator.orm["device"], on_delete="CASCADE"
        )
        email = pw.CharField(index=True, max_length=254)
        role = pw.CharField(max_length=16)
        access_until = pw.DateTimeField(null=True)
        invited_by = pw.ForeignKeyField(
            column_name="invited_by_id",
            field="id",
            model=migrator.orm["user"],
            null=True,
            on_delete="SET NULL",
        )
        created_at = pw.DateTimeField()
        expires_at = pw.DateTimeField()
        state = pw.CharField(default="pending", index=True, max_length=16)
        nonce = pw.CharField(max_length=32, unique=True)
        decided_at = pw.DateTimeField(null=True)
        decided_by = pw.ForeignKeyField(
            column_name="decided_by_id",
            field="id",
            model=migrator.orm["user"],
            null=True,
            on_delete="SET NULL",
        )
        grant = pw.ForeignKeyField(
            column_name="grant_id",
            field="id",
            model=migrator.orm["device_grant"],
            null=True,
            on_delete="SET NULL",
        )
        mailed_at = pw.DateTimeField(null=True)

        class Meta:
            table_name = "invitation"


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):

    migrator.remove_model("invitation")

    migrator.remove_model("device_grant")
