"""Plan markdown: sections as CommonMark sees them, and rendering that lets no script through."""

from __future__ import annotations

from html.parser import HTMLParser

from django.urls import reverse

from experiments import services
from experiments.actors import Actor
from experiments.markdown import plan_sections, render_markdown

# --- sections: the parser's headings, not a line-by-line guess -----------------------------


def test_a_four_backtick_fence_keeps_its_triple_backtick_lines_and_comments():
    """GIVEN an Approach whose ```` fence shows a markdown snippet with ``` lines and `## `
    lines WHEN parsed THEN the whole fence stays in Approach and Metrics still starts after it
    (the hand parser toggled on the inner ``` and took `## Metrics` inside for a heading)."""
    text = (
        "## Approach\n"
        "Write the README like this:\n"
        "````markdown\n"
        "```bash\n"
        "## Metrics\n"
        "python train.py\n"
        "```\n"
        "````\n"
        "Then run it.\n"
        "## Metrics\n"
        "val_acc\n"
    )
    sections = plan_sections(text)
    assert sections["Metrics"] == "val_acc"
    assert sections["Approach"] == (
        "Write the README like this:\n"
        "````markdown\n```bash\n## Metrics\npython train.py\n```\n````\n"
        "Then run it."
    )


def test_a_tilde_fence_holding_backticks_stays_in_its_section():
    text = "## Approach\n~~~\n```\n# Risks\n~~~\nafter\n## Metrics\nloss\n"
    sections = plan_sections(text)
    assert sections == {"Approach": "~~~\n```\n# Risks\n~~~\nafter", "Metrics": "loss"}


def test_setext_headings_start_and_end_sections():
    """GIVEN headings underlined with --- and === WHEN parsed THEN they are headings like ## and
    #, and a setext line is not part of the section before it."""
    text = (
        "Study\n=====\n\n"
        "Objective\n---------\nBeat the baseline.\n\n"
        "Approach\n--------\nGrid first.\n\n"
        "Notes\n-----\nnot a section\n"
    )
    assert plan_sections(text) == {"Objective": "Beat the baseline.", "Approach": "Grid first."}


def test_numbered_and_emphasised_headings_match_and_levels_nest():
    text = (
        "# 1. Objective\nfind lr\n"
        "### Details\nstill the objective\n"
        "## 2) **Approach**\nbaseline\n"
        "# Appendix\nnot a section\n"
        "## Risks\nOOM\n"
    )
    assert plan_sections(text) == {
        "Objective": "find lr\n### Details\nstill the objective",
        "Approach": "baseline",
        "Risks & Mitigations": "OOM",
    }


def test_headings_inside_code_quotes_and_lists_are_content():
    text = (
        "## Approach\n"
        "    ## Metrics (an indented code block)\n"
        "> ## Metrics (quoted)\n"
        "- ## Metrics (in a list)\n"
        "<!-- ## Metrics -->\n"
    )
    assert list(plan_sections(text)) == ["Approach"]


def test_crlf_and_empty_text():
    assert plan_sections("## Objective\r\nline one\r\n\r\nline two\r\n") == {
        "Objective": "line one\n\nline two"
    }
    assert plan_sections("") == {}


def test_plan_create_uses_the_markdown_parser(member):
    """The service's parse is this module's: a setext heading the hand parser missed counts."""
    actor = Actor(kind="user", user=member.user)
    plan = services.plan_create(actor=actor, title="t", raw_markdown="Approach\n--------\nGo.\n")
    assert plan.sections == {"Approach": "Go."}


# --- rendering: sanitized by an allow-list ----------------------------------------------------

XSS = (
    "## Objective\n"
    "<script>alert('raw')</script>\n\n"
    '<img src="x" onerror="alert(1)">\n\n'
    "[click](javascript:alert(1)) and [data](data:text/html;base64,PHNjcmlwdD4=)\n\n"
    '![pic](javascript:alert(2) "t")\n\n'
    '<a href="https://example.org" onclick="alert(3)">raw link</a>\n\n'
    "[ok](https://example.org/page)\n"
)


class Elements(HTMLParser):
    """Every element and attribute a browser would build from the HTML (text is inert)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, {k: v or "" for k, v in attrs}))


def active_content(html: str) -> list[str]:
    bad = []
    for tag, attrs in Elements(html).found:
        if tag in {"script", "style", "iframe", "object", "embed", "svg", "form", "input"}:
            bad.append(tag)
        bad += [f"{tag} {name}" for name in attrs if name.startswith("on") or name == "style"]
        for name in ("href", "src"):
            url = attrs.get(name, "").strip().lower()
            if url and not url.startswith(("http://", "https://", "mailto:", "/", "#")):
                bad.append(f"{tag} {name}={url}")
    return bad


def test_scripts_handlers_and_javascript_links_do_not_survive():
    """GIVEN raw <script>, <img onerror>, <a onclick> and javascript:/data: links WHEN rendered
    THEN the browser would build no script, no handler and no such link from it."""
    html = render_markdown(XSS)
    assert active_content(html) == []
    tags = [tag for tag, _ in Elements(html).found]
    assert "img" not in tags and tags.count("a") == 1  # only the https link is a link


def test_the_sanitizer_holds_even_for_html_the_parser_let_through():
    """The second line: nh3 alone strips what a looser parser option would pass."""
    import nh3

    from experiments import markdown

    raw = '<p onclick="x()">hi<script>alert(1)</script><a href="javascript:alert(1)">j</a></p>'
    clean = nh3.clean(
        raw,
        tags=markdown.ALLOWED_TAGS,
        attributes=markdown.ALLOWED_ATTRIBUTES,
        url_schemes=markdown.URL_SCHEMES,
        link_rel=markdown.LINK_REL,
    )
    assert active_content(clean) == [] and "alert" not in clean


def test_raw_html_is_shown_as_text_and_safe_links_get_rel():
    html = render_markdown(XSS)
    assert "&lt;script&gt;" in html  # what the author wrote, visible, inert
    assert '<a href="https://example.org/page" rel="noopener noreferrer">ok</a>' in html
    assert "<h2>Objective</h2>" in html


def test_tables_code_and_heading_offset():
    html = render_markdown(
        "# T\n\n| a | b |\n|:-|-:|\n| 1 | 2 |\n\n```py\nx = 1 < 2\n```\n", heading_offset=2
    )
    assert "<h3>T</h3>" in html and "<table>" in html and "text-align:right" in html
    assert "<pre><code>x = 1 &lt; 2\n</code></pre>" in html


def test_the_plan_page_renders_the_body_with_the_same_parser(client, member):
    """GIVEN a plan with a setext heading, a fence and an XSS attempt WHEN its page is shown THEN
    the headings are rendered (nested under the card's h2), the fence is code, and no script."""
    actor = Actor(kind="user", user=member.user)
    plan = services.plan_create(
        actor=actor,
        title="Rendered",
        raw_markdown=(
            "Approach\n--------\nGrid first.\n\n"
            "````\n```\n## Metrics\n```\n````\n\n"
            "## Metrics\n<script>alert(1)</script> [x](javascript:alert(1))\n"
        ),
    )
    client.force_login(member.user)
    page = client.get(reverse("plan_detail", args=[plan.id])).content.decode()
    body = page[page.index('<div class="markdown">') :]
    body = body[: body.index("</div>")]
    assert "<h3>Approach</h3>" in body and "<h3>Metrics</h3>" in body
    assert "<pre><code>```\n## Metrics\n```\n</code></pre>" in body
    assert active_content(body) == [] and "&lt;script&gt;" in body
