"""History."""

import peewee as pw
from peewee_migrate import Migrator


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    # History of device values (services/history.py): raw changes, hourly rollups, and the
    # hours whose rollups are pending.

    @migrator.create_model
    class RollupPending(pw.Model):
        id = pw.AutoField()
        device_id = pw.CharField(max_length=24)
        hour = pw.DateTimeField(index=True)

        class Meta:
            table_name = "rolluppending"
            indexes = [(("device_id", "hour"), True)]

    @migrator.create_model
    class ValueRollup(pw.Model):
        id = pw.AutoField()
        device_id = pw.CharField(max_length=24)
        owner = pw.ForeignKeyField(
            column_name="owner_id", field="id", model=migrator.orm["user"], null=True, on_delete="CASCADE"
        )
        name = pw.CharField(max_length=32)
        hour = pw.DateTimeField(index=True)
        minimum = pw.DoubleField()
        maximum = pw.DoubleField()
        mean = pw.DoubleField()
        last = pw.DoubleField()

        class Meta:
            table_name = "valuerollup"
            indexes = [(("device_id", "name", "hour", "owner"), True)]

    @migrator.create_model
    class ValueSample(pw.Model):
        id = pw.AutoField()
        device_id = pw.CharField(max_length=24)
        owner = pw.ForeignKeyField(
            column_name="owner_id", field="id", model=migrator.orm["user"], null=True, on_delete="CASCADE"
        )
        name = pw.CharField(max_length=32)
        at = pw.DateTimeField(index=True)
        value = pw.DoubleField(null=True)
        text = pw.CharField(max_length=64, null=True)

        class Meta:
            table_name = "valuesample"
            indexes = [(("device_id", "name", "at"), True)]


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):

    migrator.remove_model("valuesample")

    migrator.remove_model("valuerollup")

    migrator.remove_model("rolluppending")
