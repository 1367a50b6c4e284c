"""peewee models. The database is the source of truth for who owns what.

`db` is a DatabaseProxy bound at start-up by `init_db(url)`: SQLite by default (WAL, foreign
keys), PostgreSQL when the URL says so. A change here needs a migration: `flask db create NAME`
(see the README, "Adding a table or column").
"""

import contextlib
import datetime
import functools
import json
import os
import time

import peewee
from playhouse.db_url import connect
from playhouse.db_url import parse as parse_db_url
from playhouse.pool import PooledDatabase
from playhouse.pool import PooledPostgresqlDatabase
from playhouse.pool import PooledSqliteDatabase

db = peewee.DatabaseProxy()


def utcnow():
    """Naive UTC now; every timestamp in the database is naive UTC."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


class PostgresPool(PooledPostgresqlDatabase):
    """peewee's PostgreSQL pool, with two savings in round trips for work done very often
    (each device event, services/device_events.py):

    - A connection handed back within the last `PING_AFTER_IDLE_SECONDS` and left idle is lent
      again without the `SELECT 1` round trip peewee makes on every checkout (HikariCP's
      "alive bypass window"): a busy worker's connections are alive. A connection idle for
      longer is still checked, so one a database restart killed is replaced rather than lent.
    - A transaction's first statements can go with its BEGIN, and statements queued for its
      end with its COMMIT, as one query string each (`transaction_opening_with`, `at_commit`).
    """

    PING_AFTER_IDLE_SECONDS = 0.5

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._returned_at = {}

    def _close(self, conn, close_conn=False):
        if len(self._returned_at) > 1000:  # connections replaced over days: forget, ping once
            self._returned_at.clear()
        self._returned_at[id(conn)] = time.monotonic()
        return super()._close(conn, close_conn=close_conn)

    def _is_closed(self, conn):
        if conn.closed:
            return True
        returned = self._returned_at.get(id(conn))
        if (
            returned is not None
            and time.monotonic() - returned < self.PING_AFTER_IDLE_SECONDS
            and self._adapter.txn_status(conn) == self._adapter.txn_idle
        ):
            return False
        return super()._is_closed(conn)

    # What travels with BEGIN and COMMIT lives in peewee's per-thread (per-greenlet under
    # gevent) connection state, under names of ours: `ss_opening` (statements the next BEGIN
    # sends, set by transaction_opening_with), `ss_opened` (their cursor) and `ss_at_commit`
    # (statements the COMMIT sends, queued by at_commit). Every BEGIN starts them afresh, and a
    # rollback drops what was queued, so nothing reaches another transaction.

    def begin(self, isolation_level=None):
        opening, self._state.ss_opening = getattr(self._state, "ss_opening", None), None
        self._state.ss_at_commit = []
        if not opening or isolation_level or self._isolation_level:
            return super().begin(isolation_level)  # transaction_opening_with then runs them itself
        try:
            self._state.ss_opened = _send_together(self, [("BEGIN", []), *opening])
        except BaseException:
            # The BEGIN ran, but peewee records the transaction only once begin() returns:
            # end it here, or the connection would stay in a transaction nobody ends.
            with contextlib.suppress(Exception):
                self._adapter.rollback(self._state.conn)
            raise
        return None

    def commit(self):
        queued, self._state.ss_at_commit = getattr(self._state, "ss_at_commit", None), []
        if not queued:
            return super().commit()
        _send_together(self, [*queued, ("COMMIT", [])])
        return None

    def rollback(self):
        self._state.ss_at_commit = []
        return super().rollback()

    def run_at_commit(self, sql, params):
        """models.at_commit: queued when the connection is in a transaction (as the server
        sees it: an after_commit callback of an explicit `txn.commit()` runs while peewee
        still lists the transaction), else run now."""
        conn = self._state.conn
        if (
            conn is None
            or not self.in_transaction()
            or self._adapter.txn_status(conn) == self._adapter.txn_idle
        ):
            self.execute_sql(sql, params)
        else:
            self._state.ss_at_commit = [*getattr(self._state, "ss_at_commit", []), (sql, params)]


def _send_together(database, statements):
    """(sql, params) statements as one query string: one round trip to PostgreSQL, whose
    cursor then holds the last statement's result. This relies on psycopg2 putting the
    parameters into the string itself (psycopg 3 binds them on the server, one statement per
    query): with another driver they are sent one by one."""
    if not isinstance(database._adapter, peewee.Psycopg2Adapter):
        return _one_by_one(database, statements)
    return database.execute_sql(
        "; ".join(sql for sql, _ in statements), [p for _, ps in statements for p in ps]
    )


def _one_by_one(database, statements):
    """(sql, params) statements one after the other; the last one's cursor."""
    cursor = None
    for sql, params in statements:
        cursor = database.execute_sql(sql, params)
    return cursor


