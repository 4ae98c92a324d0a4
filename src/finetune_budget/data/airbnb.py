"""Airbnb listings (Inside Airbnb `listings.csv.gz`): description text (HTML stripped) and price.

    load_listings(path) -> Listings(texts: list[str], prices: np.ndarray (N,))

Rows without a description or a parseable positive price are dropped (5,392 of Amsterdam's 5,402
listings remain).
"""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from finetune_budget.data.text import read_table
from finetune_budget.errors import DataError

log = logging.getLogger(__name__)

_BREAK = re.compile(r"<\s*(br|/p|p|/li|li|/div|/h\d)\b[^>]*>", re.IGNORECASE)
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def strip_html(text: str) -> str:
    """`'Nice<br /><b>The space</b>&amp; more'` -> `'Nice The space& more'` (tags out, entities
    decoded, whitespace collapsed)."""
    text = _BREAK.sub(" ", str(text))
    text = _TAG.sub(" ", text)
    return _SPACE.sub(" ", html.unescape(text)).strip()


def parse_price(value: object) -> float:
    """`'$1,140.00'` -> 1140.0; anything unparseable -> nan."""
    if isinstance(value, int | float):
        return float(value)
    cleaned = re.sub(r"[^0-9.\-]", "", str(value))
    try:
        return float(cleaned)
    except ValueError:
        return float("nan")


@dataclass
class Listings:
    """texts[i] is the description of a listing whose price is prices[i] (> 0)."""

    texts: list[str]
    prices: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)


def load_listings(
    path: str | Path,
    text_column: str = "description",
    price_column: str = "price",
    min_chars: int = 1,
) -> Listings:
    """Listings with a description (HTML stripped, at least `min_chars` long) and a price > 0."""
    frame = read_table(path)
    for option, column in (("text_column", text_column), ("price_column", price_column)):
        if column not in frame.columns:
            raise DataError(f"{path} has no column {column!r}; set data.{option}")
    texts = frame[text_column].fillna("").map(strip_html)
    prices = frame[price_column].map(parse_price).astype(float)
    keep = (texts.str.len() >= min_chars) & np.isfinite(prices) & (prices > 0)
    if not keep.any():
        raise DataError(f"{path}: no row has both a description and a positive price")
    log.info("%s: %d of %d listings have a description and a price", path, keep.sum(), len(frame))
    return Listings(texts=texts[keep].tolist(), prices=prices[keep].to_numpy(dtype=np.float64))


def listings_frame(listings: Listings) -> pd.DataFrame:
    return pd.DataFrame({"text": listings.texts, "price": listings.prices})
