"""Every word a person reads in a template goes through the translation functions.

Each template is read with Jinja's lexer (the text between tags, expressions and statements) and
its AST (string constants inside expressions). Text outside `{{ _() }}` / `{% trans %}` fails:
- HTML templates: visible text data (not comments, script or style) and the user-facing
  attributes (USER_FACING_ATTRIBUTES);
- email templates (*.txt): all their text;
- both: string constants that read like words for people ("Email address", "per hour"), passed
  to macros, printed, or filled into a translated message ({% trans kind='pump controller' %}),
  unless they are the message of a translation call.
The exceptions are few and listed here (the brand, symbols, units and machine values).
"""

import html.parser
import pathlib
import re

import jinja2
import pytest
from jinja2 import nodes

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"

# Attributes whose value is read or heard by a person.
USER_FACING_ATTRIBUTES = {
    "title",
    "alt",
    "placeholder",
    "aria-label",
    "aria-valuetext",
    "aria-roledescription",
    "aria-description",
    "label",
    "hx-confirm",  # shown in the in-page confirmation dialog
    "data-confirm-title",
    "data-confirm-yes",
}
# Text allowed outside the translation functions: the brand, and what reads the same in every
# language (units and symbols). Compared after trimming whitespace and punctuation.
ALLOWED_TEXT = {"Tidewell", "UTC", "kPa", "L/min", "V", "h", "s", "%", "CSV", "QR", "ID", "OK", "htmx"}
# Words that contain letters but are not language (element ids, HTML entities).
ENTITY = re.compile(r"&[a-zA-Z]+;|&#\d+;")
MARK = "\x00"  # where an expression or a translated block was

TRANSLATION_CALLS = {"_", "gettext", "ngettext", "pgettext", "npgettext", "lazy_gettext"}
# A constant that reads like words for a person: starts with a capital and a small letter
# ("Email address", "Password"), or has two lower-case words and ends a phrase or sentence.
WORDS = re.compile(r"^[A-Z][a-z]+\b|[a-z]{2,} [a-z]{2,}.*[.:?!…)]$|^[a-z']+ [a-z']+")
# ...but not CSS classes, ids, formats or machine values.
MACHINE = re.compile(r"^[a-z0-9_\-.:/#%{}]*$|^[A-Z0-9_]+$|^%")


def _environment():
    env = jinja2.Environment(extensions=["jinja2.ext.i18n"])
    env.policies["ext.i18n.trimmed"] = True
    return env


def _templates():
    return sorted(p for p in TEMPLATES.rglob("*") if p.suffix in (".html", ".txt", ".svg"))


def _skeleton(env, source):
    """The template with every {{ expression }} and {% trans %} block replaced by MARK and every
    other statement and comment removed: what is left is literal text and markup."""
    out = []
    depth = 0  # inside {% trans %} ... {% endtrans %}
    in_block = False
    block_words = []
    for _lineno, token, value in env.lex(source):
        if token == "block_begin":
            in_block, block_words = True, []
            continue
        if token == "block_end":
            in_block = False
            word = block_words[0] if block_words else ""
            if word == "trans":
                if depth == 0:
                    out.append(MARK)
                depth += 1
            elif word == "endtrans":
                depth -= 1
            continue
        if in_block:
            if token != "whitespace":
                block_words.append(value)
            continue
        if depth:
            continue
        if token == "data":
            out.append(value)
        elif token == "variable_begin":
            out.append(MARK)
    return "".join(out)


class _Visible(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=False)
        self.found = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.hidden += 1
        for name, value in attrs:
            if name in USER_FACING_ATTRIBUTES and value:
                self.found.append((f"{tag}[{name}]", value))

    def handle_startendtag(self, tag, attrs):
        for name, value in attrs:
            if name in USER_FACING_ATTRIBUTES and value:
                self.found.append((f"{tag}[{name}]", value))

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.hidden -= 1

    def handle_data(self, data):
        if not self.hidden:
            self.found.append(("text", data))


def _is_language(text):
    text = ENTITY.sub(" ", text.replace(MARK, " "))
    words = [w.strip(".,:;!?()[]·—–-/\"'«»“”‘’…*") for w in text.split()]
    words = [w for w in words if w and w not in ALLOWED_TEXT]
    return any(any(c.isalpha() for c in w) for w in words)


def _untranslated_text(env, path):
    source = path.read_text(encoding="utf-8")
    skeleton = _skeleton(env, source)
    if path.suffix == ".txt":
        return [("text", line.strip()) for line in skeleton.splitlines() if _is_language(line)]
    parser = _Visible()
    parser.feed(skeleton)
    parser.close()
    return [(where, " ".join(text.split())) for where, text in parser.found if _is_language(text)]


def _untranslated_constants(env, path):
    """String constants in expressions that read like words, outside translation calls."""
    tree = env.parse(path.read_text(encoding="utf-8"))
    found = []

    def walk(node, translated=False):
        if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Name):
            if node.node.name in TRANSLATION_CALLS:
                # The message is translated; the values filled into it ({% trans x='...' %},
                # _('...', x='...')) are not.
                for arg in node.args[:1]:
                    walk(arg, translated=True)
                for child in [*node.args[1:], *node.kwargs]:
                    walk(child, translated)
                return
            if node.node.name == "url_for":
                return
        if isinstance(node, (nodes.Compare, nodes.Getitem, nodes.Test)):
            return  # compared with or looked up: a machine value
        if isinstance(node, nodes.Filter) and node.name in ("format",):
            return
        if isinstance(node, nodes.Const) and isinstance(node.value, str) and not translated:
            value = node.value.strip()
            if WORDS.search(value) and not MACHINE.match(value) and _is_language(value):
                found.append(("constant", value))
        for child in node.iter_child_nodes():
            walk(child, translated)

    walk(tree)
    return found


@pytest.mark.parametrize("path", _templates(), ids=lambda p: str(p.relative_to(TEMPLATES)))
def test_template_text_is_translatable(path):
    env = _environment()
    untranslated = _untranslated_text(env, path) + _untranslated_constants(env, path)
    assert untranslated == [], f"{path.relative_to(ROOT)}: wrap these in _() or {{% trans %}}"


def test_the_check_finds_untranslated_text(tmp_path):
    """The check itself: plain text, an attribute, a macro argument and an email line fail;
    translated text, markup, ids and the allowed words pass."""
    env = _environment()
    page = tmp_path / "page.html"
    page.write_text(
        '<h1 id="title-x" class="big wide">{{ _("Hello") }} Tidewell</h1>\n'
        "<p>{% trans name=user.name %}Hi {{ name }}{% endtrans %} · 5 kPa</p>\n"
        '<button aria-label="Close">×</button>\n'
        "<p>Plain words</p>\n"
        '{{ forms.field("email", "Email address") }}\n'
        "{% if kind == 'Hour' %}{{ _('per hour') }}{% endif %}\n"
        "{% trans kind='pump controller' %}A {{ kind }}{% endtrans %}\n",
        encoding="utf-8",
    )
    mail = tmp_path / "mail.txt"
    mail.write_text("{{ _('Hello,') }}\n\n{{ link }}\n\nThanks\n", encoding="utf-8")
    assert _untranslated_text(env, page) == [("button[aria-label]", "Close"), ("text", "Plain words")]
    assert _untranslated_constants(env, page) == [
        ("constant", "Email address"),
        ("constant", "pump controller"),
    ]
    assert _untranslated_text(env, mail) == [("text", "Thanks")]
