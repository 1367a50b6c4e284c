"""Device events."""

import peewee as pw
from peewee_migrate import Migrator


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    # Live by events: publish times of the last state/status event applied, how long event
    # values need no read, who is watching; ignored-event counts; the event-stream lease.

    migrator.add_fields(
        "devicesnapshot",
        state_at=pw.DateTimeField(null=True),
        status_at=pw.DateTimeField(null=True),
        fresh_until=pw.DateTimeField(null=True),
        watched_until=pw.DateTimeField(null=True),
    )

    @migrator.create_model
    class EventCount(pw.Model):
        key = pw.CharField(max_length=64, primary_key=True)
        count = pw.BigIntegerField(default=0)

        class Meta:
            table_name = "eventcount"

    @migrator.create_model
    class ListenerLease(pw.Model):
        name = pw.CharField(max_length=64, primary_key=True)
        holder = pw.CharField(max_length=128, null=True)
        until = pw.DateTimeField(null=True)

        class Meta:
            table_name = "listenerlease"


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):

    migrator.remove_fields("devicesnapshot", "state_at", "status_at", "fresh_until", "watched_until")

    migrator.remove_model("listenerlease")

    migrator.remove_model("eventcount")
