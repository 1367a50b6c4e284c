"""Alerts: one per episode from values as they arrive and from the offline timer, each
person's choices and quiet hours, one mail per person per batch through a real SMTP sink,
nothing lost or doubled across crashes and outages, unsubscribe in one click."""

import datetime
import socket

import pytest
from helpers import csrf_token
from helpers import login
from helpers import make_user

from selfserve import background
from selfserve.models import AlertEpisode
from selfserve.models import AlertNotice
from selfserve.models import Device
from selfserve.models import DeviceSnapshot
from selfserve.models import OutboxMail
from selfserve.models import utcnow
from selfserve.services import alerts
from selfserve.services import history
from selfserve.services import leases
from selfserve.services import outbox

PUMP = "e00fce68a1b2c3d4e5f6a001"
WINDOW = "e00fce68a1b2c3d4e5f6b001"
PASSWORD = "correct horse battery"


def add_device(device_id, owner, model="pump", claimed_at=None):
    return Device.create(
        device_id=device_id,
        serial_number="SSP-" + device_id[-8:].upper(),
        setup_code_hash="not-used",
        model=model,
        in_product=True,
        owner=owner,
        claimed_at=claimed_at or utcnow() - datetime.timedelta(days=1),
    )


@pytest.fixture
def owner(app):
    user = make_user("owner@example.com", PASSWORD, provisioned=False)
    add_device(PUMP, user)
    add_device(WINDOW, user, model="window")
    return user


def fault(value, at=None):
    return history.record(PUMP, {"fault": value}, at=at or utcnow())


def alert_mails(mailbox, address="owner@example.com"):
    return mailbox.to(address)


def test_a_fault_sends_one_alert_with_one_click_unsubscribe(app, owner, mailbox):
    fault("overpressure")
    assert alerts.send_due() == 1
    message = mailbox.wait_for("owner@example.com")
    assert "fault" in message["Subject"] and "overpressure" in message["Subject"]
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = message["List-Unsubscribe"].strip("<>")
    assert link.startswith("http://localhost/alerts/unsubscribe/")
    body = mailbox.body(message)
    assert link in body and f"http://localhost/devices/{PUMP}" in body
    # Nothing more to send; the log says it was sent.
    assert alerts.send_due() == 0
    assert [(text, state) for _, text, state in alerts.log_of(owner)] == [
        (f"Pump controller SSP-{PUMP[-8:].upper()} reports a fault (overpressure).", "sent")
    ]


def test_duplicate_and_reordered_values_make_no_second_alert(app, owner, mailbox):
    now = utcnow()
    fault("overpressure", at=now)
    fault("overpressure", at=now)  # the same event again
    fault("overpressure", at=now + datetime.timedelta(seconds=5))  # same value, later
    fault("", at=now - datetime.timedelta(seconds=30))  # an older "no fault" arriving late
    assert AlertEpisode.select().count() == 1
    assert AlertEpisode.get().open_key is not None  # the late "no fault" didn't end it
    assert AlertNotice.select().count() == 1
    alerts.send_due()
    assert len(alert_mails(mailbox)) == 1


def test_flapping_is_one_episode_and_resolved_waits(app, owner, mailbox):
    start = utcnow() - datetime.timedelta(minutes=30)
    for minute in range(0, 10, 2):
        fault("overpressure", at=start + datetime.timedelta(minutes=minute))
        fault("", at=start + datetime.timedelta(minutes=minute + 1))
    assert AlertEpisode.select().count() == 1
    started = AlertNotice.select().where(AlertNotice.event == "started").count()
    resolved = AlertNotice.select().where(
        (AlertNotice.event == "resolved") & AlertNotice.cancelled_at.is_null()
    )
    assert started == 1 and resolved.count() == 1
    # The resolved notice is due only after the reopen window (10 min after the last clear).
    assert resolved.get().due_at == start + datetime.timedelta(minutes=19)
    alerts.send_due()
    message = mailbox.wait_for("owner@example.com")
    assert "2 alerts" in message["Subject"]
    assert "no longer reports a fault" in mailbox.body(message)


