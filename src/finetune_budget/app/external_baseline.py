"""A fixed baseline from outside: embeddings computed elsewhere (a paid embedding API, say),
scored with the same metrics as the fine-tuned models and logged as an MLflow run tagged
`run_type=external_baseline` (the report draws it as a horizontal line).

    python evaluate.py mode=external_baseline baseline.export_texts=clinc150_eval.csv data=clinc150
    # ... embed the `text` column elsewhere, in row order, save (N, D) as .npy or Parquet ...
    python evaluate.py mode=external_baseline baseline.embeddings=emb.npy \
        baseline.name=openai-3-small data=clinc150

Rows are aligned with the held-out items of the data config (text data: `eval_texts`; Airbnb
listings (task=mlm_price): every listing, scored by the price probe).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from finetune_budget.errors import ConfigError, DataError
from finetune_budget.retrieval.metrics import retrieval_metrics
from finetune_budget.training.run import evaluation_run

log = logging.getLogger(__name__)

RUN_TYPE = "external_baseline"


def load_embeddings(path: str | Path) -> tuple[np.ndarray, list[str] | None]:
    """(N, D) float32 embeddings from `.npy` or `.parquet`, and the file's `text` column if any.

    Parquet: an `embedding` column of lists/arrays, or else every numeric column as one dimension.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"baseline.embeddings={path} not found; give a .npy or .parquet file")
    texts = None
    try:
        if path.suffix == ".npy":
            emb = np.load(path, allow_pickle=False)
        elif path.suffix == ".parquet":
            frame = pd.read_parquet(path)
            if "text" in frame.columns:
                texts = frame["text"].astype(str).tolist()
            if "embedding" in frame.columns:
                emb = np.stack([np.asarray(v, dtype=np.float32) for v in frame["embedding"]])
            else:
                emb = (
                    frame.select_dtypes("number")
                    .drop(columns=["index"], errors="ignore")
                    .to_numpy()
                )
        else:
            raise DataError(f"baseline.embeddings={path}: use a .npy or .parquet file")
    except (ValueError, OSError) as e:
        raise DataError(f"baseline.embeddings={path} could not be read ({e})") from e
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] == 0:
        raise DataError(f"baseline.embeddings={path} has shape {emb.shape}; save an (N, D) array")
    if not np.isfinite(emb).all():
        raise DataError(f"baseline.embeddings={path} holds NaN or inf values")
    return emb, texts


def check_alignment(
    emb: np.ndarray, texts: list[str] | None, expected: list[str], path: Any, what: str
) -> None:
    """Refuse embeddings whose rows do not match the held-out items one to one."""
    if emb.shape[0] != len(expected):
        raise DataError(
            f"baseline.embeddings={path} has {emb.shape[0]} rows but {what} has {len(expected)} "
            "items; embed the texts that baseline.export_texts=<file.csv> writes, in that order"
        )
    if texts is not None:
        bad = next(
            (i for i, (a, b) in enumerate(zip(texts, expected, strict=True)) if a != b), None
        )
        if bad is not None:
            raise DataError(
                f"baseline.embeddings={path}: row {bad} has text {texts[bad][:40]!r} "
                f"but {what} has {expected[bad][:40]!r} there; keep the exported order"
            )


def _eval_items(cfg: DictConfig) -> tuple[str, list[str], Any]:
    """(name, texts in row order, what to score them against) of the config's held-out items."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if data_cfg.get("format") == "airbnb_listings":
        from finetune_budget.data.airbnb import load_listings

        listings = load_listings(
            data_cfg["path"],
            data_cfg["text_column"],
            data_cfg["price_column"],
        )
        return f"the listings of {data_cfg['name']}", listings.texts, listings.prices
    from finetune_budget.data.text import load_text_data

    data = load_text_data(data_cfg)
    return f"the held-out split of {data.name}", data.eval_texts, torch.as_tensor(data.eval_groups)


def score(cfg: DictConfig, emb: np.ndarray, target: Any) -> dict[str, float]:
    """Retrieval metrics (target: groups) or the price probe (target: prices) of (N, D)."""
    if isinstance(target, np.ndarray):
        from finetune_budget.retrieval.probes import price_probe

        probe = OmegaConf.to_container(cfg.eval, resolve=True).get("price_probe") or {}
        return {f"probe/{k}": v for k, v in price_probe(emb, target, **probe).items()}
    x = F.normalize(torch.from_numpy(emb), dim=-1)
    out = {
        f"val/{k}": v
        for k, v in retrieval_metrics(x, query_groups=target, top_k=int(cfg.eval.top_k)).items()
    }
    from finetune_budget.retrieval.matryoshka import TruncationEval, truncation_dims

    dims = truncation_dims(cfg.eval.get("truncate_dims"), x.shape[1], "eval.truncate_dims")
    out.update(TruncationEval(dims, int(cfg.eval.top_k))(None, x, target))
    return out


def evaluate_external(cfg: DictConfig) -> dict[str, float] | None:
    """mode=external_baseline: score `baseline.embeddings`, log a run_type=external_baseline run.

    With `baseline.export_texts=<file.csv>` only writes the held-out texts (index, text) to embed.
    """
    opts = cfg.get("baseline") or {}
    what, texts, target = _eval_items(cfg)
    if opts.get("export_texts"):
        out = Path(opts.export_texts).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"index": range(len(texts)), "text": texts}).to_csv(out, index=False)
        log.info("wrote the %d texts of %s to %s; embed them in this order", len(texts), what, out)
        return None
    path = opts.get("embeddings")
    if not path:
        raise ConfigError(
            "mode=external_baseline needs baseline.embeddings=<file.npy|.parquet> "
            "(or baseline.export_texts=<file.csv> to write the texts to embed)"
        )
    emb, file_texts = load_embeddings(path)
    check_alignment(emb, file_texts, texts, path, what)
    tags = {
        "task": cfg.task.name,
        "model": str(opts.get("name") or Path(path).stem),
        "data": cfg.data.name,
        "run_type": RUN_TYPE,
        "baseline_file": str(Path(path).expanduser().resolve()),
    }
    with evaluation_run(cfg, tags, f"{tags['model']} (external)") as run:
        start = time.perf_counter()
        metrics = score(cfg, emb, target)
        metrics["time/eval_s"] = time.perf_counter() - start
        metrics["baseline/dim"] = float(emb.shape[1])
        run.log_metrics(metrics, step=0)
        log.info("external baseline run %s: %s", run.run_id, metrics)
    return metrics
