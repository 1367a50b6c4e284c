"""Rate limits shared across workers when a shared store is configured.

The per-limit trips are tested where each limit lives (tests/test_accounts_sessions.py: login
per address and per client, sign-up, forgot, resend; tests/test_devices_services.py and
tests/test_devices_views.py: claim attempts per account and per serial, kept in the database
so every worker shares them). What is left is the promise that Flask-Limiter's counters are
shared by workers once RATELIMIT_STORAGE_URI points at Redis: a second process (another
worker) uses up the sign-in limit, and this process is refused.
"""

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
from helpers import csrf_token

REDIS_URI = "redis://127.0.0.1:6379"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Another worker: its own process and app, the same Redis.
WORKER = textwrap.dedent("""
    import json, re, sys
    from selfserve import create_app
    settings = json.loads(sys.argv[1])
    app = create_app(settings)
    client = app.test_client()
    page = client.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    statuses = []
    for n in range(settings["ATTEMPTS"]):
        response = client.post("/login", data={"email": f"guess{n}@example.com", "password": "not it at all",
                                              "csrf_token": token}, environ_base={"REMOTE_ADDR": settings["IP"]})
        statuses.append(response.status_code)
    print(json.dumps(statuses))
""")


def _redis():
    redis = pytest.importorskip("redis")
    connection = redis.Redis.from_url(REDIS_URI, socket_connect_timeout=1, socket_timeout=2)
    try:
        connection.ping()
    except redis.RedisError:
        pytest.skip("Redis is not reachable on 127.0.0.1:6379")
    return connection


@pytest.fixture
def shared_store(app_config):
    connection = _redis()
    # A client address no other test uses: its counters are this test's alone.
    address = f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"
    app_config["RATELIMIT_STORAGE_URI"] = REDIS_URI
    app_config["RATE_LIMIT_LOGIN"] = "3 per minute"
    yield connection, address
    for key in connection.scan_iter(match=f"*{address}*"):
        connection.delete(key)
    connection.close()


def test_sign_in_limit_is_shared_by_workers_through_redis(shared_store, app_config, app, client):
    connection, address = shared_store
    settings = {
        "TESTING": True,
        "SECRET_KEY": "another-worker-secret-key-0123456789abcdef",
        "DATABASE_URL": app_config["DATABASE_URL"],  # the same database, as workers share one
        "PARTICLE_API_URL": app_config["PARTICLE_API_URL"],
        "PARTICLE_PRODUCT": app_config["PARTICLE_PRODUCT"],
        "PARTICLE_CLIENT_ID": app_config["PARTICLE_CLIENT_ID"],
        "PARTICLE_CLIENT_SECRET": app_config["PARTICLE_CLIENT_SECRET"],
        "RATELIMIT_STORAGE_URI": REDIS_URI,
        "RATE_LIMIT_LOGIN": "3 per minute",
        "SESSION_COOKIE_SECURE": False,
        "SWEEP_SECONDS": 0,
        "ATTEMPTS": 3,
        "IP": address,
    }
    worker = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(settings)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert json.loads(worker.stdout.strip().splitlines()[-1]) == [401, 401, 401]
    assert any(address in key.decode() for key in connection.scan_iter(match=f"*{address}*"))

    # This worker has seen no attempt from that address, yet refuses the next one.
    token = csrf_token(client, "/login")
    response = client.post(
        "/login",
        data={"email": "guess9@example.com", "password": "not it at all", "csrf_token": token},
        environ_base={"REMOTE_ADDR": address},
    )
    assert response.status_code == 429
    page = response.get_data(as_text=True)
    # The sign-in page keeps its form and the address, says when to try again, offers the reset.
    assert "Too many sign-in attempts" in page and "try again in" in page
    assert 'id="password"' in page and 'value="guess9@example.com"' in page
    assert "/forgot" in page
    assert 0 < int(response.headers["Retry-After"]) <= 3600
    # Another address is unaffected.
    other = client.post(
        "/login",
        data={"email": "guess9@example.com", "password": "not it at all", "csrf_token": token},
        environ_base={"REMOTE_ADDR": "192.0.2.77"},
    )
    assert other.status_code == 401
    for key in connection.scan_iter(match="*192.0.2.77*"):
        connection.delete(key)


def _failed_login(client, token, remote_addr, forwarded=None):
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    return client.post(
        "/login",
        data={"email": "someone@example.com", "password": "not it at all", "csrf_token": token},
        environ_base={"REMOTE_ADDR": remote_addr},
        headers=headers,
    ).status_code


@pytest.fixture
def behind_one_proxy(app_config):
    app_config["TRUSTED_PROXIES"] = 1
    app_config["RATE_LIMIT_LOGIN"] = "2 per minute"
    return app_config


def test_behind_a_proxy_limits_count_per_client_not_per_proxy(behind_one_proxy, app, client):
    proxy = "10.0.0.1"
    token = csrf_token(client, "/login")
    assert [_failed_login(client, token, proxy, "198.51.100.1") for _ in range(3)] == [401, 401, 429]
    # Another client behind the same proxy is not locked out by the first one.
    assert _failed_login(client, token, proxy, "198.51.100.2") == 401
    # A client can't escape its limit by sending its own X-Forwarded-For: the proxy appends the
    # real address, and only the proxy's entry is trusted.
    assert _failed_login(client, token, proxy, "203.0.113.9, 198.51.100.1") == 429


def test_without_trusted_proxies_forwarded_headers_are_ignored(app_config, app, client):
    app.config["RATE_LIMIT_LOGIN"] = "2 per minute"
    token = csrf_token(client, "/login")
    statuses = [_failed_login(client, token, "192.0.2.10", f"198.51.100.{n}") for n in range(3)]
    assert statuses == [401, 401, 429]
