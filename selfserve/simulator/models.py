"""Behaviour of the simulated controllers (window covering, pump) over real elapsed time.

Nothing runs in the background: every value is computed from the time of the last command and
the time now. `advance(now)` returns the events the device would have published since the last
call (the simulator calls it under its lock whenever a request or an event stream looks).
Times are `time.monotonic()` seconds.
"""

import math
import zlib

# A window covering moves about 10 % of its travel per second.
WINDOW_SPEED = 10.0
# Pump pressure approaches its set point (running) or zero (stopped) with these time constants.
PUMP_RISE_SECONDS = 2.0
PUMP_DECAY_SECONDS = 6.0
PUMP_MAX_KPA = 380.0
PUMP_DEFAULT_SETPOINT = 250.0
LITRES_PER_MINUTE_PER_KPA = 0.08
# The firmware publishes its state when the pressure has moved by this much (kPa).
PUMP_PUBLISH_KPA = 5.0


def _phase(device_id):
    """A stable per-device phase so two devices of one model don't show identical values."""
    return (zlib.crc32(device_id.encode()) % 6283) / 1000.0


class WindowModel:
    """Motorised window covering. Variables: position, target (int32 0-100), moving (bool),
    battery_v (double), fw_version (string). Functions: open, close, setPosition ("0".."100"),
    stop. Publishes "position" every 10 % of travel and on arrival."""

    kind = "window"
    variables = {
        "position": "int32",
        "target": "int32",
        "moving": "bool",
        "battery_v": "double",
        "fw_version": "string",
    }
    functions = ["open", "close", "setPosition", "stop"]

    def __init__(self, device_id, now, position=0, **_ignored):
        self.device_id = device_id
        self.phase = _phase(device_id)
        self.start_position = float(position)
        self.start_time = now
        self.target = int(position)
        self.last_reported = int(position)

    def _position(self, now):
        distance = self.target - self.start_position
        travelled = WINDOW_SPEED * max(0.0, now - self.start_time)
        if abs(distance) <= travelled:
            return float(self.target)
        return self.start_position + math.copysign(travelled, distance)

    def position(self, now):
        """Whole percent, rounded toward where it started: it reads `target` only on arrival."""
        exact = self._position(now)
        return math.floor(exact) if self.target >= self.start_position else math.ceil(exact)

    def _move_to(self, target, now):
        self.start_position = self._position(now)
        self.start_time = now
        self.target = int(target)

    def read(self, name, now):
        if name == "position":
            return self.position(now)
        if name == "target":
            return self.target
        if name == "moving":
            return self._position(now) != float(self.target)
        if name == "battery_v":
            return round(3.7 + 0.05 * math.sin(now / 600.0 + self.phase), 3)
        if name == "fw_version":
            return "2.1.0"
        raise KeyError(name)

    def call(self, name, arg, now):
        """Run a function; return Particle's return_value (negative for a bad argument)."""
        if name == "open":
            self._move_to(100, now)
            return 1
        if name == "close":
            self._move_to(0, now)
            return 1
        if name == "stop":
            here = self.position(now)
            self.start_position, self.start_time, self.target = float(here), now, here
            return 1
        if name == "setPosition":
            text = arg.strip()
            if not text.isdigit() or not 0 <= int(text) <= 100:
                return -1
            self._move_to(int(text), now)
            return 1
        raise KeyError(name)

    def active(self, now):
        return self.last_reported != self.target or self._position(now) != float(self.target)

    def advance(self, now):
        position = self.position(now)
        arrived = self._position(now) == float(self.target)
        if abs(position - self.last_reported) >= 10 or (arrived and position != self.last_reported):
            self.last_reported = position
            return [("position", str(position))]
        return []

    def snapshot(self, now):
        return {name: self.read(name, now) for name in self.variables}

    def settling(self, now):
        """True while the state still changes by itself (the firmware keeps publishing)."""
        return self._position(now) != float(self.target)

    @staticmethod
    def significant(old, new):
        """Whether the firmware publishes a state event for this change (the battery drifts
        slowly and is left to the heartbeat)."""
        return any(old.get(name) != new.get(name) for name in ("position", "target", "moving", "fw_version"))


