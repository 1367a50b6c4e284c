"""Organisations: members, groups of devices, grants on groups and to organisations."""

import peewee as pw
from peewee_migrate import Migrator


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    # Organisations (services/organisations.py): the tables first, then grants may be on a
    # group and to an organisation (device and grantee become optional: exactly one of each
    # pair is set).

    @migrator.create_model
    class Organisation(pw.Model):
        id = pw.AutoField()
        name = pw.CharField(max_length=100, unique=True)
        kind = pw.CharField(default="company", max_length=16)
        account = pw.ForeignKeyField(
            column_name="account_id", field="id", model=migrator.orm["user"], on_delete="CASCADE", unique=True
        )
        created_at = pw.DateTimeField()
        created_by = pw.ForeignKeyField(
            column_name="created_by_id",
            field="id",
            model=migrator.orm["user"],
            null=True,
            on_delete="SET NULL",
        )

        class Meta:
            table_name = "organisation"

    @migrator.create_model
    class DeviceGroup(pw.Model):
        id = pw.AutoField()
        organisation = pw.ForeignKeyField(
            column_name="organisation_id", field="id", model=migrator.orm["organisation"], on_delete="CASCADE"
        )
        name = pw.CharField(max_length=100)
        created_at = pw.DateTimeField()

        class Meta:
            table_name = "devicegroup"
            indexes = [(("organisation", "name"), True)]

    @migrator.create_model
    class GroupDevice(pw.Model):
        id = pw.AutoField()
        group = pw.ForeignKeyField(
            column_name="group_id", field="id", model=migrator.orm["devicegroup"], on_delete="CASCADE"
        )
        device = pw.ForeignKeyField(
            column_name="device_id", field="device_id", model=migrator.orm["device"], on_delete="CASCADE"
        )

        class Meta:
            table_name = "groupdevice"
            indexes = [(("group", "device"), True), (("device", "group"), False)]

    @migrator.create_model
    class Membership(pw.Model):
        id = pw.AutoField()
        organisation = pw.ForeignKeyField(
            column_name="organisation_id", field="id", model=migrator.orm["organisation"], on_delete="CASCADE"
        )
        user = pw.ForeignKeyField(
            column_name="user_id", field="id", model=migrator.orm["user"], on_delete="CASCADE"
        )
        role = pw.CharField(max_length=16)
        created_at = pw.DateTimeField()

        class Meta:
            table_name = "membership"
            indexes = [(("organisation", "user"), True), (("user", "organisation"), False)]

    migrator.add_fields(
        "device_grant",
        group=pw.ForeignKeyField(
            column_name="group_id",
            field="id",
            model=migrator.orm["devicegroup"],
            null=True,
            on_delete="CASCADE",
        ),
        grantee_org=pw.ForeignKeyField(
            column_name="grantee_org_id",
            field="id",
            model=migrator.orm["organisation"],
            null=True,
            on_delete="CASCADE",
        ),
    )

    migrator.drop_not_null("device_grant", "device")

    migrator.drop_not_null("device_grant", "grantee")

    migrator.add_index("device_grant", "grantee_org", "ended_at", unique=False)

    migrator.add_index("device_grant", "group", "ended_at", unique=False)


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):
    # Grants on groups or to organisations must be gone before device/grantee are NOT NULL again.
    migrator.sql("DELETE FROM device_grant WHERE device_id IS NULL OR grantee_id IS NULL")

    migrator.remove_fields("device_grant", "group", "grantee_org")

    migrator.add_not_null("device_grant", "device")

    migrator.add_not_null("device_grant", "grantee")

    migrator.drop_index("device_grant", "grantee_org", "ended_at")

    migrator.drop_index("device_grant", "group", "ended_at")

    migrator.remove_model("membership")

    migrator.remove_model("groupdevice")

    migrator.remove_model("devicegroup")

    migrator.remove_model("organisation")
