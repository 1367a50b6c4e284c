"""The simulator's control interface (tests and the demo steer the simulated cloud with it).

The same operations back the HTTP routes under /_sim/ and SimulatorServer's Python methods.
Bad input raises SimError (HTTP 400); an unknown device raises KeyError (HTTP 404).
"""

import copy
import time

from selfserve.simulator.state import SimError
from selfserve.simulator.state import new_hex


def _number(value, name):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SimError(f"{name} must be a number of seconds")
    if number < 0:
        raise SimError(f"{name} must not be negative")
    return number


class Control:
    """Operations on a State that no Particle API call can do."""

    def __init__(self, state):
        self.state = state

    def _device_locked(self, device_id):
        device = self.state.devices.get(device_id)
        if device is None:
            raise KeyError(device_id)
        return device

    def device(self, device_id):
        state = self.state.device_state(device_id)
        if state is None:
            raise KeyError(device_id)
        return state

    def add_device(self, spec):
        if not isinstance(spec, dict):
            raise SimError("a device is a JSON object")
        return self.state.add_device(spec)

    def set_device(self, device_id, changes):
        """Change connectivity (online, latency, hung) and, as extensions, name, in_product,
        owner (a customer id/email, created as a shadow customer if new; null to unclaim) and a
        pump's latched fault."""
        allowed = {"online", "latency", "hung", "name", "in_product", "owner", "fault"}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise SimError(f"unknown device field(s): {', '.join(unknown)}")
        latency = _number(changes["latency"], "latency") if changes.get("latency") is not None else None
        now, now_wall = time.monotonic(), time.time()
        with self.state.lock:
            device = self._device_locked(device_id)
            if changes.get("online") is not None:
                self.state.set_online_locked(device, bool(changes["online"]), now_wall)
            if latency is not None:
                device.latency = latency
            if changes.get("hung") is not None:
                device.hung = bool(changes["hung"])
            if changes.get("name"):
                device.name = str(changes["name"])
            if changes.get("in_product") is not None:
                device.in_product = bool(changes["in_product"])
            if "owner" in changes:
                owner = changes["owner"]
                if owner:
                    owner = str(owner).lower()
                    if owner not in self.state.customers:
                        self.state.customers[owner] = {
                            "id": new_hex(24),
                            "username": owner,
                            "password": None,
                            "created_at": now_wall,
                        }
                device.owner = owner or None
            if changes.get("fault") is not None:
                if not hasattr(device.model, "set_fault"):
                    raise SimError("only pumps have a fault")
                device.model.set_fault(str(changes["fault"]), now)
                self.state.touch_locked(device)
            self.state.advance_locked(now, now_wall)
            return device.state(now)

    def publish(self, device_id, name, data):
        if not name or not isinstance(name, str):
            raise SimError("an event needs a name")
        with self.state.lock:
            device = self._device_locked(device_id)
            self.state.publish_locked(device, name, "" if data is None else str(data), time.time())

    def connect(self, device_id, claim_code=None):
        """The device comes online; with a valid claim code it is claimed to that code's customer
        (and joins the product). Returns {"ok", "online", "claimed", "owner"[, "reason"]}."""
        now_wall = time.time()
        with self.state.lock:
            device = self._device_locked(device_id)
            self.state.set_online_locked(device, True, now_wall)
            result = {"ok": True, "online": True, "claimed": False}
            if claim_code:
                info = self.state.claim_codes.get(claim_code)
                if info is None or info["expires_at"] <= now_wall:
                    result["reason"] = "claim code unknown or expired"
                elif device.owner not in (None, info["customer"]):
                    result["reason"] = "device belongs to another customer"
                else:
                    del self.state.claim_codes[claim_code]
                    device.owner = info["customer"]
                    device.in_product = True
                    device.updated_at = now_wall
                    result["claimed"] = True
            result["owner"] = device.owner
            return result

    def add_fault(self, spec):
        """Queue a fault: the next `count` requests matching method + path glob get it."""
        if not isinstance(spec, dict) or not spec.get("path"):
            raise SimError("a fault needs at least a path (fnmatch glob)")
        count = spec.get("count", 1)
        if count is not None and (not isinstance(count, int) or count < 1):
            raise SimError("count must be a positive integer (or null for every request)")
        latency = _number(spec.get("latency", 0) or 0, "latency")
        # No status given: a latency-only fault (delay, then the normal answer), else a 503.
        status = spec["status"] if "status" in spec else (None if latency else 503)
        if status is None and not latency:
            raise SimError("a fault needs a status, a latency or both")
        if status is not None and (not isinstance(status, int) or not 100 <= status <= 599):
            raise SimError("status must be an HTTP status code")
        headers = spec.get("headers") or {}
        if not isinstance(headers, dict):
            raise SimError("headers must be an object")
        fault = {
            "method": str(spec.get("method") or "*").upper(),
            "path": str(spec["path"]),
            "count": count,
            "status": status,
            "body": copy.deepcopy(spec.get("body")),
            "headers": {str(k): str(v) for k, v in headers.items()},
            "latency": latency,
        }
        with self.state.lock:
            self.state.faults.append(fault)
        return copy.deepcopy(fault)

    def add_webhook(self, spec):
        """A product webhook (INVENTED control route: the integrations API is not recorded)."""
        from selfserve.simulator.webhooks import check_hook

        hook = check_hook(spec)
        with self.state.lock:
            self.state.webhooks.append(hook)
        return copy.deepcopy(hook)

    def clear_webhooks(self):
        with self.state.lock:
            self.state.webhooks = []

    def clear_faults(self):
        with self.state.lock:
            self.state.faults = []
