"""The one way selfserve talks to the Particle Cloud (two-legged auth, product shadow customers).

Every HTTP call goes through `ParticleClient._request`, which adds the bearer token (always the
Authorization header, never the URL or body), the (connect, read) timeout, sends the body the
way the API wants it, and turns every answer that isn't a success into a typed error from
selfserve.particle.errors. Method names follow particle-api-js.

Tokens are the company's keys to its fleet, so:
- they are minted once per lifetime and cached in a token store (the database in the app),
  refreshed a little before expiry (refresh_token grant when held, else client_credentials)
  or after a 401 (once);
- a per-key lock makes concurrent callers share one mint;
- token requests that fail trip a breaker before Particle's 10-failures/30-minutes IP lockout,
  and bad client credentials trip it at once;
- no token or client secret ever appears in an exception, a log line or a URL.

Reference: /work/shared/particle-cloud-api.md (sections cited as §n).
"""

import datetime
import email.utils
import json
import logging
import re
import threading
import time
import weakref
from urllib.parse import quote

import requests
import requests.auth

from selfserve.particle import errors
from selfserve.particle.token_store import MemoryTokenStore
from selfserve.particle.token_store import StoredToken

log = logging.getLogger("selfserve.particle")

DEVICE_ID_PATTERN = re.compile(r"[0-9a-f]{24}")
# Particle tokens (access, refresh) and client secrets are 40 hex characters (§1.3).
TOKEN_PATTERN = re.compile(r"[0-9a-fA-F]{40,}")
SECRET_BODY_KEYS = frozenset({"access_token", "refresh_token", "token", "client_secret", "mfa_token"})
REDACTED = "[redacted]"
PRODUCT_KEY = "product"
# Snake-case names callers may use for the product device list filters (§9.3).
DEVICE_LIST_FILTERS = {
    "device_id": "deviceId",
    "device_name": "deviceName",
    "serial_number": "serialNumber",
    "sort_attr": "sortAttr",
    "sort_dir": "sortDir",
}


def _utcnow():
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def _customer_key(customer_id):
    return f"customer:{customer_id}"


def _early_expiry(expires_in):
    """When to stop using a token that lives `expires_in` seconds: a little before Particle does
    (10% of its life, at most a minute), so a call never starts with a token about to die."""
    if not expires_in:
        return None  # expires_in 0 (or absent) means the token never expires (§4.2)
    margin = min(60.0, expires_in * 0.1)
    return _utcnow() + datetime.timedelta(seconds=expires_in - margin)


def _parse_retry_after(value):
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0, int((when - datetime.datetime.now(datetime.UTC)).total_seconds()))


def _message_from(body, fallback):
    """Particle's own words from any of its error body families (§2)."""
    if isinstance(body, dict):
        for key in ("error_description", "error"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key]
        listed = body.get("errors")
        if isinstance(listed, list) and listed:
            first = listed[0]
            if isinstance(first, str):
                return first
            if isinstance(first, list) and first and isinstance(first[0], str):
                return first[0]  # 2015's nested ["Core isn't online", 404]
            if isinstance(first, dict) and isinstance(first.get("error"), str):
                return first["error"]
        if isinstance(body.get("info"), str) and body["info"]:
            return body["info"]
    if isinstance(body, str) and body.strip():
        return body.strip()[:200]
    return fallback


class _BearerAuth(requests.auth.AuthBase):
    """The token in the Authorization header, the one way we pass it. As a requests auth
    object (not a plain header) so requests never swaps in ~/.netrc credentials."""

    def __init__(self, token):
        self._token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self):
        return "_BearerAuth([redacted])"


