"""The one job runner (services/steps.py `Runner`) and the background sweep (selfserve/sweep.py):
steps in order, leases, backoff, giving up through the hand-back path, a crash mid-step resumed
by the sweep, one explicit list of background jobs, `flask sweep`, and no sweep in other CLI
commands."""

import datetime
import threading

import peewee
import pytest
from helpers import make_user

from selfserve import background
from selfserve import sweep
from selfserve.models import JobColumns
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.particle.errors import CloudUnavailable
from selfserve.particle.errors import RateLimited
from selfserve.services import steps


class Chore(JobColumns):
    """A job model of the tests' own, with the standard job columns."""

    name = peewee.CharField()
    done = peewee.TextField(default="")


class Crash(BaseException):
    """The process dying mid-step (nothing catches it)."""


@pytest.fixture
def chores(app):
    db.create_tables([Chore])
    yield Chore
    db.drop_tables([Chore])


def make_chore(step="first", **fields):
    return Chore.create(name="chore", step=step, **fields)


def noted(name, next_step):
    """A step that records that it ran, then names the next one."""

    def step(chore):
        Chore.update(done=Chore.done + name + " ").where(Chore.id == chore.id).execute()
        return next_step

    return step


def three_steps():
    return {
        "first": noted("first", "second"),
        "second": noted("second", "third"),
        "third": noted("third", None),
    }


def make_due():
    Chore.update(next_attempt_at=utcnow() - datetime.timedelta(seconds=1)).execute()


def expire_leases():
    Chore.update(lease_until=utcnow() - datetime.timedelta(seconds=1)).execute()


def test_steps_run_in_order_and_the_lease_is_handed_back(chores):
    runner = steps.Runner("Chore", Chore, three_steps())
    chore = make_chore()
    assert runner.take(chore.id)
    done = runner.run(chore.id)
    assert done.done == "first second third "
    assert done.step is None and done.lease_until is None and done.attempts == 0


def test_a_lease_gives_a_row_to_one_worker_until_it_runs_out(chores):
    runner = steps.Runner("Chore", Chore, three_steps())
    chore = make_chore()
    now = utcnow()
    assert runner.take(chore.id, now) is True
    assert runner.take(chore.id, now) is False
    assert runner.take(chore.id, now + datetime.timedelta(seconds=60)) is False
    assert runner.take(chore.id, now + datetime.timedelta(minutes=10)) is True


def test_only_rows_at_a_step_of_this_runner_are_due(chores):
    runner = steps.Runner("Chore", Chore, three_steps())
    make_chore(step=None)
    make_chore(step="somebody_elses_step")
    mine = make_chore(step="second")
    assert [row.id for row in Chore.select().where(runner.due(utcnow()))] == [mine.id]
    assert runner.resume() == 1
    assert Chore.get_by_id(mine.id).done == "second third "


def test_retry_postpones_with_growing_backoff_and_the_sweep_finishes(chores):
    failures = {"left": 2}

    def flaky(chore):
        if failures["left"]:
            failures["left"] -= 1
            raise steps.Retry("not yet")
        return None

    runner = steps.Runner("Chore", Chore, {"first": noted("first", "flaky"), "flaky": flaky})
    chore = make_chore()
    runner.take(chore.id)
    first = runner.run(chore.id)
    assert first.step == "flaky" and first.attempts == 1 and first.last_error == "not yet"
    assert first.lease_until is None and first.next_attempt_at > utcnow()
    assert runner.resume() == 0  # not due before its backoff
    make_due()
    assert runner.resume() == 1
    second = Chore.get_by_id(chore.id)
    assert second.attempts == 2
    assert second.next_attempt_at - utcnow() > datetime.timedelta(seconds=steps.backoff_seconds(1))
    make_due()
    runner.resume()
    done = Chore.get_by_id(chore.id)
    assert done.step is None and done.attempts == 0 and done.last_error is None
    assert done.done == "first "  # the finished step never ran again


