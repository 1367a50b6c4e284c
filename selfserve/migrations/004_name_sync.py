"""Name sync."""

import peewee as pw
from peewee_migrate import Migrator


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    # A rename whose answer was lost is sent to Particle again until it answers (a job of the
    # one runner, services/steps.py: the job columns of models.JobColumns).

    @migrator.create_model
    class NameSync(pw.Model):
        device_id = pw.CharField(max_length=24, primary_key=True)
        step = pw.CharField(index=True, max_length=24, null=True)
        attempts = pw.IntegerField(default=0)
        next_attempt_at = pw.DateTimeField(null=True)
        lease_until = pw.DateTimeField(null=True)
        last_error = pw.TextField(null=True)

        class Meta:
            table_name = "namesync"


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):

    migrator.remove_model("namesync")
