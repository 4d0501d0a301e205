"""A tiny document model rendered twice, as Markdown and as standalone HTML.

The model card (:mod:`kdpipe.model_card`) is written once as a list of blocks; both
renderings come from that list, so the Markdown logged with the MLflow model version and
the HTML shown in ZenML (and in a browser) cannot say different things. Text is escaped
in each format (``<&`` in both, also ``>`` in HTML, ``|`` in Markdown tables; code blocks stay verbatim). No kdpipe imports.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Block", "Bullets", "Code", "Heading", "Para", "Table", "Verbatim", "to_html",
           "to_markdown"]


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str
    strong: bool = False


@dataclass(frozen=True)
class Bullets:
    items: tuple[tuple[str, str], ...]
    """(label, text) pairs; an empty label gives a plain item."""


@dataclass(frozen=True)
class Table:
    head: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    right: frozenset[int] = frozenset()
    """Columns aligned right (numbers)."""
    row_classes: tuple[str, ...] = ()
    """Optional CSS class per row in HTML (``pass``, ``fail``, ``skipped``, ``hit``)."""


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Verbatim:
    """Pre-rendered content: ``markdown`` for the Markdown file, ``html`` for the page."""

    markdown: str
    html: str


Block = Heading | Para | Bullets | Table | Code | Verbatim


# ------------------------------------------------------------------------ Markdown
def _md(text: str) -> str:
    """Text, not markup: ``<tag>`` must not become HTML in a Markdown renderer (``>`` is
    harmless inside a line and kept, so ``>= 0.9`` stays readable in the raw file)."""
    return text.replace("&", "&amp;").replace("<", "&lt;")


def _md_cell(text: str) -> str:
    return _md(text).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in t.head) + " |",
             "|" + "|".join("---:" if i in t.right else "---" for i in range(len(t.head))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def _md_block(b: Block) -> str:
    if isinstance(b, Heading):
        return f"{'#' * b.level} {_md(b.text)}"
    if isinstance(b, Para):
        return f"**{_md(b.text)}**" if b.strong else _md(b.text)
    if isinstance(b, Bullets):
        return "\n".join(f"- **{_md(label)}**: {_md(text)}" if label else f"- {_md(text)}"
                         for label, text in b.items)
    if isinstance(b, Table):
        return _md_table(b)
    if isinstance(b, Code):
        return f"```\n{b.text}\n```"
    return b.markdown


def to_markdown(blocks: Sequence[Block]) -> str:
    """GitHub-flavoured Markdown (pipe tables), one blank line between blocks."""
    return "\n\n".join(_md_block(b) for b in blocks) + "\n"


# ---------------------------------------------------------------------------- HTML
_CSS = ("body{font-family:system-ui,sans-serif;font-size:14px;max-width:1000px;margin:24px auto;"
        "padding:0 16px;color:#222}h1{font-size:22px}h2{font-size:17px;margin-top:26px;"
        "border-bottom:1px solid #ddd}table{border-collapse:collapse;margin:6px 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}"
        "th{background:#f3f3f3}td.r{text-align:right;font-variant-numeric:tabular-nums}"
        "tr.pass{background:#e3f4e3}tr.fail{background:#f8dcdc}tr.skipped{background:#eee}"
        "tr.hit{font-weight:bold}pre{background:#f6f6f6;padding:8px;overflow-x:auto}"
        "p.strong{font-size:15px;font-weight:bold}svg{max-width:100%;height:auto}")


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in t.head)
    rows = []
    for i, row in enumerate(t.rows):
        cls = f" class='{_e(t.row_classes[i])}'" if i < len(t.row_classes) and t.row_classes[i] \
            else ""
        cells = "".join(f"<td class='r'>{_e(c)}</td>" if j in t.right else f"<td>{_e(c)}</td>"
                        for j, c in enumerate(row))
        rows.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _html_block(b: Block) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level}>{_e(b.text)}</h{b.level}>"
    if isinstance(b, Para):
        return f"<p class='strong'>{_e(b.text)}</p>" if b.strong else f"<p>{_e(b.text)}</p>"
    if isinstance(b, Bullets):
        items = "".join(f"<li><b>{_e(label)}</b>: {_e(text)}</li>" if label
                        else f"<li>{_e(text)}</li>" for label, text in b.items)
        return f"<ul>{items}</ul>"
    if isinstance(b, Table):
        return _html_table(b)
    if isinstance(b, Code):
        return f"<pre>{_e(b.text)}</pre>"
    return b.html


def to_html(blocks: Sequence[Block], title: str) -> str:
    """A standalone HTML page (inline CSS, no external resources)."""
    body = "\n".join(_html_block(b) for b in blocks)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")
