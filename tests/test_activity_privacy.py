"""The activity page shows an address only for the account holder's own actions."""

from helpers import login
from helpers import make_user

from selfserve.models import AuditEvent
from selfserve.services import audit


def test_another_persons_action_shows_neither_their_address_nor_support(app, client):
    owner = make_user("owner@example.com", provisioned=False)
    asker = make_user("asker@example.com", provisioned=False)
    event = audit.record("transfer.request_received", user=owner, actor=asker)
    AuditEvent.update(ip="198.51.100.9").where(AuditEvent.id == event.id).execute()
    own = audit.record("account.signed_in", user=owner)
    AuditEvent.update(ip="192.0.2.44").where(AuditEvent.id == own.id).execute()

    login(client, "owner@example.com")
    page = client.get("/account/activity").get_data(as_text=True)
    assert "192.0.2.44" in page  # their own sign-in keeps its address
    assert "198.51.100.9" not in page
    assert "<td>Support</td>" not in page
