"""History: changes stored with their publish time per ownership period, rollups, retention,
charts with gaps, CSV; fed by the live values read from the simulator."""

import datetime

import pytest
from helpers import PUMP
from helpers import WINDOW
from helpers import make_user

from selfserve.models import Device
from selfserve.models import RollupPending
from selfserve.models import ValueRollup
from selfserve.models import ValueSample
from selfserve.models import utcnow
from selfserve.services import devices
from selfserve.services import history
from selfserve.services import live_values

T0 = datetime.datetime(2026, 11, 1, 10, 0, 0)


def minutes(n):
    return T0 + datetime.timedelta(minutes=n)


@pytest.fixture
def owner(app, labels):
    user = make_user("owner@example.com")
    for device_id in (WINDOW, PUMP):
        devices.claim(user, labels[device_id]["serial_number"], labels[device_id]["setup_code"])
    # Claimed well before the times the tests use.
    Device.update(claimed_at=T0 - datetime.timedelta(days=60)).execute()
    return user


def pump(owner):
    return devices.device_for(owner, PUMP)


def samples(device_id, name):
    return [
        (row.at, row.value)
        for row in ValueSample.select()
        .where((ValueSample.device_id == device_id) & (ValueSample.name == name))
        .order_by(ValueSample.at)
    ]


def test_only_changes_are_stored_with_their_publish_time(owner):
    history.record(PUMP, {"pressure_kpa": 200}, at=minutes(0))
    history.record(PUMP, {"pressure_kpa": 200}, at=minutes(1))  # same value: not a change
    history.record(PUMP, {"pressure_kpa": 210.5}, at=minutes(2))
    history.record(PUMP, {"pressure_kpa": "not a number", "unknown": 5}, at=minutes(3))
    assert samples(PUMP, "pressure_kpa") == [(minutes(0), 200.0), (minutes(2), 210.5)]
    assert samples(PUMP, "unknown") == []
    assert ValueSample.select().where(ValueSample.at == minutes(3)).count() == 0
    history.record(PUMP, {"fault": "overpressure"}, at=minutes(4))
    assert [row.text for row in ValueSample.select().where(ValueSample.at == minutes(4))] == ["overpressure"]


def test_duplicates_and_reordered_values_make_no_wrong_history(owner):
    assert len(history.record(PUMP, {"pressure_kpa": 100}, at=minutes(0))) == 1
    assert len(history.record(PUMP, {"pressure_kpa": 300}, at=minutes(10))) == 1
    assert history.record(PUMP, {"pressure_kpa": 300}, at=minutes(10)) == []  # repeated event
    # An older event arriving late is stored at its own time, never as the newest value.
    late = history.record(PUMP, {"pressure_kpa": 150}, at=minutes(5))
    assert [(change.at, change.value) for change in late] == [(minutes(5), 150.0)]
    assert history.record(PUMP, {"pressure_kpa": 150}, at=minutes(5)) == []
    # A late repeat of the value that already held then is not a change.
    assert history.record(PUMP, {"pressure_kpa": 100}, at=minutes(3)) == []
    assert samples(PUMP, "pressure_kpa") == [(minutes(0), 100.0), (minutes(5), 150.0), (minutes(10), 300.0)]


def test_booleans_and_online_are_numbers(owner):
    history.record(PUMP, {"running": True}, at=minutes(0), online=True)
    history.record(PUMP, {"running": "false"}, at=minutes(1), online=False)
    assert samples(PUMP, "running") == [(minutes(0), 1.0), (minutes(1), 0.0)]
    assert samples(PUMP, "online") == [(minutes(0), 1.0), (minutes(1), 0.0)]


def test_a_device_without_owner_stores_nothing(app, labels):
    assert history.record(PUMP, {"pressure_kpa": 1}, at=minutes(0)) == []
    assert ValueSample.select().count() == 0


