"""Two site processes on one database, as two machines would run them: exactly one holds the
product event stream, and an event taken in by that one reaches a page held open on the other.

On PostgreSQL (SELFSERVE_TEST_DATABASE_URL) the fan-out is LISTEN/NOTIFY; on the SQLite pass the
two processes share the database file and fan out through Redis pub/sub."""

import datetime
import os
import sys
import time

import pytest
import requests
from helpers import free_port
from helpers import make_user
from helpers import seed_registry

from bench import load
from bench.servers import Gunicorn
from bench.servers import loopback_site_env
from selfserve import config as config_module
from selfserve.models import Device
from selfserve.models import utcnow
from selfserve.services import devices

PASSWORD = "correct horse battery"
WINDOW = "e00fce68a1b2c3d4e5f60701"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REDIS_DB = "redis://127.0.0.1:6379/11"


class SiteProcess(Gunicorn):
    """One site process (gevent worker, as in production) on a free loopback port."""

    def __init__(self, name, env, log_dir):
        super().__init__(name, "bench.app:app", env, log_dir)
        self.port = free_port()

    @property
    def command(self):
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            os.path.join(ROOT, "gunicorn.conf.py"),
            "-w",
            "1",
            "-b",
            f"127.0.0.1:{self.port}",
            "--chdir",
            ROOT,
            "--log-level",
            "warning",
            self.app_path,
        ]


@pytest.fixture
def owner(app, sim):
    labels = {device["id"]: device for device in seed_registry()}
    user = make_user("owner@example.com", PASSWORD)
    devices.claim(user, labels[WINDOW]["serial_number"], labels[WINDOW]["setup_code"])
    Device.update(claimed_at=utcnow() - datetime.timedelta(hours=1)).execute()
    return user


@pytest.fixture
def site_settings():
    """More SELFSERVE_* settings of the site processes (a test parametrizes it)."""
    return {}


@pytest.fixture
def sites(app, owner, sim, tmp_path, site_settings):
    from selfserve import models

    models.db.close()  # the processes below need the database to themselves now (SQLite)
    env = loopback_site_env(
        app.config["DATABASE_URL"],
        sim.url,
        app.config["SECRET_KEY"],
        TOKEN_ENCRYPTION_KEY=app.config.get("TOKEN_ENCRYPTION_KEY") or "",
        SWEEP_SECONDS=30,  # the sweep keeps each process's listener running
        EVENT_STREAM="true",
        EVENT_STREAM_MIN_OPEN_SECONDS=0.5,
        PUSH_BROKER_URL="" if app.config["DATABASE_URL"].startswith("postgres") else REDIS_DB,
        **site_settings,
    )
    processes = [SiteProcess(name, env, str(tmp_path)) for name in ("one", "two")]
    try:
        for process in processes:
            process.launch()
        for process in processes:
            process.wait_ready("/login")
        yield processes
    finally:
        for process in processes:
            process.stop()
        models.db.connect(reuse_if_open=True)


def holder_pid():
    from selfserve import event_stream
    from selfserve import models

    with models.db.connection_context():
        holder = event_stream.Lease.holder_of()
    return int(holder.split(":")[1]) if holder else None


def test_one_stream_for_two_processes_and_pushes_cross_between_them(sites, sim):
    one, two = sites
    sessions = {}
    for site in sites:  # signing in is each process's first request: both start a listener
        sessions[site.name] = load.login(site.url, "owner@example.com", PASSWORD, site.url + "/devices")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sim.open_streams("product") != 1:
        time.sleep(0.1)
    for _ in range(20):  # and it stays one
        assert sim.open_streams("product") == 1
        time.sleep(0.1)
    pid = holder_pid()
    workers = {site.name: set(site_pids(site)) for site in sites}
    leader = next(name for name, pids in workers.items() if pid in pids)
    other = next(site for site in sites if site.name != leader)

    # A page held open on the process that does not hold the stream.
    response = sessions[other.name].get(f"{other.url}/devices/{WINDOW}/live", stream=True, timeout=(5, 30))
    assert response.status_code == 200
    chunks = response.iter_content(chunk_size=None)
    buffer = ""
    while "event: values" not in buffer:
        buffer += next(chunks).decode()
    # The device moves; its firmware publishes; the leader takes the events in.
    sim.set_device(WINDOW, online=False)
    sim.set_device(WINDOW, online=True)
    token = requests.post(
        f"{sim.url}/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=(config_module.DEMO_PARTICLE_CLIENT_ID, config_module.DEMO_PARTICLE_CLIENT_SECRET),
        timeout=5,
    ).json()["access_token"]
    answer = requests.post(
        f"{sim.url}/v1/products/{config_module.DEMO_PARTICLE_PRODUCT}/devices/{WINDOW}/setPosition",
        data={"arg": "20"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )
    assert answer.json()["return_value"] == 1
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline and '<span class="value">20%</span>' not in buffer:
        buffer = buffer[-20000:] + next(chunks).decode()
    response.close()
    assert '<span class="value">20%</span>' in buffer
    assert sim.open_streams("product") == 1


def site_pids(site):
    master = site.process.pid
    pids = {master}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == master:
                        pids.add(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return pids


@pytest.fixture
def shared_with_viewer(app, owner):
    """A person the owner's window is shared with (as viewer)."""
    from selfserve.services import access

    viewer = make_user("viewer@example.com", PASSWORD, provisioned=False)
    return access.give(devices.device_for(owner, WINDOW), viewer, "viewer", owner)


# Pages re-check only every minute here: only the announcement can end the stream sooner.
@pytest.mark.parametrize("site_settings", [{"VALUES_POLL_SECONDS": 60}])
def test_a_revoke_on_one_process_ends_the_page_open_on_the_other(shared_with_viewer, sites):
    """Issue 10/11: revocation ends any live page that person has open, whichever process
    serves it (the announcement crosses through LISTEN/NOTIFY or Redis)."""
    import re

    one, two = sites
    viewer = load.login(two.url, "viewer@example.com", PASSWORD, two.url + "/devices")
    owner = load.login(one.url, "owner@example.com", PASSWORD, one.url + "/devices")
    response = viewer.get(f"{two.url}/devices/{WINDOW}/live", stream=True, timeout=(5, 40))
    assert response.status_code == 200
    chunks = response.iter_content(chunk_size=None)
    buffer = ""
    while "event: values" not in buffer:
        buffer += next(chunks).decode()
    page = owner.get(f"{one.url}/devices/{WINDOW}").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    done = owner.post(
        f"{one.url}/devices/{WINDOW}/sharing/grants/{shared_with_viewer.id}/revoke",
        data={"csrf_token": token, "confirmed": "yes"},
        allow_redirects=False,
        timeout=10,
    )
    assert done.status_code == 302
    # The stream on the other process says so and ends (it would otherwise tick on for minutes).
    for chunk in chunks:
        buffer += chunk.decode()
        if "event: gone" in buffer:
            break
    response.close()
    assert "Your access to this device has ended" in buffer and "event: gone" in buffer