class EventStream:
    """An open server-sent-events stream: iterate to get events as dicts with name, data, ttl,
    published_at and coreid. Iteration ends when the server closes the stream or sends nothing
    (not even a keep-alive) for the read timeout. Close it (or use `with`) when done."""

    def __init__(self, response, route, on_line=None):
        self._response = response
        self._route = route
        self._on_line = on_line
        self._events = self._parse()

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._events)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        self._events.close()
        self._response.close()

    def _parse(self):
        name = None
        data_lines = []
        try:
            for line in self._lines():
                if self._on_line is not None and self._on_line(line) is False:
                    return
                if line == "":
                    if name is not None and data_lines:
                        yield self._event(name, "\n".join(data_lines))
                    name, data_lines = None, []
                elif line.startswith(":"):
                    continue  # ":ok" and keep-alive comments
                else:
                    field, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if field == "event":
                        name = value
                    elif field == "data":
                        data_lines.append(value)
        except requests.RequestException as exc:
            # A read timeout or a dropped connection ends the stream; the caller reconnects if
            # it wants more. str(exc) is not logged: it carries the URL.
            log.info("event stream %s ended: %s", self._route, type(exc).__name__)
        finally:
            self._response.close()

    def _lines(self):
        """Lines as they arrive (iter_lines would wait for a 512-byte chunk: an event could sit in
        the buffer until the next keep-alive). Lines end in LF or CRLF."""
        pending = b""
        for chunk in self._response.iter_content(chunk_size=None):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode("utf-8", "replace")

    @staticmethod
    def _event(name, data):
        try:
            payload = json.loads(data)
        except ValueError:
            payload = {"data": data}
        if not isinstance(payload, dict):
            payload = {"data": payload}
        return {
            "name": name,
            "data": payload.get("data"),
            "ttl": payload.get("ttl"),
            "published_at": payload.get("published_at"),
            "coreid": payload.get("coreid"),
        }