def test_a_rate_limit_waits_at_least_its_retry_after(chores):
    def limited(chore):
        raise RateLimited("slow down", retry_after=300)

    runner = steps.Runner("Chore", Chore, {"first": limited})
    chore = make_chore()
    runner.take(chore.id)
    row = runner.run(chore.id)
    assert row.next_attempt_at - utcnow() > datetime.timedelta(seconds=290)


def test_quick_retries_absorb_a_blip_while_someone_waits(app, chores):
    calls = {"n": 0}

    def blip(chore):
        calls["n"] += 1
        if calls["n"] < 3:
            raise CloudUnavailable("503", 503)
        return None

    app.config["CHORE_QUICK_RETRIES"] = (0.01, 0.01)
    runner = steps.Runner("Chore", Chore, {"first": blip}, quick_retries=("CHORE_QUICK_RETRIES", ()))
    chore = make_chore()
    runner.take(chore.id)
    assert runner.run(chore.id).step is None
    assert calls["n"] == 3


def test_give_up_takes_the_hand_back_path(chores):
    handed_back = []

    def refused(chore):
        raise steps.GiveUp("refused for good")

    def hand_back(chore, reason):
        handed_back.append(reason)
        return "undo"

    runner = steps.Runner(
        "Chore",
        Chore,
        {"first": refused, "undo": noted("undo", None)},
        on_give_up=hand_back,
        keep_error=lambda chore: True,
    )
    chore = make_chore()
    runner.take(chore.id)
    done = runner.run(chore.id)
    assert handed_back == ["refused for good"]
    assert done.done == "undo " and done.step is None and done.lease_until is None
    assert done.last_error == "refused for good"  # kept: it says why the job was undone


def test_without_a_hand_back_path_a_given_up_row_stops_with_the_reason(chores):
    runner = steps.Runner("Chore", Chore, {"first": lambda chore: (_ for _ in ()).throw(steps.GiveUp("no"))})
    chore = make_chore()
    runner.take(chore.id)
    done = runner.run(chore.id)
    assert done.step is None and done.last_error == "no" and done.lease_until is None


def test_give_up_after_too_many_failed_attempts(chores):
    def always_down(chore):
        raise CloudUnavailable("timed out")

    runner = steps.Runner(
        "Chore",
        Chore,
        {"first": always_down, "undo": noted("undo", None)},
        on_give_up=lambda chore, reason: "undo",
        give_up_after=3,
    )
    chore = make_chore()
    for _ in range(2):
        runner.take(chore.id)
        assert runner.run(chore.id).step == "first"
        make_due()
    runner.take(chore.id)
    done = runner.run(chore.id)
    assert done.done == "undo " and done.step is None


def test_an_unexpected_error_is_postponed_not_raised(chores):
    def bug(chore):
        raise KeyError("bug")

    runner = steps.Runner("Chore", Chore, {"first": bug})
    chore = make_chore()
    runner.take(chore.id)
    row = runner.run(chore.id)
    assert row.step == "first" and row.attempts == 1 and "bug" in row.last_error


def test_a_crash_mid_step_is_resumed_once_the_lease_runs_out(chores):
    crashed = {"n": 0}

    def crashing(chore):
        crashed["n"] += 1
        if crashed["n"] == 1:
            raise Crash()
        return "third"

    runner = steps.Runner("Chore", Chore, {**three_steps(), "second": crashing})
    chore = make_chore()
    runner.take(chore.id)
    with pytest.raises(Crash):
        runner.run(chore.id)
    dead = Chore.get_by_id(chore.id)
    assert dead.step == "second" and dead.lease_until > utcnow()
    assert runner.resume() == 0  # the dead worker's lease still holds
    expire_leases()
    assert runner.resume() == 1
    done = Chore.get_by_id(chore.id)
    assert done.step is None and done.done == "first third "


