"""The outbox (issue 9, "Mail that is never lost"): every email is a row written with the change
it reports, sent by a background job with retries."""

import peewee as pw
from peewee_migrate import Migrator


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    @migrator.create_model
    class OutboxMail(pw.Model):
        id = pw.AutoField()
        kind = pw.CharField(max_length=32)
        to_address = pw.CharField(index=True, max_length=254)
        subject = pw.CharField(max_length=255)
        body = pw.TextField()
        headers = pw.TextField(null=True)
        sensitive = pw.BooleanField(default=False)
        dedupe_key = pw.CharField(max_length=128, null=True, unique=True)
        state = pw.CharField(default="pending", max_length=12)
        attempts = pw.IntegerField(default=0)
        next_attempt_at = pw.DateTimeField(null=True)
        lease_until = pw.DateTimeField(null=True)
        last_error = pw.CharField(max_length=500, null=True)
        created_at = pw.DateTimeField(index=True)
        finished_at = pw.DateTimeField(null=True)

        class Meta:
            table_name = "outboxmail"
            indexes = [(("state", "next_attempt_at"), False)]


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):
    migrator.remove_model("outboxmail")