class PumpModel:
    """Pump controller. Variables: pressure_kpa, flow_lpm, runtime_h (double), running (bool),
    fault (string, "" when none). Functions: start, stop, setPressure ("50".."400" kPa).
    Pressure rises toward the set point while running and decays when stopped; a set point
    above 380 kPa trips an "overpressure" fault that stops the pump (published as "fault").
    `start` with a latched fault answers -2; `stop` clears the fault."""

    kind = "pump"
    variables = {
        "pressure_kpa": "double",
        "flow_lpm": "double",
        "running": "bool",
        "runtime_h": "double",
        "fault": "string",
    }
    functions = ["start", "stop", "setPressure"]

    def __init__(
        self, device_id, now, running=False, setpoint=PUMP_DEFAULT_SETPOINT, runtime_h=0.0, **_ignored
    ):
        self.device_id = device_id
        self.phase = _phase(device_id)
        self.setpoint = float(setpoint)
        self.running = bool(running)
        self.start_pressure = self.setpoint if self.running else 0.0
        self.start_time = now
        self.runtime_base = float(runtime_h)
        self.fault = ""
        self.pending_events = []

    def _base_pressure(self, now):
        elapsed = max(0.0, now - self.start_time)
        if self.running:
            gap = self.start_pressure - self.setpoint
            return self.setpoint + gap * math.exp(-elapsed / PUMP_RISE_SECONDS)
        return self.start_pressure * math.exp(-elapsed / PUMP_DECAY_SECONDS)

    def _rebase(self, now):
        self.runtime_base = self._runtime(now)
        self.start_pressure = self._base_pressure(now)
        self.start_time = now

    def _runtime(self, now):
        if not self.running:
            return self.runtime_base
        return self.runtime_base + max(0.0, now - self.start_time) / 3600.0

    def _trip_time(self):
        """When a running pump crosses PUMP_MAX_KPA (None if it never does)."""
        if not self.running or self.setpoint <= PUMP_MAX_KPA or self.start_pressure >= PUMP_MAX_KPA:
            return None
        ratio = (self.start_pressure - self.setpoint) / (PUMP_MAX_KPA - self.setpoint)
        return self.start_time + PUMP_RISE_SECONDS * math.log(ratio)

    def _settle(self, now):
        """Apply a trip that happened before `now`, so reads never see an impossible state."""
        trip = self._trip_time()
        if trip is not None and trip <= now:
            self._rebase(trip)
            self.start_pressure = PUMP_MAX_KPA
            self.running = False
            self.fault = "overpressure"
            self.pending_events.append(("fault", "overpressure"))
            self.pending_events.append(("running", "false"))

    def read(self, name, now):
        self._settle(now)
        ripple = 1.5 * math.sin(now * 1.3 + self.phase) if self.running else 0.0
        pressure = max(0.0, self._base_pressure(now) + ripple)
        if name == "pressure_kpa":
            return round(pressure, 1)
        if name == "flow_lpm":
            return round(pressure * LITRES_PER_MINUTE_PER_KPA, 2)
        if name == "running":
            return self.running
        if name == "runtime_h":
            return round(self._runtime(now), 4)
        if name == "fault":
            return self.fault
        raise KeyError(name)

    def call(self, name, arg, now):
        """Run a function; return Particle's return_value (negative for a bad argument)."""
        self._settle(now)
        if name == "start":
            if self.fault:
                return -2
            if not self.running:
                self._rebase(now)
                self.running = True
                self.pending_events.append(("running", "true"))
            return 1
        if name == "stop":
            if self.running:
                self._rebase(now)
                self.running = False
                self.pending_events.append(("running", "false"))
            self.fault = ""
            return 1
        if name == "setPressure":
            text = arg.strip()
            try:
                value = float(text)
            except ValueError:
                return -1
            if not math.isfinite(value) or not 50.0 <= value <= 400.0:
                return -1
            self._rebase(now)
            self.setpoint = value
            return 1
        raise KeyError(name)

    def set_fault(self, fault, now):
        """Latch a fault from the control API (stops the pump)."""
        self._settle(now)
        if self.running:
            self._rebase(now)
            self.running = False
            self.pending_events.append(("running", "false"))
        self.fault = fault
        if fault:
            self.pending_events.append(("fault", fault))

    def active(self, now):
        return bool(self.pending_events) or self._trip_time() is not None

    def advance(self, now):
        self._settle(now)
        events, self.pending_events = self.pending_events, []
        return events

    def snapshot(self, now):
        return {name: self.read(name, now) for name in self.variables}

    def settling(self, now):
        """True while the pressure still moves toward its set point (or toward zero)."""
        self._settle(now)
        goal = self.setpoint if self.running else 0.0
        return abs(self._base_pressure(now) - goal) > PUMP_PUBLISH_KPA / 2

    @staticmethod
    def significant(old, new):
        """Running or fault changed, or the pressure moved by PUMP_PUBLISH_KPA (the ripple of
        a running pump does not count; runtime is left to the heartbeat)."""
        if old.get("running") != new.get("running") or old.get("fault") != new.get("fault"):
            return True
        return (
            abs(float(old.get("pressure_kpa") or 0) - float(new.get("pressure_kpa") or 0)) >= PUMP_PUBLISH_KPA
        )


MODELS = {"window": WindowModel, "pump": PumpModel}
