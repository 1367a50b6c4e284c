"""The device registry from manufacturing: device id, serial number, setup code, model.

Importing is safe to re-run: rows are matched by device id, unchanged rows stay as they are,
setup codes are stored only as Argon2 hashes, and every device not yet in the Particle product
is (re-)added to it, so a device whose product import failed last time is retried.
"""

import csv
import dataclasses
import json
import logging
import re
import urllib.parse

import click
import peewee
from flask import current_app
from flask.cli import with_appcontext

from selfserve import device_models
from selfserve import passwords
from selfserve.models import Device
from selfserve.models import db
from selfserve.particle import get_client
from selfserve.particle.errors import ParticleError

log = logging.getLogger(__name__)

COLUMNS = ("device_id", "serial_number", "setup_code", "model")
# Optional: the dealer organisation (its name here) the device was sold through.
OPTIONAL_COLUMNS = ("dealer",)
DEALER_MAX = 100
DEVICE_ID_RE = re.compile(r"[0-9a-f]{24}")
SERIAL_RE = re.compile(r"[A-Z0-9][A-Z0-9-]{2,63}")
SETUP_CODE_MIN = 4
SETUP_CODE_MAX = 64


@dataclasses.dataclass
class RowResult:
    """What happened to one row. `status`: added | updated | unchanged | invalid."""

    line: int
    device_id: str
    serial_number: str
    status: str
    reason: str = ""
    in_product: bool = False
    product_error: str = ""
    # Kept in memory only, for printing label URLs right after an import; never stored or logged.
    setup_code: str = dataclasses.field(default="", repr=False)


def normalize_device_id(raw):
    """A device id as Particle spells it (24 lowercase hex), or None when malformed."""
    text = (raw or "").strip().lower()
    return text if DEVICE_ID_RE.fullmatch(text) else None


def normalize_serial(raw):
    """Serials are printed in capitals; accept any case and surrounding spaces."""
    return (raw or "").strip().upper()


def normalize_setup_code(raw):
    """Setup codes as printed: spaces, dashes and case don't matter when typing them."""
    return re.sub(r"[\s-]+", "", raw or "").upper()


def _validate(row):
    """Return (clean dict, None) or (partial dict, reason)."""
    device_id_raw = (row.get("device_id") or "").strip()
    clean = {
        "device_id": normalize_device_id(device_id_raw),
        "serial_number": normalize_serial(row.get("serial_number")),
        "setup_code": normalize_setup_code(row.get("setup_code")),
        "model": (row.get("model") or "").strip().lower(),
        "dealer": re.sub(r"\s+", " ", row.get("dealer") or "").strip() or None,
    }
    shown_id = clean["device_id"] or device_id_raw[:40]
    clean["shown_id"] = shown_id
    if clean["device_id"] is None:
        return clean, "device_id must be 24 hexadecimal characters"
    if not SERIAL_RE.fullmatch(clean["serial_number"]):
        return clean, "serial_number must be 3-64 letters, digits or dashes"
    if not SETUP_CODE_MIN <= len(clean["setup_code"]) <= SETUP_CODE_MAX:
        return clean, f"setup_code must be {SETUP_CODE_MIN}-{SETUP_CODE_MAX} characters"
    if device_models.get(clean["model"]) is None:
        known = ", ".join(sorted(device_models.MODELS))
        return clean, f"model must be one of: {known}"
    dealer = clean["dealer"]
    if dealer is not None and (len(dealer) > DEALER_MAX or any(ord(ch) < 32 for ch in dealer)):
        return clean, f"dealer must be an organisation name of at most {DEALER_MAX} characters"
    return clean, None


def import_rows(rows, add_to_product=True):
    """Import registry rows (dicts with COLUMNS) and return one RowResult per row.

    Each row is saved in its own transaction, so a crash part-way keeps what was done and a
    re-run completes the rest. Afterwards every valid device not yet in the Particle product
    is added to it (`add_to_product=False` skips that, e.g. when the cloud is known down).
    """
    results = []
    seen_ids = set()
    seen_serials = set()
    for index, row in enumerate(rows):
        line = index + 2  # line 1 is the CSV header
        clean, reason = _validate(row)
        if reason is None and clean["device_id"] in seen_ids:
            reason = "device_id appears more than once in this file"
        if reason is None and clean["serial_number"] in seen_serials:
            reason = "serial_number appears more than once in this file"
        if reason is not None:
            results.append(RowResult(line, clean["shown_id"], clean["serial_number"], "invalid", reason))
            continue
        seen_ids.add(clean["device_id"])
        seen_serials.add(clean["serial_number"])
        results.append(_save_row(line, clean))
    if add_to_product:
        _add_to_product(results)
    else:
        for result in results:
            if result.status != "invalid":
                result.in_product = Device.get_by_id(result.device_id).in_product
    return results


def _save_row(line, clean):
    device_id = clean["device_id"]
    serial = clean["serial_number"]
    result = RowResult(line, device_id, serial, "", setup_code=clean["setup_code"])
    clash = Device.get_or_none((Device.serial_number == serial) & (Device.device_id != device_id))
    if clash is not None:
        result.status = "invalid"
        result.reason = f"serial_number is already used by device {clash.device_id}"
        return result
    try:
        with db.atomic():
            existing = Device.get_or_none(Device.device_id == device_id)
            if existing is None:
                Device.create(
                    device_id=device_id,
                    serial_number=serial,
                    setup_code_hash=passwords.hash_password(clean["setup_code"]),
                    model=clean["model"],
                    sold_through=clean["dealer"],
                )
                result.status = "added"
                return result
            changes = {}
            if existing.serial_number != serial:
                changes["serial_number"] = serial
            if existing.model != clean["model"]:
                changes["model"] = clean["model"]
            if existing.sold_through != clean["dealer"]:
                changes["sold_through"] = clean["dealer"]
            if not passwords.check_password(existing.setup_code_hash, clean["setup_code"]):
                changes["setup_code_hash"] = passwords.hash_password(clean["setup_code"])
            if changes:
                Device.update(**changes).where(Device.device_id == device_id).execute()
                result.status = "updated"
                # Field names only: the detail must never carry a setup code.
                result.reason = "changed: " + ", ".join(
                    "setup_code" if key == "setup_code_hash" else key for key in sorted(changes)
                )
            else:
                result.status = "unchanged"
    except peewee.IntegrityError:
        # Another import raced us to the same serial: the database's unique index decided.
        result.status = "invalid"
        result.reason = "serial_number is already used by another device"
    return result


