"""The simulated Particle Cloud's state: product, devices, customers, tokens, claim codes,
faults, counters, rate limits, event subscribers, configuration.

One lock (`State.lock`) guards everything here. Hold it only to read or change state, never
while sleeping or writing to a socket.
"""

import copy
import datetime
import heapq
import json
import math
import os
import queue
import re
import secrets
import threading
import time
from collections import deque

from selfserve.simulator.models import MODELS

# The firmware contract (README, "What the devices publish"): the company's firmware publishes
# its whole state as one JSON event of this name when it changes and as a heartbeat.
STATE_EVENT = "selfserve/state"
STATE_EVENT_VERSION = 1
# Particle allows about one publish per second per device (reference §16).
MIN_PUBLISH_INTERVAL = 1.0
FIRMWARES = ("current", "legacy")  # legacy: older firmware that publishes no state events

DEFAULT_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "demo.json")

DEVICE_ID_RE = re.compile(r"^[0-9a-f]{24}$")
CLAIM_CODE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
CLAIM_CODE_SECONDS = 3600
DEFAULT_TOKEN_SECONDS = 7776000
REFRESH_EXTRA_SECONDS = 14 * 24 * 3600

DEFAULT_CONFIG = {
    "rate_limit": {"requests": 10000, "window": 300},
    "token_rate_limit": {"requests": 100, "window": 300},
    "token_lockout": {"failures": 10, "seconds": 1800},
    "legacy_errors": False,
    "cloud_timeout": 30.0,
    "issue_tokens": [],
    "reject_query_tokens": False,
    "duplicate_customer_error": {
        "status": 400,
        # error_description is invented (the real text is unknown, reference §5.1).
        "body": {"error": "customer_exists", "error_description": "Customer already exists"},
    },
    # Extensions beyond the contract: SSE keep-alive interval, default token lifetime.
    "sse_keepalive": 9.0,
    "default_expires_in": DEFAULT_TOKEN_SECONDS,
    # Event-stream opens per source address (reference §11/§12: 100 per 5 minutes).
    "stream_rate_limit": {"requests": 100, "window": 300},
    # The firmware's heartbeat: every device with current firmware publishes its state at
    # least this often (a device's own "heartbeat" fixture field wins).
    "heartbeat_seconds": 120.0,
    # Webhook retries after a failed delivery (reference §16: after 30 s and 1 min, then dropped).
    "webhook_retry_seconds": [30.0, 60.0],
}


