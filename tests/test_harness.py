"""The test harness itself behaves like a real server."""


def test_each_request_gets_its_own_g(app):
    from flask import g

    @app.get("/_test_g")
    def _probe():
        seen = getattr(g, "probe", None)
        g.probe = "set"
        return {"seen": seen}

    app.view_functions["_probe"].is_public = True
    client = app.test_client()
    assert client.get("/_test_g").json == {"seen": None}
    assert client.get("/_test_g").json == {"seen": None}


def test_tests_cannot_reach_past_loopback():
    import socket

    import pytest

    with pytest.raises(AssertionError, match="only loopback"):
        socket.create_connection(("192.0.2.1", 80), timeout=0.1)
