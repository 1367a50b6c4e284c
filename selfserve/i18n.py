"""The person's language and time zone (Flask-Babel).

Language: the choice stored on the account (settings page), else the best match of the
browser's Accept-Language among LANGUAGES, else English. Time zone: the one stored on the
account (the browser's, sent by a hidden form field at sign-up and sign-in, changeable in
settings), else UTC. The database keeps naive UTC times; pages and emails show them through
Flask-Babel's formatters in the reader's locale and zone.

Emails are written in their recipient's language and zone (`as_recipient`), not in the
language of whoever's request happens to send them.

Catalogues: selfserve/translations/messages.pot (extracted with babel.cfg, committed) and
<lang>/LC_MESSAGES/messages.po (committed). The .mo files are built from the .po files by
`compile_catalogues` (bin/setup, the test harness and the demo call it; `bin/i18n compile`
in production); they are not committed.
"""

import contextlib
import datetime
import logging
import os
import pathlib
import zoneinfo

from flask import current_app
from flask import g
from flask import has_request_context
from flask import request
from flask.json.tag import JSONTag
from flask_babel import Babel
from flask_babel import format_date
from flask_babel import format_datetime
from flask_babel import format_decimal
from flask_babel import format_time
from flask_babel import get_timezone
from flask_babel import gettext
from flask_babel import pgettext
from flask_babel import refresh
from flask_babel.speaklater import LazyString
from markupsafe import escape

log = logging.getLogger(__name__)

# The languages the site speaks, by code, named in their own language (the settings page).
LANGUAGES = {"en": "English", "de": "Deutsch", "es": "Español"}
DEFAULT_LANGUAGE = "en"
DEFAULT_TIME_ZONE = "UTC"
TIME_ZONE_MAX = 64
TRANSLATIONS = pathlib.Path(__file__).resolve().parent / "translations"

babel = Babel()


def init_app(app):
    babel.init_app(
        app,
        default_locale=DEFAULT_LANGUAGE,
        default_timezone=DEFAULT_TIME_ZONE,
        default_translation_directories=str(TRANSLATIONS),
        locale_selector=select_locale,
        timezone_selector=select_time_zone,
    )
    if not compiled(TRANSLATIONS):
        # Running from a checkout nobody set up: build the catalogues now rather than serve
        # English to everyone (bin/setup normally did it).
        compile_catalogues(TRANSLATIONS)
    _store_lazy_text_as_text(app.session_interface.serializer)
    # ...and |tojson (data attributes for static/js) writes a lazy message as its text, not as
    # the escaped markup Flask's JSON would take from its __html__.
    json_default = app.json.default

    def _json_default(value):
        return str(value) if isinstance(value, LazyString) else json_default(value)

    app.json.default = _json_default

    @app.after_request
    def _language_headers(response):
        # A page's words depend on Accept-Language (for visitors) and say which language they
        # are in: caches keep one copy per language.
        if response.mimetype == "text/html":
            response.vary.add("Accept-Language")
            response.headers.setdefault("Content-Language", current_language())
        return response

    # {% trans %} blocks are extracted and looked up with their whitespace folded (babel.cfg).
    app.jinja_env.policies["ext.i18n.trimmed"] = True
    app.jinja_env.filters.update(
        in_sentence=in_sentence,
        number=number,
        role_name=role_name,
        local_datetime=local_datetime,
        local_date=local_date,
        local_time=local_time,
        local_moment=local_moment,
    )
    app.jinja_env.globals.update(
        current_language=current_language,
        script_texts=script_texts,
        says_contact_support=says_contact_support,
        languages=LANGUAGES,
    )


# --- Choosing ----------------------------------------------------------------------------------


class _LazyText(JSONTag):
    key = None  # never read back: it is stored as a plain string

    def check(self, value):
        return isinstance(value, LazyString)

    def tag(self, value):
        return str(value)


def _store_lazy_text_as_text(serializer):
    """flash() keeps its messages in the session cookie: a lazy message is stored as its text in
    the language of the request that flashed it.

    Flask's session serializer is one object for the whole process (every app shares it), so the
    tag is registered once, not again by each create_app."""
    if not any(isinstance(tag, _LazyText) for tag in serializer.order):
        serializer.register(_LazyText, index=0)


def _person():
    """The signed-in person whose language the page speaks: staff viewing a customer's account
    keep their own language."""
    if not has_request_context() or not hasattr(current_app, "login_manager"):
        return None
    from flask_login import current_user

    if not current_user or not current_user.is_authenticated:
        return None
    return getattr(current_user, "viewed_by", None) or current_user


def browser_language():
    """The best match of the request's Accept-Language among LANGUAGES, or None."""
    if not has_request_context():
        return None
    return request.accept_languages.best_match(list(LANGUAGES))


def select_locale():
    override = g.get("i18n_recipient")
    if override is not None:
        return override[0]
    person = _person()
    if person is not None and getattr(person, "locale", None) in LANGUAGES:
        return person.locale
    return browser_language() or DEFAULT_LANGUAGE


