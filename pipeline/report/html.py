"""One self-contained HTML page: inline CSS, tables, figures as data-URI PNGs; no scripts, no external files."""
from __future__ import annotations

import base64
import html
import re

import pandas as pd

from pipeline.report.empty import note_of, reason_of

CSS = """
body { font-family: Georgia, 'Times New Roman', serif; max-width: 1100px; margin: 2em auto; color: #222;
       line-height: 1.4; padding: 0 1em; }
h1, h2 { font-family: Helvetica, Arial, sans-serif; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
.note { color: #555; font-size: 0.9em; }
.headline { background: #f4f7fb; border: 1px solid #c9d6e8; border-radius: 4px; padding: 0.2em 1em 0.6em; }
.headline h2 { border-bottom: none; margin-top: 0.5em; }
.headline li { margin: 0.35em 0; }
.methods { color: #444; font-size: 0.9em; }
code { font-size: 0.95em; background: #f2f2f2; padding: 0 0.2em; }
"""


def table_html(df: pd.DataFrame) -> str:
    note = f"<p>{html.escape(note_of(df))}</p>" if note_of(df) else ""
    if df.empty:
        return f"{note}<p class='note'>{html.escape(reason_of(df))}</p>"
    return note + df.to_html(index=False, escape=True, border=0, na_rep="n/a")


def inline(text: str) -> str:
    """A line with its only markup, **bold** and `code`, as HTML (everything else escaped)."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def block_html(block) -> str:
    """A front.Block: heading, lead paragraphs, bullet lines, table, paragraphs after."""
    parts = [f"<section class='{html.escape(block.css)}'>" if block.css else "<section>"]
    if block.title:
        parts.append(f"<h2>{html.escape(block.title)}</h2>")
    parts += [f"<p>{inline(line)}</p>" for line in block.lead]
    if block.lines:
        parts.append("<ul>" + "".join(f"<li>{inline(line)}</li>" for line in block.lines) + "</ul>")
    if block.table is not None:
        parts.append(table_html(block.table))
    parts += [f"<p>{inline(line)}</p>" for line in block.after]
    parts.append("</section>")
    return "\n".join(parts)


def report_html(title: str, intro: list[str], sections: dict[str, pd.DataFrame],
                figures: list[tuple[str, bytes]], no_figures: str = "no runs finished",
                front: list | None = None, opening: list | None = None) -> str:
    """The page, in order: the title; `front` blocks (front.Block: the answer first); the `intro` paragraphs;
    `opening` blocks (what was measured, the claims); the figures ((caption, PNG bytes), embedded, or
    `no_figures`: why there is none); `sections` (heading -> table, an empty one printing its reason)."""
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    parts += [block_html(b) for b in front or []]
    parts += [f"<p class='methods'>{inline(line)}</p>" for line in intro]
    parts += [block_html(b) for b in opening or []]
    parts.append("<h2>Figures</h2>")
    if not figures:
        parts.append(f"<p class='note'>No figure: {html.escape(no_figures)}.</p>")
    for caption, png in figures:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    for heading, df in sections.items():
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(table_html(df))
    parts.append("</body></html>")
    return "\n".join(parts)