def init_db(url, pool_size=32, pool_recycle_seconds=300, pool_wait_seconds=10):
    """Bind `db` to the database at `url` (SQLite with WAL and foreign keys, or PostgreSQL).

    Connections come from a pool (playhouse.pool): a request's or a thread's `db.close()` hands
    its connection back instead of closing it, so the next one skips connect + set-up (0.8 ms
    on SQLite, 3 ms on PostgreSQL). At most `pool_size` are open at once (a caller waits up to
    `pool_wait_seconds` for one), and each is replaced after `pool_recycle_seconds`.

    Tables are made and changed only by migrations (selfserve/schema.py, `flask db upgrade`)."""
    pool = {"max_connections": pool_size, "stale_timeout": pool_recycle_seconds, "timeout": pool_wait_seconds}
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        database = PooledSqliteDatabase(
            path,
            pragmas={
                "journal_mode": "wal",
                # SQLite's advice for WAL: a commit doesn't wait for the disk; the database is
                # never corrupted, and a power cut (not a crashed process) can lose the last
                # commits. Waiting for the flush capped event intake at the disk's flush rate.
                "synchronous": "normal",
                "foreign_keys": 1,
                "busy_timeout": 10000,
            },
            check_same_thread=False,
            **pool,
        )
    elif url.startswith(("postgresql://", "postgres://")):
        database = PostgresPool(**parse_db_url(url), **pool)
    else:
        database = connect(url)
    previous = db.obj
    db.initialize(database)
    if isinstance(previous, PooledDatabase):
        # Rebinding (tests build one app after another): close the old pool's idle connections
        # rather than leave them to garbage collection. Not the ones in use: closing a SQLite
        # connection another thread is running a statement on crashes the process.
        previous.close_idle()
    return database


def is_postgres():
    return isinstance(db.obj, peewee.PostgresqlDatabase)


@functools.lru_cache(maxsize=64)
def _in_dialect(template, param):
    return template.replace("?", param)


def raw_sql(template):
    """`template` (SQL with `?` placeholders) with the bound database's placeholder. Every `?`
    becomes one (so none may stand for anything else, such as PostgreSQL's jsonb operator), and
    the template may hold no `%` (psycopg2 would read it as a placeholder).

    For the few statements that run for every device event (services/device_events.py,
    history.py): written out once rather than built by the query builder each time, which cost
    more than running them."""
    return _in_dialect(template, db.param)


def execute_together(*statements):
    """Run (sql, params) statements in order inside the current transaction; returns the last
    one's cursor. PostgreSQL gets them in one round trip (`_send_together`); SQLite runs them
    one by one, in-process, where a round trip costs nothing and its driver takes one statement
    at a time. (Outside a transaction PostgreSQL would run them all or nothing, SQLite each on
    its own: call it inside one.)"""
    if is_postgres():
        return _send_together(db.obj, statements)
    return _one_by_one(db, statements)


@contextlib.contextmanager
def transaction_opening_with(*statements):
    """`db.atomic()` whose first statements are (sql, params) `statements`; yields the last
    one's cursor. On PostgreSQL they go in one round trip with the BEGIN (PostgresPool). On
    SQLite the transaction takes the write lock at its BEGIN (IMMEDIATE): in WAL mode, a
    transaction that reads and then writes fails at once if another commits in between."""
    if isinstance(db.obj, PostgresPool) and not db.in_transaction():
        state = db.obj._state
        state.ss_opening, state.ss_opened = statements, None  # PostgresPool.begin sends them
        with db.atomic():
            opened, state.ss_opened = state.ss_opened, None
            yield opened if opened is not None else execute_together(*statements)
        return
    immediate = isinstance(db.obj, peewee.SqliteDatabase) and not db.in_transaction()
    with db.atomic(lock_type="IMMEDIATE") if immediate else db.atomic():
        yield execute_together(*statements)


def at_commit(sql, params):
    """Run `sql` as the current transaction's last statement: on PostgreSQL in the COMMIT's
    round trip, elsewhere or outside a transaction now. For statements whose extra run does
    no harm, such as NOTIFY: on PostgreSQL a statement queued inside a savepoint that is then
    rolled back still runs at the commit."""
    if isinstance(db.obj, PostgresPool):
        db.obj.run_at_commit(sql, params)
    else:
        db.execute_sql(sql, params)


def close_idle_connections():
    """Close the pool's idle connections (those no thread holds)."""
    if isinstance(db.obj, PooledDatabase):
        db.obj.close_idle()


class BaseModel(peewee.Model):
    class Meta:
        database = db


class JobColumns(BaseModel):
    """The columns of a recorded multi-step job (services/steps.py `Runner`), for a model to
    inherit: `step` is the next step to run (None: nothing left), taken by one worker at a time
    through the `lease_until` lease, retried after `next_attempt_at` with backoff; `attempts`
    counts failures of the current step and `last_error` says why the last one failed. No table
    of its own."""

    step = peewee.CharField(null=True, max_length=24, index=True)
    attempts = peewee.IntegerField(default=0)
    next_attempt_at = peewee.DateTimeField(null=True)
    lease_until = peewee.DateTimeField(null=True)
    last_error = peewee.TextField(null=True)