def test_offline_longer_than_grace_by_the_timer_then_back_online(app, owner, mailbox, sim):
    now = utcnow()
    sim.reset_counters()
    DeviceSnapshot.insert(
        device_id=PUMP, values={}, online=False, offline_since=now - datetime.timedelta(minutes=10)
    ).execute()
    DeviceSnapshot.insert(
        device_id=WINDOW, values={}, online=False, offline_since=now - datetime.timedelta(minutes=30)
    ).execute()
    assert alerts.check_offline(now) == 0  # pump grace 15 min, window 60 min
    assert alerts.check_offline(now + datetime.timedelta(minutes=6)) == 1  # the pump
    assert alerts.check_offline(now + datetime.timedelta(minutes=7)) == 0  # already open
    assert alerts.run_timers(now + datetime.timedelta(minutes=31))["offline"] == 1  # the window
    assert sim.counters()["total"] == 0  # nothing polls Particle for it
    message = mailbox.wait_for("owner@example.com")
    assert "2 alerts" in message["Subject"] and "offline since" in mailbox.body(message)
    # Back online: "back online" is sent once the reopen window has passed.
    history.record(PUMP, {}, at=now + datetime.timedelta(minutes=40), online=True)
    assert alerts.send_due(now + datetime.timedelta(minutes=41)) == 0
    assert alerts.send_due(now + datetime.timedelta(minutes=51)) == 1
    assert "back online" in mailbox.wait_for("owner@example.com", count=2)["Subject"]


def test_a_worker_killed_between_deciding_and_sending_neither_loses_nor_doubles(app, owner, mailbox):
    fault("overpressure")  # decided: the notice is in the database, nothing sent yet
    notice = AlertNotice.get()
    # A worker took it and died before the server accepted it: its lease runs out.
    AlertNotice.update(lease_until=utcnow() + datetime.timedelta(minutes=2), mail_id="dead").execute()
    assert alerts.send_due() == 0 and alert_mails(mailbox) == []
    later = utcnow() + datetime.timedelta(minutes=3)
    assert alerts.send_due(later) == 1
    assert alerts.send_due(later) == 0
    assert len(alert_mails(mailbox)) == 1
    assert AlertNotice.get_by_id(notice.id).sent_at is not None


def test_an_smtp_outage_delays_alerts_and_sends_them_after_in_order(app, owner, mailbox):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    app.config["MAIL_PORT"] = dead_port
    first = utcnow()
    fault("overpressure", at=first)
    assert alerts.send_due(first) == 1  # queued in the outbox with the decision
    assert outbox.send_due(first) == {"pending": 1}  # the server is down: it waits
    queued = OutboxMail.get()
    assert queued.attempts == 1 and queued.next_attempt_at > first and queued.kind == "alert"
    history.record(WINDOW, {"battery_v": 3.1}, at=first + datetime.timedelta(seconds=1))
    # Battery low is a digest kind by default: it waits for the digest hour.
    AlertNotice.update(due_at=first).where(AlertNotice.kind == "battery_low").execute()
    assert alerts.send_due(first + datetime.timedelta(seconds=2)) == 1
    assert outbox.send_due(first + datetime.timedelta(minutes=1)) == {"pending": 1}  # still down
    app.config["MAIL_PORT"] = mailbox.port
    assert outbox.send_due(first + datetime.timedelta(minutes=2)) == {"sent": 2}
    fault_mail, battery_mail = alert_mails(mailbox)  # after the outage, in order
    assert "fault" in fault_mail["Subject"] and "battery low" in battery_mail["Subject"]
    assert AlertNotice.select().where(AlertNotice.sent_at.is_null()).count() == 0


def test_500_devices_in_an_outage_make_one_mail(app, owner, mailbox):
    now = utcnow()
    for number in range(500):
        device_id = f"e00fce68a1b2c3d4{number:08x}"
        add_device(device_id, owner)
        DeviceSnapshot.insert(
            device_id=device_id, values={}, online=False, offline_since=now - datetime.timedelta(minutes=20)
        ).execute()
    assert alerts.run_timers(now)["offline"] == 500
    assert len(alert_mails(mailbox)) == 1
    message = alert_mails(mailbox)[0]
    assert message["Subject"] == "500 alerts about your devices"
    assert mailbox.body(message).count("offline since") == 500


