"""The device registry: CSV import (validation, hashing, re-runs) and the Particle product import."""

import io
import logging

import pytest
from helpers import demo_devices
from helpers import seed_registry

from selfserve import passwords
from selfserve.models import Device
from selfserve.services import registry

GOOD_ID = "e00fce68a1b2c3d4e5f60701"
OTHER_ID = "e00fce68a1b2c3d4e5f60702"

CSV = """device_id,serial_number,setup_code,model
E00FCE68A1B2C3D4E5F60701, ssw-24a-000101 ,7KQ2M9XD,window
e00fce68a1b2c3d4e5f60702,SSW-24A-000102,H4TR8WPL,Window
nothex0000000000000000zz,SSW-BAD-1,ABCDEFGH,window
e00fce68a1b2c3d4e5f6070,SSW-BAD-2,ABCDEFGH,window
e00fce68a1b2c3d4e5f60799,SSW-BAD-3,ABCDEFGH,toaster
e00fce68a1b2c3d4e5f60798,SSW-BAD-4,,pump
e00fce68a1b2c3d4e5f60701,SSW-DUP-1,ABCDEFGH,window
e00fce68a1b2c3d4e5f60797,SSW-24A-000102,ABCDEFGH,pump
"""


def _import(text):
    return registry.import_rows(registry.read_csv(io.StringIO(text)))


def test_import_validates_normalises_and_hashes(app, sim):
    results = _import(CSV)
    by_line = {result.line: result for result in results}

    assert [r.status for r in results] == ["added", "added"] + ["invalid"] * 6
    assert by_line[2].device_id == GOOD_ID  # lowercased
    assert by_line[2].serial_number == "SSW-24A-000101"  # trimmed and uppercased
    assert "24 hexadecimal" in by_line[4].reason
    assert "24 hexadecimal" in by_line[5].reason
    assert "model must be one of" in by_line[6].reason
    assert "setup_code" in by_line[7].reason
    assert "more than once" in by_line[8].reason and "device_id" in by_line[8].reason
    assert "more than once" in by_line[9].reason and "serial_number" in by_line[9].reason

    device = Device.get_by_id(GOOD_ID)
    assert device.serial_number == "SSW-24A-000101"
    assert device.model == "window"
    assert Device.get_by_id(OTHER_ID).model == "window"  # "Window" lowercased
    assert "7KQ2M9XD" not in device.setup_code_hash
    assert passwords.check_password(device.setup_code_hash, "7KQ2M9XD")
    assert Device.select().count() == 2


def test_import_adds_devices_to_the_particle_product(app, sim):
    assert sim.device(GOOD_ID)["in_product"] is False
    results = _import(CSV)
    assert results[0].in_product and results[1].in_product
    assert Device.get_by_id(GOOD_ID).in_product is True
    assert sim.device(GOOD_ID)["in_product"] is True
    assert sim.device(OTHER_ID)["in_product"] is True


def test_rerun_is_safe_and_reports_updates(app, sim):
    _import(CSV)
    sim.reset_counters()
    again = _import(CSV)
    assert [r.status for r in again[:2]] == ["unchanged", "unchanged"]
    # Devices already in the product are not imported again.
    assert sim.counters()["routes"].get("POST /v1/products/:p/devices", 0) == 0
    assert Device.select().count() == 2

    changed = CSV.replace("7KQ2M9XD,window", "NEWCODE1,window")
    results = _import(changed)
    assert results[0].status == "updated"
    assert results[0].reason == "changed: setup_code"  # names the field, never the code
    device = Device.get_by_id(GOOD_ID)
    assert passwords.check_password(device.setup_code_hash, "NEWCODE1")
    assert not passwords.check_password(device.setup_code_hash, "7KQ2M9XD")


