"""Text retrieval data: labelled items (text, label) or pairs (query, positive) + a held-out split.

Held-out evaluation: every held-out item queries all the others; items of the same group (label,
pair or image) are relevant.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finetune_budget.errors import DataError
from finetune_budget.identity import loaded_from
from finetune_budget.speed.reuse import cached

log = logging.getLogger(__name__)

# The held-out split of generated splits (Flickr8k images, held-out fractions) is fixed: it never
# moves with the run's seed, so every run of a study is scored on the same items.
SPLIT_SEED = 20240


@dataclass
class TextRetrievalData:
    """train_texts[i] has train_labels[i] (labelled items) or train_positives[i] (pairs)."""

    name: str
    train_texts: list[str]
    eval_texts: list[str]
    eval_groups: list[int]
    train_labels: list[int] | None = None
    train_positives: list[str] | None = None

    @property
    def kind(self) -> str:
        return "pairs" if self.train_positives is not None else "labels"

    def __len__(self) -> int:
        return len(self.train_texts)


def require_file(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(
            f"{what} not found at {path}; set paths.data_dir=<folder> "
            "(or FINETUNE_BUDGET_DATA_DIR) or the data config's path"
        )
    return path


def _check_eval(data: TextRetrievalData) -> TextRetrievalData:
    if not data.train_texts:
        raise DataError(
            f"{data.name}: the training split is empty; check the file and its columns"
        )
    groups = pd.Series(data.eval_groups)
    if len(groups) < 2 or groups.value_counts().max() < 2:
        raise DataError(
            f"{data.name}: the held-out split needs at least one group with two items "
            f"(it has {len(groups)} items); give a larger eval file or eval_fraction"
        )
    return data


def _codes(values: list[Any]) -> list[int]:
    return pd.factorize(pd.Series(values, dtype="object"), sort=True)[0].tolist()


def load_clinc150(path: str | Path, eval_split: str = "val", **_: Any) -> TextRetrievalData:
    """CLINC150 (data_full.json), out-of-scope excluded; labels are the 150 intents."""
    path = require_file(path, "CLINC150 (clinc150/data_full.json)")
    try:
        raw = json.loads(path.read_text())
        train, held = raw["train"], raw[eval_split]
    except (json.JSONDecodeError, KeyError) as e:
        raise DataError(
            f"{path} is not CLINC150's data_full.json ({e}); use data.eval_split=val|test"
        ) from e
    intents = sorted({label for _, label in train})
    code = {name: i for i, name in enumerate(intents)}
    return _check_eval(
        TextRetrievalData(
            name="clinc150",
            train_texts=[t for t, _ in train],
            train_labels=[code[label] for _, label in train],
            eval_texts=[t for t, label in held if label in code],
            eval_groups=[code[label] for _, label in held if label in code],
        )
    )


def _read_stsb(path: Path) -> pd.DataFrame:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) >= 7:
            rows.append((float(fields[4]), fields[5], fields[6]))
    if not rows:
        raise DataError(
            f"{path} has no tab-separated STS-B rows (score in column 5, sentences in 6-7)"
        )
    return pd.DataFrame(rows, columns=["score", "s1", "s2"])


def load_stsb(path: str | Path, eval_split: str = "dev", min_score: float = 4.0, **_: Any):
    """STS-B pairs with score >= min_score; each held-out pair forms a group of two."""
    folder = require_file(path, "STS-B folder (stsb/)")
    train = _read_stsb(require_file(folder / "sts-train.csv", "STS-B train file"))
    held = _read_stsb(require_file(folder / f"sts-{eval_split}.csv", f"STS-B {eval_split} file"))
    train, held = train[train.score >= min_score], held[held.score >= min_score]
    return _check_eval(
        TextRetrievalData(
            name="stsb",
            train_texts=train.s1.tolist(),
            train_positives=train.s2.tolist(),
            eval_texts=[s for a, b in zip(held.s1, held.s2, strict=True) for s in (a, b)],
            eval_groups=[i for i in range(len(held)) for _ in (0, 1)],
        )
    )


def read_flickr8k_captions(folder: str | Path) -> pd.DataFrame:
    """captions.txt as a frame `image, caption`, images in file order."""
    folder = require_file(folder, "Flickr8k folder (flickr8k/)")
    frame = pd.read_csv(require_file(Path(folder) / "captions.txt", "Flickr8k captions.txt"))
    if not {"image", "caption"} <= set(frame.columns) or frame.empty:
        raise DataError(f"{folder}/captions.txt needs columns image,caption and at least one row")
    return frame.dropna()


def split_images(images: list[str], eval_images: int) -> tuple[list[str], list[str]]:
    """(train, held-out) images: a fixed permutation, the first `eval_images` held out."""
    if not 0 < eval_images < len(images):
        raise DataError(f"data.eval_images={eval_images} must lie between 1 and {len(images) - 1}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    held = [images[i] for i in order[:eval_images]]
    train = [images[i] for i in order[eval_images:]]
    return train, held


def load_flickr8k_captions(path: str | Path, eval_images: int = 1000, **_: Any):
    """Captions of one image are paraphrases: a train pair per image, held-out groups by image."""
    frame = read_flickr8k_captions(path)
    by_image = frame.groupby("image", sort=False)["caption"].apply(list)
    train_images, held_images = split_images(by_image.index.tolist(), eval_images)
    train_images = [im for im in train_images if len(by_image[im]) >= 2]
    return _check_eval(
        TextRetrievalData(
            name="flickr8k_captions",
            train_texts=[by_image[im][0] for im in train_images],
            train_positives=[by_image[im][1] for im in train_images],
            eval_texts=[c for im in held_images for c in by_image[im]],
            eval_groups=[g for g, im in enumerate(held_images) for _ in by_image[im]],
        )
    )


def read_table(path: str | Path) -> pd.DataFrame:
    """CSV, JSONL/JSON or Parquet by file extension."""
    path = require_file(path, "data file")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    try:
        if suffix in (".csv", ".csv.gz", ".tsv"):
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        elif suffix in (".jsonl", ".jsonl.gz", ".json"):
            frame = pd.read_json(path, lines=suffix != ".json")
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise DataError(
                f"{path}: unknown file type {suffix!r}; use .csv, .tsv, .jsonl or .parquet"
            )
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path} is empty; give a file with a header and labelled rows") from e
    except (ValueError, pd.errors.ParserError, OSError) as e:
        raise DataError(f"{path} could not be read as {suffix} ({str(e).splitlines()[0]})") from e
    if frame.empty:
        raise DataError(f"{path} has no rows; give a file with at least a few labelled items")
    return frame


def _columns(frame: pd.DataFrame, path: Any, **columns: str | None) -> pd.DataFrame:
    for option, column in columns.items():
        if column not in frame.columns:
            raise DataError(
                f"{path} has no column {column!r} "
                f"(columns: {', '.join(map(str, frame.columns))}); "
                f"set data.{option}"
            )
    for column in columns.values():
        values = frame[column]
        empty = values.isna() | (values.astype(str).str.strip() == "")
        if empty.any():
            first = int(np.flatnonzero(empty.to_numpy())[0])
            raise DataError(
                f"{path}: {int(empty.sum())} row(s) have an empty {column!r} (the first is data "
                f"row {first + 1}); fill them in or delete those rows"
            )
    return frame


def warn_overlap(train: list[str], held: list[str], path: Any) -> int:
    """Warn (with the count) when held-out items also appear in the training file."""
    seen = set(train)
    shared = sum(text in seen for text in held)
    if shared:
        log.warning(
            "%d of the %d held-out items in %s also appear in the training file: their scores "
            "measure memorisation; remove them from one of the files",
            shared,
            len(held),
            path,
        )
    return shared


def load_table(
    train_path: str | Path,
    eval_path: str | Path | None = None,
    eval_fraction: float = 0.2,
    text_column: str = "text",
    label_column: str | None = "label",
    query_column: str | None = None,
    positive_column: str | None = None,
    name: str = "custom_text",
    **_: Any,
) -> TextRetrievalData:
    """A user's table of `text,label` items or `query,positive` pairs."""
    frame = read_table(train_path)
    pairs = query_column is not None
    if pairs:
        frame = _columns(
            frame, train_path, query_column=query_column, positive_column=positive_column
        )
    else:
        frame = _columns(frame, train_path, text_column=text_column, label_column=label_column)
    if eval_path is not None:
        held = read_table(eval_path)
        held = _columns(
            held,
            eval_path,
            **(
                {"query_column": query_column, "positive_column": positive_column}
                if pairs
                else {"text_column": text_column, "label_column": label_column}
            ),
        )
        train = frame
        key = (query_column, positive_column) if pairs else (text_column,)
        warn_overlap(
            [str(t) for c in key for t in train[c]],
            [str(t) for c in key for t in held[c]],
            eval_path,
        )
    else:
        if not 0 < eval_fraction < 1:
            raise DataError(
                f"data.eval_fraction={eval_fraction} must lie in (0, 1), or set data.eval_path"
            )
        rng = np.random.default_rng(SPLIT_SEED)
        if pairs:
            is_held = rng.random(len(frame)) < eval_fraction
        else:  # hold out a fraction of every label's items, so held-out labels have positives
            is_held = np.zeros(len(frame), dtype=bool)
            for _, idx in frame.groupby(label_column).indices.items():
                k = int(round(len(idx) * eval_fraction))
                is_held[rng.permutation(idx)[:k]] = True
        train, held = frame[~is_held], frame[is_held]
    if pairs:
        return _check_eval(
            TextRetrievalData(
                name=name,
                train_texts=train[query_column].astype(str).tolist(),
                train_positives=train[positive_column].astype(str).tolist(),
                eval_texts=[
                    s
                    for a, b in zip(held[query_column], held[positive_column], strict=True)
                    for s in (str(a), str(b))
                ],
                eval_groups=[i for i in range(len(held)) for _ in (0, 1)],
            )
        )
    labels = _codes(train[label_column].tolist() + held[label_column].tolist())
    return _check_eval(
        TextRetrievalData(
            name=name,
            train_texts=train[text_column].astype(str).tolist(),
            train_labels=labels[: len(train)],
            eval_texts=held[text_column].astype(str).tolist(),
            eval_groups=labels[len(train) :],
        )
    )


TEXT_LOADERS = {
    "clinc150": load_clinc150,
    "stsb": load_stsb,
    "flickr8k_captions": load_flickr8k_captions,
    "table": load_table,
}


def load_text_data(data_cfg: Mapping[str, Any]) -> TextRetrievalData:
    """Load the data set a `conf/data/*.yaml` describes (its `format` picks the loader)."""
    fmt = data_cfg.get("format")
    if fmt not in TEXT_LOADERS:
        raise DataError(
            f"data.format={fmt!r} is not a text format; use one of {sorted(TEXT_LOADERS)}"
        )
    kwargs = {k: v for k, v in data_cfg.items() if k != "format"}
    what = loaded_from("data", kwargs)
    files = {k: _stat(v) for k, v in kwargs.items() if "path" in k}
    # Read once per process for the jobs of a sweep; each job gets its own (shallow) copy.
    return cached(
        "text_data",
        (fmt, what, files),
        lambda: TEXT_LOADERS[fmt](**kwargs),
        copy=dataclasses.replace,
    )


def _stat(path: Any) -> Any:
    try:
        st = Path(str(path)).expanduser().stat()
        return [st.st_size, st.st_mtime_ns]
    except (OSError, TypeError):
        return None
