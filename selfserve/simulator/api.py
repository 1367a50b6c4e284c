"""The simulator's Particle Cloud API: /oauth/token and /v1/..., with the bodies and statuses
of the reference (/work/shared/particle-cloud-api.md). Answers the reference marks as unknown
are chosen here and marked INVENTED.
"""

import base64
import binascii
import datetime
import hashlib
import math
import queue
import re
import secrets
import time

from werkzeug.wrappers import Response

from selfserve.simulator.http import Answer
from selfserve.simulator.http import json_response
from selfserve.simulator.http import oauth_error
from selfserve.simulator.http import text_response
from selfserve.simulator.http import text_value
from selfserve.simulator.http import truthy
from selfserve.simulator.state import Subscriber
from selfserve.simulator.state import iso
from selfserve.simulator.state import new_hex

CLIENT_ID_RE = re.compile(r"^[a-z0-9-_]{3,40}$", re.IGNORECASE)
GRANT_TYPES = ("client_credentials", "refresh_token", "password")
SYSTEM_FIRMWARE = "5.8.0"
PRODUCT_FIRMWARE_VERSION = 3

ORG_NOT_FOUND = {"ok": False, "error": "Organization not found for user's role."}
# INVENTED (the real answers are not recorded):
PRODUCT_NOT_FOUND = {"ok": False, "error": "Product not found"}
PRODUCT_DEVICE_NOT_FOUND = {"ok": False, "error": "Device not found"}
NOT_IN_PRODUCT = {"ok": False, "errors": ["That device is not part of this customer's product."]}
PRODUCT_TOKEN_CANNOT_CLAIM = {"ok": False, "errors": ["Only a customer or user token can claim a device."]}
CLAIM_CODE_NEEDS_CUSTOMER = {
    "ok": False,
    "error": "A customer access token is required to create a claim code.",
}
CREATE_NEEDS_CLIENT = {"ok": False, "error": "Creating a customer needs the product's client ID and secret."}


class Ctx:
    """One request: the werkzeug request, its parsed body, source address, clocks."""

    def __init__(self, request, body, body_kind):
        self.request = request
        self.body = body
        self.body_kind = body_kind
        self.ip = request.remote_addr or "unknown"
        self.now = time.monotonic()
        self.now_wall = time.time()


class Principal:
    """Who a bearer token stands for: the product (its client) or one customer."""

    def __init__(self, kind, customer, token, source):
        self.kind = kind
        self.customer = customer
        self.token = token
        self.source = source


def _hash_password(password):
    return hashlib.sha256(password.encode()).hexdigest()


