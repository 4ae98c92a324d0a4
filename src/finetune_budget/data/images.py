"""Labelled images for image-to-image search: CelebA identities, a folder per class, or a CSV.

Whole classes are held out for evaluation (a split fixed by `data.split_seed`, independent of the
run seed): each held-out image queries the other held-out images, same class relevant. Training
uses the images of the other classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from finetune_budget.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class ImageRetrievalData:
    """Paths and integer class ids; train and eval classes are disjoint.

    train_paths: (N,) image files, train_labels: (N,) class ids;
    eval_paths: (M,), eval_groups: (M,) class ids of the held-out classes."""

    name: str
    train_paths: list[str]
    train_labels: np.ndarray
    eval_paths: list[str]
    eval_groups: np.ndarray
    class_names: list[str]

    @property
    def kind(self) -> str:
        return "labels"


def _list_folder(root: Path) -> tuple[list[str], list[str]]:
    """A folder with one sub-folder per class -> (paths, class names), sorted."""
    if not root.is_dir():
        raise DataError(
            f"data.root={str(root)!r} is not a folder; give a folder with one sub-folder per class"
        )
    paths, labels = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(class_dir.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(f))
                labels.append(class_dir.name)
    return paths, labels


def _list_csv(csv: Path, root: Path | None, path_column: str, label_column: str):
    """A CSV of `path,label` rows -> (paths, labels); relative paths are under root (or the CSV's
    folder)."""
    if not csv.is_file():
        raise DataError(
            f"data.csv={str(csv)!r} does not exist; give a CSV with path,label columns"
        )
    try:
        table = pd.read_csv(csv, dtype=str)
    except Exception as e:  # noqa: BLE001 - empty or malformed files raise various errors
        raise DataError(
            f"could not read data.csv={str(csv)!r} ({e}); give a path,label CSV"
        ) from e
    missing = [c for c in (path_column, label_column) if c not in table.columns]
    if missing:
        raise DataError(
            f"{csv} has no column(s) {missing} (columns: {list(table.columns)}); set "
            "data.path_column and data.label_column"
        )
    table = table.dropna(subset=[path_column, label_column])
    base = root if root is not None else csv.parent
    if not base.is_dir():
        raise DataError(f"data.root={str(base)!r} is not a folder; set data.root to the images")
    paths = [p if Path(p).is_absolute() else str(base / p) for p in table[path_column]]
    return paths, table[label_column].astype(str).tolist()


def split_classes(labels: list[str], eval_fraction: float, split_seed: int) -> set[str]:
    """Held-out classes: round(eval_fraction * classes) of those with >= 2 images, chosen by
    `split_seed` alone (so the split is the same for every run seed and every data.n)."""
    names, counts = np.unique(np.asarray(labels), return_counts=True)
    eligible = names[counts >= 2]
    n_eval = int(round(eval_fraction * len(names)))
    if not 0.0 < eval_fraction < 1.0 or n_eval < 2 or n_eval >= len(names):
        raise DataError(
            f"data.eval_fraction={eval_fraction} of {len(names)} classes leaves no usable split; "
            "use a fraction that holds out at least 2 classes and keeps some for training"
        )
    n_eval = min(n_eval, len(eligible))
    order = np.random.default_rng(int(split_seed)).permutation(len(eligible))
    return {str(c) for c in eligible[order[:n_eval]]}


def load_image_data(cfg: dict[str, Any]) -> ImageRetrievalData:
    """Read `data.format` (folder | csv) and split whole classes into train and held-out."""
    fmt = cfg.get("format", "csv")
    root = Path(cfg["root"]).expanduser() if cfg.get("root") else None
    if fmt == "folder":
        if root is None:
            raise DataError("data.root is not set; give a folder with one sub-folder per class")
        paths, labels = _list_folder(root)
        where = str(root)
    elif fmt == "csv":
        if not cfg.get("csv"):
            raise DataError("data.csv is not set; give a CSV with path,label columns")
        csv = Path(cfg["csv"]).expanduser()
        paths, labels = _list_csv(
            csv, root, cfg.get("path_column", "path"), cfg.get("label_column", "label")
        )
        where = str(csv)
    else:
        raise DataError(f"data.format={fmt!r} is unknown; use folder or csv")
    if not paths:
        raise DataError(f"no images found in {where}; check data.root / data.csv")
    absent = [p for p in paths if not Path(p).is_file()]
    if absent:
        raise DataError(
            f"{len(absent)} image file(s) listed in {where} do not exist (e.g. {absent[0]}); "
            "fix data.root or the paths"
        )
    held_out = split_classes(
        labels, float(cfg.get("eval_fraction", 0.2)), cfg.get("split_seed", 0)
    )
    class_names = sorted(set(labels))
    class_id = {c: i for i, c in enumerate(class_names)}
    is_eval = np.array([lab in held_out for lab in labels])
    ids = np.array([class_id[lab] for lab in labels], dtype=np.int64)
    data = ImageRetrievalData(
        name=cfg.get("name", "images"),
        train_paths=[p for p, e in zip(paths, is_eval, strict=True) if not e],
        train_labels=ids[~is_eval],
        eval_paths=[p for p, e in zip(paths, is_eval, strict=True) if e],
        eval_groups=ids[is_eval],
        class_names=class_names,
    )
    log.info(
        "%s: %d training images of %d classes; held out %d images of %d classes",
        data.name,
        len(data.train_paths),
        len(class_names) - len(held_out),
        len(data.eval_paths),
        len(held_out),
    )
    return data


def check_readable(paths: list[str]) -> None:
    """Open each file's header (cheap): a clear error now instead of one in a DataLoader worker."""
    for p in paths:
        try:
            with Image.open(p) as im:
                im.size  # noqa: B018 - the header is parsed on open
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"image {p} cannot be read ({e}); remove or replace the file") from e


class ImageDataset(Dataset):
    """Item i -> {"images": (3, H, W) float tensor, key: int}; decoding and augmentation happen
    here, i.e. in the DataLoader workers. key is "labels" (class id) or "index" (position).
    ids: each item's id, added as "index" (training items carry theirs)."""

    def __init__(
        self,
        paths: list[str],
        values: np.ndarray | list[int],
        transform: Any,
        key: str,
        ids: list[int] | None = None,
    ) -> None:
        self.paths = paths
        self.values = [int(v) for v in values]
        self.transform = transform
        self.key = key
        self.ids = ids

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            with Image.open(self.paths[i]) as im:
                image = self.transform(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(
                f"image {self.paths[i]} cannot be read ({e}); remove or replace the file"
            ) from e
        item = {"images": image, self.key: torch.tensor(self.values[i])}
        if self.ids is not None:
            item["index"] = torch.tensor(self.ids[i])
        return item
