"""One self-contained report.html: the answer, the tables, the figures embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; }
img { max-width: 48%; margin: 0.5%; border: 1px solid #eee; }
.answer li { margin: 0.3em 0; }
.note { color: #666; font-size: 90%; }
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def render(
    title: str,
    answer: Sequence[str],
    notes: Sequence[str],
    tables: Sequence[tuple[str, pd.DataFrame]],
    figures: Sequence[tuple[str, Sequence[Path]]],
) -> str:
    """answer, notes: plain-text lines; tables: (heading, frame); figures: (heading, PNG paths)."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        "<h2>The answer</h2><ul class='answer'>",
    ]
    parts += [f"<li>{html.escape(line)}</li>" for line in answer]
    parts.append("</ul>")
    if notes:
        parts.append("<div class='note'>" + "<br>".join(html.escape(n) for n in notes) + "</div>")
    for heading, paths in figures:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts += [_img(p) for p in paths]
    for heading, frame in tables:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(frame.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}"))
    parts.append("</body></html>")
    return "\n".join(parts)
