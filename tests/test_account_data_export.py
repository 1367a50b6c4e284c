"""Download my data: JSON and a zip of CSV files from the account page, with every section,
nothing of other people, queries flat in the size of the account, and support viewing the
account refused."""

import csv
import datetime
import io
import json
import zipfile

import pytest
from helpers import OTHER_WINDOW
from helpers import PASSWORD
from helpers import PUMP
from helpers import WINDOW
from helpers import count_queries
from helpers import make_user
from helpers import signed_in

from selfserve.models import AlertOptIn
from selfserve.models import AlertSetting
from selfserve.models import AuditEvent
from selfserve.models import Device
from selfserve.models import ValueRollup
from selfserve.models import ValueSample
from selfserve.models import utcnow
from selfserve.services import access
from selfserve.services import data_export
from selfserve.services import devices
from selfserve.services import transfers


def own(user, labels, device_id):
    label = labels[device_id]
    return devices.claim(user, label["serial_number"], label["setup_code"])


@pytest.fixture
def world(app, sim, labels, mailbox):
    """A homeowner with two devices, one released device that now belongs to someone else
    (renamed by them, with history in both periods), an offer, a request from a stranger,
    a grant given and one held."""
    home = make_user("home@example.com")
    later = make_user("later@example.com")
    friend = make_user("friend@example.com")
    window = own(home, labels, WINDOW)
    own(home, labels, PUMP)
    devices.rename(home, devices.device_for(home, WINDOW), "Living room")
    own(home, labels, OTHER_WINDOW)
    devices.rename(home, devices.device_for(home, OTHER_WINDOW), "Old bedroom")
    then = utcnow() - datetime.timedelta(hours=2)
    ValueSample.create(device_id=OTHER_WINDOW, owner=home.id, name="position", at=then, value=40)
    ValueRollup.create(
        device_id=OTHER_WINDOW, owner=home.id, name="position", hour=then.replace(minute=0, second=0, microsecond=0),
        minimum=40, maximum=40, mean=40, last=40,
    )  # fmt: skip
    devices.release(home, devices.device_for(home, OTHER_WINDOW))
    own(later, labels, OTHER_WINDOW)
    devices.rename(later, devices.device_for(later, OTHER_WINDOW), "Secret study of later")
    ValueSample.create(device_id=OTHER_WINDOW, owner=later.id, name="position", at=utcnow(), value=99)
    access.give(window, friend, "viewer", home)
    friends_pump = own(friend, labels, "e00fce68a1b2c3d4e5f60802")
    access.give(friends_pump, home, "operator", friend)
    AlertSetting.create(user=home.id, modes={"offline": "off"}, quiet_from=22, quiet_until=7)
    AlertOptIn.create(user=home.id, device=friends_pump.device_id)
    transfers.offer(home, devices.device_for(home, PUMP), "buyer@example.com")
    return {"home": home, "later": later, "friend": friend}


def test_json_download_has_every_section_and_nothing_of_other_people(app, world):
    client = signed_in(app, "home@example.com")
    settings = client.get("/account").get_data(as_text=True)
    assert "/account/data.json" in settings and "/account/data.zip" in settings
    response = client.get("/account/data.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers["Content-Disposition"].startswith('attachment; filename="selfserve-data-')
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_data(as_text=True)
    data = json.loads(body)
    home = world["home"]
    assert data["format"] == data_export.FORMAT
    assert data["account"]["email"] == "home@example.com" and data["account"]["id"] == home.id
    by_device = {}
    for row in data["devices"]:
        by_device.setdefault(row["device_id"], []).append(row)
    assert set(by_device) == {WINDOW, PUMP, OTHER_WINDOW}
    (window,) = by_device[WINDOW]
    assert window["owned_now"] is True and window["name"] == "Living room" and window["owned_from"]
    (former,) = by_device[OTHER_WINDOW]
    assert former["owned_now"] is False and former["how_it_left"] == "released"
    assert former["owned_from"] <= former["owned_until"]
    assert former["name"] == "Old bedroom"  # the name in their time, not the new owner's
    # History: only their own period of the device they had before.
    assert [(s["device_id"], s["value"]) for s in data["history_changes"]] == [(OTHER_WINDOW, 40.0)]
    assert [r["device_id"] for r in data["history_hourly"]] == [OTHER_WINDOW]
    (offer,) = data["transfers"]
    assert offer["you_were"] == "seller" and offer["other_party"] == "buyer@example.com"
    directions = sorted((g["direction"], g["role"], g["to"]) for g in data["access"])
    assert directions == [("given", "viewer", "friend@example.com"), ("held", "operator", "you")]
    assert data["alert_settings"]["quiet_from"] == 22 and json.loads(data["alert_settings"]["modes"]) == {
        "offline": "off"
    }
    assert [row["device_id"] for row in data["alert_opt_ins"]] == ["e00fce68a1b2c3d4e5f60802"]
    assert any(row["what"] == "Released device Old bedroom" for row in data["activity"])
    assert all(row["by"] in ("you", "someone else", "support", None) for row in data["activity"])
    # Nothing of the next owner of the released window, nor of the friend's own account.
    assert (
        "later@example.com" not in body
        and "Secret study" not in body
        and "99" not in body.split('"history_changes"')[1].split('"history_hourly"')[0]
    )
    assert "friend@example.com" in body  # they gave the friend access themselves
    assert world["friend"].particle_customer_id not in body
    assert world["later"].particle_customer_id not in body


def test_csv_zip_has_one_file_per_section_matching_the_json(app, world):
    client = signed_in(app, "home@example.com")
    response = client.get("/account/data.zip")
    assert response.status_code == 200 and response.mimetype == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.get_data()))
    assert archive.testzip() is None
    names = set(archive.namelist())
    assert names == {"README.txt"} | {f"{section.name}.csv" for section in data_export.SECTIONS}
    data = data_export.as_dict(world["home"])
    for section in data_export.SECTIONS:
        rows = list(csv.DictReader(io.TextIOWrapper(archive.open(f"{section.name}.csv"), encoding="utf-8")))
        expected = data[section.name]
        expected = ([expected] if expected else []) if section.single else expected
        assert len(rows) == len(expected), section.name
        for row in rows:
            assert list(row) == list(section.columns)
    devices_csv = archive.read("devices.csv").decode()
    assert "Old bedroom" in devices_csv and "Secret study" not in devices_csv