def test_hourly_rollup_is_time_weighted_with_the_value_carried_in():
    # 100 for the first 30 minutes (carried in), 200 for the rest.
    rows = history.hourly([(minutes(30), 200.0)], 100.0, minutes(24 * 60))
    assert rows == {T0: (100.0, 200.0, 150.0, 200.0)}
    rows = history.hourly([(minutes(0), 10.0), (minutes(45), 20.0), (minutes(75), 30.0)], None, minutes(600))
    assert rows[T0] == (10.0, 20.0, 12.5, 20.0)
    assert rows[minutes(60)] == (20.0, 30.0, 27.5, 30.0)


def test_maintain_rolls_up_finished_hours_once_and_purges_past_retention(app, owner):
    history.record(PUMP, {"pressure_kpa": 100}, at=minutes(0))
    history.record(PUMP, {"pressure_kpa": 200}, at=minutes(30))
    history.record(PUMP, {"pressure_kpa": 300}, at=minutes(90))
    # The hour that is still running is not rolled up.
    history.maintain(now=minutes(50))
    assert ValueRollup.select().count() == 0
    history.maintain(now=minutes(150))
    rows = {
        (row.name, row.hour): (row.minimum, row.maximum, row.mean, row.last)
        for row in ValueRollup.select().where(ValueRollup.device_id == PUMP)
    }
    assert rows[("pressure_kpa", T0)] == (100.0, 200.0, 150.0, 200.0)
    assert rows[("pressure_kpa", minutes(60))] == (200.0, 300.0, 250.0, 300.0)
    assert RollupPending.select().where(RollupPending.hour < minutes(120)).count() == 0
    # A late value for a finished hour marks it again and the next run corrects it.
    history.record(PUMP, {"pressure_kpa": 0}, at=minutes(15))
    history.maintain(now=minutes(150))
    corrected = ValueRollup.get(
        (ValueRollup.device_id == PUMP) & (ValueRollup.hour == T0) & (ValueRollup.name == "pressure_kpa")
    )
    assert (corrected.minimum, corrected.maximum) == (0.0, 200.0)
    # Retention: raw after 7 days, rollups after 13 months.
    history.maintain(now=minutes(0) + datetime.timedelta(days=8))
    assert ValueSample.select().count() == 0
    assert ValueRollup.select().count() > 0
    app.config["HISTORY_ROLLUP_DAYS"] = 30
    history.maintain(now=minutes(0) + datetime.timedelta(days=31))
    assert ValueRollup.select().count() == 0


def test_one_maintainer_at_a_time(app, owner):
    from selfserve.services import leases

    assert leases.take(history.MAINTAIN_LEASE, 60, holder="another-worker")
    assert history.maintain() == "busy"
    leases.release(history.MAINTAIN_LEASE, holder="another-worker")
    assert history.maintain() != "busy"


def test_the_24h_chart_draws_offline_time_as_a_gap(owner):
    device = pump(owner)
    history.record(PUMP, {"pressure_kpa": 100}, at=minutes(0), online=True)
    history.record(PUMP, {"pressure_kpa": 120}, at=minutes(60))
    history.record(PUMP, {}, at=minutes(120), online=False)
    history.record(PUMP, {"pressure_kpa": 130}, at=minutes(240), online=True)
    data = history.chart(device, "24h", now=minutes(300))
    pressure = data.series[0]
    assert pressure.name == "pressure_kpa" and pressure.unit == "kPa"
    assert pressure.segments == [
        [(minutes(0), 100.0), (minutes(60), 120.0), (minutes(120), 120.0)],
        [(minutes(240), 130.0), (minutes(300), 130.0)],
    ]
    # The table alternative: the offline hours say so (None).
    table = dict(pressure.rows)
    assert table[T0] == (100.0, 100.0, 100.0, 100.0)
    assert table[minutes(120)] is None and table[minutes(180)] is None
    assert table[minutes(240)] == (130.0, 130.0, 130.0, 130.0)
    assert data.queries == 2