def _plain_text(value):
    """A lazy translated message stored in JSON: its English words (selfserve/i18n.py)."""
    from selfserve import i18n

    plain = i18n.english(value)
    if plain is value:
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")
    return plain


class JSONField(peewee.TextField):
    """JSON stored as text, so it works the same on SQLite and PostgreSQL."""

    def db_value(self, value):
        return None if value is None else json.dumps(value, sort_keys=True, default=_plain_text)

    def python_value(self, value):
        return None if value is None else json.loads(value)


class User(BaseModel):
    """An account: a homeowner, or (role staff/admin) a support person.

    The Particle shadow customer is created only after the email is verified, under
    `particle_customer_id`, an opaque lowercase id that never contains the email.
    """

    email = peewee.CharField(unique=True, max_length=254)  # stored lowercased
    password_hash = peewee.CharField(max_length=255)
    role = peewee.CharField(default="customer", max_length=16)  # customer | staff | admin
    created_at = peewee.DateTimeField(default=utcnow)
    email_verified_at = peewee.DateTimeField(null=True)
    # Provisioning of the Particle customer: None (not verified yet) -> "pending" -> "ready".
    particle_customer_id = peewee.CharField(null=True, unique=True, max_length=64)
    provisioning_state = peewee.CharField(null=True, max_length=16)
    provisioning_error = peewee.TextField(null=True)
    provisioning_attempts = peewee.IntegerField(default=0)
    # Lease and backoff in one: the next time a worker may try provisioning. A worker takes the
    # work with an atomic UPDATE moving it into the future (so only one worker calls Particle),
    # and after a failure it is set to now + backoff.
    provisioning_next_at = peewee.DateTimeField(null=True)
    # An email change waiting for the new address to confirm its link.
    pending_email = peewee.CharField(null=True, max_length=254)
    password_changed_at = peewee.DateTimeField(default=utcnow)
    # When an emailed sign-in link was last used: that link, and every one sent before it, is
    # spent (services/accounts.py use_sign_in_link).
    sign_in_link_used_at = peewee.DateTimeField(null=True)
    # Second factor for staff (TOTP secret, encrypted at rest).
    totp_secret_encrypted = peewee.TextField(null=True)
    # Set when the staff member confirmed the secret with a code (the QR is shown until then).
    totp_enrolled_at = peewee.DateTimeField(null=True)
    # The last accepted TOTP time step: a code works once (no replay within its 30 s window).
    totp_last_step = peewee.BigIntegerField(null=True)
    # Language and time zone (selfserve/i18n.py). `locale`: the language the person chose in
    # their settings (None: follow the browser's Accept-Language). `seen_locale`: the browser's
    # language at their last sign-up or sign-in, for emails when they chose none. `time_zone`:
    # an IANA name, the browser's at sign-up (or first sign-in), changeable in settings; pages,
    # emails, quiet hours and the daily digest use it (None: UTC).
    locale = peewee.CharField(null=True, max_length=8)
    seen_locale = peewee.CharField(null=True, max_length=8)
    time_zone = peewee.CharField(null=True, max_length=64)

    # Flask-Login protocol. get_id() is the login session's random cookie id, never the primary
    # key (Flask-Login "Alternative Tokens"), so ending a session on the server really ends it.
    # The database keeps only a hash of it (security.stored_session_id).
    login_session = None

    @property
    def is_authenticated(self):
        return True

    @property
    def is_active(self):
        return True

    @property
    def is_anonymous(self):
        return False

    def get_id(self):
        return getattr(self.login_session, "cookie_id", None)

    @property
    def is_verified(self):
        return self.email_verified_at is not None

    @property
    def is_staff(self):
        return self.role in ("staff", "admin")


class LoginSession(BaseModel):
    """One signed-in browser. Logging out, or a password reset, ends it on the server."""

    # sha256 hex of the random id in the session cookie (never the cookie's id itself).
    id = peewee.CharField(primary_key=True, max_length=64)
    user = peewee.ForeignKeyField(User, backref="login_sessions", on_delete="CASCADE")
    created_at = peewee.DateTimeField(default=utcnow)
    last_seen_at = peewee.DateTimeField(default=utcnow)
    ended_at = peewee.DateTimeField(null=True)
    user_agent = peewee.CharField(null=True, max_length=255)
    # Staff only: when this session passed the second factor (staff routes need it).
    mfa_verified_at = peewee.DateTimeField(null=True)


