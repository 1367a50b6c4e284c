"""Account deletion (issue 9, "Delete and export my data"): one row per account asked to be
deleted, which is also the recorded job (services/erasure.py) that deletes it after the grace."""

import peewee as pw
from peewee_migrate import Migrator


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    @migrator.create_model
    class AccountDeletion(pw.Model):
        id = pw.AutoField()
        user = pw.ForeignKeyField(
            column_name="user_id", field="id", model=migrator.orm["user"], on_delete="CASCADE", unique=True
        )
        state = pw.CharField(index=True, max_length=16)
        requested_at = pw.DateTimeField()
        due_at = pw.DateTimeField()
        cancelled_at = pw.DateTimeField(null=True)
        started_at = pw.DateTimeField(null=True)
        finished_at = pw.DateTimeField(null=True)
        step = pw.CharField(index=True, max_length=24, null=True)
        attempts = pw.IntegerField(default=0)
        next_attempt_at = pw.DateTimeField(null=True)
        lease_until = pw.DateTimeField(null=True)
        last_error = pw.TextField(null=True)

        class Meta:
            table_name = "accountdeletion"


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):
    migrator.remove_model("accountdeletion")