class ParticleClient:
    """A Particle Cloud client for one product, acting as the product (product token) or as one
    of its shadow customers (customer tokens). Safe to share between threads."""

    def __init__(
        self,
        api_url,
        product,
        client_id,
        client_secret,
        connect_timeout=3.05,
        read_timeout=20.0,
        customer_token_lifetime=86400,
        token_store=None,
        token_failure_limit=5,
        token_pause_seconds=300,
    ):
        self.api_url = api_url.rstrip("/")
        self.product = str(product)
        self.client_id = client_id
        self._client_secret = client_secret
        self.timeout = (connect_timeout, read_timeout)
        self.customer_token_lifetime = customer_token_lifetime
        self.token_store = token_store if token_store is not None else MemoryTokenStore()
        self.token_failure_limit = token_failure_limit
        self.token_pause_seconds = token_pause_seconds
        self._local = threading.local()
        self._key_locks = weakref.WeakValueDictionary()
        self._key_locks_guard = threading.Lock()

    def __repr__(self):
        return f"ParticleClient(api_url={self.api_url!r}, product={self.product!r}, client_id={self.client_id!r})"

    # --- tokens ---------------------------------------------------------------------------

    def product_token(self):
        """The product bearer token (client_credentials, no scope), minted once per lifetime."""
        return self._token(PRODUCT_KEY)

    def customer_token(self, customer_id):
        """A token scoped to the existing shadow customer `customer_id` (lowercased), minted once
        per lifetime. Raises BadRequest when Particle doesn't know the customer."""
        return self._token(_customer_key(self._customer_id(customer_id)))

    def forget_customer_token(self, customer_id):
        """Drop the cached token of `customer_id` (e.g. the customer was deleted). No network."""
        self.token_store.delete(_customer_key(self._customer_id(customer_id)))

    def _token(self, key):
        stored = self.token_store.get(key)
        if stored is not None and stored.usable():
            return stored.access_token
        with self._lock_for(key):
            # Another thread may have minted while we waited for the lock.
            stored = self.token_store.get(key)
            if stored is not None and stored.usable():
                return stored.access_token
            return self._renew(key, stored)

    def _replace_rejected_token(self, key, rejected):
        """After a 401 on `rejected`: drop it and get a new one, unless another thread already did."""
        with self._lock_for(key):
            stored = self.token_store.get(key)
            if stored is not None and stored.access_token != rejected and stored.usable():
                return stored.access_token
            self.token_store.delete(key)
            return self._renew(key, stored)

    def _renew(self, key, stale):
        """Mint a token for `key` (caller holds the key's lock): the refresh_token grant when
        `stale` holds one, falling back to client_credentials when Particle refuses it."""
        lifetime = {}
        if key != PRODUCT_KEY:
            lifetime["expires_in"] = str(int(self.customer_token_lifetime))
        if stale is not None and stale.refresh_token:
            try:
                return self._mint(
                    key, {"grant_type": "refresh_token", "refresh_token": stale.refresh_token, **lifetime}
                )
            except errors.InvalidClient:
                raise
            except errors.BadRequest:
                log.info("refresh token for %s refused; minting a new token", key.split(":")[0])
        form = {"grant_type": "client_credentials", **lifetime}
        if key != PRODUCT_KEY:
            form["scope"] = f"customer={key.split(':', 1)[1]}"
        return self._mint(key, form)

    def _mint(self, key, form):
        answer = self._token_request("POST", "/oauth/token", data=form)
        return self._store_token(key, answer)

    def _store_token(self, key, answer):
        if not isinstance(answer, dict) or not isinstance(answer.get("access_token"), str):
            raise errors.CloudUnavailable("token answer without an access token", 200, None)
        expires_in = answer.get("expires_in")
        try:
            expires_in = float(expires_in) if expires_in is not None else 0
        except (TypeError, ValueError):
            expires_in = 0
        token = StoredToken(
            access_token=answer["access_token"],
            expires_at=_early_expiry(expires_in),
            refresh_token=answer.get("refresh_token")
            if isinstance(answer.get("refresh_token"), str)
            else None,
        )
        self.token_store.put(key, token)
        return token.access_token

    def _lock_for(self, key):
        with self._key_locks_guard:
            lock = self._key_locks.get(key)
            if lock is None:
                lock = threading.Lock()
                self._key_locks[key] = lock
            return lock

    def _token_request(self, method, path, **kwargs):
        """A request that authenticates with our client id and secret (token grants, customer
        creation), behind the breaker: Particle locks the IP out for 30 minutes after 10 failed
        token requests in a row (§12), so we stop sending them earlier."""
        reason = self.token_store.paused()
        if reason:
            raise errors.TokenRequestsSuspended(f"token requests paused after {reason}", None, None)
        try:
            answer = self._request(
                method, path, form=True, auth=(self.client_id, self._client_secret), **kwargs
            )
        except errors.CustomerExists:
            self._token_request_succeeded()  # the credentials worked; nothing failed
            raise
        except errors.InvalidClient:
            self._token_request_failed(immediately=True)
            raise
        except errors.ParticleError:
            self._token_request_failed()
            raise
        self._token_request_succeeded()
        return answer

    def _token_request_succeeded(self):
        self.token_store.record_token_success()

    def _token_request_failed(self, immediately=False):
        # The count lives in the token store: with the database store every worker shares it.
        reason = self.token_store.record_token_failure(
            self.token_failure_limit, self.token_pause_seconds, immediately=immediately
        )
        if reason:
            log.error("Particle token requests paused for %ss: %s", self.token_pause_seconds, reason)

    # --- the choke point ------------------------------------------------------------------

    def _session(self):
        """One requests.Session per thread: connections are reused, sessions aren't shared."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["Accept"] = "application/json"
            self._local.session = session
        return session

    def _request(
        self,
        method,
        path,
        *,
        token=None,
        data=None,
        params=None,
        form=False,
        auth=None,
        stream=False,
        segments=None,
        read_timeout=None,
    ):
        """Send one API request and return the parsed JSON answer (None when empty), or for
        `stream=True` the open response. Raises a typed ParticleError for anything else.

        `path` is a route template such as "/v1/devices/{device_id}"; `{product}` and the
        `segments` are URL-quoted into it (the template, not the filled path, is logged).
        `token` is None (no bearer), "product" or ("customer", id). A 401 on a token drops it,
        gets a new one and retries once. `form=True` sends `data` form-encoded, else as JSON.
        """
        values = {"product": self.product, **(segments or {})}
        url = self.api_url + path.format(**{k: quote(str(v), safe="") for k, v in values.items()})
        key = None
        if token == "product":
            key = PRODUCT_KEY
        elif isinstance(token, tuple) and token[0] == "customer":
            key = _customer_key(self._customer_id(token[1]))
        elif token is not None:
            raise ValueError("token must be None, 'product' or ('customer', id)")

        access_token = self._token(key) if key else None
        timeout = self.timeout if read_timeout is None else (self.timeout[0], read_timeout)
        response = self._send(method, url, path, access_token, data, params, form, auth, stream, timeout)
        if response.status_code == 401 and key:
            response.close()
            log.info("%s %s: token refused; getting a new one and retrying once", method, path)
            access_token = self._replace_rejected_token(key, access_token)
            response = self._send(method, url, path, access_token, data, params, form, auth, stream, timeout)

        if stream and response.status_code == 200:
            return response
        try:
            body = self._parse_body(response)
        finally:
            response.close()
        if 200 <= response.status_code < 300:
            return body
        raise self._error_for(response, body, secrets=(access_token,))

    def _send(self, method, url, route, access_token, data, params, form, auth, stream, timeout=None):
        if access_token:
            auth = _BearerAuth(access_token)
        body = {}
        if data is not None:
            body = {"data": data} if form else {"json": data}
        failure = None
        started = time.monotonic()
        try:
            response = self._session().request(
                method,
                url,
                params=params,
                auth=auth,
                timeout=timeout or self.timeout,
                stream=stream,
                allow_redirects=False,
                **body,
            )
        except requests.Timeout as exc:
            failure = f"timed out ({type(exc).__name__})"
        except requests.RequestException as exc:
            # str(exc) names the URL; only the exception type is kept.
            failure = f"could not connect ({type(exc).__name__})"
        elapsed_ms = (time.monotonic() - started) * 1000
        if failure is not None:
            log.warning("%s %s -> %s after %.0f ms", method, route, failure, elapsed_ms)
            # Raised outside the except block so the requests exception (which holds the
            # prepared request and its Authorization header) isn't chained onto ours.
            raise errors.CloudUnavailable(f"{method} {route}: {failure}", None, None)
        log.info("%s %s -> %s in %.0f ms", method, route, response.status_code, elapsed_ms)
        return response

    @staticmethod
    def _parse_body(response):
        text = response.text
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text

    def _error_for(self, response, body, secrets=()):
        """The typed error for a non-2xx answer, scrubbed of tokens and our client secret."""
        status = response.status_code
        body = self._scrub(body, secrets)
        message = self._scrub(_message_from(body, f"HTTP {status}"), secrets)
        code = body.get("error") if isinstance(body, dict) else None
        if status == 400:
            if code == "invalid_client":
                return errors.InvalidClient(message, status, body)
            if code == "customer_exists":
                return errors.CustomerExists(message, status, body)
            if message.strip().lower() in ("timed out.", "timed out"):
                return errors.DeviceOffline(message, status, body)  # 2015 functions (§10.2)
            return errors.BadRequest(message, status, body)
        if status == 401:
            return errors.TokenInvalid(message, status, body)
        if status == 403:
            if "belongs to someone else" in message:
                return errors.DeviceOwnedByOther(message, status, body)
            return errors.PermissionDenied(message, status, body)
        if status == 404:
            return errors.NotFound(message, status, body)
        if status == 408:
            return errors.DeviceOffline(message, status, body)
        if status == 429:
            retry_after = _parse_retry_after(response.headers.get("Retry-After"))
            return errors.RateLimited(message, status, body, retry_after=retry_after)
        if status >= 500:
            return errors.CloudUnavailable(message, status, body)
        if 400 <= status < 500:
            return errors.BadRequest(message, status, body)
        return errors.ParticleError(message, status, body)  # e.g. an unexpected redirect

    def _scrub(self, value, secrets=()):
        """`value` with every token-looking string and our client secret replaced."""
        if isinstance(value, str):
            for secret in (self._client_secret, *secrets):
                if secret:
                    value = value.replace(secret, REDACTED)
            return TOKEN_PATTERN.sub(REDACTED, value)
        if isinstance(value, dict):
            return {
                k: (REDACTED if k in SECRET_BODY_KEYS and v else self._scrub(v, secrets))
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [self._scrub(v, secrets) for v in value]
        return value

    def _answer_error(self, error_class, answer, fallback):
        """`error_class` for a 200 answer that isn't what the call promises, scrubbed."""
        body = self._scrub(answer)
        return error_class(self._scrub(_message_from(body, fallback)), 200, body)

    # --- input checks (no network call for bad input) ----------------------------------------

    @staticmethod
    def _device_id(device_id):
        """The device id lowercased, or BadRequest when it isn't 24 hex characters."""
        if isinstance(device_id, str):
            normalised = device_id.lower()
            if DEVICE_ID_PATTERN.fullmatch(normalised):
                return normalised
        raise errors.BadRequest("A device id is 24 hexadecimal characters.", None, None)

    @staticmethod
    def _customer_id(customer_id):
        """The customer id lowercased (Particle lowercases it on creation, §5.1)."""
        if (
            not isinstance(customer_id, str)
            or not customer_id.strip()
            or len(customer_id) > 200
            or any(c.isspace() or not c.isprintable() for c in customer_id)
        ):
            raise errors.BadRequest("A customer id is a non-empty string without spaces.", None, None)
        return customer_id.lower()

    @staticmethod
    def _name(name, what):
        if not isinstance(name, str) or not name.strip():
            raise errors.BadRequest(f"A {what} name is required.", None, None)
        return name

    # --- customers ------------------------------------------------------------------------

    def create_customer(self, customer_id):
        """Create the shadow customer `customer_id` (lowercased) with our client credentials and
        cache the token it comes with. Idempotent: if it already exists, a scoped token is
        minted instead (§5.1, "Client pitfalls" 3).

        The duplicate answer is not confirmed (§15.1: 400 `customer_exists` comes from
        third-party code), and a create whose answer was lost (a timeout) may have worked. So
        after any other refusal or a lost answer the customer counts as existing when a scoped
        token is issued for it and works (GET /v1/devices); otherwise the first error is raised.
        (Each check is a token request the breaker counts, so it is not made after an answered
        5xx or 429.)"""
        customer_id = self._customer_id(customer_id)
        key = _customer_key(customer_id)
        failure = None
        with self._lock_for(key):
            try:
                answer = self._token_request(
                    "POST",
                    "/v1/products/{product}/customers",
                    data={"email": customer_id, "no_password": "true"},
                )
            except errors.CustomerExists:
                log.info("customer already exists; using a scoped token")
            except (errors.InvalidClient, errors.TokenRequestsSuspended):
                raise
            except (errors.BadRequest, errors.CloudUnavailable) as exc:
                if isinstance(exc, errors.CloudUnavailable) and not errors.uncertain(exc):
                    raise  # the cloud answered that it failed: nothing to check
                failure = exc
            else:
                self._store_token(key, answer)
                return
        if failure is None:
            self.customer_token(customer_id)
            return
        try:
            self.customer_token(customer_id)
            self.list_devices(customer_id)
        except errors.ParticleError:
            raise failure from None
        log.warning("creating a customer answered %s, but the customer exists: done", type(failure).__name__)

    def delete_customer(self, customer_id):
        """Delete the shadow customer `customer_id` (§5.5): Particle revokes its tokens, claim
        codes and activation codes; our cached token of it is dropped too. True when deleted now,
        False when Particle doesn't know it (404: already gone, e.g. a retry after a lost answer)."""
        customer_id = self._customer_id(customer_id)
        try:
            self._request(
                "DELETE",
                "/v1/products/{product}/customers/{customer_id}",
                token="product",
                segments={"customer_id": customer_id},
            )
            deleted = True
        except errors.NotFound:
            deleted = False
        self.forget_customer_token(customer_id)
        return deleted

    # --- product level (product token) ----------------------------------------------------

    def add_device_to_product(self, device_id):
        """Import the device into the product (it must be before a customer can claim it).
        Returns Particle's answer {"updated", "nonmemberDeviceIds", "invalidDeviceIds"}."""
        return self._request(
            "POST", "/v1/products/{product}/devices", token="product", data={"id": self._device_id(device_id)}
        )

    def remove_device_owner(self, device_id):
        """Unclaim the device from whoever owns it; it stays in the product (§8.2)."""
        self._request(
            "DELETE",
            "/v1/products/{product}/devices/{device_id}/owner",
            token="product",
            segments={"device_id": self._device_id(device_id)},
        )

    def list_product_devices(self, page=1, per_page=25, **filters):
        """One page of the product's devices: {"devices": [...], "customers": [...], "meta":
        {"total_pages": n}}. Filters: device_id, device_name, serial_number, groups, sort_attr,
        sort_dir, quarantined (or Particle's camelCase names)."""
        params = {"page": int(page), "perPage": int(per_page)}
        for name, value in filters.items():
            if value is not None:
                params[DEVICE_LIST_FILTERS.get(name, name)] = value
        answer = self._request("GET", "/v1/products/{product}/devices", token="product", params=params)
        if not isinstance(answer, dict):
            raise errors.CloudUnavailable("unexpected device list answer", 200, None)
        answer.setdefault("devices", [])
        answer.setdefault("customers", [])
        answer.setdefault("meta", {})
        return answer

    def get_product_device(self, device_id):
        """The device as the product sees it, including `owner` (§9.2)."""
        return self._request(
            "GET",
            "/v1/products/{product}/devices/{device_id}",
            token="product",
            segments={"device_id": self._device_id(device_id)},
        )

    def device_is_free(self, device_id, previous_owner=None):
        """Read back whether the device has no owner now, as the product sees it (§9.2): True or
        False, or None when the answer doesn't say. The owner fields of product answers are not
        confirmed (§9.3, §15): an `owner` field that is empty, with no `customer_id` or `user_id`
        either, means free; any of them set means owned. Without an `owner` field the answer
        doesn't count, and `previous_owner` (a customer id) is asked instead: a device its
        previous owner no longer holds is free of them. A failed read raises."""
        answer = self.get_product_device(device_id)
        if isinstance(answer, dict):
            if any(answer.get(field) for field in ("owner", "customer_id", "user_id")):
                return False
            if "owner" in answer:
                return True
        if previous_owner:
            return not self.owns_device(previous_owner, device_id)
        return None

    def owns_device(self, customer_id, device_id):
        """Read back whether the device is claimed to this customer, asked with the customer's
        own token: GET /v1/devices/:id answers its owner and refuses everyone else with 403
        (§9.2, pitfall 6), so the answer doesn't depend on how product answers spell owners.
        A failed read (timeout, 5xx, 429) raises."""
        try:
            self.get_device(customer_id, device_id)
        except (errors.PermissionDenied, errors.NotFound):
            return False
        return True

    def remove_device_from_product(self, device_id):
        """Remove the device from the product (also unclaims a customer-owned device, §8.3)."""
        self._request(
            "DELETE",
            "/v1/products/{product}/devices/{device_id}",
            token="product",
            segments={"device_id": self._device_id(device_id)},
        )

    # --- customer level (that customer's token) -------------------------------------------

    def claim_device(self, customer_id, device_id):
        """Claim the device to the customer (POST /v1/devices, id in the body). The device must
        be in the product. DeviceOwnedByOther when it belongs to someone else."""
        device_id = self._device_id(device_id)
        return self._request("POST", "/v1/devices", token=("customer", customer_id), data={"id": device_id})

    def list_devices(self, customer_id):
        """The customer's devices (a list of device dicts)."""
        answer = self._request("GET", "/v1/devices", token=("customer", customer_id))
        if not isinstance(answer, list):
            raise errors.CloudUnavailable("unexpected device list answer", 200, None)
        return answer

    def get_device(self, customer_id, device_id):
        """One of the customer's devices. PermissionDenied when it isn't theirs (or doesn't exist)."""
        return self._request(
            "GET",
            "/v1/devices/{device_id}",
            token=("customer", customer_id),
            segments={"device_id": self._device_id(device_id)},
        )

    def get_variable(self, customer_id, device_id, name):
        """The variable's typed value (number, string or bool). NotFound for an unknown
        variable, DeviceOffline when the device doesn't answer."""
        device_id = self._device_id(device_id)
        answer = self._request(
            "GET",
            "/v1/devices/{device_id}/{name}",
            token=("customer", customer_id),
            segments={"device_id": device_id, "name": self._name(name, "variable")},
        )
        if not isinstance(answer, dict) or "result" not in answer:
            raise self._answer_error(errors.ParticleError, answer, "variable answer without a result")
        return answer["result"]

    def call_function(self, customer_id, device_id, name, arg=""):
        """Call the function and return its integer return_value. FunctionFailed when the cloud
        answers 200 without a return_value (or with ok:false); NotFound, DeviceOffline as usual."""
        device_id = self._device_id(device_id)
        if not isinstance(arg, str):
            raise errors.BadRequest("A function argument is a string.", None, None)
        answer = self._request(
            "POST",
            "/v1/devices/{device_id}/{name}",
            token=("customer", customer_id),
            segments={"device_id": device_id, "name": self._name(name, "function")},
            data={"arg": arg},
        )
        if not isinstance(answer, dict) or answer.get("ok") is False or "return_value" not in answer:
            raise self._answer_error(errors.FunctionFailed, answer, "the function did not return a value")
        return answer["return_value"]

    def rename_device(self, customer_id, device_id, name):
        """Rename the device; returns Particle's answer ({"id", "name", "updated_at"})."""
        device_id = self._device_id(device_id)
        return self._request(
            "PUT",
            "/v1/devices/{device_id}",
            token=("customer", customer_id),
            segments={"device_id": device_id},
            data={"name": self._name(name, "device")},
        )

    def get_claim_code(self, customer_id):
        """A claim code for the customer: {"claim_code": "...", "device_ids": [...]} (§6)."""
        return self._request(
            "POST", "/v1/products/{product}/device_claims", token=("customer", customer_id), data={}
        )

    def get_event_stream(self, customer_id, device_id=None, prefix=None):
        """An EventStream of the customer's events (all their devices, or one), optionally only
        names starting with `prefix`. Ends on a silent or closed connection; the caller closes it."""
        segments = {}
        if device_id is None:
            path = "/v1/devices/events"
        else:
            path = "/v1/devices/{device_id}/events"
            segments["device_id"] = self._device_id(device_id)
        if prefix:
            path += "/{prefix}"
            segments["prefix"] = prefix
        response = self._request("GET", path, token=("customer", customer_id), segments=segments, stream=True)
        return EventStream(response, path)

    def get_product_event_stream(self, prefix=None, on_line=None, silence=None):
        """An EventStream of every product device's events (customer-owned ones included;
        reference §11, permission events:get), with the product token. `on_line` is called for
        every line received, keep-alives included (a listener renews its lease there); when it
        returns False the stream ends. `silence`: seconds without a byte (not even a keep-alive)
        after which the stream ends (the read timeout by default)."""
        path = "/v1/products/{product}/events"
        segments = {}
        if prefix:
            path += "/{prefix}"
            segments["prefix"] = prefix
        response = self._request(
            "GET", path, token="product", segments=segments, stream=True, read_timeout=silence
        )
        return EventStream(response, path, on_line=on_line)