class Device(BaseModel):
    """The company's device registry (from manufacturing) and who owns each device.

    `owner` is the truth; Particle's claim mirrors it. `claim_state` records a Particle step
    in progress ("claiming" / "releasing") so an interrupted one is resumed by the sweep.
    """

    device_id = peewee.CharField(primary_key=True, max_length=24)  # 24 lowercase hex
    serial_number = peewee.CharField(unique=True, max_length=64)  # stored uppercased
    setup_code_hash = peewee.CharField(max_length=255)
    model = peewee.CharField(max_length=16)  # "window" | "pump"
    imported_at = peewee.DateTimeField(default=utcnow)
    in_product = peewee.BooleanField(default=False)  # imported into the Particle product
    owner = peewee.ForeignKeyField(User, null=True, backref="devices", on_delete="SET NULL")
    name = peewee.CharField(null=True, max_length=64)
    claimed_at = peewee.DateTimeField(null=True)
    claim_state = peewee.CharField(null=True, max_length=16)  # None | claiming | releasing
    claim_state_at = peewee.DateTimeField(null=True)  # when claim_state was set (resumer's grace)
    claim_error = peewee.TextField(null=True)
    # The dealer organisation (by name) the registry says it was sold through, if any: at claim
    # the homeowner chooses what access that dealer gets (services/sharing.py).
    sold_through = peewee.CharField(null=True, max_length=100)


class ClaimAttempt(BaseModel):
    """One failed claim attempt, counted per account and per serial (see services/devices.py)."""

    key = peewee.CharField(max_length=100)  # "user:<id>" | "serial:<SERIAL>"
    at = peewee.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("key", "at"), False),)


class DeviceSnapshot(BaseModel):
    """Last known live values of a device, shared by every viewer and every worker.

    Doubles as the single-flight cache: a worker takes `lease_until` with an atomic update
    before calling Particle, so many viewers of one device cost one upstream call.
    """

    device_id = peewee.CharField(primary_key=True, max_length=24)
    values = JSONField(default=dict)  # name -> {"value": ..., "at": ISO time it was read}
    fetched_at = peewee.DateTimeField(null=True)  # when the values were read
    checked_at = peewee.DateTimeField(null=True)  # when we last asked, successfully or not
    online = peewee.BooleanField(null=True)
    offline_since = peewee.DateTimeField(null=True)
    last_error = peewee.CharField(null=True, max_length=255)
    lease_until = peewee.DateTimeField(null=True)
    # Events (services/device_events.py): the publish time of the last state event and of the
    # last spark/status applied (older or repeated events never overwrite newer ones); until
    # when the values need no read from Particle (the device's heartbeat plus a grace); until
    # when someone has the device's page open (re-read after a gap in the event stream).
    state_at = peewee.DateTimeField(null=True)
    status_at = peewee.DateTimeField(null=True)
    fresh_until = peewee.DateTimeField(null=True)
    watched_until = peewee.DateTimeField(null=True)


class EventCount(BaseModel):
    """How many device events were ignored, and why (unknown device, unknown event, ...)."""

    key = peewee.CharField(primary_key=True, max_length=64)
    count = peewee.BigIntegerField(default=0)


class ListenerLease(BaseModel):
    """A named lease one process holds at a time (e.g. the product event stream), across all
    workers and machines sharing the database. Expires by itself when its holder dies."""

    name = peewee.CharField(primary_key=True, max_length=64)
    holder = peewee.CharField(null=True, max_length=128)
    until = peewee.DateTimeField(null=True)


class ParticleToken(BaseModel):
    """Cached Particle access tokens (product, and one per customer), encrypted at rest."""

    key = peewee.CharField(primary_key=True, max_length=100)
    token_encrypted = peewee.TextField()
    refresh_encrypted = peewee.TextField(null=True)
    expires_at = peewee.DateTimeField(null=True)


class TokenBreaker(BaseModel):
    """Failed Particle token requests in a row, shared by all workers (see token_store)."""

    name = peewee.CharField(primary_key=True, max_length=32)
    failures = peewee.IntegerField(default=0)
    paused_until = peewee.DateTimeField(null=True)
    reason = peewee.CharField(null=True, max_length=255)


class AuditEvent(BaseModel):
    """Append-only trail: claims, releases, renames, function calls, sign-ins, staff actions.

    `user` is whose account it concerns (shown on their activity page); `actor` who did it.
    """

    at = peewee.DateTimeField(default=utcnow, index=True)
    user = peewee.ForeignKeyField(User, null=True, backref="audit_events", on_delete="SET NULL")
    actor = peewee.ForeignKeyField(User, null=True, on_delete="SET NULL", backref="+")
    action = peewee.CharField(max_length=64)
    device_id = peewee.CharField(null=True, max_length=24)
    detail = JSONField(null=True)
    ip = peewee.CharField(null=True, max_length=64)

    def save(self, *args, **kwargs):
        if self.id is not None and not kwargs.get("force_insert"):
            raise RuntimeError("audit events are append-only")
        return super().save(*args, **kwargs)

    def delete_instance(self, *args, **kwargs):
        raise RuntimeError("audit events are append-only")