def test_the_30_day_chart_uses_rollups_and_the_hours_not_rolled_up_yet(owner):
    device = pump(owner)
    history.record(PUMP, {"pressure_kpa": 100}, at=minutes(0), online=True)
    history.record(PUMP, {"pressure_kpa": 200}, at=minutes(30))
    history.record(PUMP, {}, at=minutes(24 * 60), online=False)
    history.record(PUMP, {"pressure_kpa": 50}, at=minutes(48 * 60), online=True)
    history.maintain(now=minutes(48 * 60 + 10))
    history.record(PUMP, {"pressure_kpa": 60}, at=minutes(48 * 60 + 20))  # current hour, raw
    data = history.chart(device, "30d", now=minutes(48 * 60 + 30))
    pressure = data.series[0]
    assert len(pressure.segments) == 2  # the offline day is a gap
    first, second = pressure.segments
    assert first[0] == (minutes(30), 150.0)
    assert all(value == 200.0 for _, value in first[1:])
    assert second[-1][1] == pytest.approx((50 * 20 + 60 * 10) / 30)
    days = dict(pressure.rows)
    # Offline from 10:00 on the second day until 10:00 on the third.
    assert first[-1][0] < minutes(24 * 60) and second[0][0] > minutes(48 * 60)
    assert days[T0.replace(hour=0) + datetime.timedelta(days=1)] == (200.0, 200.0, 200.0, 200.0)
    assert days[T0.replace(hour=0)][0:2] == (100.0, 200.0)
    assert data.queries == 3


def test_the_new_owner_sees_only_their_own_period(app, owner, labels):
    history.record(PUMP, {"pressure_kpa": 100}, at=minutes(0))
    history.maintain(now=minutes(120))
    # Released and claimed by someone else: the old values belong to the old period.
    devices.release(owner, pump(owner))
    buyer = make_user("buyer@example.com")
    devices.claim(buyer, labels[PUMP]["serial_number"], labels[PUMP]["setup_code"])
    device = devices.device_for(buyer, PUMP)
    now = device.claimed_at + datetime.timedelta(minutes=5)
    for window in history.WINDOWS:
        assert history.chart(device, window, now=now).series[0].empty, window
        assert "100" not in history.csv_text(device, window, now=now)
    history.record(PUMP, {"pressure_kpa": 100}, at=device.claimed_at + datetime.timedelta(minutes=1))
    # The same value is a change in the new period.
    assert history.chart(device, "24h", now=now).series[0].segments[0][0][1] == 100.0


def test_csv_lists_changes_and_rollups(owner):
    device = pump(owner)
    history.record(PUMP, {"pressure_kpa": 100, "flow_lpm": 12.5}, at=minutes(0), online=True)
    text = history.csv_text(device, "24h", now=minutes(10))
    lines = text.strip().splitlines()
    assert lines[0] == "time_utc,name,value"
    assert "2026-11-01T10:00:00Z,pressure_kpa,100" in lines
    assert "2026-11-01T10:00:00Z,flow_lpm,12.5" in lines
    history.maintain(now=minutes(120))
    text = history.csv_text(device, "7d", now=minutes(120))
    assert text.splitlines()[0] == "hour_utc,name,min,max,mean,last"
    assert "2026-11-01T10:00:00Z,pressure_kpa,100,100,100,100" in text


def test_live_reads_feed_the_history(app, owner, sim):
    device = pump(owner)
    snapshot = live_values.current(device)
    assert snapshot.online is True
    stored = {row.name: row.value for row in ValueSample.select().where(ValueSample.device_id == PUMP)}
    assert stored["online"] == 1.0
    assert stored["pressure_kpa"] == float(snapshot.raw["pressure_kpa"])
    # The device drops off the network: the next read stores that as a change of "online".
    sim.set_device(PUMP, online=False)
    live_values.invalidate(PUMP)
    assert live_values.current(device).online is False
    assert [value for _, value in samples(PUMP, "online")] == [1.0, 0.0]


def test_charts_exist_for_each_models_main_values():
    from selfserve import device_models

    assert device_models.get("window").charts == ("position",)
    assert device_models.get("pump").charts == ("pressure_kpa", "flow_lpm", "runtime_h")
    assert utcnow()  # naive UTC everywhere


# --- the device page's charts (views) ----------------------------------------------------------


