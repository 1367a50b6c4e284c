"""The catalogues are complete: messages.pot is what the source says now, and German and Spanish
translate every message (not fuzzy, not empty, every plural form, the same placeholders)."""

import pathlib
import subprocess

import pytest
from babel.messages.pofile import read_po

from selfserve import i18n

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRANSLATIONS = ROOT / "selfserve" / "translations"


def _read(path, locale=None):
    with open(path, "rb") as handle:
        return read_po(handle, locale=locale)


@pytest.fixture(scope="module")
def current(tmp_path_factory):
    """The messages extracted from the source as it is now (the same command as bin/i18n)."""
    out = tmp_path_factory.mktemp("i18n") / "messages.pot"
    subprocess.run([str(ROOT / "bin" / "i18n"), "extract-to", str(out)], cwd=ROOT, check=True)
    return _read(out)


def _ids(catalog):
    return {(message.context, message.id) for message in catalog if message.id}


def test_the_committed_template_is_current(current):
    committed = _read(TRANSLATIONS / "messages.pot")
    missing = _ids(current) - _ids(committed)
    stale = _ids(committed) - _ids(current)
    assert (missing, stale) == (set(), set()), "run bin/i18n extract and translate the new messages"
    assert len(_ids(current)) > 500  # the extraction does find the site's text


# Every language the site offers besides English.
CHECKED_LANGUAGES = ["de", "es"]


def test_every_offered_language_is_checked():
    assert set(CHECKED_LANGUAGES) == set(i18n.LANGUAGES) - {i18n.DEFAULT_LANGUAGE}


@pytest.mark.parametrize("language", CHECKED_LANGUAGES)
def test_every_message_is_translated(current, language):
    catalog = _read(TRANSLATIONS / language / "LC_MESSAGES" / "messages.po", locale=language)
    untranslated = []
    for message in current:
        if not message.id:
            continue
        found = catalog.get(message.id, message.context)
        strings = (
            [] if found is None else (found.string if isinstance(found.string, tuple) else [found.string])
        )
        if found is None or found.fuzzy or not strings or not all(strings):
            untranslated.append(message.id)
    assert untranslated == [], f"{len(untranslated)} messages lack a {language} translation"
    # The translations keep the placeholders (%(name)s, {name}) of their message.
    problems = [(message.id, [str(error) for error in errors]) for message, errors in catalog.check()]
    assert problems == []
    braces = [
        message.id
        for message in catalog
        if message.id and isinstance(message.id, str) and _braces(message.id) != _braces(message.string)
    ]
    assert braces == []


def _braces(text):
    import re

    return sorted(re.findall(r"\{\w+\}", text or ""))