class StaffView(BaseModel):
    """A support person viewing the site as a customer: read-only, time-limited, audited.

    Belongs to one login session (the staff member's, rotated when the view starts); live while
    `ended_at` is null and `expires_at` is in the future. See services/impersonation.py.
    """

    staff = peewee.ForeignKeyField(User, backref="+", on_delete="CASCADE")
    customer = peewee.ForeignKeyField(User, backref="+", on_delete="CASCADE")
    login_session = peewee.ForeignKeyField(LoginSession, backref="+", on_delete="CASCADE")
    reason = peewee.TextField()
    started_at = peewee.DateTimeField(default=utcnow)
    expires_at = peewee.DateTimeField()
    ended_at = peewee.DateTimeField(null=True, index=True)
    end_cause = peewee.CharField(null=True, max_length=16)  # ended | expired | signed_out


class ReconcileRun(BaseModel):
    """One comparison of our database with Particle's product view (reports, never fixes)."""

    started_at = peewee.DateTimeField(default=utcnow)
    finished_at = peewee.DateTimeField(null=True)
    started_by = peewee.ForeignKeyField(User, null=True, backref="+", on_delete="SET NULL")
    trigger = peewee.CharField(max_length=16)  # cli | console
    status = peewee.CharField(default="running", max_length=16)  # running | done | failed
    error = peewee.TextField(null=True)
    devices_checked = peewee.IntegerField(default=0)
    particle_devices = peewee.IntegerField(default=0)
    findings_count = peewee.IntegerField(default=0)
    # What Particle said about each product device: {device_id: {"online": bool, "last_heard": iso}}.
    particle_status = JSONField(null=True)


class ReconcileFinding(BaseModel):
    """One disagreement found by a ReconcileRun."""

    run = peewee.ForeignKeyField(ReconcileRun, backref="findings", on_delete="CASCADE")
    device_id = peewee.CharField(max_length=24, index=True)
    kind = peewee.CharField(max_length=32)
    detail = JSONField(null=True)


class Transfer(JobColumns):
    """A device changing hands between two accounts (services/transfers/).

    kind "offer": the recorded owner (seller) offers it to an email address; kind "request":
    someone holding the device and its label asks for it and the owner may object. The move
    itself is a recorded sequence of idempotent steps: `step` is the next one to run (None when
    nothing is left), taken by one worker at a time through the `lease_until` lease, retried
    after `next_attempt_at` with backoff. `open_device` holds the device id while the transfer
    is open and NULL once it is closed: its unique index allows one open transfer per device.
    """

    device = peewee.ForeignKeyField(Device, backref="transfers", on_delete="CASCADE", column_name="device_id")
    kind = peewee.CharField(max_length=8)  # offer | request
    # offered | requested | moving | returning | done | failed_returned | declined | cancelled
    # | objected | expired | kept (support kept an objected request's device with its owner)
    state = peewee.CharField(max_length=16, index=True)
    open_device = peewee.CharField(null=True, unique=True, max_length=24)
    seller = peewee.ForeignKeyField(User, null=True, backref="+", on_delete="SET NULL")
    buyer = peewee.ForeignKeyField(User, null=True, backref="+", on_delete="SET NULL")
    buyer_email = peewee.CharField(max_length=254, index=True)
    created_at = peewee.DateTimeField(default=utcnow)
    # Offer: when the offer lapses. Request: the end of the owner's time to object.
    expires_at = peewee.DateTimeField()
    decided_at = peewee.DateTimeField(null=True)
    finished_at = peewee.DateTimeField(null=True)
    offer_mailed_at = peewee.DateTimeField(null=True)
    alerted_at = peewee.DateTimeField(null=True)  # staff were alerted (a move failed for good)
    # Support's decision of a request the owner objected to: "requester" (it moves) or "owner".
    dispute_outcome = peewee.CharField(null=True, max_length=16)


class PossessionProof(BaseModel):
    """A short-lived record that an account just proved it holds a device (right serial and
    setup code) that belongs to someone else, so it can ask for the device without the setup
    code ever being sent back to the browser. Keyed by the hash of an opaque random id."""

    id = peewee.CharField(primary_key=True, max_length=64)  # sha256 hex of the opaque id
    user = peewee.ForeignKeyField(User, backref="+", on_delete="CASCADE")
    device = peewee.ForeignKeyField(Device, backref="+", on_delete="CASCADE", column_name="device_id")
    expires_at = peewee.DateTimeField()
    used_at = peewee.DateTimeField(null=True)


class MigrationRow(JobColumns):
    """One device already in the field being moved to its owner (services/migration.py).

    Keyed by device id, so re-running the import never duplicates anything. state: invited
    (waiting for the owner to sign up and verify) -> claiming (steps running) -> claimed, or
    failed. `step`, `attempts`, `next_attempt_at`, `lease_until` work as in Transfer.
    """

    device_id = peewee.CharField(primary_key=True, max_length=24)
    email = peewee.CharField(max_length=254, index=True)
    state = peewee.CharField(max_length=16, index=True)
    user = peewee.ForeignKeyField(User, null=True, backref="+", on_delete="SET NULL")
    created_at = peewee.DateTimeField(default=utcnow)
    invited_at = peewee.DateTimeField(null=True)
    claimed_at = peewee.DateTimeField(null=True)