def select_time_zone():
    override = g.get("i18n_recipient")
    if override is not None:
        return override[1]
    person = _person()
    if person is not None and valid_time_zone(getattr(person, "time_zone", None)):
        return person.time_zone
    return DEFAULT_TIME_ZONE


def current_language():
    from flask_babel import get_locale

    locale = get_locale()
    return locale.language if locale is not None else DEFAULT_LANGUAGE


def language_of(user):
    """The language to write to `user` in when they are not the one asking (emails): their
    choice, else the language their browser asked for when they last signed up or in."""
    for code in (getattr(user, "locale", None), getattr(user, "seen_locale", None)):
        if code in LANGUAGES:
            return code
    return DEFAULT_LANGUAGE


def recipient_preferences(address):
    """(language, time zone) for an email to `address`: the account's when it has one; for an
    address without an account (an invitation), the language of the person whose request sends
    it, and UTC."""
    from selfserve.models import User

    user = User.get_or_none(User.email == (address or "").strip().lower())
    if user is not None:
        return language_of(user), user.time_zone
    if has_request_context():
        return current_language(), None
    return DEFAULT_LANGUAGE, None


@contextlib.contextmanager
def as_recipient(language, time_zone=None):
    """Render inside the block in `language` and `time_zone` (emails to someone other than the
    person asking). Flask-Babel caches the locale and zone per request: refresh on the way in
    and out, so the page being rendered afterwards is back in its reader's language."""
    previous = g.get("i18n_recipient")
    g.i18n_recipient = (
        language if language in LANGUAGES else DEFAULT_LANGUAGE,
        time_zone if valid_time_zone(time_zone) else DEFAULT_TIME_ZONE,
    )
    refresh()
    try:
        yield
    finally:
        if previous is None:
            g.pop("i18n_recipient", None)
        else:
            g.i18n_recipient = previous
        refresh()


def valid_time_zone(name):
    if not name or not isinstance(name, str) or len(name) > TIME_ZONE_MAX:
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def time_zones():
    """Every IANA zone name, sorted (the settings page's list)."""
    return sorted(zone for zone in zoneinfo.available_timezones() if "/" in zone or zone == "UTC")


def browser_time_zone(form):
    """The browser's zone sent by the hidden `browser_time_zone` field (static/js/site.js), or
    None when it is missing or not a zone we know."""
    value = (form.get("browser_time_zone") or "").strip()
    return value if valid_time_zone(value) else None


# --- Showing times -----------------------------------------------------------------------------
# The database keeps naive UTC datetimes; Flask-Babel's formatters take naive values as UTC and
# convert them to the reader's zone (select_time_zone).


def _as_naive_utc(moment):
    if isinstance(moment, str):
        try:
            moment = datetime.datetime.fromisoformat(moment.replace("Z", "+00:00"))
        except ValueError:
            return None
    if isinstance(moment, datetime.datetime) and moment.tzinfo is not None:
        moment = moment.astimezone(datetime.UTC).replace(tzinfo=None)
    return moment


def local_datetime(moment, format="medium"):
    """A date and time in the reader's locale and zone ("30.11.2026, 10:05" / "Nov 30, 2026,
    10:05 AM"); "" for None; text that isn't a time is shown as it is. "medium" is the locale's
    medium date with its short time: seconds are noise on these pages."""
    if moment is None:
        return ""
    value = _as_naive_utc(moment)
    if value is None:
        return moment
    if format == "medium":
        format = _medium_date_short_time()
    return format_datetime(value, format)


def _medium_date_short_time():
    from babel.dates import get_date_format
    from babel.dates import get_datetime_format
    from babel.dates import get_time_format
    from flask_babel import get_locale

    locale = get_locale()
    pattern = get_datetime_format("medium", locale=locale)
    date = get_date_format("medium", locale=locale).pattern
    time = get_time_format("short", locale=locale).pattern
    return pattern.replace("{1}", date).replace("{0}", time)


def local_date(moment, format="medium"):
    if moment is None:
        return ""
    value = _as_naive_utc(moment)
    if value is None:
        return moment
    if isinstance(value, datetime.datetime):
        value = value.replace(tzinfo=datetime.UTC).astimezone(get_timezone())
    return format_date(value, format)


def local_time(moment, format="short"):
    if moment is None:
        return ""
    value = _as_naive_utc(moment)
    if value is None:
        return moment
    return format_time(value, format)


def local_moment(moment, now=None):
    """A moment for "Offline since …": the time alone today ("14:05"), else the short date and
    time, in the reader's zone."""
    if moment is None:
        return ""
    from selfserve.models import utcnow

    zone = get_timezone()
    here = moment.replace(tzinfo=datetime.UTC).astimezone(zone)
    today = (now or utcnow()).replace(tzinfo=datetime.UTC).astimezone(zone)
    if here.date() == today.date():
        return format_time(moment, "short")
    return local_datetime(moment)


