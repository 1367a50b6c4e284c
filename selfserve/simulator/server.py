"""A local Particle Cloud: a threaded HTTP server that answers like api.particle.io for one
product (two-legged auth, shadow customers, claims, variables, functions, event streams), plus
a control interface under /_sim/ for tests and the demo.

Run it on its own:

    python -m selfserve.simulator.server --host 127.0.0.1 --port 8081 [--fixtures FILE]

(product, client id and secret come from SELFSERVE_PARTICLE_PRODUCT, _CLIENT_ID, _CLIENT_SECRET,
defaulting to the demo values), or in-process:

    server = SimulatorServer(port=0).start(); ...; server.stop()

The pieces: sim_state (state, one lock), sim_models (window and pump behaviour over time),
sim_api (Particle routes), sim_control (control operations), sim_app (WSGI dispatch).
"""

import argparse
import logging
import os
import signal
import sys
import threading

from werkzeug.serving import WSGIRequestHandler
from werkzeug.serving import make_server

from selfserve import config as config_module
from selfserve.simulator.app import SimulatorApp
from selfserve.simulator.control import Control
from selfserve.simulator.state import State
from selfserve.simulator.webhooks import Deliveries

log = logging.getLogger("selfserve.simulator.server")


class _QuietHandler(WSGIRequestHandler):
    """No access log (tests); the standalone server uses _PathOnlyHandler."""

    def log_request(self, code="-", size="-"):
        pass


class _PathOnlyHandler(WSGIRequestHandler):
    """Access log without query strings (they may carry ?access_token=)."""

    def log_request(self, code="-", size="-"):
        path = self.path.split("?", 1)[0]
        log.info("%s %s %s", self.command, path, getattr(code, "value", code))


class SimulatorServer:
    """The simulator on a real socket, served by a background thread.

    `fixtures` is a path or a parsed dict; None means the shipped demo fixtures. Port 0 picks a
    free port; `url` tells which after `start()`.
    """

    def __init__(
        self,
        host="127.0.0.1",
        port=0,
        product=config_module.DEMO_PARTICLE_PRODUCT,
        client_id=config_module.DEMO_PARTICLE_CLIENT_ID,
        client_secret=config_module.DEMO_PARTICLE_CLIENT_SECRET,
        fixtures=None,
        access_log=False,
    ):
        self.host = host
        self.port = port
        self.stopping = threading.Event()
        self.cloud = State(product, client_id, client_secret, fixtures)
        self.control = Control(self.cloud)
        self.app = SimulatorApp(self.cloud, self.stopping)
        self.deliveries = Deliveries(self.cloud, self.stopping)
        self.access_log = access_log
        self._server = None
        self._thread = None

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def start(self):
        """Start serving in a background thread; return self."""
        handler = _PathOnlyHandler if self.access_log else _QuietHandler
        self._server = make_server(self.host, self.port, self.app, threaded=True, request_handler=handler)
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="particle-simulator",
            daemon=True,
        )
        self._thread.start()
        self.deliveries.start()
        return self

    def stop(self):
        """Stop serving; open event streams and pending device waits end at once."""
        self.stopping.set()
        self.deliveries.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- the control interface, in Python -------------------------------------------------------

    def reset(self):
        """Back to the fixtures: no customers, tokens, claim codes or faults; counters 0;
        default config; open event streams closed."""
        self.cloud.reset()

    def state(self):
        """Everything: product, devices (membership, owner, online, latency, hung, variables),
        customers, faults, config (as GET /_sim/state)."""
        return self.cloud.snapshot()

    def device(self, device_id):
        """The device's simulator state (incl. owner, in_product, online, variables)."""
        return self.control.device(device_id)

    def add_device(self, id, model="window", **fields):
        """Create a device at runtime (same fields as a fixture device); return its state."""
        return self.control.add_device({"id": id, "model": model, **fields})

    def set_device(self, device_id, online=None, latency=None, hung=None, **extra):
        changes = {"online": online, "latency": latency, "hung": hung, **extra}
        return self.control.set_device(
            device_id, {k: v for k, v in changes.items() if v is not None or k == "owner"}
        )

    def publish(self, device_id, name, data):
        self.control.publish(device_id, name, data)

    def connect(self, device_id, claim_code=None):
        return self.control.connect(device_id, claim_code)

    def add_fault(self, method, path, count=1, status=503, body=None, headers=None, latency=0):
        return self.control.add_fault(
            {
                "method": method,
                "path": path,
                "count": count,
                "status": status,
                "body": body,
                "headers": headers,
                "latency": latency,
            }
        )

    def clear_faults(self):
        self.control.clear_faults()

    def add_webhook(self, url, event, auth=None, headers=None, json=True):
        """A product webhook: every matching product-device event is POSTed to `url` (§16)."""
        return self.control.add_webhook(
            {"url": url, "event": event, "auth": auth, "headers": headers, "json": json}
        )

    def clear_webhooks(self):
        self.control.clear_webhooks()

    def drop_streams(self, kind=None):
        """Close open event streams (all, or "product" / "customer" ones); returns how many."""
        return self.cloud.drop_streams(kind)

    def open_streams(self, kind=None):
        """How many event streams are open (all, or "product" / "customer" ones)."""
        return self.cloud.open_streams(kind)

    def counters(self):
        return self.cloud.counter_snapshot()

    def reset_counters(self):
        self.cloud.reset_counters()

    def configure(self, **options):
        return self.cloud.configure(options)


def _settings(environ):
    """Product, client id and secret: the client's settings, demo values by default."""
    return (
        environ.get("SELFSERVE_PARTICLE_PRODUCT") or config_module.DEMO_PARTICLE_PRODUCT,
        environ.get("SELFSERVE_PARTICLE_CLIENT_ID") or config_module.DEMO_PARTICLE_CLIENT_ID,
        environ.get("SELFSERVE_PARTICLE_CLIENT_SECRET") or config_module.DEMO_PARTICLE_CLIENT_SECRET,
    )


def banner(server):
    """What an operator needs to use the simulator: URL, product, demo credentials, labels."""
    state = server.state()
    product = state["product"]
    client_id, secret = server.cloud.client_id, server.cloud.client_secret
    demo = secret == config_module.DEMO_PARTICLE_CLIENT_SECRET
    lines = [
        f"Particle Cloud simulator on {server.url}",
        f"  product:   {product['id']} ({product['slug']}, platform {product['platform_id']})",
        f"  client id: {client_id}",
        "  secret:    " + (secret if demo else "(set by SELFSERVE_PARTICLE_CLIENT_SECRET; not shown)"),
        f"  control:   {server.url}/_sim/state",
        "  devices (serial, setup code, model, device id, name):",
    ]
    for device in state["devices"]:
        flags = [] if device["online"] else ["offline"]
        if device["latency"]:
            flags.append(f"slow {device['latency']:g}s")
        if device["in_product"]:
            flags.append("in product")
        lines.append(
            f"    {device['serial_number']:<16} {device['setup_code']:<10} {device['model']:<7} "
            f"{device['id']}  {device['name']}" + (f"  [{', '.join(flags)}]" if flags else "")
        )
    return "\n".join(lines)


def main(argv=None, environ=None):
    parser = argparse.ArgumentParser(description="Run the local Particle Cloud simulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--fixtures", default=None, help="devices JSON (default: the demo fixtures)")
    args = parser.parse_args(argv)
    product, client_id, secret = _settings(os.environ if environ is None else environ)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = SimulatorServer(args.host, args.port, product, client_id, secret, args.fixtures, access_log=True)
    server.start()
    print(banner(server), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
