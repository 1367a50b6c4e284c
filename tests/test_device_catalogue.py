"""The device model catalogue's rules (selfserve/device_models.py), without HTTP: what each
state allows and why not, faults in words with their fix, return codes as sentences (never a
raw code), the pump's guard warning; and support's visits folded on the activity page."""

import datetime

import pytest

from selfserve import device_models
from selfserve.device_models import PUMP
from selfserve.device_models import WINDOW
from selfserve.device_models import DeviceState


def reasons(model, raw, online=True):
    state = DeviceState(raw, online)
    return {f.name: model.unavailable(f, state) for f in model.functions}


def test_window_actions_follow_its_position_and_movement():
    assert reasons(WINDOW, {"position": 100, "target": 100, "moving": False}) == {
        "open": "Already open.",
        "close": "",
        "setPosition": "",
        "stop": "It isn't moving.",
    }
    assert reasons(WINDOW, {"position": 0, "target": 0, "moving": False})["close"] == "Already closed."
    moving = reasons(WINDOW, {"position": 40, "target": 100, "moving": True})
    assert set(moving.values()) == {""}  # moving: every action applies (Stop included)


def test_window_state_in_words():
    describe = WINDOW.state_text
    assert describe(DeviceState({"position": 100, "target": 100, "moving": False})) == ("Open", True)
    assert describe(DeviceState({"position": 0, "target": 0, "moving": False})) == ("Closed", True)
    assert describe(DeviceState({"position": 60, "target": 60, "moving": False})) == ("Open 60%", True)
    assert describe(DeviceState({"position": 40, "target": 100, "moving": True})) == ("Opening… (40%)", False)
    assert describe(DeviceState({"position": 70, "target": 0, "moving": "true"})) == ("Closing… (70%)", False)


def test_offline_makes_every_action_unavailable_with_when_it_will_work():
    for model, raw in ((WINDOW, {"position": 50}), (PUMP, {"running": False})):
        for reason in reasons(model, raw, online=False).values():
            assert reason == "The device is offline. This will work again when it's back online."


def test_unknown_state_allows_everything():
    assert set(reasons(PUMP, {}, online=None).values()) == {""}


def test_pump_rules_fault_and_running():
    running = reasons(PUMP, {"running": True, "fault": "", "pressure_kpa": 220})
    assert running == {"start": "Already running.", "stop": "", "setPressure": ""}
    stopped = reasons(PUMP, {"running": False, "fault": ""})
    assert stopped["stop"] == "Already stopped." and stopped["start"] == ""
    faulted = reasons(PUMP, {"running": False, "fault": "overpressure"})
    assert faulted["start"] == "Reset the fault first: press Stop pump."
    assert faulted["stop"] == ""  # Stop is how the fault is reset
    assert PUMP.state_text(DeviceState({"running": True, "pressure_kpa": 219.6, "fault": ""})) == (
        "Running at 220 kPa",
        True,
    )


def test_faults_in_words_with_the_fix():
    fault = PUMP.fault(DeviceState({"fault": "overpressure"}))
    assert fault.title == "Overpressure: the pump stopped itself"
    assert fault.fix == "Press Stop pump to reset it, then start it again at a lower pressure."
    assert PUMP.fault(DeviceState({"fault": ""})) is None
    unknown = PUMP.fault(DeviceState({"fault": "dry_run"}))
    assert unknown.title == "The device reports a fault" and "contact support" in unknown.fix
    assert WINDOW.fault(DeviceState({"position": 10})) is None  # no fault variable at all


@pytest.mark.parametrize("model", [WINDOW, PUMP])
def test_return_codes_become_sentences_never_codes(model):
    for function in model.functions:
        for code in (-1, -2, -99):
            answer = function.answer_for(code)
            assert str(code) not in answer and "code" not in answer.lower()
            assert answer.endswith(".")
    start = PUMP.function("start")
    assert "Press Stop pump to reset it" in start.answer_for(-2)


def test_the_pressure_guard_warns_above_its_limit_only():
    argument = PUMP.function("setPressure").argument
    assert argument.warns("380") == ""
    assert argument.warns("381").startswith("Above 380 kPa the pump's overpressure guard stops it")
    assert WINDOW.function("setPosition").argument.warns("100") == ""


def test_pending_text_names_the_value():
    assert WINDOW.function("setPosition").pending_text("40") == "Moving to 40%…"
    assert PUMP.function("setPressure").pending_text("250") == "The pump is changing to 250 kPa…"
    assert device_models.get("window") is WINDOW


# --- support's visit on the activity page --------------------------------------------------------


def test_a_support_visit_is_one_entry_with_reason_duration_and_pages(app):
    from helpers import make_user

    from selfserve.models import AuditEvent
    from selfserve.services import audit

    customer = make_user("visited@example.com", provisioned=False)
    staff = make_user("desk@support.example", provisioned=False)
    start = datetime.datetime(2026, 11, 30, 9, 0)
    rows = [
        ("account.signed_in", customer, {}),
        ("support.view_started", staff, {"reason": "ticket 7", "minutes": 30}),
        ("support.page_viewed", staff, {"page": "/devices", "reason": "ticket 7"}),
        ("support.page_viewed", staff, {"page": "/devices/e00f/release", "reason": "ticket 7"}),
        ("support.page_viewed", staff, {"page": "/devices", "reason": "ticket 7"}),
        ("support.view_ended", staff, {"reason": "ticket 7", "cause": "ended", "minutes": 12}),
        ("account.signed_out", customer, {}),
    ]
    for minute, (action, actor, detail) in enumerate(rows):
        event = audit.record(action, user=customer, actor=actor, **detail)
        AuditEvent.update(at=start + datetime.timedelta(minutes=minute)).where(
            AuditEvent.id == event.id
        ).execute()

    entries = audit.fold_support_visits(audit.history(customer))
    assert [getattr(e, "action", "visit") for e in entries] == [
        "account.signed_out",
        "visit",
        "account.signed_in",
    ]
    visit = entries[1]
    assert visit.reason == "ticket 7" and visit.minutes == 12
    assert visit.pages == ["/devices", "/devices/e00f/release"]
    assert visit.at == start + datetime.timedelta(minutes=1)