class ValueSample(BaseModel):
    """History, raw: one row per change of a device value, at the time it was published (or
    read, for devices that don't publish). Kept HISTORY_RAW_DAYS (services/history.py).

    `owner` is whose ownership period the value belongs to: after a transfer the new owner sees
    only rows of their own period. `name` "online" records online (1) / offline (0) changes,
    which the charts draw as gaps. Unique per device, value name and time, so a repeated event
    is stored once."""

    device_id = peewee.CharField(max_length=24)
    owner = peewee.ForeignKeyField(User, null=True, backref="+", on_delete="CASCADE")
    name = peewee.CharField(max_length=32)
    at = peewee.DateTimeField(index=True)  # indexed alone too: the purge deletes by time
    value = peewee.DoubleField(null=True)  # numbers; booleans as 1 / 0
    text = peewee.CharField(null=True, max_length=64)  # text values (fault, firmware)

    class Meta:
        indexes = ((("device_id", "name", "at"), True),)


class ValueRollup(BaseModel):
    """History, hourly: min, max, time-weighted mean and last of one numeric value in one hour
    of one ownership period, for hours that had a change. Kept HISTORY_ROLLUP_DAYS. An hour
    with no row kept the previous hour's last value (charts carry it forward)."""

    device_id = peewee.CharField(max_length=24)
    owner = peewee.ForeignKeyField(User, null=True, backref="+", on_delete="CASCADE")
    name = peewee.CharField(max_length=32)
    hour = peewee.DateTimeField(index=True)  # start of the hour, naive UTC (purged by it)
    minimum = peewee.DoubleField()
    maximum = peewee.DoubleField()
    mean = peewee.DoubleField()
    last = peewee.DoubleField()

    class Meta:
        indexes = ((("device_id", "name", "hour", "owner"), True),)


class RollupPending(BaseModel):
    """An hour of a device whose rollups must be (re)computed: new raw values arrived for it."""

    device_id = peewee.CharField(max_length=24)
    hour = peewee.DateTimeField(index=True)

    class Meta:
        indexes = ((("device_id", "hour"), True),)


class NameSync(JobColumns):
    """A device whose name Particle must be sent again (services/devices.py): a rename whose
    answer was lost may or may not have reached Particle, so the `push` step sends the device's
    current name until Particle answers. One row per device, kept (step None) once done."""

    device_id = peewee.CharField(primary_key=True, max_length=24)


class Organisation(BaseModel):
    """An account that owns devices and is not a person: a company, a dealer, a manufacturer
    (services/organisations.py). People belong to it through Membership; DeviceGroup holds
    subsets of its devices.

    Its devices are owned by `account`, a User row of its own (role "organisation", no
    password anyone can use) holding the organisation's Particle shadow customer (opaque id,
    created with the organisation). So claims, releases, function calls and the audit trail of
    its devices work exactly as for a person's, and its admins act as that owner."""

    name = peewee.CharField(unique=True, max_length=100)
    kind = peewee.CharField(default="company", max_length=16)  # company | dealer
    account = peewee.ForeignKeyField(User, unique=True, backref="+", on_delete="CASCADE")
    created_at = peewee.DateTimeField(default=utcnow)
    created_by = peewee.ForeignKeyField(User, null=True, backref="+", on_delete="SET NULL")


class Membership(BaseModel):
    """A person in an organisation: admin (runs the organisation: members, groups, grants; owner
    of its devices) or member (reaches what grants to them or the organisation give).
    Removing the row ends every access it gave at once (the access check reads it)."""

    organisation = peewee.ForeignKeyField(Organisation, backref="memberships", on_delete="CASCADE")
    user = peewee.ForeignKeyField(User, backref="memberships", on_delete="CASCADE")
    role = peewee.CharField(max_length=16)  # admin | member
    created_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("organisation", "user"), True), (("user", "organisation"), False))


class DeviceGroup(BaseModel):
    """A named subset of an organisation's devices (a region, a site, a client); a device may
    be in several groups."""

    organisation = peewee.ForeignKeyField(Organisation, backref="groups", on_delete="CASCADE")
    name = peewee.CharField(max_length=100)
    created_at = peewee.DateTimeField(default=utcnow)
    # The alerts of this group's devices go to the people it is shared with, instead of the
    # organisation's admins (services/alerts.py).
    alerts_to_members = peewee.BooleanField(default=False)

    class Meta:
        indexes = ((("organisation", "name"), True),)


class GroupDevice(BaseModel):
    """One device in one group (unique pair: adding twice is a no-op, two admins can't race
    a duplicate in)."""

    group = peewee.ForeignKeyField(DeviceGroup, backref="members", on_delete="CASCADE")
    device = peewee.ForeignKeyField(Device, backref="+", on_delete="CASCADE", column_name="device_id")

    class Meta:
        indexes = ((("group", "device"), True), (("device", "group"), False))


