"""The demo: the site, the bundled Particle Cloud simulator and a local mailbox, in one process.

    python -m selfserve.demo [--host 127.0.0.1] [--port 5000] [--sim-port 0] [--keep]

Everything is real but local: the site's Particle client talks HTTP to the simulator, mail goes
over SMTP to a sink that keeps each message for the mailbox page (/demo/mailbox) and prints it
to the terminal. The SQLite database is started afresh each time (the simulator forgets its
customers when it stops, so an old database would disagree with it) unless --keep is given.
"""

import argparse
import email
import email.policy
import json
import os
import socket
import time
import uuid

from aiosmtpd.controller import Controller

from selfserve import config as config_module

FIXTURES = os.path.join(os.path.dirname(__file__), "simulator", "fixtures", "demo.json")

# The demo's support account. Its second factor is a fixed, public demo secret: the demo
# mailbox page shows the current code, so no authenticator app is needed to try the console.
DEMO_STAFF_EMAIL = "support@demo.example"
DEMO_STAFF_PASSWORD = "demo support desk"
DEMO_STAFF_TOTP_SECRET = "SELFSERVEDEMOSTAFFTOTPSECRET2345"
# The dealer the demo registry names for some windows (fixtures' "dealer"), and its admin.
DEMO_DEALER = "Demo Window Dealer"
DEMO_DEALER_EMAIL = "dealer@demo.example"
DEMO_DEALER_PASSWORD = "demo dealer desk"


class MailboxHandler:
    """aiosmtpd handler: store each message as JSON for the mailbox page and print it."""

    def __init__(self, directory):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        body = message.get_body(preferencelist=("plain",))
        record = {
            "id": f"{time.time():.6f}-{uuid.uuid4().hex[:8]}",
            "received_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "to": message["To"],
            "subject": message["Subject"],
            "body": body.get_content() if body is not None else "",
        }
        path = os.path.join(self.directory, record["id"] + ".json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        print(f"\n--- mail to {record['to']}: {record['subject']}\n{record['body']}---\n", flush=True)
        return "250 Message accepted for delivery"


def read_mailbox(directory):
    """Messages stored by MailboxHandler, newest first."""
    if not directory or not os.path.isdir(directory):
        return []
    messages = []
    for name in sorted(os.listdir(directory), reverse=True):
        if name.endswith(".json"):
            with open(os.path.join(directory, name), encoding="utf-8") as handle:
                messages.append(json.load(handle))
    return messages


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build(host, port, sim_port, instance_dir, keep):
    """Start the simulator and the mail sink; return (app, simulator, mail controller)."""
    from selfserve import create_app
    from selfserve import schema
    from selfserve.simulator.server import SimulatorServer

    os.makedirs(instance_dir, exist_ok=True)
    db_path = os.path.join(instance_dir, "demo.db")
    mailbox_dir = os.path.join(instance_dir, "demo-mail")
    if not keep:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db_path + suffix):
                os.remove(db_path + suffix)
        for name in os.listdir(mailbox_dir) if os.path.isdir(mailbox_dir) else []:
            os.remove(os.path.join(mailbox_dir, name))

    simulator = SimulatorServer(
        host="127.0.0.1",
        port=sim_port,
        product=config_module.DEMO_PARTICLE_PRODUCT,
        client_id=config_module.DEMO_PARTICLE_CLIENT_ID,
        client_secret=config_module.DEMO_PARTICLE_CLIENT_SECRET,
        fixtures=FIXTURES,
    ).start()
    mail_port = _free_port()
    # aiosmtpd probes its own port once started, so it can't be given port 0.
    mail = Controller(MailboxHandler(mailbox_dir), hostname="127.0.0.1", port=mail_port)
    mail.start()

    # The same migrations as production's `flask db upgrade` build (or bring up to date) the file.
    schema.upgrade_url(f"sqlite:///{db_path}")
    app = create_app(
        {
            "DEMO": True,
            "SESSION_COOKIE_SECURE": False,  # the demo is served over plain http
            "DATABASE_URL": f"sqlite:///{db_path}",
            "BASE_URL": f"http://{host}:{port}",
            "PARTICLE_API_URL": simulator.url,
            **config_module.demo_particle_settings(),
            "MAIL_SERVER": "127.0.0.1",
            "MAIL_PORT": mail_port,
            "DEMO_MAILBOX_DIR": mailbox_dir,
        }
    )
    return app, simulator, mail