def iso(timestamp):
    """ISO-8601 UTC with milliseconds and Z, as Particle writes timestamps."""
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def new_hex(length):
    return secrets.token_hex(length // 2)


def load_fixtures(fixtures):
    """Parse fixtures given as a path, a dict, or None (the shipped demo fixtures)."""
    if fixtures is None:
        fixtures = DEFAULT_FIXTURES
    if isinstance(fixtures, (str, os.PathLike)):
        with open(fixtures, encoding="utf-8") as handle:
            return json.load(handle)
    return copy.deepcopy(fixtures)


class SimError(ValueError):
    """Bad input to the control API (message is shown to the caller)."""


class Device:
    """One simulated device: identity, label, product membership, owner, connectivity, model."""

    def __init__(self, spec, now_wall, now):
        device_id = str(spec.get("id", "")).strip()
        if not DEVICE_ID_RE.match(device_id):
            raise SimError(f"device id must be 24 lowercase hex characters: {device_id!r}")
        model = spec.get("model", "window")
        if model not in MODELS:
            raise SimError(f"model must be one of {sorted(MODELS)}: {model!r}")
        self.id = device_id
        self.serial_number = str(spec.get("serial_number") or ("SIM" + device_id[-12:].upper()))
        self.setup_code = str(spec.get("setup_code") or device_id[-8:].upper())
        self.platform_id = int(spec.get("platform_id", 12))
        self.model_name = model
        self.name = str(spec.get("name") or f"{model}_{device_id[-6:]}")
        self.online = bool(spec.get("online", True))
        self.latency = float(spec.get("latency", 0) or 0)
        self.hung = bool(spec.get("hung", False))
        self.in_product = bool(spec.get("in_product", False))
        self.firmware = str(spec.get("firmware") or "current")
        if self.firmware not in FIRMWARES:
            raise SimError(f"firmware must be one of {list(FIRMWARES)}: {self.firmware!r}")
        heartbeat = spec.get("heartbeat")
        self.heartbeat = float(heartbeat) if heartbeat else None  # None: the configured default
        self.published_state = None  # the variables of the last state event
        self.published_state_at = None  # monotonic time of it
        self.owner = None  # customer username (lowercased "email") or None
        self.notes = None
        self.last_heard = now_wall
        self.last_handshake_at = now_wall - 3600
        self.updated_at = now_wall
        self.model = MODELS[model](device_id, now, **spec.get("state", {}))

    def state(self, now):
        return {
            "id": self.id,
            "name": self.name,
            "serial_number": self.serial_number,
            "setup_code": self.setup_code,
            "platform_id": self.platform_id,
            "model": self.model_name,
            "in_product": self.in_product,
            "owner": self.owner,
            "online": self.online,
            "latency": self.latency,
            "hung": self.hung,
            "firmware": self.firmware,
            "heartbeat": self.heartbeat,
            "variables": self.model.snapshot(now),
        }


class Subscriber:
    """An open event stream: who may see what, and the queue its frames come from."""

    def __init__(self, kind, customer=None, device_id=None, prefix=None):
        self.kind = kind  # "customer" | "product"
        self.customer = customer
        self.device_id = device_id
        self.prefix = prefix or ""
        self.queue = queue.Queue()
        self.closed = False


class State:
    """Everything the simulator knows. Methods marked `_locked` expect `self.lock` held."""

    def __init__(self, product, client_id, client_secret, fixtures=None):
        self.lock = threading.Lock()
        self.client_id = client_id
        self.client_secret = client_secret
        self.product_setting = str(product)
        self.fixtures = load_fixtures(fixtures)
        self.subscribers = []
        self.webhooks = []
        self.webhook_queue = queue.Queue()
        self.reset()

    # --- lifecycle ------------------------------------------------------------------------

    def reset(self):
        """Back to the fixtures: no customers, tokens, faults; counters 0; default config."""
        fixture_product = self.fixtures.get("product", {})
        product_id = int(fixture_product.get("id", 4242))
        slug = str(fixture_product.get("slug", "selfserve-demo"))
        if self.product_setting.isdigit():
            product_id = int(self.product_setting)
        elif self.product_setting:
            slug = self.product_setting
        now_wall, now = time.time(), time.monotonic()
        devices = {}
        for spec in self.fixtures.get("devices", []):
            device = Device(spec, now_wall, now)
            devices[device.id] = device
        with self.lock:
            self.product = {
                "id": product_id,
                "slug": slug,
                "platform_id": int(fixture_product.get("platform_id", 12)),
            }
            self.devices = devices
            # Devices that may still publish something on their own (see advance_locked).
            self.active = set(devices)
            # (monotonic due time, device id): when each device's next heartbeat is due.
            self.heartbeats = []
            self.customers = {}  # username -> {"id", "username", "password", "created_at"}
            self.tokens = {}  # access token -> {"kind", "customer", "client_id", "expires_at"}
            self.refresh_tokens = {}  # refresh token -> {"kind", "customer", "client_id", "expires_at"}
            self.claim_codes = {}  # code -> {"customer", "expires_at"}
            self.faults = []
            self.config = copy.deepcopy(DEFAULT_CONFIG)
            self.counters = {}
            self.total = 0
            self.request_log = {}  # ip -> deque of monotonic times (general limit)
            self.token_request_log = {}  # ip -> deque (token endpoint limit)
            self.token_failures = {}  # ip -> consecutive failures
            self.token_locked_until = {}  # ip -> monotonic time
            self.stream_log = {}  # ip -> deque (event stream opens)
            self.webhooks = []
            self.webhook_log = {"sent": 0, "failed": 0, "dropped": 0}
            for device in devices.values():
                self.schedule_heartbeat_locked(device, now, first=True)
            old_subscribers, self.subscribers = self.subscribers, []
        for subscriber in old_subscribers:
            subscriber.closed = True
            subscriber.queue.put(None)

    # --- identities -------------------------------------------------------------------------

    def product_matches(self, product):
        return product == str(self.product["id"]) or product == self.product["slug"]

    def new_token_locked(self):
        queued = self.config.get("issue_tokens") or []
        while queued:
            token = str(queued.pop(0)).lower()
            if token not in self.tokens and token not in self.refresh_tokens:
                return token
        while True:
            token = new_hex(40)
            if token not in self.tokens and token not in self.refresh_tokens:
                return token

    def issue_token_locked(self, kind, customer, client_id, expires_in, now_wall):
        """Create an access token (+ refresh token unless it never expires); return the body."""
        access = self.new_token_locked()
        body = {"token_type": "bearer", "access_token": access, "expires_in": int(expires_in)}
        expires_at = None if expires_in == 0 else now_wall + expires_in
        self.tokens[access] = {
            "kind": kind,
            "customer": customer,
            "client_id": client_id,
            "expires_at": expires_at,
        }
        if expires_at is not None:
            refresh = self.new_token_locked()
            self.refresh_tokens[refresh] = {
                "kind": kind,
                "customer": customer,
                "client_id": client_id,
                "expires_at": expires_at + REFRESH_EXTRA_SECONDS,
            }
            body["refresh_token"] = refresh
        if customer is not None:
            body["scope"] = f"customer={customer}"
        return body

    def revoke_customer_locked(self, username):
        for store in (self.tokens, self.refresh_tokens):
            for token in [t for t, info in store.items() if info["customer"] == username]:
                del store[token]
        for code in [c for c, info in self.claim_codes.items() if info["customer"] == username]:
            del self.claim_codes[code]

    def new_claim_code_locked(self, username, now_wall):
        code = "".join(secrets.choice(CLAIM_CODE_ALPHABET) for _ in range(63))
        self.claim_codes[code] = {"customer": username, "expires_at": now_wall + CLAIM_CODE_SECONDS}
        return code

    def owned_by_locked(self, username):
        return sorted(d.id for d in self.devices.values() if d.owner == username)

    # --- devices ------------------------------------------------------------------------------

    def add_device(self, spec):
        device = Device(spec, time.time(), time.monotonic())
        with self.lock:
            if device.id in self.devices:
                raise SimError(f"device {device.id} already exists")
            self.devices[device.id] = device
            self.active.add(device.id)
            self.schedule_heartbeat_locked(device, time.monotonic(), first=True)
            return device.state(time.monotonic())

    def set_online_locked(self, device, online, now_wall):
        if device.online == online:
            return
        device.online = online
        device.last_heard = now_wall
        if online:
            device.last_handshake_at = now_wall
        self.publish_locked(device, "spark/status", "online" if online else "offline", now_wall)
        if online:
            # The firmware publishes its state as soon as it is connected.
            self.publish_state_locked(device, time.monotonic(), now_wall, force=True)

    def touch_locked(self, device):
        """Note that `device` was commanded: it may publish events as time passes."""
        self.active.add(device.id)

    def advance_locked(self, now, now_wall):
        """Let every active device publish what it would have published by now.

        Only devices touched since they last went quiet are looked at, so this stays cheap with
        thousands of devices (it runs on every request and every stream tick).
        """
        for device_id in list(self.active):
            device = self.devices.get(device_id)
            if device is None:
                self.active.discard(device_id)
                continue
            if not device.online:
                continue
            for name, data in device.model.advance(now):
                if device.firmware != "legacy":
                    self.publish_locked(device, name, data, now_wall)
            waiting = self.publish_state_locked(device, now, now_wall) == "wait"
            if not (device.model.active(now) or device.model.settling(now) or waiting):
                self.active.discard(device_id)
        while self.heartbeats and self.heartbeats[0][0] <= now:
            _, device_id = heapq.heappop(self.heartbeats)
            device = self.devices.get(device_id)
            if device is None:
                continue
            every = self.heartbeat_of_locked(device)
            last = device.published_state_at
            if last is not None and now - last < every - 0.001:
                heapq.heappush(self.heartbeats, (last + every, device_id))  # published since
                continue
            self.publish_state_locked(device, now, now_wall, force=True)
            heapq.heappush(self.heartbeats, (now + every, device_id))

    # --- the firmware contract: state events and heartbeats -------------------------------------

    def heartbeat_of_locked(self, device):
        return float(device.heartbeat or self.config["heartbeat_seconds"])

    def schedule_heartbeat_locked(self, device, now, first=False):
        every = self.heartbeat_of_locked(device)
        # The first heartbeats of a fleet are spread over the second period after a reset (devices
        # boot at different times; none in the first period, so a short test sees none unasked).
        offset = (1 + (int(device.id[-6:], 16) % 1000) / 1000.0) * every if first else every
        heapq.heappush(self.heartbeats, (now + offset, device.id))

    def state_payload_locked(self, device, values):
        every = self.heartbeat_of_locked(device)
        return {"v": STATE_EVENT_VERSION, "hb": int(every) if every == int(every) else every, **values}

    def publish_state_locked(self, device, now, now_wall, force=False):
        """Publish the device's state event when it changed (or `force`: heartbeat, connect).

        Returns True when published, "wait" when a change waits for the one-per-second limit,
        False otherwise. Offline devices and legacy firmware publish nothing."""
        if not device.online or device.firmware == "legacy":
            return False
        values = device.model.snapshot(now)
        previous = device.published_state
        if not force and previous is not None and not device.model.significant(previous, values):
            return False
        if not force and device.published_state_at is not None:
            if now - device.published_state_at < MIN_PUBLISH_INTERVAL:
                return "wait"
        data = json.dumps(self.state_payload_locked(device, values), separators=(",", ":"))
        device.published_state, device.published_state_at = values, now
        self.publish_locked(device, STATE_EVENT, data, now_wall)
        return True

    # --- events -------------------------------------------------------------------------------

    def publish_locked(self, device, name, data, now_wall):
        payload = {"data": data, "ttl": 60, "published_at": iso(now_wall), "coreid": device.id}
        frame = f"event: {name}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"
        for subscriber in self.subscribers:
            if subscriber.closed or not name.startswith(subscriber.prefix):
                continue
            if subscriber.device_id is not None and subscriber.device_id != device.id:
                continue
            if subscriber.kind == "customer" and device.owner != subscriber.customer:
                continue
            if subscriber.kind == "product" and not device.in_product:
                continue
            subscriber.queue.put(frame)
        if device.in_product:
            for hook in self.webhooks:
                if name.startswith(hook["event"]):
                    body = {
                        "event": name,
                        "data": data,
                        "coreid": device.id,
                        "published_at": payload["published_at"],
                    }
                    self.webhook_queue.put((hook, body, 0))

    def drop_streams(self, kind=None):
        """Close open event streams (all, or of one kind: "product" | "customer") as a dropped
        connection would; returns how many."""
        with self.lock:
            dropped = [s for s in self.subscribers if kind is None or s.kind == kind]
            for subscriber in dropped:
                subscriber.closed = True
                subscriber.queue.put(None)
            self.subscribers = [s for s in self.subscribers if s not in dropped]
        return len(dropped)

    def open_streams(self, kind=None):
        with self.lock:
            return sum(1 for s in self.subscribers if not s.closed and (kind is None or s.kind == kind))

    def subscribe(self, subscriber):
        with self.lock:
            self.subscribers.append(subscriber)

    def unsubscribe(self, subscriber):
        with self.lock:
            subscriber.closed = True
            if subscriber in self.subscribers:
                self.subscribers.remove(subscriber)

    # --- rate limits ----------------------------------------------------------------------------

    @staticmethod
    def _window_hit_locked(log, ip, limit, now):
        """Record a request in a sliding window; return seconds to wait if over the limit."""
        requests = int(limit["requests"])
        window = float(limit["window"])
        entries = log.setdefault(ip, deque())
        while entries and entries[0] <= now - window:
            entries.popleft()
        if len(entries) >= requests:
            wait = entries[0] + window - now if entries else window
            return max(1, math.ceil(wait))
        entries.append(now)
        return 0

    def check_rate_locked(self, ip, now):
        return self._window_hit_locked(self.request_log, ip, self.config["rate_limit"], now)

    def check_stream_rate_locked(self, ip, now):
        return self._window_hit_locked(self.stream_log, ip, self.config["stream_rate_limit"], now)

    def check_token_rate_locked(self, ip, now):
        return self._window_hit_locked(self.token_request_log, ip, self.config["token_rate_limit"], now)

    def token_lockout_wait_locked(self, ip, now):
        until = self.token_locked_until.get(ip, 0)
        return max(1, math.ceil(until - now)) if until > now else 0

    def record_token_result_locked(self, ip, ok, now):
        if ok:
            self.token_failures.pop(ip, None)
            return
        failures = self.token_failures.get(ip, 0) + 1
        lockout = self.config["token_lockout"]
        if failures >= int(lockout["failures"]):
            self.token_locked_until[ip] = now + float(lockout["seconds"])
            failures = 0
        self.token_failures[ip] = failures

    # --- control-API views ----------------------------------------------------------------------

    def device_state(self, device_id):
        with self.lock:
            device = self.devices.get(device_id)
            if device is None:
                return None
            return device.state(time.monotonic())

    def snapshot(self):
        now = time.monotonic()
        with self.lock:
            self.advance_locked(now, time.time())
            return {
                "product": dict(self.product),
                "devices": [d.state(now) for d in self.devices.values()],
                "customers": [
                    {
                        "id": c["id"],
                        "username": c["username"],
                        "devices": self.owned_by_locked(c["username"]),
                        "tokens": sum(1 for t in self.tokens.values() if t["customer"] == c["username"]),
                    }
                    for c in self.customers.values()
                ],
                "claim_codes": len(self.claim_codes),
                "webhooks": copy.deepcopy(self.webhooks),
                "webhook_log": dict(self.webhook_log),
                "faults": copy.deepcopy(self.faults),
                "config": copy.deepcopy(self.config),
            }

    def counter_snapshot(self):
        with self.lock:
            return {"routes": dict(self.counters), "total": self.total}

    def reset_counters(self):
        with self.lock:
            self.counters = {}
            self.total = 0

    def configure(self, options):
        """Merge control-API options into the config; unknown keys are an error."""
        unknown = sorted(set(options) - set(DEFAULT_CONFIG))
        if unknown:
            raise SimError(f"unknown config option(s): {', '.join(unknown)}")
        for key in ("rate_limit", "token_rate_limit", "stream_rate_limit"):
            if key in options:
                value = options[key]
                if (
                    not isinstance(value, dict)
                    or int(value.get("requests", 0)) < 1
                    or float(value.get("window", 0)) <= 0
                ):
                    raise SimError(f"{key} needs positive 'requests' and 'window'")
        if "token_lockout" in options:
            value = options["token_lockout"]
            if not isinstance(value, dict) or int(value.get("failures", 0)) < 1:
                raise SimError("token_lockout needs positive 'failures' and 'seconds'")
        if "heartbeat_seconds" in options:
            try:
                heartbeat = float(options["heartbeat_seconds"])
            except (TypeError, ValueError):
                heartbeat = 0
            if not heartbeat > 0:
                raise SimError("heartbeat_seconds must be a positive number")
        if "webhook_retry_seconds" in options:
            retries = options["webhook_retry_seconds"]
            if not isinstance(retries, list) or not all(
                isinstance(r, (int, float)) and r >= 0 for r in retries
            ):
                raise SimError("webhook_retry_seconds must be a list of non-negative numbers")
        if "issue_tokens" in options:
            tokens = options["issue_tokens"]
            if not isinstance(tokens, list) or not all(
                isinstance(t, str) and re.fullmatch(r"[0-9a-f]{40}", t) for t in tokens
            ):
                raise SimError("issue_tokens must be a list of 40-lowercase-hex strings")
        with self.lock:
            for key, value in options.items():
                if isinstance(DEFAULT_CONFIG[key], dict) and key != "duplicate_customer_error":
                    merged = dict(self.config[key])
                    merged.update(value)
                    self.config[key] = merged
                else:
                    self.config[key] = copy.deepcopy(value)
            if "rate_limit" in options:
                self.request_log = {}
            if "token_rate_limit" in options:
                self.token_request_log = {}
            if "stream_rate_limit" in options:
                self.stream_log = {}
            if "heartbeat_seconds" in options:
                now = time.monotonic()
                self.heartbeats = []
                for device in self.devices.values():
                    due = (device.published_state_at or now) + self.heartbeat_of_locked(device)
                    heapq.heappush(
                        self.heartbeats, (min(due, now + self.heartbeat_of_locked(device)), device.id)
                    )
            if "token_lockout" in options:
                self.token_failures = {}
                self.token_locked_until = {}
            return copy.deepcopy(self.config)