def test_failed_product_import_is_retried_on_rerun(app, sim):
    sim.add_fault("POST", "/v1/products/*/devices", count=1, status=503)
    first = _import(CSV)
    assert first[0].status == "added"
    assert first[0].in_product is False
    assert "re-run" in first[0].product_error
    assert Device.get_by_id(GOOD_ID).in_product is False
    assert first[1].in_product is True  # the fault hit only the first device
    assert registry.summarize(first)["not_in_product"] == 1

    second = _import(CSV)
    assert second[0].status == "unchanged"
    assert second[0].in_product is True
    assert Device.get_by_id(GOOD_ID).in_product is True
    assert sim.device(GOOD_ID)["in_product"] is True


def test_serial_taken_by_another_device_is_invalid(app, sim):
    _import(CSV)
    results = _import(
        "device_id,serial_number,setup_code,model\ne00fce68a1b2c3d4e5f60703,SSW-24A-000101,ABCDEFGH,window\n"
    )
    assert results[0].status == "invalid"
    assert GOOD_ID in results[0].reason
    assert Device.get_or_none(Device.device_id == "e00fce68a1b2c3d4e5f60703") is None


def test_missing_column_is_refused():
    with pytest.raises(ValueError, match="setup_code"):
        registry.read_csv(io.StringIO("device_id,serial_number,model\n"))


def test_seed_from_fixtures_imports_every_demo_device(app, sim):
    devices = seed_registry()
    assert Device.select().count() == len(devices)
    for fixture in devices:
        device = Device.get_by_id(fixture["id"])
        assert device.serial_number == fixture["serial_number"]
        assert device.model == fixture["model"]
        assert device.in_product
        assert passwords.check_password(device.setup_code_hash, fixture["setup_code"])
        assert sim.device(fixture["id"])["in_product"] is True


def test_label_url_keeps_the_code_in_the_fragment():
    url = registry.label_url("SSW-24A-000101", "7KQ2M9XD", "https://example.test/")
    assert url == "https://example.test/claim#serial=SSW-24A-000101&code=7KQ2M9XD"
    assert "?" not in url


def test_cli_import_registry(app, sim, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "registry.csv"
    path.write_text(CSV, encoding="utf-8")
    runner = app.test_cli_runner()

    result = runner.invoke(args=["import-registry", str(path)])
    assert "line 2: added" in result.output
    assert "line 6: invalid" in result.output and "model must be one of" in result.output
    assert "2 added, 0 updated, 0 unchanged, 6 invalid" in result.output
    assert result.exit_code == 1  # invalid rows make the command fail for scripts
    # Setup codes appear neither in the report nor in any log line.
    for fixture in demo_devices()[:2]:
        assert fixture["setup_code"] not in result.output
        assert fixture["setup_code"] not in caplog.text

    good = tmp_path / "good.csv"
    good.write_text("\n".join(CSV.splitlines()[:3]) + "\n", encoding="utf-8")
    rerun = runner.invoke(args=["import-registry", str(good), "--labels"])
    assert rerun.exit_code == 0, rerun.output
    assert "0 added, 0 updated, 2 unchanged, 0 invalid; 0 not in the Particle product" in rerun.output
    # Labels were asked for explicitly: the operator prints them on the devices.
    assert "label: http://localhost/claim#serial=SSW-24A-000101&code=7KQ2M9XD" in rerun.output
    assert "7KQ2M9XD" not in caplog.text


def test_cli_refuses_a_file_without_the_columns(app, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("id,serial\n1,2\n", encoding="utf-8")
    result = app.test_cli_runner().invoke(args=["import-registry", str(path)])
    assert result.exit_code != 0
    assert "missing column" in result.output


def test_cli_writes_label_qr_codes(app, sim, tmp_path):
    path = tmp_path / "registry.csv"
    path.write_text("\n".join(CSV.splitlines()[:3]) + "\n", encoding="utf-8")
    qr_dir = tmp_path / "labels"
    result = app.test_cli_runner().invoke(args=["import-registry", str(path), "--qr-dir", str(qr_dir)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in qr_dir.iterdir()) == ["SSW-24A-000101.svg", "SSW-24A-000102.svg"]
    assert (qr_dir / "SSW-24A-000101.svg").read_text().lstrip().startswith("<?xml")