def test_digest_and_quiet_hours_in_the_persons_time_zone(app, owner):
    alerts.save_settings(
        owner,
        {"fault": "now", "offline": "now", "battery_low": "digest"},
        time_zone="America/New_York",
        quiet_from=22,
        quiet_until=7,
        faults_in_quiet=True,
        digest_hour=8,
    )
    setting = alerts.settings_of(owner)
    night = datetime.datetime(2026, 7, 1, 4, 0)  # 00:00 in New York (EDT, UTC-4)
    assert alerts.in_quiet_hours(setting, night)
    assert alerts.due_time(setting, "offline", "now", night) == datetime.datetime(2026, 7, 1, 11, 0)
    assert alerts.due_time(setting, "fault", "now", night) == night  # faults go through
    assert alerts.due_time(setting, "battery_low", "digest", night) == datetime.datetime(2026, 7, 1, 12, 0)
    alerts.save_settings(
        owner, {}, time_zone="America/New_York", quiet_from=22, quiet_until=7, faults_in_quiet=False
    )
    assert alerts.due_time(alerts.settings_of(owner), "fault", "now", night) == datetime.datetime(
        2026, 7, 1, 11, 0
    )


def test_off_means_no_notice(app, owner, mailbox):
    alerts.save_settings(owner, {"fault": "off"})
    fault("overpressure")
    assert AlertEpisode.select().count() == 1 and AlertNotice.select().count() == 0


def test_settings_are_validated_and_nothing_is_saved_on_error(app, owner):
    for bad in (
        {"modes": {"fault": "sometimes"}},
        {"modes": {}, "time_zone": "Mars/Olympus"},
        {"modes": {}, "quiet_from": 22},
        {"modes": {}, "quiet_from": 25, "quiet_until": 3},
    ):
        with pytest.raises(alerts.AlertError):
            alerts.save_settings(owner, **bad)
    assert alerts.settings_of(owner).id is None or alerts.settings_of(owner).time_zone == "UTC"


def test_a_transfer_or_release_stops_the_old_owners_alerts_at_once(app, owner, mailbox):
    fault("overpressure")
    buyer = make_user("buyer@example.com", PASSWORD, provisioned=False)
    Device.update(owner=buyer, claimed_at=utcnow()).where(Device.device_id == PUMP).execute()
    assert alerts.send_due() == 0
    assert alert_mails(mailbox) == []
    assert AlertNotice.get().cancelled_at is not None
    # The old owner's open episode ends without a word; the buyer's own fault is theirs.
    alerts.run_timers()
    assert AlertEpisode.select().where(AlertEpisode.open_key.is_null(False)).count() == 0
    fault("", at=utcnow() + datetime.timedelta(seconds=1))
    fault("overpressure", at=utcnow() + datetime.timedelta(seconds=2))
    alerts.send_due(utcnow() + datetime.timedelta(seconds=5))
    assert len(mailbox.to("buyer@example.com")) == 1 and alert_mails(mailbox) == []


def test_reminder_while_it_lasts(app, owner, mailbox):
    start = utcnow() - datetime.timedelta(hours=30)
    fault("overpressure", at=start)
    assert alerts.remind(utcnow()) == 1
    assert alerts.remind(utcnow()) == 0
    alerts.send_due()
    assert "still reports a fault" in mailbox.body(mailbox.wait_for("owner@example.com"))


def test_a_stuck_release_alerts_its_owner(app, owner, mailbox):
    Device.update(claim_state="releasing", claim_state_at=utcnow() - datetime.timedelta(hours=2)).where(
        Device.device_id == WINDOW
    ).execute()
    assert alerts.check_stuck() == 1 and alerts.check_stuck() == 0
    Device.update(claim_state=None, claim_state_at=None).where(Device.device_id == WINDOW).execute()
    alerts.check_stuck()
    assert AlertEpisode.get(AlertEpisode.kind == "transfer_stuck").ended_at is not None