def test_spreadsheet_formulas_in_text_are_kept_as_text(app, sim, labels):
    home = make_user("home@example.com")
    own(home, labels, WINDOW)
    Device.update(name='=HYPERLINK("http://evil")').where(Device.device_id == WINDOW).execute()
    archive = zipfile.ZipFile(io.BytesIO(b"".join(data_export.csv_zip_chunks(home))))
    (row,) = csv.DictReader(io.StringIO(archive.read("devices.csv").decode()))
    assert row["name"] == '\'=HYPERLINK("http://evil")'


def test_queries_do_not_grow_with_the_number_of_devices_or_rows(app, sim):
    def account_with(email, count, prefix):
        user = make_user(email, provisioned=False)
        for n in range(count):
            device_id = f"{prefix}{n:023x}"
            Device.create(
                device_id=device_id, serial_number=f"{email}-{n}", setup_code_hash="x", model="window", owner=user.id,
                claimed_at=utcnow(), name=f"Device {n}",
            )  # fmt: skip
            AuditEvent.create(
                user=user, actor=user, action="device.claimed", device_id=device_id, detail={"name": "x"}
            )
            for minute in range(3):
                ValueSample.create(
                    device_id=device_id, owner=user.id, name="position", value=minute,
                    at=utcnow() - datetime.timedelta(minutes=minute),
                )  # fmt: skip
        return user

    small, big = account_with("small@example.com", 1, "a"), account_with("big@example.com", 40, "b")
    counts = []
    for user in (small, big):
        with count_queries() as queries:
            text = "".join(data_export.json_chunks(user))
            b"".join(data_export.csv_zip_chunks(user))
        counts.append(len(queries))
        assert json.loads(text)["account"]["id"] == user.id
    assert counts[0] == counts[1], counts
    assert len(json.loads("".join(data_export.json_chunks(big)))["history_changes"]) == 120


def test_long_sections_are_read_in_batches(app, sim, monkeypatch):
    user = make_user("many@example.com", provisioned=False)
    for minute in range(7):
        ValueSample.create(
            device_id="0" * 24, owner=user.id, name="position", value=minute,
            at=utcnow() - datetime.timedelta(minutes=minute),
        )  # fmt: skip
    monkeypatch.setattr(data_export, "BATCH", 3)
    rows = list(data_export._samples(user))
    assert sorted(row["value"] for row in rows) == [0, 1, 2, 3, 4, 5, 6]


def test_support_viewing_the_account_cannot_download_it(app, world, sim):
    from test_support_views import sign_in_staff
    from test_support_views import start_view

    from selfserve.services import staff

    console = sign_in_staff(app.test_client(), staff.create_staff("helper@support.example", PASSWORD))
    assert start_view(console, world["home"]).status_code == 302
    for path in ("/account/data.json", "/account/data.zip"):
        response = console.get(path)
        assert response.status_code == 403, path
        assert "read-only" in response.get_data(as_text=True)
    # The customer themselves still can, and anonymous people are sent to sign in.
    assert signed_in(app, "home@example.com").get("/account/data.json").status_code == 200
    anonymous = app.test_client()
    response = anonymous.get("/account/data.json")
    assert response.status_code == 302 and response.headers["Location"].startswith("/login")


def test_a_german_accounts_download_has_german_activity_sentences(app, world):
    # The body is written while the response is sent: still in the account's language.
    from selfserve.models import User

    User.update(locale="de").where(User.id == world["home"].id).execute()
    client = signed_in(app, "home@example.com")
    data = json.loads(client.get("/account/data.json").get_data(as_text=True))
    whats = [row["what"] for row in data["activity"]]
    assert "Gerät Old bedroom freigegeben" in whats
    assert "Released device Old bedroom" not in whats