class ParticleApi:
    """Handlers for every simulated Particle route. `routes` lists (method, template, handler)."""

    def __init__(self, state, stopping):
        self.state = state
        self.stopping = stopping
        self.routes = [
            ("POST", "/oauth/token", self.oauth_token),
            ("POST", "/v1/products/:p/customers", self.create_customer),
            ("GET", "/v1/products/:p/customers", self.list_customers),
            ("DELETE", "/v1/products/:p/customers/:id", self.delete_customer),
            ("POST", "/v1/products/:p/devices", self.import_devices),
            ("GET", "/v1/products/:p/devices", self.list_product_devices),
            ("GET", "/v1/products/:p/devices/:id", self.get_product_device),
            ("PUT", "/v1/products/:p/devices/:id", self.update_product_device),
            ("DELETE", "/v1/products/:p/devices/:id", self.remove_product_device),
            ("DELETE", "/v1/products/:p/devices/:id/owner", self.remove_device_owner),
            ("GET", "/v1/products/:p/devices/:id/:name", self.product_variable),
            ("POST", "/v1/products/:p/devices/:id/:name", self.product_function),
            ("POST", "/v1/products/:p/device_claims", self.create_claim_code),
            ("GET", "/v1/products/:p/events", self.product_events),
            ("GET", "/v1/products/:p/events/:prefix", self.product_events),
            ("GET", "/v1/devices", self.list_devices),
            ("POST", "/v1/devices", self.claim_device),
            ("GET", "/v1/devices/events", self.my_events),
            ("GET", "/v1/devices/events/:prefix", self.my_events),
            ("GET", "/v1/devices/:id", self.get_device),
            ("PUT", "/v1/devices/:id", self.update_device),
            ("DELETE", "/v1/devices/:id", self.unclaim_device),
            ("PUT", "/v1/devices/:id/ping", self.ping_device),
            ("GET", "/v1/devices/:id/events", self.device_events),
            ("GET", "/v1/devices/:id/events/:prefix", self.device_events),
            ("GET", "/v1/devices/:id/:name", self.user_variable),
            ("POST", "/v1/devices/:id/:name", self.user_function),
        ]

    # --- authentication -----------------------------------------------------------------------

    def authenticate(self, ctx):
        """The bearer token's principal, following the OAuth library's getBearerToken rules."""
        request = ctx.request
        header = request.headers.get("Authorization")
        query_token = request.args.get("access_token")
        body_token = text_value(ctx.body.get("access_token")) if "access_token" in ctx.body else None
        used = sum(value is not None for value in (header, query_token, body_token))
        if used > 1:
            raise oauth_error(
                "invalid_request",
                "Only one method may be used to authenticate at a time (Auth header,  GET or POST).",
            )
        if used == 0:
            raise oauth_error("invalid_request", "The access token was not found")
        if header is not None:
            match = re.search(r"Bearer\s(\S+)", header)
            if not match:
                raise oauth_error("invalid_request", "Malformed auth header")
            token, source = match.group(1), "header"
        elif body_token is not None:
            if request.method == "GET":
                raise oauth_error(
                    "invalid_request", "Method cannot be GET When putting the token in the body."
                )
            if ctx.body_kind != "form" or request.mimetype != "application/x-www-form-urlencoded":
                raise oauth_error(
                    "invalid_request",
                    "When putting the token in the body, content type must be application/x-www-form-urlencoded.",
                )
            token, source = body_token, "body"
        else:
            with self.state.lock:
                reject = self.state.config["reject_query_tokens"]
            if reject:
                # INVENTED wording (the model-supplied message is not recorded).
                raise oauth_error(
                    "invalid_request",
                    "Passing the access token in the query string is not allowed for this account; "
                    "use the Authorization header.",
                )
            token, source = query_token, "query"
        with self.state.lock:
            info = self.state.tokens.get(token)
            if info is None:
                raise oauth_error("invalid_token", "The access token provided is invalid.")
            if info["expires_at"] is not None and info["expires_at"] <= ctx.now_wall:
                raise oauth_error("invalid_token", "The access token provided has expired.")
            return Principal(info["kind"], info["customer"], token, source)

    def product_principal(self, ctx, product):
        """A product token for this product, else the documented refusals."""
        principal = self.authenticate(ctx)
        if principal.kind == "customer":
            raise Answer(403, ORG_NOT_FOUND)
        if not self.state.product_matches(product):
            raise Answer(404, PRODUCT_NOT_FOUND)
        return principal

    @staticmethod
    def permission_denied(principal):
        shown = "undefined" if principal.source == "header" else principal.token
        return Answer(
            403,
            {
                "error": "Permission Denied",
                "info": "I didn't recognize that device name or ID, try opening "
                f"https://api.particle.io/v1/devices?access_token={shown}",
            },
        )

    def user_device_locked(self, principal, id_or_name):
        """A device the token owns, by id or name; anything else is Permission Denied."""
        if principal.kind == "customer":
            device = self.state.devices.get(id_or_name)
            if device is not None and device.owner == principal.customer:
                return device
            for device in self.state.devices.values():
                if device.owner == principal.customer and device.name == id_or_name:
                    return device
        raise self.permission_denied(principal)

    def product_device_locked(self, device_id):
        device = self.state.devices.get(device_id)
        if device is None or not device.in_product:
            raise Answer(404, PRODUCT_DEVICE_NOT_FOUND)
        return device

    @staticmethod
    def client_credentials(ctx):
        """(client_id, client_secret) from HTTP Basic (first) or the body; None when absent."""
        header = ctx.request.headers.get("Authorization", "")
        if header[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                decoded = None
            if decoded is not None and ":" in decoded:
                client_id, secret = decoded.split(":", 1)
                return client_id, secret
        if "client_id" in ctx.body or "client_secret" in ctx.body:
            return text_value(ctx.body.get("client_id")), text_value(ctx.body.get("client_secret"))
        return None

    def check_client(self, credentials):
        client_id, secret = credentials
        if not client_id or not CLIENT_ID_RE.match(client_id):
            raise oauth_error("invalid_client", "Invalid or missing client_id parameter")
        if not secret:
            raise oauth_error("invalid_client", "Missing client_secret parameter")
        if not (
            secrets.compare_digest(client_id, self.state.client_id)
            and secrets.compare_digest(secret, self.state.client_secret)
        ):
            raise oauth_error("invalid_client", "Client credentials are invalid")
        return client_id

    # --- /oauth/token ---------------------------------------------------------------------------

    def oauth_token(self, ctx):
        request = ctx.request
        if request.mimetype != "application/x-www-form-urlencoded":
            raise oauth_error(
                "invalid_request", "Method must be POST with application/x-www-form-urlencoded encoding"
            )
        form = request.form
        grant_type = form.get("grant_type")
        if grant_type not in GRANT_TYPES:
            raise oauth_error("invalid_request", "Invalid or missing grant_type parameter")
        credentials = self.client_credentials(ctx) or (None, None)
        client_id = self.check_client(credentials)
        expires_in = self.requested_lifetime(ctx)

        if grant_type == "client_credentials":
            scope = form.get("scope")
            with self.state.lock:
                customer = None
                if scope:
                    if not scope.startswith("customer="):
                        raise oauth_error("invalid_scope", "Invalid scope")  # INVENTED wording
                    customer = scope[len("customer=") :].strip().lower()
                    if customer not in self.state.customers:
                        # INVENTED wording (reference §4.1: the real answer is unknown).
                        raise oauth_error("invalid_scope", "Customer not found")
                body = self.state.issue_token_locked(
                    "customer" if customer else "product", customer, client_id, expires_in, ctx.now_wall
                )
        elif grant_type == "refresh_token":
            refresh = form.get("refresh_token")
            if not refresh:
                raise oauth_error("invalid_request", 'No "refresh_token" parameter')
            with self.state.lock:
                info = self.state.refresh_tokens.get(refresh)
                if info is None or info["client_id"] != client_id:
                    raise oauth_error("invalid_grant", "Invalid refresh token")
                if info["expires_at"] <= ctx.now_wall:
                    raise oauth_error("invalid_grant", "Refresh token has expired")
                del self.state.refresh_tokens[refresh]
                body = self.state.issue_token_locked(
                    info["kind"], info["customer"], client_id, expires_in, ctx.now_wall
                )
        else:
            username = form.get("username")
            password = form.get("password")
            if not username or not password:
                raise oauth_error(
                    "invalid_client", 'Missing parameters. "username" and "password" are required'
                )
            with self.state.lock:
                customer = self.state.customers.get(username.strip().lower())
                if (
                    customer is None
                    or customer["password"] is None
                    or not secrets.compare_digest(customer["password"], _hash_password(password))
                ):
                    raise oauth_error("invalid_grant", "User credentials are invalid")
                body = self.state.issue_token_locked(
                    "customer", customer["username"], client_id, expires_in, ctx.now_wall
                )
        return json_response(200, body, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def requested_lifetime(self, ctx):
        """expires_in / expires_at from the form; 0 = never expires."""
        form = ctx.request.form
        expires_at = form.get("expires_at")
        if expires_at:
            text = expires_at.strip().replace("Z", "+00:00")
            try:
                moment = datetime.datetime.fromisoformat(text)
            except ValueError:
                raise oauth_error("invalid_request", "Invalid expires_at parameter")  # INVENTED wording
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=datetime.UTC)
            seconds = math.floor(moment.timestamp() - ctx.now_wall)
            if seconds <= 0:
                raise oauth_error("invalid_request", "Invalid expires_at parameter")  # INVENTED
            return seconds
        raw = form.get("expires_in")
        if raw is None or raw == "":
            with self.state.lock:
                return int(self.state.config["default_expires_in"])
        if not raw.strip().isdigit():
            raise oauth_error("invalid_request", "Invalid expires_in parameter")  # INVENTED wording
        return int(raw)

    # --- customers ------------------------------------------------------------------------------

    def create_customer(self, ctx, p):
        credentials = self.client_credentials(ctx)
        if credentials is None:
            # No client credentials: the library falls back to bearer-token handling.
            principal = self.authenticate(ctx)
            if principal.kind == "customer":
                raise Answer(403, ORG_NOT_FOUND)
            raise Answer(403, CREATE_NEEDS_CLIENT)  # INVENTED (reference: "won't create")
        client_id = self.check_client(credentials)
        if not self.state.product_matches(p):
            raise Answer(404, PRODUCT_NOT_FOUND)
        email = (text_value(ctx.body.get("email")) or "").strip()
        if not email:
            raise Answer(400, {"ok": False, "error": "email is required"})  # INVENTED wording
        username = email.lower()
        password = text_value(ctx.body.get("password"))
        no_password = truthy(ctx.body.get("no_password", False))
        if not no_password and not password:
            # INVENTED wording: shadow customers must say no_password=true.
            raise Answer(400, {"ok": False, "error": "password is required unless no_password is true"})
        with self.state.lock:
            if username in self.state.customers:
                duplicate = self.state.config["duplicate_customer_error"]
                raise Answer(int(duplicate.get("status", 400)), duplicate.get("body"))
            self.state.customers[username] = {
                "id": new_hex(24),
                "username": username,
                "password": None if no_password else _hash_password(password),
                "created_at": ctx.now_wall,
            }
            expires_in = int(self.state.config["default_expires_in"])
            body = self.state.issue_token_locked("customer", username, client_id, expires_in, ctx.now_wall)
        return json_response(201, body, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def list_customers(self, ctx, p):
        self.product_principal(ctx, p)
        per_page, page = self.paging(ctx)
        with self.state.lock:
            listed = []
            for customer in sorted(self.state.customers.values(), key=lambda c: c["created_at"]):
                owned = self.state.owned_by_locked(customer["username"])
                if owned:  # shadow customers appear only once they own a device
                    listed.append((customer, owned))
            total_pages = math.ceil(len(listed) / per_page)
            window = listed[(page - 1) * per_page : page * per_page]
            customers = [
                {"id": c["id"], "full_name": None, "username": c["username"], "devices": owned}
                for c, owned in window
            ]
            devices = []
            for _customer, owned in window:
                for device_id in owned:
                    device = self.state.devices[device_id]
                    devices.append(
                        {
                            "id": device.id,
                            "product_id": self.device_product_id(device),
                            "last_ip_address": self.ip_address(device),
                            "firmware_version": PRODUCT_FIRMWARE_VERSION,
                            "online": device.online,
                        }
                    )
        return json_response(
            200, {"customers": customers, "devices": devices, "meta": {"total_pages": total_pages}}
        )

    def delete_customer(self, ctx, p, id):
        self.product_principal(ctx, p)
        username = id.strip().lower()
        with self.state.lock:
            if username not in self.state.customers:
                raise Answer(404, {"ok": False, "error": "Customer not found"})  # INVENTED wording
            del self.state.customers[username]
            self.state.revoke_customer_locked(username)
            for device in self.state.devices.values():
                if device.owner == username:
                    device.owner = None
                    device.updated_at = ctx.now_wall
        return json_response(200, {"ok": True})

    # --- product devices --------------------------------------------------------------------------

    def import_devices(self, ctx, p):
        self.product_principal(ctx, p)
        ids = []
        upload = ctx.request.files.get("file")
        if upload is not None:
            text = upload.read().decode("utf-8", "replace")
            ids = [line.strip() for line in re.split(r"[\r\n,]+", text) if line.strip()]
        elif ctx.body.get("id"):
            ids = [text_value(ctx.body.get("id")).strip()]
        if not ids:
            raise Answer(400, {"ok": False, "error": "Please provide a device id or a file"})  # INVENTED
        updated, invalid = 0, []
        with self.state.lock:
            for device_id in ids:
                device = self.state.devices.get(device_id)
                if device is None or device.platform_id != self.state.product["platform_id"]:
                    invalid.append(device_id)
                    continue
                device.in_product = True
                device.updated_at = ctx.now_wall
                updated += 1
        return json_response(200, {"updated": updated, "nonmemberDeviceIds": [], "invalidDeviceIds": invalid})

    def list_product_devices(self, ctx, p):
        self.product_principal(ctx, p)
        args = ctx.request.args
        per_page, page = self.paging(ctx)
        filters = {
            "id": (args.get("deviceId") or "").lower(),
            "name": (args.get("deviceName") or "").lower(),
            "serial_number": (args.get("serialNumber") or "").lower(),
        }
        sort_attr = args.get("sortAttr") or "deviceId"
        descending = (args.get("sortDir") or "asc").lower() == "desc"
        keys = {
            "deviceId": lambda d: d.id,
            "deviceName": lambda d: d.name.lower(),
            "lastConnection": lambda d: d.last_handshake_at,
            "firmwareVersion": lambda d: d.id,
        }
        with self.state.lock:
            matching = [
                d
                for d in self.state.devices.values()
                if d.in_product and all(value in getattr(d, attr).lower() for attr, value in filters.items())
            ]
            matching.sort(key=keys.get(sort_attr, keys["deviceId"]), reverse=descending)
            total_pages = math.ceil(len(matching) / per_page)
            window = matching[(page - 1) * per_page : page * per_page]
            devices = [self.device_json_locked(d, ctx, owner=True, product_view=True) for d in window]
            owners = sorted({d.owner for d in window if d.owner})
            customers = [
                {"id": self.state.customers[o]["id"], "username": o}
                for o in owners
                if o in self.state.customers
            ]
        return json_response(
            200, {"devices": devices, "customers": customers, "meta": {"total_pages": total_pages}}
        )

    def get_product_device(self, ctx, p, id):
        self.product_principal(ctx, p)
        with self.state.lock:
            device = self.product_device_locked(id)
            return json_response(200, self.device_json_locked(device, ctx, owner=True, product_view=True))

    def update_product_device(self, ctx, p, id):
        self.product_principal(ctx, p)
        with self.state.lock:
            device = self.product_device_locked(id)
            return self.rename_locked(ctx, device)

    def remove_product_device(self, ctx, p, id):
        self.product_principal(ctx, p)
        with self.state.lock:
            device = self.product_device_locked(id)
            device.in_product = False
            device.owner = None  # removal also unclaims a customer-owned device
            device.updated_at = ctx.now_wall
        return Response(status=204)

    def remove_device_owner(self, ctx, p, id):
        self.product_principal(ctx, p)
        with self.state.lock:
            device = self.product_device_locked(id)
            device.owner = None
            device.updated_at = ctx.now_wall
        # Body INVENTED as the reference suggests (real body undocumented).
        return json_response(200, {"ok": True})

    def product_variable(self, ctx, p, id, name):
        self.product_principal(ctx, p)
        return self.read_variable(ctx, lambda: self.product_device_locked(id), name)

    def product_function(self, ctx, p, id, name):
        self.product_principal(ctx, p)
        return self.call_function(ctx, lambda: self.product_device_locked(id), name)

    # --- claim codes ------------------------------------------------------------------------------

    def create_claim_code(self, ctx, p):
        principal = self.authenticate(ctx)
        if principal.kind != "customer":
            raise Answer(403, CLAIM_CODE_NEEDS_CUSTOMER)  # INVENTED
        if not self.state.product_matches(p):
            raise Answer(404, PRODUCT_NOT_FOUND)
        with self.state.lock:
            code = self.state.new_claim_code_locked(principal.customer, ctx.now_wall)
            owned = self.state.owned_by_locked(principal.customer)
        return json_response(200, {"claim_code": code, "device_ids": owned})

    # --- user device paths ------------------------------------------------------------------------

    def list_devices(self, ctx):
        principal = self.authenticate(ctx)
        with self.state.lock:
            mine = [
                d
                for d in self.state.devices.values()
                if principal.kind == "customer" and d.owner == principal.customer
            ]
            mine.sort(key=lambda d: (-d.last_handshake_at, d.id))
            body = [self.device_json_locked(d, ctx, owner=False, product_view=False) for d in mine]
        return json_response(200, body)

    def claim_device(self, ctx):
        principal = self.authenticate(ctx)
        device_id = text_value(ctx.body.get("id"))  # the body only; a query-string id doesn't count
        if not device_id:
            raise Answer(400, {"ok": False, "errors": ["data.deviceID is empty"]})
        with self.state.lock:
            device = self.state.devices.get(device_id)
            if device is None:
                raise Answer(404, {"ok": False, "errors": ["device does not exist"]})
            if principal.kind != "customer":
                raise Answer(403, PRODUCT_TOKEN_CANNOT_CLAIM)  # INVENTED
            if device.owner is not None and device.owner != principal.customer:
                raise Answer(403, {"ok": False, "errors": ["That belongs to someone else."]})
            if not device.in_product:
                raise Answer(403, NOT_IN_PRODUCT)  # INVENTED
            if device.owner is None:
                device.owner = principal.customer
                device.updated_at = ctx.now_wall
            # Claiming your own device again answers the same success (INVENTED: idempotent).
            customer = self.state.customers[principal.customer]
            body = {
                "customer_id": customer["id"],
                "product_id": self.state.product["id"],
                "updated_at": iso(device.updated_at),
                "id": device.id,
                "connected": device.online,
                "ok": True,
            }
        return json_response(200, body)

    def get_device(self, ctx, id):
        principal = self.authenticate(ctx)
        with self.state.lock:
            device = self.user_device_locked(principal, id)
            return json_response(200, self.device_json_locked(device, ctx, owner=True, product_view=False))

    def update_device(self, ctx, id):
        principal = self.authenticate(ctx)
        with self.state.lock:
            device = self.user_device_locked(principal, id)
            return self.rename_locked(ctx, device)

    def unclaim_device(self, ctx, id):
        principal = self.authenticate(ctx)
        with self.state.lock:
            device = self.user_device_locked(principal, id)
            device.owner = None
            device.updated_at = ctx.now_wall
        return json_response(200, {"ok": True})

    def ping_device(self, ctx, id):
        principal = self.authenticate(ctx)
        with self.state.lock:
            device = self.user_device_locked(principal, id)
            return json_response(200, {"online": device.online, "ok": True})

    def user_variable(self, ctx, id, name):
        principal = self.authenticate(ctx)
        return self.read_variable(ctx, lambda: self.user_device_locked(principal, id), name)

    def user_function(self, ctx, id, name):
        principal = self.authenticate(ctx)
        return self.call_function(ctx, lambda: self.user_device_locked(principal, id), name)

    def rename_locked(self, ctx, device):
        name = text_value(ctx.body.get("name"))
        notes = text_value(ctx.body.get("notes"))
        if name is None and notes is None:
            raise Answer(400, {"ok": False, "error": "Nothing to update"})  # INVENTED wording
        if name is not None:
            name = name.strip()
            if not name:
                raise Answer(400, {"ok": False, "error": "Device name cannot be empty"})  # INVENTED
            device.name = name
        if notes is not None:
            device.notes = notes
        device.updated_at = ctx.now_wall
        body = {"id": device.id}
        if name is not None:
            body["name"] = device.name
        if notes is not None:
            body["notes"] = device.notes
        body["updated_at"] = iso(device.updated_at)
        return json_response(200, body)

    # --- variables and functions ------------------------------------------------------------------

    def timed_out(self, what):
        """The 408 (or legacy) answer for a device that doesn't answer; `what` is (kind, name)."""
        with self.state.lock:
            legacy = self.state.config["legacy_errors"]
        if not legacy:
            return Answer(408, {"ok": False, "error": "timed out"})
        if what[0] == "variable":
            return Answer(408, {"error": "Timed out."})
        return Answer(400, {"ok": False, "error": "Timed out."})

    def reach_device(self, ctx, lookup, what, known):
        """Answer 408 for offline/hung devices, wait out a slow one; raise 404 for unknown names.

        `known(device)` says whether the variable/function exists (checked before waiting: the
        cloud knows the device's description).
        """
        with self.state.lock:
            device = lookup()
            online, hung, latency = device.online, device.hung, device.latency
            cloud_timeout = float(self.state.config["cloud_timeout"])
            legacy = self.state.config["legacy_errors"]
            if online and not hung and not known(device):
                raise Answer(404, self.unknown_body(what, legacy))
        if not online:
            raise self.timed_out(what)
        if hung:
            self.stopping.wait(cloud_timeout)
            raise self.timed_out(what)
        if latency > 0:
            self.stopping.wait(latency)

    @staticmethod
    def unknown_body(what, legacy):
        name = what[1]
        if what[0] == "variable":
            return {"ok": False, "error": "Variable not found" if legacy else f"Unknown Variable: {name}"}
        return {"ok": False, "error": f"Function {name} not found"}

    def read_variable(self, ctx, lookup, name):
        self.reach_device(ctx, lookup, ("variable", name), lambda d: name in d.model.variables)
        now, now_wall = time.monotonic(), time.time()
        with self.state.lock:
            device = lookup()
            online = device.online  # it may have gone offline while we waited
            if online:
                value = device.model.read(name, now)
                device.last_heard = now_wall
                self.state.advance_locked(now, now_wall)
                body = {
                    "cmd": "VarReturn",
                    "name": name,
                    "result": value,
                    "coreInfo": self.core_info_locked(device, now_wall),
                }
        if not online:
            raise self.timed_out(("variable", name))
        if ctx.request.args.get("format") == "raw":
            return text_response(200, self.raw(value))
        return json_response(200, body)

    def call_function(self, ctx, lookup, name):
        self.reach_device(ctx, lookup, ("function", name), lambda d: name in d.model.functions)
        arg = ""
        for field in ("arg", "args", "params"):
            if field in ctx.body and ctx.body[field] is not None:
                arg = text_value(ctx.body[field])
                break
        now, now_wall = time.monotonic(), time.time()
        with self.state.lock:
            device = lookup()
            online = device.online
            if online:
                return_value = device.model.call(name, arg, now)
                device.last_heard = now_wall
                self.state.touch_locked(device)
                self.state.advance_locked(now, now_wall)
                body = {"id": device.id, "last_app": "", "connected": True, "return_value": return_value}
        if not online:
            raise self.timed_out(("function", name))
        raw_format = text_value(ctx.body.get("format")) or ctx.request.args.get("format")
        if raw_format == "raw":
            return text_response(200, str(return_value))
        return json_response(200, body)

    @staticmethod
    def raw(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    # --- events -------------------------------------------------------------------------------------

    def my_events(self, ctx, prefix=None):
        principal = self.authenticate(ctx)
        if principal.kind == "customer":
            subscriber = Subscriber("customer", customer=principal.customer, prefix=prefix)
        else:
            # A product token owns no devices: its /v1/devices stream stays silent.
            subscriber = Subscriber("customer", customer=object(), prefix=prefix)
        return self.stream(subscriber)

    def device_events(self, ctx, id, prefix=None):
        principal = self.authenticate(ctx)
        with self.state.lock:
            device = self.user_device_locked(principal, id)
            subscriber = Subscriber(
                "customer", customer=principal.customer, device_id=device.id, prefix=prefix
            )
        return self.stream(subscriber)

    def product_events(self, ctx, p, prefix=None):
        self.product_principal(ctx, p)
        return self.stream(Subscriber("product", prefix=prefix))

    def stream(self, subscriber):
        """An SSE response: ":ok", then frames from the subscriber's queue, keep-alives."""
        self.state.subscribe(subscriber)
        state = self.state
        stopping = self.stopping

        def frames():
            try:
                yield b":ok\n\n"
                last_sent = time.monotonic()
                while not stopping.is_set() and not subscriber.closed:
                    with state.lock:
                        state.advance_locked(time.monotonic(), time.time())
                        keepalive = float(state.config["sse_keepalive"])
                    try:
                        frame = subscriber.queue.get(timeout=0.2)
                    except queue.Empty:
                        frame = None
                    if frame is not None:
                        yield frame.encode("utf-8")
                        last_sent = time.monotonic()
                    elif time.monotonic() - last_sent >= keepalive:
                        yield b":ok\n\n"
                        last_sent = time.monotonic()
            finally:
                state.unsubscribe(subscriber)

        response = Response(frames(), status=200, content_type="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    # --- shapes ---------------------------------------------------------------------------------------

    def device_product_id(self, device):
        return self.state.product["id"] if device.in_product else device.platform_id

    @staticmethod
    def ip_address(device):
        return f"192.0.2.{int(device.id[-2:], 16) % 254 + 1}"

    def core_info_locked(self, device, now_wall):
        return {
            "name": device.name,
            "last_app": "",
            "last_heard": iso(device.last_heard),
            "connected": device.online,
            "last_handshake_at": iso(device.last_handshake_at),
            "deviceID": device.id,
            "product_id": self.device_product_id(device),
        }

    def device_json_locked(self, device, ctx, owner, product_view):
        """Device attributes as GET /v1/devices[/:id] and the product list send them."""
        if device.online:
            device.last_heard = ctx.now_wall
        body = {
            "id": device.id,
            "name": device.name,
            "last_app": None,
            "last_ip_address": self.ip_address(device),
            "last_heard": iso(device.last_heard),
            "last_handshake_at": iso(device.last_handshake_at),
            "product_id": self.device_product_id(device),
            "online": device.online,
            "connected": device.online,
            "platform_id": device.platform_id,
            "cellular": False,
            "notes": device.notes,
            # Offline devices: null, as recorded in 2015.
            "functions": list(device.model.functions) if device.online else None,
            "variables": dict(device.model.variables) if device.online else None,
            "status": "normal",
            "serial_number": device.serial_number,
            "system_firmware_version": SYSTEM_FIRMWARE,
        }
        if owner:
            body["owner"] = device.owner
        if device.in_product:
            body.update(
                {
                    "firmware_product_id": self.state.product["id"],
                    "firmware_version": PRODUCT_FIRMWARE_VERSION,
                    "groups": [],
                    "development": False,
                    "quarantined": False,
                    "denied": False,
                }
            )
        return body

    def paging(self, ctx):
        args = ctx.request.args
        raw_per_page = args.get("perPage") or args.get("per_page") or "25"
        raw_page = args.get("page") or "1"
        per_page = int(raw_per_page) if raw_per_page.isdigit() and int(raw_per_page) > 0 else 25
        page = int(raw_page) if raw_page.isdigit() and int(raw_page) > 0 else 1
        return per_page, page
