"""One self-contained HTML page: inline CSS, tables, figures as data-URI PNGs; no scripts, no external files."""
from __future__ import annotations

import base64
import html

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
"""


def table_html(df: pd.DataFrame) -> str:
    note = f"<p>{html.escape(note_of(df))}</p>" if note_of(df) else ""
    if df.empty:
        return f"{note}<p class='note'>{html.escape(reason_of(df))}</p>"
    return note + df.to_html(index=False, escape=True, border=0, na_rep="n/a")


def report_html(title: str, intro: list[str], sections: dict[str, pd.DataFrame],
                figures: list[tuple[str, str]], no_figures: str = "no runs finished",
                opening: dict[str, pd.DataFrame] | None = None) -> str:
    """sections: heading -> table (an empty one prints its reason); figures: (caption, PNG bytes), embedded;
    no_figures: why there is no figure, printed when `figures` is empty; opening: sections shown before
    the figures (what was measured)."""
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(line)}</p>" for line in intro]
    for heading, df in (opening or {}).items():
        parts += [f"<h2>{html.escape(heading)}</h2>", table_html(df)]
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