def number(value, decimals=0):
    """A number in the reader's locale with `decimals` places ("3.72" / "3,72"); plain
    outside a request or app (no locale to ask)."""
    from flask import has_app_context

    if not has_app_context():
        return f"{value:.{decimals}f}"
    pattern = "#,##0." + "0" * decimals if decimals else "#,##0"
    return format_decimal(round(value, decimals), format=pattern)


def zone_name():
    """The reader's zone, for a note such as "times are in Europe/Berlin"."""
    return str(get_timezone())


# --- Catalogues --------------------------------------------------------------------------------


def compiled(directory=TRANSLATIONS):
    """True when every .po has a .mo at least as new."""
    for po in pathlib.Path(directory).glob("*/LC_MESSAGES/*.po"):
        mo = po.with_suffix(".mo")
        if not mo.exists() or mo.stat().st_mtime < po.stat().st_mtime:
            return False
    return True


def compile_catalogues(directory=TRANSLATIONS):
    """Build each .mo from its .po (written to a temporary name and renamed, so a process
    reading it never sees half a file). Fuzzy entries are left out, as gettext does."""
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    count = 0
    for po in sorted(pathlib.Path(directory).glob("*/LC_MESSAGES/*.po")):
        with po.open("rb") as handle:
            catalog = read_po(handle, locale=po.parent.parent.name)
        mo = po.with_suffix(".mo")
        partial = mo.with_name(f".{mo.name}.{os.getpid()}.tmp")
        with partial.open("wb") as handle:
            write_mo(handle, catalog, use_fuzzy=False)
        partial.replace(mo)
        count += 1
    return count


class LazyText(LazyString):
    """A message translated when it is shown. Unlike Flask-Babel's LazyString (which passes as
    markup), it is escaped in templates like any text: its values may come from people."""

    def __html__(self):
        return escape(str(self))


def lazy_text(message, **values):
    """`_l`: a lazy message for constants and service refusals (see LazyText)."""
    return LazyText(gettext, message, **values)


_l = lazy_text


def lazy_in_context(context, message, **values):
    """`_lp`: a lazy message with a context, for a word that translates two ways ("Open": the
    button, "Öffnen", and the state, "Offen")."""
    return LazyText(pgettext, context, message, **values)


def json_text(value):
    """json.dumps(default=...): a lazy message as its text in the current language."""
    if isinstance(value, LazyString):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def script_texts():
    """The sentences static/js writes into pages, in the reader's language (base.html puts them
    on <body data-texts>; siteText() in site.js reads them). %(name)s marks a value."""
    return {
        "fault": _l("%(fault)s: see the alert at the top of the page."),
        "offline_before_report": _l("The device went offline before it reported back."),
        "done_now": _l("Done. Now: %(state)s."),
        "sending": _l("Sending ‘%(label)s’ to the device…"),
        "not_sent": _l(
            "‘%(label)s’ could not be sent (no answer from our server). Check your connection, "
            "then reload the page to see whether it was done."
        ),
        "confirm_title": _l("Are you sure?"),
        "confirm": _l("Confirm"),
        "view_clock": _l("%(minutes)s min %(seconds)s s"),
        "view_ends_1": _l("The support view ends in less than 1 minute."),
        "view_ends_5": _l("The support view ends in less than 5 minutes."),
        "view_ended": _l("ended"),
    }


def in_sentence(text):
    """A label inside a sentence: lower case in English and Spanish ("start pump"), as it is
    in German, whose nouns keep their capital ("Pumpe starten")."""
    text = str(text)
    return text if current_language() == "de" else text.lower()


def says_contact_support(message):
    """Whether a message tells the person to contact support (pages then link the Help page),
    in the words of the language it is shown in."""
    lowered = str(message or "").lower()
    phrases = (_l("contact support"), _l("contact our support"))
    return any(str(phrase).lower() in lowered for phrase in phrases)


# Roles as a word in a sentence or list ("viewer", "Betrachter"); the database keeps the keys.
ROLE_NAMES = {
    "viewer": _l("viewer"),
    "operator": _l("operator"),
    "manager": _l("manager"),
    "owner": _l("owner"),
    "admin": _l("admin"),
    "member": _l("member"),
}


def role_name(role):
    """A role key ("viewer", "admin") in the reader's language; anything else as it is."""
    name = ROLE_NAMES.get(role)
    return str(name) if name is not None else role


def english(value):
    """The English text of a lazy message (its msgid, formatted), for what is stored or logged:
    the database keeps the words in one language; pages translate them when shown."""
    if isinstance(value, LazyString):
        message, kwargs = value._args[-1], value._kwargs
        return message % {key: english(item) for key, item in kwargs.items()} if kwargs else message
    return value


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["compile"]:
        print(f"compiled {compile_catalogues()} catalogue(s) in {TRANSLATIONS}")
    else:
        sys.exit("usage: python -m selfserve.i18n compile")
