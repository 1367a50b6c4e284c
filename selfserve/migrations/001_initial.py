"""The schema of the first release with migrations (main at a8f1969): every table as it was.

Databases made before migrations existed (by create_tables) are recognised by `flask db upgrade`
and recorded as being at this migration without running it (see selfserve/schema.py).
"""

import peewee as pw
from peewee_migrate import Migrator


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    @migrator.create_model
    class User(pw.Model):
        id = pw.AutoField()
        email = pw.CharField(max_length=254, unique=True)
        password_hash = pw.CharField(max_length=255)
        role = pw.CharField(default="customer", max_length=16)
        created_at = pw.DateTimeField()
        email_verified_at = pw.DateTimeField(null=True)
        particle_customer_id = pw.CharField(max_length=64, null=True, unique=True)
        provisioning_state = pw.CharField(max_length=16, null=True)
        provisioning_error = pw.TextField(null=True)
        provisioning_attempts = pw.IntegerField(default=0)
        provisioning_next_at = pw.DateTimeField(null=True)
        pending_email = pw.CharField(max_length=254, null=True)
        password_changed_at = pw.DateTimeField()
        totp_secret_encrypted = pw.TextField(null=True)
        totp_enrolled_at = pw.DateTimeField(null=True)
        totp_last_step = pw.BigIntegerField(null=True)

        class Meta:
            table_name = "user"

    @migrator.create_model
    class AuditEvent(pw.Model):
        id = pw.AutoField()
        at = pw.DateTimeField(index=True)
        user = pw.ForeignKeyField(
            column_name="user_id", field="id", model=migrator.orm["user"], null=True, on_delete="SET NULL"
        )
        actor = pw.ForeignKeyField(
            column_name="actor_id", field="id", model=migrator.orm["user"], null=True, on_delete="SET NULL"
        )
        action = pw.CharField(max_length=64)
        device_id = pw.CharField(max_length=24, null=True)
        detail = pw.TextField(null=True)
        ip = pw.CharField(max_length=64, null=True)

        class Meta:
            table_name = "auditevent"

    @migrator.create_model
    class ClaimAttempt(pw.Model):
        id = pw.AutoField()
        key = pw.CharField(max_length=100)
        at = pw.DateTimeField()

        class Meta:
            table_name = "claimattempt"
            indexes = [(("key", "at"), False)]

    @migrator.create_model
    class Device(pw.Model):
        device_id = pw.CharField(max_length=24, primary_key=True)
        serial_number = pw.CharField(max_length=64, unique=True)
        setup_code_hash = pw.CharField(max_length=255)
        model = pw.CharField(max_length=16)
        imported_at = pw.DateTimeField()
        in_product = pw.BooleanField(default=False)
        owner = pw.ForeignKeyField(
            column_name="owner_id", field="id", model=migrator.orm["user"], null=True, on_delete="SET NULL"
        )
        name = pw.CharField(max_length=64, null=True)
        claimed_at = pw.DateTimeField(null=True)
        claim_state = pw.CharField(max_length=16, null=True)
        claim_state_at = pw.DateTimeField(null=True)
        claim_error = pw.TextField(null=True)

        class Meta:
            table_name = "device"

    @migrator.create_model
    class DeviceSnapshot(pw.Model):
        device_id = pw.CharField(max_length=24, primary_key=True)
        values = pw.TextField()
        fetched_at = pw.DateTimeField(null=True)
        checked_at = pw.DateTimeField(null=True)
        online = pw.BooleanField(null=True)
        offline_since = pw.DateTimeField(null=True)
        last_error = pw.CharField(max_length=255, null=True)
        lease_until = pw.DateTimeField(null=True)

        class Meta:
            table_name = "devicesnapshot"

    @migrator.create_model
    class LoginSession(pw.Model):
        id = pw.CharField(max_length=64, primary_key=True)
        user = pw.ForeignKeyField(
            column_name="user_id", field="id", model=migrator.orm["user"], on_delete="CASCADE"
        )
        created_at = pw.DateTimeField()
        last_seen_at = pw.DateTimeField()
        ended_at = pw.DateTimeField(null=True)
        user_agent = pw.CharField(max_length=255, null=True)
        mfa_verified_at = pw.DateTimeField(null=True)

        class Meta:
            table_name = "loginsession"

    @migrator.create_model
    class MigrationRow(pw.Model):
        device_id = pw.CharField(max_length=24, primary_key=True)
        email = pw.CharField(index=True, max_length=254)
        state = pw.CharField(index=True, max_length=16)
        user = pw.ForeignKeyField(
            column_name="user_id", field="id", model=migrator.orm["user"], null=True, on_delete="SET NULL"
        )
        created_at = pw.DateTimeField()
        invited_at = pw.DateTimeField(null=True)
        claimed_at = pw.DateTimeField(null=True)
        step = pw.CharField(index=True, max_length=24, null=True)
        attempts = pw.IntegerField(default=0)
        next_attempt_at = pw.DateTimeField(null=True)
        lease_until = pw.DateTimeField(null=True)
        last_error = pw.TextField(null=True)

        class Meta:
            table_name = "migrationrow"

    @migrator.create_model
    class ParticleToken(pw.Model):
        key = pw.CharField(max_length=100, primary_key=True)
        token_encrypted = pw.TextField()
        refresh_encrypted = pw.TextField(null=True)
        expires_at = pw.DateTimeField(null=True)

        class Meta:
            table_name = "particletoken"

    @migrator.create_model
    class PossessionProof(pw.Model):
        id = pw.CharField(max_length=64, primary_key=True)
        user = pw.ForeignKeyField(
            column_name="user_id", field="id", model=migrator.orm["user"], on_delete="CASCADE"
        )
        device = pw.ForeignKeyField(
            column_name="device_id", field="device_id", model=migrator.orm["device"], on_delete="CASCADE"
        )
        expires_at = pw.DateTimeField()
        used_at = pw.DateTimeField(null=True)

        class Meta:
            table_name = "possessionproof"

    @migrator.create_model
    class ReconcileRun(pw.Model):
        id = pw.AutoField()
        started_at = pw.DateTimeField()
        finished_at = pw.DateTimeField(null=True)
        started_by = pw.ForeignKeyField(
            column_name="started_by_id",
            field="id",
            model=migrator.orm["user"],
            null=True,
            on_delete="SET NULL",
        )
        trigger = pw.CharField(max_length=16)
        status = pw.CharField(default="running", max_length=16)
        error = pw.TextField(null=True)
        devices_checked = pw.IntegerField(default=0)
        particle_devices = pw.IntegerField(default=0)
        findings_count = pw.IntegerField(default=0)
        particle_status = pw.TextField(null=True)

        class Meta:
            table_name = "reconcilerun"

    @migrator.create_model
    class ReconcileFinding(pw.Model):
        id = pw.AutoField()
        run = pw.ForeignKeyField(
            column_name="run_id", field="id", model=migrator.orm["reconcilerun"], on_delete="CASCADE"
        )
        device_id = pw.CharField(index=True, max_length=24)
        kind = pw.CharField(max_length=32)
        detail = pw.TextField(null=True)

        class Meta:
            table_name = "reconcilefinding"

    @migrator.create_model
    class StaffView(pw.Model):
        id = pw.AutoField()
        staff = pw.ForeignKeyField(
            column_name="staff_id", field="id", model=migrator.orm["user"], on_delete="CASCADE"
        )
        customer = pw.ForeignKeyField(
            column_name="customer_id", field="id", model=migrator.orm["user"], on_delete="CASCADE"
        )
        login_session = pw.ForeignKeyField(
            column_name="login_session_id",
            field="id",
            model=migrator.orm["loginsession"],
            on_delete="CASCADE",
        )
        reason = pw.TextField()
        started_at = pw.DateTimeField()
        expires_at = pw.DateTimeField()
        ended_at = pw.DateTimeField(index=True, null=True)
        end_cause = pw.CharField(max_length=16, null=True)

        class Meta:
            table_name = "staffview"

    @migrator.create_model
    class TokenBreaker(pw.Model):
        name = pw.CharField(max_length=32, primary_key=True)
        failures = pw.IntegerField(default=0)
        paused_until = pw.DateTimeField(null=True)
        reason = pw.CharField(max_length=255, null=True)

        class Meta:
            table_name = "tokenbreaker"

    @migrator.create_model
    class Transfer(pw.Model):
        id = pw.AutoField()
        device = pw.ForeignKeyField(
            column_name="device_id", field="device_id", model=migrator.orm["device"], on_delete="CASCADE"
        )
        kind = pw.CharField(max_length=8)
        state = pw.CharField(index=True, max_length=16)
        open_device = pw.CharField(max_length=24, null=True, unique=True)
        seller = pw.ForeignKeyField(
            column_name="seller_id", field="id", model=migrator.orm["user"], null=True, on_delete="SET NULL"
        )
        buyer = pw.ForeignKeyField(
            column_name="buyer_id", field="id", model=migrator.orm["user"], null=True, on_delete="SET NULL"
        )
        buyer_email = pw.CharField(index=True, max_length=254)
        created_at = pw.DateTimeField()
        expires_at = pw.DateTimeField()
        decided_at = pw.DateTimeField(null=True)
        finished_at = pw.DateTimeField(null=True)
        step = pw.CharField(index=True, max_length=24, null=True)
        attempts = pw.IntegerField(default=0)
        next_attempt_at = pw.DateTimeField(null=True)
        lease_until = pw.DateTimeField(null=True)
        last_error = pw.TextField(null=True)
        offer_mailed_at = pw.DateTimeField(null=True)
        alerted_at = pw.DateTimeField(null=True)
        dispute_outcome = pw.CharField(max_length=16, null=True)

        class Meta:
            table_name = "transfer"


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):
    migrator.remove_model("transfer")

    migrator.remove_model("tokenbreaker")

    migrator.remove_model("staffview")

    migrator.remove_model("reconcilefinding")

    migrator.remove_model("reconcilerun")

    migrator.remove_model("possessionproof")

    migrator.remove_model("particletoken")

    migrator.remove_model("migrationrow")

    migrator.remove_model("loginsession")

    migrator.remove_model("devicesnapshot")

    migrator.remove_model("device")

    migrator.remove_model("claimattempt")

    migrator.remove_model("auditevent")

    migrator.remove_model("user")