class Grant(BaseModel):
    """A role on a device given to a person who doesn't own it (services/access.py).

    Roles, each including the one before: viewer (values, history), operator (also runs
    functions), manager (also renames and shares up to their own role). A grant ends when it
    is revoked, when the device changes owner (release, transfer), or by itself at
    `expires_at` (the lookup checks the time; the sweep records the ending afterwards).
    `active_key` (what it is on and to whom, e.g. "d<device>:u<user>") is set while the grant
    has not been ended and NULL after: its unique index allows one live grant per pair.
    """

    # What it is on: one device, or a group of an organisation's devices (exactly one is set).
    device = peewee.ForeignKeyField(
        Device, null=True, backref="grants", on_delete="CASCADE", column_name="device_id"
    )
    group = peewee.ForeignKeyField(DeviceGroup, null=True, backref="grants", on_delete="CASCADE")
    # To whom: a person, or an organisation (all its members; exactly one is set).
    grantee = peewee.ForeignKeyField(User, null=True, backref="grants_received", on_delete="CASCADE")
    grantee_org = peewee.ForeignKeyField(
        Organisation, null=True, backref="grants_received", on_delete="CASCADE"
    )
    role = peewee.CharField(max_length=16)  # viewer | operator | manager
    created_at = peewee.DateTimeField(default=utcnow)
    granted_by = peewee.ForeignKeyField(User, null=True, backref="+", on_delete="SET NULL")
    expires_at = peewee.DateTimeField(null=True, index=True)
    ended_at = peewee.DateTimeField(null=True)
    ended_by = peewee.ForeignKeyField(User, null=True, backref="+", on_delete="SET NULL")
    # revoked | released | transferred | expired | replaced
    end_cause = peewee.CharField(null=True, max_length=16)
    active_key = peewee.CharField(null=True, unique=True, max_length=64)

    class Meta:
        table_name = "device_grant"  # "grant" is an SQL keyword
        indexes = (
            (("grantee", "ended_at"), False),
            (("grantee_org", "ended_at"), False),
            (("group", "ended_at"), False),
        )


class Invitation(BaseModel):
    """An emailed offer of a role on a device (services/sharing.py). The link is signed and
    carries `nonce`; it works once because accepting moves `state` from pending with an
    atomic UPDATE. state: pending -> accepted | withdrawn | expired | ended (the device
    changed owner)."""

    device = peewee.ForeignKeyField(
        Device, backref="invitations", on_delete="CASCADE", column_name="device_id"
    )
    email = peewee.CharField(max_length=254, index=True)
    role = peewee.CharField(max_length=16)
    # The grant's own end, chosen by the inviter (None: until revoked).
    access_until = peewee.DateTimeField(null=True)
    invited_by = peewee.ForeignKeyField(User, null=True, backref="+", on_delete="SET NULL")
    created_at = peewee.DateTimeField(default=utcnow)
    expires_at = peewee.DateTimeField()  # when the link stops working
    state = peewee.CharField(default="pending", max_length=16, index=True)
    nonce = peewee.CharField(max_length=32, unique=True)
    decided_at = peewee.DateTimeField(null=True)
    decided_by = peewee.ForeignKeyField(User, null=True, backref="+", on_delete="SET NULL")
    grant = peewee.ForeignKeyField(Grant, null=True, backref="+", on_delete="SET NULL")
    mailed_at = peewee.DateTimeField(null=True)
    # Offered to an organisation: whoever accepts does so for an organisation they administer.
    to_organisation = peewee.BooleanField(default=False)


class AlertSetting(BaseModel):
    """A person's alert choices (services/alerts.py): per kind "now", "digest" or "off"
    (`modes`, kinds left out take the kind's default), quiet hours in their time zone."""

    user = peewee.ForeignKeyField(User, primary_key=True, backref="+", on_delete="CASCADE")
    modes = JSONField(default=dict)
    # The hours below are in the person's time zone, User.time_zone (one for the whole site).
    quiet_from = peewee.IntegerField(null=True)  # local hour 0-23 (None: no quiet hours)
    quiet_until = peewee.IntegerField(null=True)
    faults_in_quiet = peewee.BooleanField(default=True)  # faults still go through at night
    digest_hour = peewee.IntegerField(default=8)  # local hour the daily digest is sent


class AlertOptIn(BaseModel):
    """A person who is not the owner wants a shared device's alerts (services/alerts.py). It
    counts only while they can see the device: a revoked or expired grant stops them."""

    user = peewee.ForeignKeyField(User, backref="+", on_delete="CASCADE")
    device = peewee.ForeignKeyField(Device, backref="+", on_delete="CASCADE", column_name="device_id")

    class Meta:
        indexes = ((("user", "device"), True), (("device", "user"), False))


