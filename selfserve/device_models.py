"""The catalogue of device models: what each model's variables mean and which functions a
homeowner may run, with the argument each one takes and when to ask before running it.

The catalogue is the allow-list for function calls: a function that is not listed here is
never sent to a device, whatever the device itself reports.
"""

import dataclasses
import re

from selfserve import i18n
from selfserve.i18n import lazy_in_context as _lp
from selfserve.i18n import lazy_text as _l


@dataclasses.dataclass(frozen=True)
class Variable:
    """One cloud variable: how to label it and how to show its value."""

    name: str
    label: str
    unit: str = ""
    kind: str = "number"  # number | bool | text
    decimals: int = 0
    true_text: str = _l("Yes")
    false_text: str = _l("No")
    empty_text: str = ""  # shown for an empty text value ("" means show nothing special)

    def format(self, value):
        """The value as a homeowner reads it, without the unit."""
        if value is None:
            return "—"
        if self.kind == "bool":
            if isinstance(value, str):
                value = value.strip().lower() in ("1", "true", "yes", "on")
            return self.true_text if value else self.false_text
        if self.kind == "number":
            try:
                number = float(value)
            except (TypeError, ValueError):
                return str(value)
            return i18n.number(number, self.decimals)
        text = str(value)
        if not text and self.empty_text:
            return self.empty_text
        return text


@dataclasses.dataclass(frozen=True)
class Argument:
    """An integer argument with inclusive bounds (all our functions take at most one)."""

    label: str
    minimum: int
    maximum: int
    unit: str = ""
    # A limit the device guards inside the allowed range: above it, warn (and ask) first.
    warn_above: int = None
    warning: str = ""

    def warns(self, value):
        """The warning for a parsed value above the device's guard limit, else ""."""
        if self.warn_above is None or value in (None, ""):
            return ""
        try:
            number = int(value)
        except (TypeError, ValueError):
            return ""
        return self.warning if number > self.warn_above else ""

    def parse(self, raw):
        """Return (value as the string sent to the device, None) or (None, error message)."""
        text = (raw or "").strip()
        if not re.fullmatch(r"-?\d{1,6}", text):
            return (
                None,
                _l(
                    "Enter a whole number from %(minimum)s to %(maximum)s%(unit)s.",
                    minimum=self.minimum,
                    maximum=self.maximum,
                    unit=_with_space(self.unit),
                ),
            )
        number = int(text)
        if not self.minimum <= number <= self.maximum:
            return (
                None,
                _l(
                    "Enter a whole number from %(minimum)s to %(maximum)s%(unit)s.",
                    minimum=self.minimum,
                    maximum=self.maximum,
                    unit=_with_space(self.unit),
                ),
            )
        return str(number), None


@dataclasses.dataclass(frozen=True)
class Function:
    """One cloud function a homeowner may run."""

    name: str
    label: str
    done_text: str  # what to say when it worked
    argument: Argument = None
    confirm: str = ""  # ask this before running it ("" = no question)
    danger: bool = False  # red: an action that can do harm (not merely one that is confirmed)
    primary: bool = False  # the model's main action, styled to stand out
    # The variable whose stored value pre-fills the argument (the current target), if any.
    prefill_from: str = ""
    # Negative return values the firmware documents -> what to tell the homeowner (never the code).
    codes: dict = dataclasses.field(default_factory=dict)
    # state -> why this can't apply now ("" when it can); see DeviceState.
    unavailable_when: object = None

    def pending_text(self, arg=""):
        """What to say right after the device accepted it, before it reports the outcome."""
        return self.done_text.format(arg=arg)

    def answer_for(self, return_value):
        """A sentence for a refusal (negative return value), from the catalogue, never a code."""
        return self.codes.get(
            return_value,
            _l(
                "The device did not carry out “%(label)s”. Please try again, or contact support if it keeps happening.",
                label=self.label,
            ),
        )

    def prefill(self, raw_values):
        """The argument's starting value from stored variable values ({name: value}), as a
        whole number within bounds, or "" when unknown."""
        if self.argument is None or not self.prefill_from:
            return ""
        value = (raw_values or {}).get(self.prefill_from)
        if isinstance(value, bool):
            return ""
        try:
            number = int(round(float(value)))
        except (TypeError, ValueError):
            return ""
        if not self.argument.minimum <= number <= self.argument.maximum:
            return ""
        return str(number)

    def parse_arg(self, raw):
        """Return (arg string for Particle, None) or (None, error message)."""
        if self.argument is None:
            return "", None
        return self.argument.parse(raw)


@dataclasses.dataclass(frozen=True)
class AlertKind:
    """A kind of alert a homeowner can get (services/alerts.py): on by default as `default`
    ("now", "digest" or "off")."""

    key: str
    label: str
    description: str
    default: str = "now"
    fault: bool = False  # goes through quiet hours unless the person says otherwise


