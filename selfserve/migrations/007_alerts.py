"""Alerts."""

import peewee as pw
from peewee_migrate import Migrator


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    # Alerts (services/alerts.py): each person's choices, episodes of a condition on a device
    # (one open per device and kind: unique open_key), and the notices decided for each person.

    @migrator.create_model
    class AlertEpisode(pw.Model):
        id = pw.AutoField()
        device_id = pw.CharField(index=True, max_length=24)
        owner = pw.ForeignKeyField(
            column_name="owner_id", field="id", model=migrator.orm["user"], null=True, on_delete="CASCADE"
        )
        kind = pw.CharField(max_length=24)
        open_key = pw.CharField(max_length=64, null=True, unique=True)
        detail = pw.CharField(max_length=64, null=True)
        started_at = pw.DateTimeField()
        ended_at = pw.DateTimeField(null=True)
        reminded_at = pw.DateTimeField(null=True)

        class Meta:
            table_name = "alertepisode"

    @migrator.create_model
    class AlertNotice(pw.Model):
        id = pw.AutoField()
        user = pw.ForeignKeyField(
            column_name="user_id", field="id", model=migrator.orm["user"], on_delete="CASCADE"
        )
        episode = pw.ForeignKeyField(
            column_name="episode_id",
            field="id",
            model=migrator.orm["alertepisode"],
            null=True,
            on_delete="CASCADE",
        )
        kind = pw.CharField(max_length=24)
        event = pw.CharField(max_length=16)
        delivery = pw.CharField(max_length=8)
        device_id = pw.CharField(max_length=24, null=True)
        created_at = pw.DateTimeField()
        due_at = pw.DateTimeField(index=True)
        sent_at = pw.DateTimeField(index=True, null=True)
        cancelled_at = pw.DateTimeField(null=True)
        attempts = pw.IntegerField(default=0)
        lease_until = pw.DateTimeField(null=True)
        mail_id = pw.CharField(index=True, max_length=32, null=True)

        class Meta:
            table_name = "alertnotice"

    @migrator.create_model
    class AlertSetting(pw.Model):
        user = pw.ForeignKeyField(
            column_name="user_id",
            field="id",
            model=migrator.orm["user"],
            on_delete="CASCADE",
            primary_key=True,
        )
        modes = pw.TextField()
        time_zone = pw.CharField(default="UTC", max_length=64)
        quiet_from = pw.IntegerField(null=True)
        quiet_until = pw.IntegerField(null=True)
        faults_in_quiet = pw.BooleanField(default=True)
        digest_hour = pw.IntegerField(default=8)

        class Meta:
            table_name = "alertsetting"


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):

    migrator.remove_model("alertsetting")

    migrator.remove_model("alertnotice")

    migrator.remove_model("alertepisode")