def seed(app):
    """Import the demo devices into our registry and the simulated product; return them."""
    from selfserve.services import registry

    with open(FIXTURES, encoding="utf-8") as handle:
        fixtures = json.load(handle)
    from selfserve.models import User
    from selfserve.services import staff

    with app.app_context():
        registry.seed_from_fixtures(FIXTURES)
        if not User.get_or_none(User.email == DEMO_STAFF_EMAIL):
            user = staff.create_staff(DEMO_STAFF_EMAIL, DEMO_STAFF_PASSWORD, role="admin")
            staff.enrol_with_secret(user, DEMO_STAFF_TOTP_SECRET)
        _seed_dealer()
    return fixtures["devices"]


def _seed_dealer():
    """The demo dealer organisation (so claiming its windows asks what access it gets)."""
    from selfserve import passwords
    from selfserve.models import Organisation
    from selfserve.models import User
    from selfserve.models import utcnow
    from selfserve.services import organisations

    if Organisation.get_or_none(Organisation.name == DEMO_DEALER):
        return
    person = User.get_or_none(User.email == DEMO_DEALER_EMAIL) or User.create(
        email=DEMO_DEALER_EMAIL,
        password_hash=passwords.hash_password(DEMO_DEALER_PASSWORD),
        email_verified_at=utcnow(),
    )
    organisations.create(person, DEMO_DEALER, kind="dealer")


def banner(host, port, simulator, devices):
    lines = [
        "",
        "selfserve demo",
        "==============",
        f"Site:            http://{host}:{port}/",
        f"Demo mailbox:    http://{host}:{port}/demo/mailbox  (emails are also printed here)",
        f"Particle sim:    {simulator.url}  (product {config_module.DEMO_PARTICLE_PRODUCT})",
        "",
        "Demo devices (what their labels say):",
        f"  {'serial':<16} {'setup code':<12} {'model':<8} notes",
    ]
    for device in devices:
        notes = []
        if not device.get("online", True):
            notes.append("offline")
        if device.get("latency"):
            notes.append(f"slow ({device['latency']} s)")
        if device.get("dealer"):
            notes.append("dealer")
        lines.append(
            f"  {device['serial_number']:<16} {device['setup_code']:<12} {device['model']:<8} {', '.join(notes)}"
        )
    lines += [
        "",
        f"Support console:  http://{host}:{port}/support  as {DEMO_STAFF_EMAIL} / {DEMO_STAFF_PASSWORD}",
        "                  (its sign-in code is shown on the demo mailbox page)",
        f"Dealer:           {DEMO_DEALER_EMAIL} / {DEMO_DEALER_PASSWORD} runs {DEMO_DEALER}, which sold",
        "                  the windows marked 'dealer' (claiming one asks what access it gets)",
        "",
        "Sign up, open the verification mail in the mailbox, then add a device.",
        "Ctrl-C stops.",
        "",
    ]
    print("\n".join(lines), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the selfserve demo.")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")))
    parser.add_argument("--sim-port", type=int, default=0, help="simulator port (0 = any free port)")
    parser.add_argument("--instance", default="instance", help="folder for the demo database and mail")
    parser.add_argument("--keep", action="store_true", help="keep the database of the last run")
    args = parser.parse_args(argv)

    from selfserve import sweep

    app, simulator, mail = build(args.host, args.port, args.sim_port, args.instance, args.keep)
    try:
        devices = seed(app)
        from selfserve import event_stream

        # The demo listens to the simulated product's event stream from the start.
        event_stream.start(app)
        banner(args.host, args.port, simulator, devices)
        # Finish interrupted work (a --keep database) at once, not only after the first request.
        sweep.start(app)
        app.run(host=args.host, port=args.port, threaded=True, use_reloader=False)
    finally:
        mail.stop()
        simulator.stop()


if __name__ == "__main__":
    main()
