"""The demo (bin/demo) wires a working site: simulator, mailbox sink, seeded registry, a
support account whose second-factor code the demo mailbox page shows."""

import re
import time

import pyotp
import pytest

from selfserve import background
from selfserve import demo


@pytest.fixture
def demo_site(tmp_path):
    app, simulator, mail = demo.build("127.0.0.1", 5999, 0, str(tmp_path), keep=False)
    try:
        yield app, simulator, demo.seed(app)
    finally:
        # Its background threads (sweep, senders, event-stream listener) would otherwise work
        # in the databases of the tests that follow (the models' binding is process-wide).
        background.stop_all(app)
        mail.stop()
        simulator.stop()


def test_demo_seeds_devices_and_prints_their_labels(demo_site, capsys):
    app, simulator, devices = demo_site
    from selfserve.models import Device

    with app.app_context():
        assert Device.select().where(Device.in_product == True).count() == len(devices) >= 6  # noqa: E712
    assert all(simulator.device(d["id"])["in_product"] for d in devices)
    demo.banner("127.0.0.1", 5999, simulator, devices)
    printed = capsys.readouterr().out
    for device in devices:
        assert device["serial_number"] in printed and device["setup_code"] in printed
    assert "offline" in printed and "slow" in printed
    assert demo.DEMO_STAFF_EMAIL in printed


def test_demo_mailbox_shows_sent_mail_and_the_staff_code(demo_site):
    app, _, _ = demo_site
    client = app.test_client()
    page = client.get("/signup").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    client.post(
        "/signup",
        data={"email": "new@example.com", "password": "a long enough password", "csrf_token": token},
    )
    # The outbox's sender thread mails it once the sign-up's request is over.
    deadline = time.monotonic() + 15
    while True:
        mailbox = client.get("/demo/mailbox").get_data(as_text=True)
        if "new@example.com" in mailbox or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert "new@example.com" in mailbox
    assert re.search(r'href="http://127\.0\.0\.1:5999/verify/[^"]+"', mailbox)  # links are clickable
    code = re.search(r'class="code">(\d{6})<', mailbox).group(1)
    assert pyotp.TOTP(demo.DEMO_STAFF_TOTP_SECRET).verify(code, valid_window=1)


def test_the_mailbox_exists_only_in_the_demo(client):
    assert client.get("/demo/mailbox").status_code in (302, 404)