def test_one_timer_at_a_time(app, owner):
    assert leases.take(alerts.TIMER_LEASE, 60, holder="other-machine")
    assert alerts.run_timers() == "busy"


# --- views ------------------------------------------------------------------------------------------


def test_unsubscribe_in_one_click_from_the_mail(app, owner, mailbox):
    fault("overpressure")
    alerts.send_due()
    link = mailbox.wait_for("owner@example.com")["List-Unsubscribe"].strip("<>")
    path = link.replace("http://localhost", "")
    anonymous = app.test_client()
    page = anonymous.get(path)
    assert page.status_code == 200 and "Pump fault" in page.get_data(as_text=True)
    assert alerts.mode_of(alerts.settings_of(owner), "fault") == "now"  # a GET changes nothing
    # RFC 8058: the mail client posts this, without session or CSRF token.
    done = anonymous.post(path, data={"List-Unsubscribe": "One-Click"})
    assert done.status_code == 200
    assert alerts.mode_of(alerts.settings_of(owner), "fault") == "off"
    assert alerts.mode_of(alerts.settings_of(owner), "offline") == "now"
    assert anonymous.post("/alerts/unsubscribe/forged-token").status_code == 404


def test_settings_page_test_alert_and_the_log(app, owner, mailbox):
    client = app.test_client()
    login(client, owner.email, PASSWORD)
    token = csrf_token(client, "/account/alerts")
    response = client.post("/account/alerts/test", data={"csrf_token": token})
    assert response.status_code == 302
    alerts.send_due()
    assert mailbox.wait_for("owner@example.com")["Subject"] == "Test alert from Tidewell"
    page = client.get("/account/alerts").get_data(as_text=True)
    assert "Test alert: your alerts reach this address." in page and "sent" in page
    fragment = client.get("/account/alerts/log", headers={"HX-Request": "true"}).get_data(as_text=True)
    assert "Test alert" in fragment and "<html" not in fragment
    assert 'hx-get="/account/alerts/log"' in client.get("/account/activity").get_data(as_text=True)
    bad = client.post("/account/alerts", data={"csrf_token": token, "time_zone": "Nowhere/Land"})
    assert bad.status_code == 400 and "Enter a time zone" in bad.get_data(as_text=True)
    form = {"csrf_token": token, "time_zone": "Europe/Paris", "quiet_from": "22", "quiet_until": "6"}
    form.update({f"mode_{kind}": "digest" for kind in alerts.KINDS})
    assert client.post("/account/alerts", data=form).status_code == 302
    setting = alerts.settings_of(owner)
    assert (
        setting.time_zone == "Europe/Paris" and setting.quiet_from == 22 and setting.faults_in_quiet is False
    )
    assert alerts.mode_of(setting, "fault") == "digest"


def test_a_fault_event_wakes_the_sender_threads_once_it_is_committed(app, owner, mailbox):
    """The ingest stores the value, the history and the alert's decision in one transaction;
    the sender threads (whose timers are an hour here) are woken after it commits, so the
    mail leaves at once. Woken before the commit, the alert sender found nothing yet and
    slept its whole interval."""
    import json

    from selfserve.services import device_events

    assert alerts.start_sender(app, interval=3600) is not None
    assert outbox.start_sender(app, interval=3600) is not None
    try:
        state = json.dumps({"v": 1, "pressure_kpa": 385, "running": False, "fault": "overpressure"})
        assert device_events.ingest("selfserve/state", state, PUMP, utcnow()) == device_events.STORED
        message = mailbox.wait_for("owner@example.com", timeout=10)
        assert "overpressure" in message["Subject"]
    finally:
        background.stop_all(app)


def test_waking_one_apps_alert_sender_leaves_another_apps_asleep(app, app_config):
    # As the outbox's: the wake-up is per app, so one app's change never wakes another's sender.
    from selfserve import create_app

    other = create_app(app_config)
    with other.app_context():
        alerts.wake()
    assert alerts._wakeup(other).is_set()
    assert not alerts._wakeup(app).is_set()
