"""One self-contained report.html: decision cards first, then the figures (embedded as base64
PNG), the answer in words, and the tables."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from finetune_budget.study.advice import Advice, no_gain_shown
from finetune_budget.study.plan import Plan
from finetune_budget.study.roi import metric_name

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; }
img { max-width: 48%; margin: 0.5%; border: 1px solid #eee; }
.answer li { margin: 0.3em 0; }
.note { color: #666; font-size: 90%; }
.card { border: 2px solid #2b6cb0; border-radius: 8px; padding: 0.8em 1.2em; margin: 1em 0;
        background: #f5f9ff; }
.card h2 { margin: 0 0 0.4em 0; font-size: 1.15em; }
.card .big { font-size: 1.6em; font-weight: 600; }
.plan .big { font-size: 1.1em; } .plan img { max-width: 70%; }
.card table { font-size: 13px; margin: 0.5em 0 0 0; }
.card td, .card th { text-align: left; border: none; padding: 2px 12px 2px 0; }
.trust { display: inline-block; padding: 0 8px; border-radius: 10px; color: white;
         font-size: 12px; }
.trust-high, .trust-measured, .trust-interpolated { background: #2f855a; }
.trust-medium { background: #b7791f; }
.trust-low { background: #c53030; } .trust-untested { background: #718096; }
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _badge(trust: str) -> str:
    """A coloured label; a combined one ("measured; curve low") takes its weakest part's colour."""
    words = trust.replace(";", " ").split()
    order = ("low", "untested", "medium", "high", "interpolated", "measured")
    kind = next((w for w in order if w in words), "untested")
    return f"<span class='trust trust-{kind}'>{html.escape(trust)}</span>"


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%" if math.isfinite(x) else "n/a"


def decision_card(a: Advice) -> str:
    """The recommendation for one task, model and data set, with what more would buy."""
    key = " · ".join(map(str, a.key))
    name = metric_name(a.metric)
    if a.n is None:
        return (
            f"<div class='card'><h2>Decision: {html.escape(key)} ({html.escape(name)})</h2>"
            f"<p>{html.escape(a.why)}</p></div>"
        )
    interval = (
        f" [{_pct(a.gain_lo)}, {_pct(a.gain_hi)}]" if math.isfinite(a.gain_lo) else " (one seed)"
    )
    rows = [
        (
            "expected gain",
            f"{_pct(a.gain)}{interval} in {name} over the pretrained model"
            f"{no_gain_shown(a.gain_lo)}",
        ),
        ("training time", f"≈ {a.seconds:.0f} s on this machine (items seen / measured items/s)"),
    ]
    for extra in (a.more_labels, a.more_time):
        if extra is not None:
            rows.append((extra.question, f"{html.escape(extra.text)} {_badge(extra.trust)}"))
    rows.append(("why", html.escape(a.why)))
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return (
        f"<div class='card'><h2>Decision: {html.escape(key)} ({html.escape(name)}) "
        f"{_badge(a.trust)}</h2>"
        f"<div class='big'>data.n = {a.n}, trainer.max_epochs = {a.epochs}</div>"
        f"<table>{body}</table></div>"
    )


def plan_card(plans: Sequence[Plan], figure: Path | None = None) -> str:
    """The priced plan: each plan's lines (the same mode=advise prints), the model to buy first,
    and the figure of expected gain against total cost."""
    made = sorted((p for p in plans if p.sizes), key=lambda p: not p.chosen)
    if not made:
        return ""
    rows = []
    for p in made:
        first, *rest = p.lines()
        more = "".join(f"<li>{html.escape(line.strip())}</li>" for line in rest)
        buy = " <b>(buy this one)</b>" if p.chosen else ""
        rows.append(f"<p class='big'>{html.escape(first)}{buy}</p><ul>{more}</ul>")
    img = _img(figure) if figure is not None else ""
    return f"<div class='card plan'><h2>The plan</h2>{''.join(rows)}{img}</div>"


def render(
    title: str,
    answer: Sequence[str],
    notes: Sequence[str],
    tables: Sequence[tuple[str, pd.DataFrame]],
    figures: Sequence[tuple[str, Sequence[Path]]],
    cards: Sequence[Advice] = (),
    plan: str = "",
) -> str:
    """answer, notes: plain-text lines; tables: (heading, frame); figures: (heading, PNG paths);
    cards: the decision of each task, model and data set (first metric); plan: plan_card's
    HTML, which leads."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    parts.append(plan)
    parts += [decision_card(a) for a in cards]
    head, *rest = tables if tables else [("", pd.DataFrame())]
    if not head[1].empty:  # the questions, answered, right under the cards
        parts.append(f"<h2>{html.escape(head[0])}</h2>")
        parts.append(head[1].to_html(index=False, na_rep="", escape=True))
    for heading, paths in figures:
        parts.append(f"<h2>Figures: {html.escape(heading)}</h2>")
        parts += [_img(p) for p in paths]
    parts.append("<h2>The answer in words</h2><ul class='answer'>")
    parts += [f"<li>{html.escape(line)}</li>" for line in answer]
    parts.append("</ul>")
    if notes:
        parts.append("<div class='note'>" + "<br>".join(html.escape(n) for n in notes) + "</div>")
    for heading, frame in rest:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(frame.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}"))
    parts.append("</body></html>")
    return "\n".join(parts)
