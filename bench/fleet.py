"""The bench's homeowners and devices, set up through the real services: devices are added to
the simulated cloud, imported into the registry (and the Particle product) by the registry
service, each account is verified with the link sign-up would mail (which creates its Particle
customer through the real client) and claims its device with serial + setup code."""

import dataclasses
import secrets

from bench.servers import BenchError

PASSWORD = "bench-password-not-secret"


@dataclasses.dataclass
class Homeowner:
    email: str
    device_ids: list


def _label(index, offline=False):
    suffix = "OFF" if offline else "DEV"
    return {
        "device_id": secrets.token_hex(12),
        "serial_number": f"BENCH-{suffix}-{index:05d}",
        "setup_code": secrets.token_hex(4).upper(),
        "model": "window" if index % 2 == 0 else "pump",
    }


def create(app, simulator, count, offline_owner=1):
    """`count` verified, provisioned homeowners, each owning one online device; homeowner
    `offline_owner` also owns an offline device. Returns (homeowners, offline device id)."""
    from selfserve import models
    from selfserve import passwords
    from selfserve import tokens
    from selfserve.models import User
    from selfserve.services import accounts
    from selfserve.services import devices
    from selfserve.services import registry

    labels = [_label(index) for index in range(count)]
    offline_label = _label(offline_owner, offline=True)
    for label in labels + [offline_label]:
        simulator.add_device(
            label["device_id"],
            model=label["model"],
            serial_number=label["serial_number"],
            setup_code=label["setup_code"],
            online=True,
        )

    homeowners = []
    with app.app_context(), models.db.connection_context():
        results = registry.import_rows(labels + [offline_label])
        refused = [r for r in results if r.status != "added" or not r.in_product]
        if refused:
            raise BenchError(f"registry import refused devices: {refused[:3]}")
        # Every account gets the same password, so Argon2 hashes it once (it is slow on purpose).
        password_hash = passwords.hash_password(PASSWORD)
        for index, label in enumerate(labels):
            email = f"homeowner{index:03d}@bench.example"
            # What accounts.sign_up saves (minus its verification email: the bench has no mail).
            user = User.create(email=email, password_hash=password_hash)
            link = tokens.make("verify_email", {"u": user.id, "e": tokens.fingerprint(email)})
            user = accounts.verify_email(link, password=PASSWORD).user  # the sign-in that finishes it
            if user.provisioning_state != "ready":
                raise BenchError(
                    f"provisioning {email} ended {user.provisioning_state!r}: {user.provisioning_error}"
                )
            owned = [label]
            if index == offline_owner:
                owned.append(offline_label)
            for device_label in owned:
                devices.claim(user, device_label["serial_number"], device_label["setup_code"])
            homeowners.append(Homeowner(email, [item["device_id"] for item in owned]))
    simulator.set_device(offline_label["device_id"], online=False)
    return homeowners, offline_label["device_id"]


def forget_customer_tokens(app):
    """Empty the customer token cache (as after a key rotation), so the token count below
    starts cold; returns how many cached tokens there were."""
    from selfserve import models
    from selfserve.models import ParticleToken

    with app.app_context(), models.db.connection_context():
        return ParticleToken.delete().where(ParticleToken.key.startswith("customer:")).execute()