def _add_to_product(results):
    """Add every imported device not yet in the product; record the outcome per device."""
    client = get_client()
    for result in results:
        if result.status == "invalid":
            continue
        device = Device.get_by_id(result.device_id)
        if device.in_product:
            result.in_product = True
            continue
        try:
            answer = client.add_device_to_product(device.device_id) or {}
        except ParticleError as exc:
            log.warning("Adding device %s to the product failed: %s", device.device_id, exc)
            result.product_error = (
                f"not added to the Particle product ({type(exc).__name__}); re-run to retry"
            )
            continue
        refused = [str(x).lower() for x in (answer.get("invalidDeviceIds") or [])]
        elsewhere = [str(x).lower() for x in (answer.get("nonmemberDeviceIds") or [])]
        if device.device_id in refused:
            result.product_error = "Particle says this device id is invalid"
            continue
        if device.device_id in elsewhere:
            result.product_error = "the device belongs to another Particle product"
            continue
        Device.update(in_product=True).where(Device.device_id == device.device_id).execute()
        result.in_product = True


def read_csv(stream):
    """Rows of a registry CSV as dicts; raises ValueError when a column is missing."""
    reader = csv.DictReader(stream)
    header = [name.strip().lower() for name in (reader.fieldnames or [])]
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        raise ValueError("missing column(s): " + ", ".join(missing))
    reader.fieldnames = header
    return list(reader)


def seed_from_fixtures(path):
    """Import the simulator's demo devices (fixtures JSON) into the registry and the product."""
    with open(path, encoding="utf-8") as handle:
        fixtures = json.load(handle)
    rows = [
        {
            "device_id": device["id"],
            "serial_number": device["serial_number"],
            "setup_code": device["setup_code"],
            "model": device["model"],
            "dealer": device.get("dealer"),
        }
        for device in fixtures["devices"]
    ]
    return import_rows(rows)


def label_url(serial_number, setup_code, base_url=""):
    """The URL printed as a QR code on a device's label.

    The serial and the setup code go in the fragment (after #), which browsers never send to
    the server, so the code cannot end up in access logs; the claim page's script copies them
    into the form and removes them from the address bar.
    """
    fragment = urllib.parse.urlencode({"serial": serial_number, "code": setup_code})
    return f"{base_url.rstrip('/')}/claim#{fragment}"


def summarize(results):
    """Counts per status, plus how many valid devices are still outside the product."""
    counts = {"added": 0, "updated": 0, "unchanged": 0, "invalid": 0, "not_in_product": 0}
    for result in results:
        counts[result.status] += 1
        if result.status != "invalid" and not result.in_product:
            counts["not_in_product"] += 1
    return counts


@click.command("import-registry")
@click.argument("csv_file", type=click.File("r", encoding="utf-8-sig"))
@click.option(
    "--labels",
    is_flag=True,
    help="Also print each device's label URL (holds the setup code: keep it private).",
)
@click.option(
    "--qr-dir", type=click.Path(file_okay=False), help="Also write one label QR code (SVG) per device here."
)
@with_appcontext
def import_registry_command(csv_file, labels, qr_dir):
    """Import the manufacturing registry CSV (device_id, serial_number, setup_code, model, and
    optionally dealer: the dealer organisation the device was sold through)."""
    try:
        rows = read_csv(csv_file)
    except (ValueError, csv.Error) as exc:
        raise click.ClickException(f"{csv_file.name}: {exc}")
    db.connect(reuse_if_open=True)
    try:
        results = import_rows(rows)
    finally:
        db.close()
    base_url = current_app.config.get("BASE_URL") or ""
    for result in results:
        note = result.reason
        if result.status != "invalid":
            product = "in product" if result.in_product else result.product_error
            note = "; ".join(part for part in (note, product) if part)
        click.echo(
            f"line {result.line}: {result.status:<9} {result.device_id or '-'} {result.serial_number or '-'}"
            + (f"  ({note})" if note else "")
        )
        if result.status != "invalid" and labels:
            click.echo(f"    label: {label_url(result.serial_number, result.setup_code, base_url)}")
    if qr_dir:
        _write_qr_codes(results, qr_dir, base_url)
    counts = summarize(results)
    click.echo(
        "{added} added, {updated} updated, {unchanged} unchanged, {invalid} invalid; "
        "{not_in_product} not in the Particle product yet (re-run to retry).".format(**counts)
    )
    if counts["invalid"] or counts["not_in_product"]:
        raise SystemExit(1)


def _write_qr_codes(results, qr_dir, base_url):
    import os

    import qrcode
    import qrcode.image.svg

    os.makedirs(qr_dir, exist_ok=True)
    for result in results:
        if result.status == "invalid":
            continue
        image = qrcode.make(
            label_url(result.serial_number, result.setup_code, base_url),
            image_factory=qrcode.image.svg.SvgPathImage,
        )
        path = os.path.join(qr_dir, f"{result.serial_number}.svg")
        image.save(path)
    click.echo(f"QR codes written to {qr_dir}")
