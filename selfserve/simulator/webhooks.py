"""Webhook delivery and the clock of the simulated cloud.

A product integration (webhook) in the real cloud is created in the console or with
`POST /v1/products/:p/integrations`; the reference (§16) records what Particle *sends* but not
that API, so the simulator configures webhooks through its control interface instead
(`POST /_sim/webhooks`, INVENTED). What it sends follows §16: a POST per matching product-device
event with the default fields `{"event", "data", "coreid", "published_at"}` as JSON (or a form),
`User-Agent: ParticleBot/1.1 (https://docs.particle.io/webhooks)`, HTTP Basic auth from `auth` or
the given `headers`; a failed delivery (no answer within 20 s, or not 2xx) is retried after 30 s
and 1 min (configurable), then dropped.

The ticker makes time pass for devices nobody asks about: it runs `advance_locked` a few times a
second, so heartbeats and state changes are published (and delivered to webhooks) even while no
request and no stream is open.
"""

import logging
import threading
import time

import requests

log = logging.getLogger("selfserve.simulator.webhooks")

USER_AGENT = "ParticleBot/1.1 (https://docs.particle.io/webhooks)"
ANSWER_WITHIN_SECONDS = 20.0  # §16: the receiver must answer within 20 s
TICK_SECONDS = 0.1
SENDERS = 4


def check_hook(spec):
    """A webhook from the control API, normalised; raises ValueError with a message."""
    from selfserve.simulator.state import SimError

    if not isinstance(spec, dict):
        raise SimError("a webhook is a JSON object")
    url = spec.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise SimError("a webhook needs an http(s) url")
    event = spec.get("event")
    if not isinstance(event, str) or not event:
        raise SimError("a webhook needs an event prefix of at least one character")
    auth = spec.get("auth")
    if auth is not None and not (
        isinstance(auth, dict)
        and isinstance(auth.get("username"), str)
        and isinstance(auth.get("password"), str)
    ):
        raise SimError("auth must be {username, password}")
    headers = spec.get("headers") or {}
    if not isinstance(headers, dict):
        raise SimError("headers must be an object")
    return {
        "url": url,
        "event": event,
        "auth": dict(auth) if auth else None,
        "headers": {str(k): str(v) for k, v in headers.items()},
        "json": spec.get("json", True) is not False,
    }


class Deliveries:
    """Threads that send queued webhook requests, and the ticker. Started by SimulatorServer."""

    def __init__(self, state, stopping):
        self.state = state
        self.stopping = stopping
        self.threads = []

    def start(self):
        for number in range(SENDERS):
            thread = threading.Thread(target=self._send_loop, name=f"sim-webhook-{number}", daemon=True)
            thread.start()
            self.threads.append(thread)
        ticker = threading.Thread(target=self._tick_loop, name="sim-ticker", daemon=True)
        ticker.start()
        self.threads.append(ticker)

    def stop(self):
        for _ in range(SENDERS):
            self.state.webhook_queue.put(None)

    def _tick_loop(self):
        while not self.stopping.wait(TICK_SECONDS):
            try:
                with self.state.lock:
                    self.state.advance_locked(time.monotonic(), time.time())
            except Exception:  # noqa: BLE001 - the clock must keep running
                log.exception("simulator tick failed")

    def _send_loop(self):
        session = requests.Session()
        session.trust_env = False
        while True:
            item = self.state.webhook_queue.get()
            if item is None or self.stopping.is_set():
                return
            hook, body, attempt = item
            ok = self._send(session, hook, body)
            with self.state.lock:
                if ok:
                    self.state.webhook_log["sent"] += 1
                    continue
                self.state.webhook_log["failed"] += 1
                retries = list(self.state.config["webhook_retry_seconds"])
                if attempt >= len(retries) or hook not in self.state.webhooks:
                    self.state.webhook_log["dropped"] += 1
                    continue
            timer = threading.Timer(
                retries[attempt], self.state.webhook_queue.put, ((hook, body, attempt + 1),)
            )
            timer.daemon = True
            timer.start()

    @staticmethod
    def _send(session, hook, body):
        headers = {"User-Agent": USER_AGENT, **hook["headers"]}
        auth = (hook["auth"]["username"], hook["auth"]["password"]) if hook["auth"] else None
        kwargs = {"json": body} if hook["json"] else {"data": body}
        try:
            response = session.post(
                hook["url"], headers=headers, auth=auth, timeout=ANSWER_WITHIN_SECONDS, **kwargs
            )
        except requests.RequestException as exc:
            log.info("webhook to %s failed: %s", hook["url"], type(exc).__name__)
            return False
        response.close()
        return 200 <= response.status_code < 300