ALERT_KINDS = {
    kind.key: kind
    for kind in (
        AlertKind(
            "offline", _l("Device offline"), _l("The device has been offline longer than its grace time.")
        ),
        AlertKind("back_online", _l("Back online"), _l("A device you were told was offline is back.")),
        AlertKind(
            "fault",
            _l("Pump fault"),
            _l("The pump reports a fault (overpressure or any other fault)."),
            fault=True,
        ),
        AlertKind(
            "battery_low",
            _l("Battery low"),
            _l("A window covering's battery is running low."),
            default="digest",
        ),
        AlertKind(
            "transfer_stuck",
            _l("Transfer or release stuck"),
            _l("Handing over or releasing one of your devices is not finishing."),
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class Fault:
    """A fault a device reports (its `fault` variable): what happened and what to do, in words."""

    code: str
    title: str
    text: str
    fix: str


@dataclasses.dataclass(frozen=True)
class DeviceState:
    """What the catalogue's rules look at: the raw values and whether the device is online
    (None: not known yet)."""

    raw: dict
    online: bool = None

    def number(self, name):
        value = (self.raw or {}).get(name)
        if isinstance(value, bool) or value is None:
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            return None

    def flag(self, name):
        value = (self.raw or {}).get(name)
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value) if value is not None else None

    def text(self, name):
        value = (self.raw or {}).get(name)
        return "" if value is None else str(value).strip()


OFFLINE_REASON = _l("The device is offline. This will work again when it's back online.")


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    key: str
    label: str
    variables: tuple
    functions: tuple
    summary: tuple  # variable names shown on the dashboard card
    charts: tuple = ()  # numeric variables charted on the device page (history)
    alerts: tuple = ()  # keys of ALERT_KINDS this model can raise
    offline_grace_minutes: int = 60  # offline this long before the "offline" alert
    battery_low_v: float = None  # "battery low" below this voltage
    icon: str = "device"  # the sprite symbol (templates/_icons.svg)
    noun: str = ""  # the label inside a sentence ("a window covering"), translated on its own
    faults: tuple = ()  # known Fault codes; an unknown code still shows, in general words
    describe: object = None  # DeviceState -> (sentence, settled: bool)

    def fault(self, state):
        """The Fault the device reports now, or None."""
        code = state.text("fault") if any(v.name == "fault" for v in self.variables) else ""
        if not code:
            return None
        for fault in self.faults:
            if fault.code == code:
                return fault
        return Fault(
            code,
            _l("The device reports a fault"),
            _l("It says “%(code)s”.", code=code),
            _l("Stop it, then contact support if the fault doesn't clear."),
        )

    def unavailable(self, function, state):
        """Why `function` can't apply in this state ("" when it can)."""
        if state.online is False:
            return OFFLINE_REASON
        if function.unavailable_when is None or not state.raw:
            return ""
        return function.unavailable_when(state) or ""

    def state_text(self, state):
        """(what the device is doing, in a few words; settled: nothing is changing)."""
        if self.describe is None or not state.raw:
            return "", True
        return self.describe(state)

    def variable(self, name):
        for variable in self.variables:
            if variable.name == name:
                return variable
        return None

    def function(self, name):
        for function in self.functions:
            if function.name == name:
                return function
        return None


def _with_space(unit):
    if not unit:
        return ""
    return unit if unit == "%" else " " + unit


def _window_moving(state):
    return bool(state.flag("moving"))


def _window_describe(state):
    position, target = state.number("position"), state.number("target")
    if position is None:
        return "", True
    here = f"{position:.0f}%"
    if _window_moving(state) and target is not None:
        if target >= 100:
            return _l("Opening… (%(position)s)", position=here), False
        if target <= 0:
            return _l("Closing… (%(position)s)", position=here), False
        return _l("Moving to %(target)s%% (%(here)s now)", target=format(target, ".0f"), here=here), False
    if position >= 100:
        return _lp("window state", "Open"), True
    if position <= 0:
        return _l("Closed"), True
    return _l("Open %(position)s", position=here), True


def _already_open(state):
    position = state.number("position")
    return (
        _l("Already open.") if position is not None and position >= 100 and not _window_moving(state) else ""
    )


def _already_closed(state):
    position = state.number("position")
    return (
        _l("Already closed.") if position is not None and position <= 0 and not _window_moving(state) else ""
    )


def _not_moving(state):
    return _l("It isn't moving.") if state.flag("moving") is False else ""


WINDOW = DeviceModel(
    key="window",
    label=_l("Window covering"),
    noun=_l("window covering"),
    variables=(
        Variable("position", _l("Position"), "%", decimals=0),
        Variable("target", _l("Target position"), "%", decimals=0),
        Variable("moving", _l("Moving"), kind="bool", true_text=_l("Moving"), false_text=_l("Still")),
        Variable("battery_v", _l("Battery"), "V", decimals=2),
        Variable("fw_version", _l("Firmware"), kind="text"),
    ),
    functions=(
        Function("open", _l("Open"), _l("Opening…"), unavailable_when=_already_open),
        Function("close", _l("Close"), _l("Closing…"), unavailable_when=_already_closed),
        Function(
            "setPosition",
            _l("Set position"),
            _l("Moving to {arg}%…"),
            argument=Argument(_l("Position (0 = closed, 100 = open)"), 0, 100, "%"),
            prefill_from="target",
            codes={-1: _l("The blind didn't accept that position: it takes 0 (closed) to 100 (open).")},
        ),
        Function("stop", _l("Stop"), _l("Stopping…"), unavailable_when=_not_moving),
    ),
    summary=("position", "moving"),
    charts=("position",),
    alerts=("offline", "back_online", "battery_low", "transfer_stuck"),
    offline_grace_minutes=60,
    battery_low_v=3.4,
    icon="window",
    describe=_window_describe,
)

PUMP_GUARD_KPA = 380  # the firmware's overpressure guard stops the pump above this


def _pump_describe(state):
    fault = state.text("fault")
    running = state.flag("running")
    pressure = state.number("pressure_kpa")
    if fault:
        return _l("Stopped by a fault"), True
    if running:
        return (
            _l("Running at %(pressure)s kPa", pressure=format(pressure, ".0f"))
            if pressure is not None
            else _l("Running")
        ), True
    if running is False:
        return _l("Stopped"), True
    return "", True


def _pump_start_unavailable(state):
    if state.text("fault"):
        return _l("Reset the fault first: press Stop pump.")
    return _l("Already running.") if state.flag("running") else ""


def _pump_stop_unavailable(state):
    return _l("Already stopped.") if state.flag("running") is False and not state.text("fault") else ""


PUMP = DeviceModel(
    key="pump",
    label=_l("Pump controller"),
    noun=_l("pump controller"),
    variables=(
        Variable("pressure_kpa", _l("Pressure"), "kPa", decimals=0),
        Variable("flow_lpm", _l("Flow"), "L/min", decimals=1),
        Variable("running", _l("Running"), kind="bool", true_text=_l("Running"), false_text=_l("Stopped")),
        Variable("runtime_h", _l("Run time"), "h", decimals=1),
        Variable("fault", _l("Fault"), kind="text", empty_text=_l("None")),
    ),
    functions=(
        Function(
            "start",
            _l("Start pump"),
            _l("The pump is starting…"),
            confirm=_l("Start the pump? Water will flow as soon as it runs."),
            primary=True,
            codes={
                -2: _l(
                    "The pump didn't start: it stopped itself because of a fault. Press Stop pump to reset it, then start it again."
                ),
            },
            unavailable_when=_pump_start_unavailable,
        ),
        Function(
            "stop",
            _l("Stop pump"),
            _l("The pump is stopping…"),
            # Stopping is the safe action: asked first, but not styled as dangerous.
            confirm=_l("Stop the pump? Anything that depends on it will stop getting water."),
            unavailable_when=_pump_stop_unavailable,
        ),
        Function(
            "setPressure",
            _l("Set pressure"),
            _l("The pump is changing to {arg} kPa…"),
            # No prefill: the pump's firmware reports its pressure, not its set point, and a
            # reading is not what the homeowner last asked for.
            argument=Argument(
                _l("Pressure (50 to 400 kPa)"),
                50,
                400,
                "kPa",
                warn_above=PUMP_GUARD_KPA,
                warning=(
                    _l(
                        "Above %(limit)s kPa the pump's overpressure guard stops it, and it stays stopped until you reset it with Stop pump.",
                        limit=PUMP_GUARD_KPA,
                    )
                ),
            ),
            codes={-1: _l("The pump didn't accept that pressure: it takes 50 to 400 kPa.")},
        ),
    ),
    summary=("running", "pressure_kpa", "fault"),
    charts=("pressure_kpa", "flow_lpm", "runtime_h"),
    alerts=("offline", "back_online", "fault", "transfer_stuck"),
    offline_grace_minutes=15,
    icon="pump",
    faults=(
        Fault(
            "overpressure",
            _l("Overpressure: the pump stopped itself"),
            _l(
                "The pressure went above %(limit)s kPa, so its guard switched it off.",
                limit=PUMP_GUARD_KPA,
            ),
            _l("Press Stop pump to reset it, then start it again at a lower pressure."),
        ),
    ),
    describe=_pump_describe,
)

MODELS = {model.key: model for model in (WINDOW, PUMP)}


def argument_text(function_label, arg):
    """An argument as the activity page shows it ("40%", "220 kPa"), found by the function's
    label as the audit trail records it; the bare value for a label we don't know."""
    for model in MODELS.values():
        for function in model.functions:
            if i18n.english(function.label) == function_label and function.argument is not None:
                return f"{arg}{_with_space(function.argument.unit)}"
    return str(arg)


def get(key):
    """The DeviceModel for `key`, or None for a model we don't know."""
    return MODELS.get(key)


def label(key):
    model = MODELS.get(key)
    return model.label if model else _l("Device")


def device_label(device):
    """ "Window covering SSW-24A-000101", in the language of whoever reads it (lazy: an email
    is rendered in its recipient's)."""
    return _l("%(model)s %(serial)s", model=label(device.model), serial=device.serial_number)


def noun(key):
    """The model's name inside a sentence ("a window covering", "einen Fensterbehang")."""
    model = MODELS.get(key)
    return model.noun if model else _l("device")
