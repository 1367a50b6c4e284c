"""One configuration: every setting the code reads is in config.DEFAULTS, typed, settable from
the environment, and documented in the README's tables."""

import pathlib
import re

import pytest

from selfserve import config as config_module

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Keys of Flask and its extensions that the app sets itself (not deployment settings).
FRAMEWORK_KEYS = {
    "TESTING",
    "SESSION_COOKIE_HTTPONLY",
    "SESSION_COOKIE_SAMESITE",
    "SESSION_COOKIE_NAME",
    "RATELIMIT_HEADERS_ENABLED",
    "WTF_CSRF_TIME_LIMIT",
}
READS = [
    re.compile(r"""config\[\s*["']([A-Z][A-Z0-9_]*)["']\s*\]"""),
    re.compile(r"""config\.(?:get|setdefault)\(\s*["']([A-Z][A-Z0-9_]*)["']"""),
    re.compile(r"""_setting\(\s*["']([A-Z][A-Z0-9_]*)["']"""),
]
TEMPLATE_READS = re.compile(r"""\bconfig\.([A-Z][A-Z0-9_]*)\b""")  # {{ config.DEMO }}
# views/accounts.py reads RATE_LIMIT_<NAME> for _limit("name").
LIMIT_NAMES = re.compile(r"""_limit\(\s*["']([a-z_]+)["']\s*\)""")


def _keys_read_by_the_code():
    found = {}
    sources = [*ROOT.joinpath("selfserve").rglob("*.py"), *ROOT.joinpath("templates").rglob("*.html")]
    for path in sources:
        if "simulator" in path.parts:
            continue  # the simulator has its own settings (POST /_sim/config), not the site's
        text = path.read_text(encoding="utf-8")
        patterns = READS if path.suffix == ".py" else [TEMPLATE_READS]
        keys = {key for pattern in patterns for key in pattern.findall(text)}
        keys |= {"RATE_LIMIT_" + name.upper() for name in LIMIT_NAMES.findall(text)}
        for key in keys:
            found.setdefault(key, path.relative_to(ROOT))
    return found


def test_every_setting_the_code_reads_is_in_defaults():
    found = _keys_read_by_the_code()
    assert len(found) > 40  # the scan does find the reads
    missing = {key: str(where) for key, where in found.items() if key not in config_module.DEFAULTS}
    assert {k: v for k, v in missing.items() if k not in FRAMEWORK_KEYS} == {}


def test_every_setting_is_documented_in_the_readme_tables():
    readme = ROOT.joinpath("README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", readme, re.MULTILINE))
    assert set(config_module.DEFAULTS) - documented == set()


def test_environment_values_are_parsed_to_the_type_of_their_default():
    config = config_module.from_env(
        {
            "SELFSERVE_MIGRATION_REQUESTS_PER_SECOND": "5",
            "SELFSERVE_CLAIM_MAX_FAILURES_PER_SERIAL": " 7 ",
            "SELFSERVE_SESSION_COOKIE_SECURE": "false",
            "SELFSERVE_MAIL_USE_TLS": "Yes",
            "SELFSERVE_TRANSFER_QUICK_RETRY_SECONDS": "0.1, 1",
            "SELFSERVE_RATE_LIMIT_SECOND_FACTOR": "3 per minute",
            "SELFSERVE_NOT_A_SETTING": "ignored",
        }
    )
    assert config["MIGRATION_REQUESTS_PER_SECOND"] == 5.0
    assert isinstance(config["MIGRATION_REQUESTS_PER_SECOND"], float)
    assert config["CLAIM_MAX_FAILURES_PER_SERIAL"] == 7
    assert config["SESSION_COOKIE_SECURE"] is False
    assert config["MAIL_USE_TLS"] is True
    assert config["TRANSFER_QUICK_RETRY_SECONDS"] == (0.1, 1.0)
    assert config["RATE_LIMIT_SECOND_FACTOR"] == "3 per minute"
    assert "NOT_A_SETTING" not in config
    assert config_module.from_env({})["SESSION_COOKIE_SECURE"] is True  # Secure unless turned off


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CLAIM_WINDOW_SECONDS", "15 minutes"),
        ("SESSION_COOKIE_SECURE", "maybe"),
        ("VALUES_CACHE_SECONDS", "fast"),
    ],
)
def test_a_value_that_does_not_parse_refuses_to_start_and_names_the_setting(name, value):
    with pytest.raises(config_module.ConfigError, match=f"SELFSERVE_{name}"):
        config_module.from_env({f"SELFSERVE_{name}": value})


def test_a_rate_limit_flask_limiter_cannot_read_refuses_to_start(app_config):
    from selfserve import create_app

    with pytest.raises(config_module.ConfigError, match="SELFSERVE_RATE_LIMIT_SIGNUP"):
        create_app({**app_config, "RATE_LIMIT_SIGNUP": "twenty an hour"})


def test_settings_from_the_environment_reach_the_code(app_config, monkeypatch):
    """SELFSERVE_MIGRATION_REQUESTS_PER_SECOND used to be silently ignored."""
    from selfserve import create_app
    from selfserve.services import migration

    monkeypatch.setenv("SELFSERVE_MIGRATION_REQUESTS_PER_SECOND", "5")
    monkeypatch.setenv("SELFSERVE_STAFF_VIEW_MINUTES", "7")
    app_config.pop("MIGRATION_REQUESTS_PER_SECOND", None)
    app = create_app(app_config)
    with app.app_context():
        assert migration.pacer().rate == 5.0
        from selfserve.services import impersonation

        assert impersonation.view_minutes() == 7


def test_the_session_cookie_is_secure_unless_turned_off(app_config):
    from selfserve import create_app

    secure = create_app({**app_config, "SESSION_COOKIE_SECURE": True}).test_client()
    plain = create_app({**app_config, "SESSION_COOKIE_SECURE": False}).test_client()
    secure_cookie = secure.get("/login", base_url="https://localhost").headers.get("Set-Cookie", "")
    plain_cookie = plain.get("/login").headers.get("Set-Cookie", "")
    assert "selfserve_session=" in secure_cookie and "Secure" in secure_cookie
    assert "selfserve_session=" in plain_cookie and "Secure" not in plain_cookie