class AlertEpisode(BaseModel):
    """One stretch of a condition on a device (offline, fault, battery low, ...): one alert
    when it starts, reminders while it lasts, "resolved" when it ends. `open_key` holds
    "<device>:<kind>" while the episode is open and NULL once it ended: its unique index
    allows one open episode per device and kind, so a repeated event can't open a second."""

    device_id = peewee.CharField(max_length=24, index=True)
    owner = peewee.ForeignKeyField(User, null=True, backref="+", on_delete="CASCADE")
    kind = peewee.CharField(max_length=24)
    open_key = peewee.CharField(null=True, unique=True, max_length=64)
    detail = peewee.CharField(null=True, max_length=64)  # e.g. the fault's name
    started_at = peewee.DateTimeField()
    ended_at = peewee.DateTimeField(null=True)
    reminded_at = peewee.DateTimeField(null=True)


class AlertNotice(BaseModel):
    """One decision to tell one person about an episode (started, reminder, resolved, test),
    written in the same transaction as the episode change, so a worker that dies before
    sending loses nothing. Sent once (`sent_at`), by whoever holds its `lease_until`; notices
    due together for one person leave as one mail. Also the alerts log of the activity page."""

    user = peewee.ForeignKeyField(User, backref="+", on_delete="CASCADE")
    episode = peewee.ForeignKeyField(AlertEpisode, null=True, backref="notices", on_delete="CASCADE")
    kind = peewee.CharField(max_length=24)
    event = peewee.CharField(max_length=16)  # started | reminder | resolved | test
    delivery = peewee.CharField(max_length=8)  # now | digest
    device_id = peewee.CharField(null=True, max_length=24)
    created_at = peewee.DateTimeField(default=utcnow)
    due_at = peewee.DateTimeField(index=True)
    sent_at = peewee.DateTimeField(null=True, index=True)
    cancelled_at = peewee.DateTimeField(null=True)  # no longer true or no longer theirs
    attempts = peewee.IntegerField(default=0)
    lease_until = peewee.DateTimeField(null=True)
    mail_id = peewee.CharField(null=True, max_length=32, index=True)  # the batch (one mail) it left in


class OutboxMail(BaseModel):
    """One email to send (services/outbox.py), written in the same transaction as the change it
    reports: a rolled-back change sends nothing, a committed one is never lost. Holds the
    rendered message, so sending needs no request. state: pending -> sent | failed (refused
    for good, or out of attempts) | skipped (a reset request for an address without an
    account: nothing to send). A sender takes a row with an atomic UPDATE of `lease_until`;
    a recipient's rows leave in `id` order. `sensitive` mails (links that sign in or reset)
    are never shown to staff and lose their body once finished."""

    kind = peewee.CharField(max_length=32)  # the template (or "reset_request")
    to_address = peewee.CharField(max_length=254, index=True)
    subject = peewee.CharField(max_length=255)
    body = peewee.TextField()
    headers = JSONField(null=True)  # extra headers, e.g. List-Unsubscribe
    sensitive = peewee.BooleanField(default=False)
    # Steps that enqueue (transfers, migration rows) may run twice: the same key is one mail.
    dedupe_key = peewee.CharField(null=True, max_length=128, unique=True)
    state = peewee.CharField(default="pending", max_length=12)
    attempts = peewee.IntegerField(default=0)
    next_attempt_at = peewee.DateTimeField(null=True)
    lease_until = peewee.DateTimeField(null=True)
    last_error = peewee.CharField(null=True, max_length=500)
    created_at = peewee.DateTimeField(default=utcnow, index=True)
    finished_at = peewee.DateTimeField(null=True)

    class Meta:
        indexes = ((("state", "next_attempt_at"), False),)


class AccountDeletion(JobColumns):
    """An account its owner asked to delete (services/erasure.py), and the recorded job that
    deletes it. state: scheduled (until `due_at`; the person may undo it) -> running (the steps
    run; no way back) -> done; or cancelled (undone in the grace). The "deleted" email is in
    the outbox, queued with the removal of the personal data, so no address is kept here. One
    row per account: asking again after an undo reuses it."""

    user = peewee.ForeignKeyField(User, unique=True, backref="+", on_delete="CASCADE")
    state = peewee.CharField(max_length=16, index=True)
    requested_at = peewee.DateTimeField()
    due_at = peewee.DateTimeField()
    cancelled_at = peewee.DateTimeField(null=True)
    started_at = peewee.DateTimeField(null=True)
    finished_at = peewee.DateTimeField(null=True)


ALL_MODELS = [
    User,
    LoginSession,
    Device,
    ClaimAttempt,
    DeviceSnapshot,
    EventCount,
    ListenerLease,
    ParticleToken,
    TokenBreaker,
    AuditEvent,
    StaffView,
    ReconcileRun,
    ReconcileFinding,
    Transfer,
    PossessionProof,
    MigrationRow,
    ValueSample,
    ValueRollup,
    RollupPending,
    NameSync,
    Organisation,
    Membership,
    DeviceGroup,
    GroupDevice,
    Grant,
    Invitation,
    AlertSetting,
    AlertOptIn,
    AlertEpisode,
    AlertNotice,
    OutboxMail,
    AccountDeletion,
]
