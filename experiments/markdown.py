"""Plan markdown: one parser (markdown-it-py, CommonMark) both splits a plan into its sections
and renders it for the plan page, so what the page shows as a heading is what was parsed as one.

Rendered HTML is sanitized by nh3 against an explicit allow-list: the parser already escapes
raw HTML and refuses javascript: links, and the sanitizer is the second line that holds even
if a parser option changes.
"""

from __future__ import annotations

import re
from functools import cache

import nh3
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt
from markdown_it.token import Token

from experiments.choices import PLAN_SECTIONS

ALLOWED_TAGS = {
    *(f"h{n}" for n in range(1, 7)),
    "p",
    "br",
    "hr",
    "strong",
    "em",
    "del",
    "s",
    "code",
    "pre",
    "blockquote",
    "ul",
    "ol",
    "li",
    "a",
    "img",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
}
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "img": {"src", "alt", "title"},
    "ol": {"start"},
    # markdown-it writes a table column's alignment as style="text-align:..."; nothing else
    # of style passes (filter_style_properties below).
    "th": {"style"},
    "td": {"style"},
}
URL_SCHEMES = {"http", "https", "mailto"}
LINK_REL = "noopener noreferrer"

_NUMBERING = re.compile(r"^\d+[.)]\s*")
_NOT_LETTERS = re.compile(r"[^a-z]+")


@cache
def _parser() -> MarkdownIt:
    # html=False: raw HTML in a plan is shown as text, never passed through.
    return MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])


def _words(text: str) -> str:
    return _NOT_LETTERS.sub(" ", text.lower()).strip()


_CANONICAL = {name: _words(name) for name in PLAN_SECTIONS}


def section_name(title: str) -> str | None:
    """The known section a heading's text names ("2. Approach", "**Risks**"), or None."""
    norm = _words(_NUMBERING.sub("", title.strip()))
    for name, canon in _CANONICAL.items():
        if (
            norm == canon
            or norm.startswith(canon)
            or (name == "Risks & Mitigations" and norm.startswith("risks"))
        ):
            return name
    return None


def _lines(text: str) -> list[str]:
    # The same line breaks markdown-it counts in its token maps (it normalizes \r\n and \r).
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def plan_sections(text: str) -> dict[str, str]:
    """The known sections of a plan's markdown, keyed by their canonical names.

    A known heading (ATX or setext, any level) starts a section; an unknown heading of the same
    or a higher level ends it; deeper headings, fenced code (whatever its fence) and headings
    inside lists or quotes stay part of it. A section's text is its source lines, as written.
    """
    text = text or ""
    tokens: list[Token] = _parser().parse(text)
    lines = _lines(text)
    pieces: dict[str, list[str]] = {}
    current: str | None = None
    level = 0
    start = 0

    def close(end: int) -> None:
        if current is not None:
            pieces.setdefault(current, []).append("\n".join(lines[start:end]))

    for i, token in enumerate(tokens):
        # Only top-level headings structure the plan: one inside a list or a quote is content.
        if token.type != "heading_open" or token.level != 0 or token.map is None:
            continue
        depth = int(token.tag[1])
        name = section_name(tokens[i + 1].content)
        if name is None and (current is None or depth > level):
            continue
        close(token.map[0])
        current, level, start = name, depth, token.map[1]
        if name is not None:
            pieces.setdefault(name, [])
    close(len(lines))
    return {name: "\n".join(parts).strip() for name, parts in pieces.items()}


def render_markdown(text: str, *, heading_offset: int = 0) -> SafeString:
    """A plan's markdown as HTML that is safe to put in a page; heading_offset moves its
    headings down (1: `#` becomes h2) to nest them under the page's own."""
    parser = _parser()
    tokens = parser.parse(text or "")
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{max(1, min(6, int(token.tag[1]) + heading_offset))}"
    html = parser.renderer.render(tokens, parser.options, {})
    clean = nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel=LINK_REL,
        filter_style_properties={"text-align"},
        strip_comments=True,
    )
    return mark_safe(clean)  # noqa: S308 - sanitized by nh3 against the allow-list above