def test_two_sweeps_at_once_run_each_step_once(app, chores):
    runs = []
    lock = threading.Lock()

    def counted(chore):
        with lock:
            runs.append(chore.id)
        return None

    runner = steps.Runner("Chore", Chore, {"first": counted})
    ids = [make_chore().id for _ in range(5)]
    barrier = threading.Barrier(2)

    def sweep_worker():
        with app.app_context():
            db.connect(reuse_if_open=True)
            try:
                barrier.wait(timeout=10)
                runner.resume()
            finally:
                db.close()

    threads = [threading.Thread(target=sweep_worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(runs) == sorted(ids)


def test_a_mapped_job_may_keep_lease_and_backoff_in_one_column(app):
    """Provisioning keeps its job in the account's own columns."""
    from selfserve.services import provisioning

    runner = provisioning.RUNNER
    assert runner.columns.lease_until is runner.columns.next_attempt_at is User.provisioning_next_at
    user = make_user("mapped@example.com", verified=True, provisioned=False)
    ready = make_user("ready@example.com", verified=True, provisioned=True)
    due = {row.id for row in User.select().where(runner.due(utcnow()))}
    assert user.id in due and ready.id not in due


# --- the background jobs and the sweep ---------------------------------------------------------


def test_the_background_jobs_are_one_explicit_list(app):
    names = [job.name for job in sweep.jobs(app)]
    assert names == [
        "selfserve.services.provisioning.resume_pending",
        "selfserve.services.devices.resume_pending",
        "selfserve.services.devices.push_pending_names",
        "selfserve.services.transfers.resume_pending",
        "selfserve.services.migration.resume_pending",
        "selfserve.services.impersonation.end_stale_views",
        "selfserve.services.history.maintain",
        "selfserve.services.access.record_expired",
        "selfserve.services.alerts.run_timers",
        "selfserve.services.erasure.resume_pending",
        "selfserve.event_stream.keep_listening",
        "selfserve.services.outbox.purge_finished",
        "selfserve.services.outbox.send_due",
    ]


def test_a_failing_job_does_not_stop_the_others(app, sim):
    def broken():
        raise RuntimeError("broken job")

    app.extensions["background_jobs"] = [sweep.Job(broken, name="broken"), *sweep.jobs(app)]
    user = make_user("after.broken@example.com", verified=True, provisioned=False)
    db.close()
    results = sweep.run_once(app)
    db.connect(reuse_if_open=True)
    assert isinstance(results["broken"], RuntimeError)
    assert results["selfserve.services.provisioning.resume_pending"] == 1
    assert User.get_by_id(user.id).provisioning_state == "ready"


def test_other_cli_commands_never_start_the_sweep_and_a_request_does(app, sim):
    app.config["SWEEP_SECONDS"] = 3600
    result = app.test_cli_runner().invoke(args=["reconcile"])
    assert result.exit_code == 0, result.output
    assert app.extensions.get("sweep") is None
    app.test_client().get("/")
    thread = app.extensions.get("sweep")
    sender = app.extensions.get("outbox_sender")
    try:
        assert thread is not None and thread.is_alive()
        assert sender is not None and sender.is_alive()  # the outbox's sender starts with it
    finally:
        # The alert sender too: left running, any later test's alert would wake it, and it
        # would send that test's notices from under it (the models' binding is process-wide).
        background.stop_all(app)


def test_flask_sweep_once_runs_the_background_jobs(app, sim):
    user = make_user("cli.sweep@example.com", verified=True, provisioned=False)
    result = app.test_cli_runner().invoke(args=["sweep", "--once"])
    assert result.exit_code == 0, result.output
    assert "selfserve.services.provisioning.resume_pending: 1" in result.output
    assert User.get_by_id(user.id).provisioning_state == "ready"
    assert app.extensions.get("sweep") is None  # the command ran the jobs itself, no thread


def test_flask_sweep_once_fails_when_a_job_fails(app, sim):
    def broken():
        raise RuntimeError("broken job")

    app.extensions["background_jobs"] = [sweep.Job(broken, name="broken")]
    result = app.test_cli_runner().invoke(args=["sweep", "--once"])
    assert result.exit_code != 0 and "broken" in result.output


def test_job_names_must_be_unique(app):
    from flask import Flask

    job = sweep.Job(lambda: None, name="same")
    with pytest.raises(ValueError):
        sweep.init_app(Flask("other"), [job, job])
