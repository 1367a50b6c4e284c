"""The simulator's WSGI app: routes /oauth and /v1 requests through counters, injected faults
and rate limits to the Particle API handlers, and /_sim/ requests to the control interface."""

import fnmatch
import json
import logging
import time

from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.exceptions import NotFound
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.routing import Map
from werkzeug.routing import Rule
from werkzeug.wrappers import Request
from werkzeug.wrappers import Response

from selfserve.simulator.api import Ctx
from selfserve.simulator.api import ParticleApi
from selfserve.simulator.control import Control
from selfserve.simulator.http import Answer
from selfserve.simulator.http import json_response
from selfserve.simulator.http import oauth_error
from selfserve.simulator.http import parse_body
from selfserve.simulator.state import SimError

log = logging.getLogger("selfserve.simulator.server")

UNMATCHED = "(unmatched)"


def _rule_path(template):
    """ "/v1/devices/:id/events/:prefix" -> werkzeug's "/v1/devices/<id>/events/<path:prefix>"."""
    parts = []
    for part in template.split("/"):
        if part == ":prefix":
            parts.append("<path:prefix>")
        elif part.startswith(":"):
            parts.append(f"<{part[1:]}>")
        else:
            parts.append(part)
    return "/".join(parts)


class SimulatorApp:
    """WSGI callable. `state` is a sim_state.State; `stopping` ends waits and streams."""

    def __init__(self, state, stopping):
        self.state = state
        self.stopping = stopping
        self.api = ParticleApi(state, stopping)
        self.control = Control(state)
        self.handlers = {}
        rules = []
        for method, template, handler in self.api.routes:
            endpoint = f"{method} {template}"
            self.handlers[endpoint] = handler
            rules.append(Rule(_rule_path(template), methods=[method], endpoint=endpoint))
        self.url_map = Map(rules, strict_slashes=False, merge_slashes=False)
        control_routes = [
            ("POST", "/_sim/reset", self.c_reset),
            ("GET", "/_sim/state", self.c_state),
            ("POST", "/_sim/devices", self.c_add_device),
            ("GET", "/_sim/devices/<id>", self.c_get_device),
            ("POST", "/_sim/devices/<id>", self.c_set_device),
            ("POST", "/_sim/devices/<id>/events", self.c_publish),
            ("POST", "/_sim/devices/<id>/connect", self.c_connect),
            ("GET", "/_sim/faults", self.c_faults),
            ("POST", "/_sim/faults", self.c_add_fault),
            ("DELETE", "/_sim/faults", self.c_clear_faults),
            ("GET", "/_sim/counters", self.c_counters),
            ("POST", "/_sim/counters/reset", self.c_reset_counters),
            ("GET", "/_sim/config", self.c_get_config),
            ("POST", "/_sim/config", self.c_config),
            ("GET", "/_sim/streams", self.c_streams),
            ("DELETE", "/_sim/streams", self.c_drop_streams),
            ("GET", "/_sim/webhooks", self.c_webhooks),
            ("POST", "/_sim/webhooks", self.c_add_webhook),
            ("DELETE", "/_sim/webhooks", self.c_clear_webhooks),
        ]
        self.control_handlers = {}
        control_rules = []
        for method, path, handler in control_routes:
            endpoint = f"{method} {path}"
            self.control_handlers[endpoint] = handler
            control_rules.append(Rule(path, methods=[method], endpoint=endpoint))
        self.control_map = Map(control_rules, strict_slashes=False)

    def __call__(self, environ, start_response):
        request = Request(environ)
        try:
            if request.path == "/_sim" or request.path.startswith("/_sim/"):
                response = self.dispatch_control(request)
            else:
                response = self.dispatch_particle(request)
        except Answer as answer:
            response = answer.response()
        except Exception:  # the simulator must answer, not drop the connection
            log.exception("simulator error on %s %s", request.method, request.path)
            response = json_response(500, {"ok": False, "error": "Internal simulator error"})
        return response(environ, start_response)

    # --- Particle requests ----------------------------------------------------------------------

    def dispatch_particle(self, request):
        path = request.path
        counted = path == "/v1" or path.startswith("/v1/") or path.startswith("/oauth/")
        try:
            endpoint, args = self.url_map.bind_to_environ(request.environ).match()
        except (NotFound, MethodNotAllowed):
            endpoint, args = None, {}
        if counted:
            key = endpoint or f"{request.method} {UNMATCHED}"
            with self.state.lock:
                self.state.counters[key] = self.state.counters.get(key, 0) + 1
                self.state.total += 1

        fault = self.take_fault(request.method, path)
        if fault is not None:
            if fault["latency"]:
                self.stopping.wait(fault["latency"])
            if fault["status"] is not None:
                return self.fault_response(fault)

        if endpoint is None:
            # INVENTED body for an unknown route.
            return json_response(404, {"ok": False, "error": "Not Found"})

        is_token = endpoint == "POST /oauth/token"
        now = time.monotonic()
        ip = request.remote_addr or "unknown"
        with self.state.lock:
            wait = self.state.check_rate_locked(ip, now)
            if not wait and endpoint.startswith("GET ") and "/events" in endpoint:
                # Event streams have their own limit: 100 opens per 5 minutes per address.
                wait = self.state.check_stream_rate_locked(ip, now)
        if wait:
            return self.too_many(is_token, wait)

        if is_token:
            with self.state.lock:
                locked = self.state.token_lockout_wait_locked(ip, now)
                wait = 0 if locked else self.state.check_token_rate_locked(ip, now)
            if locked:
                # INVENTED wording for the lockout (reference §12: 30-minute block, body unknown).
                raise oauth_error(
                    "rate_limit_exceeded",
                    "Too many failed token requests from this address; try again later.",
                    headers={"Retry-After": locked},
                )
            if wait:
                return self.too_many(True, wait)
            body = request.form.to_dict() if request.mimetype == "application/x-www-form-urlencoded" else {}
            ctx = Ctx(request, body, "form" if body else None)
            try:
                response = self.api.oauth_token(ctx)
            except Answer:
                with self.state.lock:
                    self.state.record_token_result_locked(ip, False, time.monotonic())
                raise
            with self.state.lock:
                self.state.record_token_result_locked(ip, True, time.monotonic())
            return response

        body, body_kind = parse_body(request)
        ctx = Ctx(request, body, body_kind)
        with self.state.lock:
            self.state.advance_locked(ctx.now, ctx.now_wall)
        return self.handlers[endpoint](ctx, **args)

    def take_fault(self, method, path):
        with self.state.lock:
            for fault in self.state.faults:
                if fault["method"] in ("*", method) and fnmatch.fnmatchcase(path, fault["path"]):
                    if fault["count"] is not None:
                        fault["count"] -= 1
                        if fault["count"] <= 0:
                            self.state.faults.remove(fault)
                    return dict(fault)
        return None

    @staticmethod
    def fault_response(fault):
        status, body, headers = fault["status"], fault["body"], fault["headers"]
        if body is None:
            # INVENTED default body for an injected error.
            body = {"ok": False, "error": HTTP_STATUS_CODES.get(status, "Error")}
        if isinstance(body, str):
            response = Response(body, status=status, content_type="text/plain; charset=utf-8")
            for name, value in headers.items():
                response.headers[name] = value
            return response
        return json_response(status, body, headers)

    @staticmethod
    def too_many(is_token, wait):
        if is_token:
            raise oauth_error("rate_limit_exceeded", "Too many requests", headers={"Retry-After": wait})
        # INVENTED body for non-OAuth routes (reference §12: unknown).
        return json_response(429, {"ok": False, "error": "Too many requests"}, {"Retry-After": wait})

    # --- control requests -----------------------------------------------------------------------

    def dispatch_control(self, request):
        try:
            endpoint, args = self.control_map.bind_to_environ(request.environ).match()
        except HTTPException:
            return json_response(
                404, {"ok": False, "error": f"no control route {request.method} {request.path}"}
            )
        data = {}
        if request.method in ("POST", "PUT") and request.get_data(cache=True).strip():
            try:
                data = json.loads(request.get_data(cache=True))
            except ValueError:
                return json_response(400, {"ok": False, "error": "control requests take a JSON body"})
        try:
            return self.control_handlers[endpoint](data, **args)
        except SimError as error:
            return json_response(400, {"ok": False, "error": str(error)})
        except KeyError as error:
            return json_response(404, {"ok": False, "error": f"no such device {error.args[0]}"})

    def c_reset(self, data):
        self.state.reset()
        return json_response(200, {"ok": True})

    def c_state(self, data):
        return json_response(200, self.state.snapshot())

    def c_add_device(self, data):
        return json_response(201, self.control.add_device(data))

    def c_get_device(self, data, id):
        return json_response(200, self.control.device(id))

    def c_set_device(self, data, id):
        if not isinstance(data, dict):
            raise SimError("a JSON object is expected")
        return json_response(200, self.control.set_device(id, data))

    def c_publish(self, data, id):
        if not isinstance(data, dict):
            raise SimError("a JSON object is expected")
        self.control.publish(id, data.get("name"), data.get("data"))
        return json_response(200, {"ok": True})

    def c_connect(self, data, id):
        claim_code = data.get("claim_code") if isinstance(data, dict) else None
        return json_response(200, self.control.connect(id, claim_code))

    def c_faults(self, data):
        with self.state.lock:
            return json_response(200, {"faults": list(self.state.faults)})

    def c_add_fault(self, data):
        return json_response(201, {"ok": True, "fault": self.control.add_fault(data)})

    def c_clear_faults(self, data):
        self.control.clear_faults()
        return json_response(200, {"ok": True})

    def c_counters(self, data):
        return json_response(200, self.state.counter_snapshot())

    def c_reset_counters(self, data):
        self.state.reset_counters()
        return json_response(200, {"ok": True})

    def c_streams(self, data):
        return json_response(
            200,
            {"product": self.state.open_streams("product"), "customer": self.state.open_streams("customer")},
        )

    def c_drop_streams(self, data):
        return json_response(200, {"ok": True, "dropped": self.state.drop_streams()})

    def c_webhooks(self, data):
        with self.state.lock:
            return json_response(
                200, {"webhooks": list(self.state.webhooks), "log": dict(self.state.webhook_log)}
            )

    def c_add_webhook(self, data):
        return json_response(201, {"ok": True, "webhook": self.control.add_webhook(data)})

    def c_clear_webhooks(self, data):
        self.control.clear_webhooks()
        return json_response(200, {"ok": True})

    def c_get_config(self, data):
        with self.state.lock:
            return json_response(200, dict(self.state.config))

    def c_config(self, data):
        if not isinstance(data, dict):
            raise SimError("a JSON object is expected")
        return json_response(200, self.state.configure(data))
