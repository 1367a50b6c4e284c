"""Reconciliation: compare who owns what in our database with Particle's product view.

Our database is the truth; the Particle claim mirrors it. A run reads every page of the
product's device list (product token), compares it with the registry and reports each
disagreement as a ReconcileFinding. It never changes anything on either side: drift is for
staff to look at and decide (see the fleet view), because guessing which side is right could
hand a device to the wrong household.

Kinds of drift:
- `unclaimed_on_particle`: owned in our database, no owner on Particle;
- `claimed_not_in_db`: free in our database, claimed on Particle;
- `owner_mismatch`: both have an owner, but not the same customer;
- `not_in_product`: in our registry, absent from the Particle product;
- `not_in_registry`: in the Particle product, unknown to our registry.

Devices with a claim or release in flight (`claim_state`) are skipped: the sweep finishes them.
"""

import logging

import click
import peewee
from flask.cli import with_appcontext

from selfserve.i18n import lazy_text as _l
from selfserve.models import Device
from selfserve.models import ReconcileFinding
from selfserve.models import ReconcileRun
from selfserve.models import User
from selfserve.models import db
from selfserve.models import utcnow
from selfserve.particle import get_client
from selfserve.particle.errors import ParticleError
from selfserve.services import audit

log = logging.getLogger(__name__)

PAGE_SIZE = 100
MAX_PAGES = 10_000  # a guard against a cloud that never says it is done

KINDS = {
    "unclaimed_on_particle": _l("Owned here, unclaimed on Particle"),
    "claimed_not_in_db": _l("Claimed on Particle, free here"),
    "owner_mismatch": _l("Different owner on Particle"),
    "not_in_product": _l("Not in the Particle product"),
    "not_in_registry": _l("In the Particle product, not in our registry"),
}


def product_devices(client=None):
    """Every device of the product as Particle sees it: {device_id: {"owner", "online",
    "last_heard", "serial_number"}}. Raises ParticleError if a page can't be read."""
    client = client or get_client()
    seen = {}
    page = 1
    while page <= MAX_PAGES:
        answer = client.list_product_devices(page=page, per_page=PAGE_SIZE)
        for entry in answer["devices"]:
            device_id = str(entry.get("id") or "").lower()
            if not device_id:
                continue
            seen[device_id] = {
                "owner": (entry.get("owner") or None) and str(entry["owner"]).lower(),
                "online": bool(entry.get("online", entry.get("connected"))),
                "last_heard": entry.get("last_heard"),
                "serial_number": entry.get("serial_number"),
            }
        total_pages = answer["meta"].get("total_pages") or 0
        if page >= total_pages or not answer["devices"]:
            break
        page += 1
    return seen


def compare(device, particle_view, customers_by_particle_id):
    """The findings for one registry device given Particle's view of it (None: absent from
    the product): a list of (kind, detail). `customers_by_particle_id` maps a lowercase
    Particle customer id to our User."""
    if device.claim_state is not None:
        return []
    db_owner = device.owner if device.owner_id is not None else None
    expected = (
        db_owner.particle_customer_id.lower()
        if db_owner is not None and db_owner.particle_customer_id
        else None
    )
    if particle_view is None:
        return [
            (
                "not_in_product",
                {"db_owner": db_owner.email if db_owner else None, "db_in_product": device.in_product},
            )
        ]
    particle_owner = particle_view.get("owner")
    known = customers_by_particle_id.get(particle_owner) if particle_owner else None
    detail = {
        "db_owner": db_owner.email if db_owner else None,
        "particle_owner": particle_owner,
        "particle_owner_account": known.email if known else None,
    }
    if db_owner is not None and particle_owner is None:
        return [("unclaimed_on_particle", detail)]
    if db_owner is None and particle_owner is not None:
        return [("claimed_not_in_db", detail)]
    if db_owner is not None and particle_owner != expected:
        return [("owner_mismatch", detail)]
    return []


def _customers_by_particle_id():
    query = User.select().where(User.particle_customer_id.is_null(False))
    return {user.particle_customer_id.lower(): user for user in query}