def _signed_in(app, user):
    from helpers import login

    client = app.test_client()
    assert login(client, user.email).status_code == 200
    return client


def test_the_device_page_loads_the_history_fragment_with_charts_and_tables(app, owner):
    now = utcnow()
    history.record(
        PUMP, {"pressure_kpa": 100, "flow_lpm": 10}, at=now - datetime.timedelta(hours=3), online=True
    )
    history.record(PUMP, {"pressure_kpa": 150}, at=now - datetime.timedelta(hours=2))
    client = _signed_in(app, owner)
    page = client.get(f"/devices/{PUMP}").get_data(as_text=True)
    assert f'hx-get="/devices/{PUMP}/history"' in page
    fragment = client.get(f"/devices/{PUMP}/history", headers={"HX-Request": "true"})
    html = fragment.get_data(as_text=True)
    assert fragment.status_code == 200 and "<html" not in html
    assert html.count("<svg") == 2  # pressure and flow; run time has no values yet
    assert "No values recorded in this period yet." in html
    assert 'class="chart-line"' in html and '<path d="M' in html
    assert "<table" in html and "<td>150</td>" in html
    assert "<script" not in html and "style=" not in html  # strict CSP: no inline anything
    # Without htmx: a page of its own.
    page = client.get(f"/devices/{PUMP}/history?window=7d").get_data(as_text=True)
    assert "<html" in page and 'aria-current="true">7 days' in page


def test_history_csv_download_and_bad_window(app, owner):
    history.record(PUMP, {"pressure_kpa": 100}, at=utcnow() - datetime.timedelta(minutes=5))
    client = _signed_in(app, owner)
    response = client.get(f"/devices/{PUMP}/history.csv?window=24h")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in response.headers["Content-Disposition"]
    assert ",pressure_kpa,100" in response.get_data(as_text=True)
    assert client.get(f"/devices/{PUMP}/history?window=1y").status_code == 400
    assert client.get(f"/devices/{PUMP}/history.csv?window=<x>").status_code == 400


def test_another_customers_history_is_404_without_particle_calls(app, owner, sim):
    history.record(PUMP, {"pressure_kpa": 100}, at=utcnow())
    stranger = make_user("stranger@example.com")
    client = _signed_in(app, stranger)
    sim.reset_counters()
    for path in (f"/devices/{PUMP}/history", f"/devices/{PUMP}/history.csv?window=30d"):
        assert client.get(path).status_code == 404
    assert sim.counters()["total"] == 0


def test_device_events_feed_the_history_once(app, owner):
    import json

    from selfserve.services import device_events

    published = utcnow().replace(microsecond=0)
    state = json.dumps({"v": 1, "pressure_kpa": 222, "flow_lpm": 3.5, "running": True, "fault": ""})
    assert device_events.ingest("selfserve/state", state, PUMP, published) == device_events.STORED
    assert samples(PUMP, "pressure_kpa") == [(published, 222.0)]
    assert samples(PUMP, "online") == [(published, 1.0)]
    # The same event again, and an older one, change nothing in the history.
    device_events.ingest("selfserve/state", state, PUMP, published)
    older = json.dumps({"v": 1, "pressure_kpa": 100})
    device_events.ingest("selfserve/state", older, PUMP, published - datetime.timedelta(minutes=1))
    assert samples(PUMP, "pressure_kpa") == [(published, 222.0)]
    later = published + datetime.timedelta(minutes=1)
    assert device_events.ingest("spark/status", "offline", PUMP, later) == device_events.STORED
    assert samples(PUMP, "online") == [(published, 1.0), (later, 0.0)]


def test_the_sweep_runs_the_history_job(app, owner):
    from selfserve import sweep

    history.record(PUMP, {"pressure_kpa": 100}, at=utcnow() - datetime.timedelta(hours=3))
    assert "selfserve.services.history.maintain" in [job.name for job in app.extensions["background_jobs"]]
    sweep.run_once(app)
    assert ValueRollup.select().where(ValueRollup.device_id == PUMP).count() == 1