def run(trigger="cli", started_by=None):
    """Compare the whole registry with the product; store and return the ReconcileRun (with
    status "done", or "failed" and a message when Particle couldn't be read: then no findings
    are stored, as a half-read product would report false drift)."""
    started = ReconcileRun.create(trigger=trigger, started_by=started_by, started_at=utcnow())
    try:
        particle = product_devices()
    except ParticleError as exc:
        log.warning("Reconciliation %s could not read the product: %s", started.id, exc)
        ReconcileRun.update(status="failed", error=exc.user_message, finished_at=utcnow()).where(
            ReconcileRun.id == started.id
        ).execute()
        return ReconcileRun.get_by_id(started.id)

    customers = _customers_by_particle_id()
    findings = []
    checked = 0
    registry_ids = set()
    devices = Device.select(Device, User).join(User, peewee.JOIN.LEFT_OUTER, on=(Device.owner == User.id))
    for device in devices:
        checked += 1
        registry_ids.add(device.device_id)
        for kind, detail in compare(device, particle.get(device.device_id), customers):
            findings.append(
                {"run": started.id, "device_id": device.device_id, "kind": kind, "detail": detail}
            )
    for device_id in sorted(set(particle) - registry_ids):
        view = particle[device_id]
        known = customers.get(view["owner"]) if view["owner"] else None
        findings.append(
            {
                "run": started.id,
                "device_id": device_id,
                "kind": "not_in_registry",
                "detail": {
                    "particle_owner": view["owner"],
                    "particle_owner_account": known.email if known else None,
                    "serial_number": view.get("serial_number"),
                },
            }
        )
    with db.atomic():
        for start in range(0, len(findings), 200):
            ReconcileFinding.insert_many(findings[start : start + 200]).execute()
        ReconcileRun.update(
            status="done",
            finished_at=utcnow(),
            devices_checked=checked,
            particle_devices=len(particle),
            findings_count=len(findings),
            particle_status={
                device_id: {"online": view["online"], "last_heard": view["last_heard"]}
                for device_id, view in particle.items()
            },
        ).where(ReconcileRun.id == started.id).execute()
    if started_by is not None:
        audit.record(
            "support.reconciled", user=None, actor=started_by, run=started.id, findings=len(findings)
        )
    log.info("Reconciliation %s: %d devices, %d findings", started.id, checked, len(findings))
    return ReconcileRun.get_by_id(started.id)


def latest_run():
    """The newest finished run (done or failed), or None."""
    return (
        ReconcileRun.select().where(ReconcileRun.status != "running").order_by(ReconcileRun.id.desc()).first()
    )


def findings_of(run_row, kind=None):
    query = ReconcileFinding.select().where(ReconcileFinding.run == run_row.id)
    if kind:
        query = query.where(ReconcileFinding.kind == kind)
    return list(query.order_by(ReconcileFinding.kind, ReconcileFinding.device_id))


def drift_by_device(run_row):
    """{device_id: [finding, ...]} of a run (empty for None or a failed run)."""
    if run_row is None or run_row.status != "done":
        return {}
    result = {}
    for finding in findings_of(run_row):
        result.setdefault(finding.device_id, []).append(finding)
    return result


def particle_status(run_row):
    """{device_id: {"online", "last_heard"}} as Particle said at that run (empty if none)."""
    if run_row is None or run_row.status != "done":
        return {}
    return run_row.particle_status or {}


def describe(finding):
    return KINDS.get(finding.kind, finding.kind)


@click.command("reconcile")
@with_appcontext
def reconcile_command():
    """Compare our device ownership with the Particle product and report drift (changes nothing)."""
    db.connect(reuse_if_open=True)
    result = run(trigger="cli")
    if result.status != "done":
        click.echo(f"Reconciliation failed: {result.error}", err=True)
        raise SystemExit(2)
    click.echo(
        f"Checked {result.devices_checked} registry devices against {result.particle_devices} product devices: "
        f"{result.findings_count} finding(s)."
    )
    for finding in findings_of(result):
        detail = finding.detail or {}
        parts = [f"{key}={value}" for key, value in sorted(detail.items()) if value is not None]
        click.echo(f"  {finding.device_id}  {finding.kind}  {' '.join(parts)}")
    click.echo("Nothing was changed. Review the findings in the support console (Fleet).")
