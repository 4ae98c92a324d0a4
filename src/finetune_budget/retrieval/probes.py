"""Downstream probes: judge embeddings by a task other than retrieval.

- price_probe: embeddings (N, D) -> cross-validated gradient-boosted regression of a (log) price;
  `probe/r2`, `probe/mae`, `probe/median_ae`.
- pair_probe: cosine similarities of labelled pairs; the threshold is chosen on training pairs,
  then `probe/pair_accuracy`, `probe/pair_error`, `probe/pair_auc` on held-out pairs.
- PairProbe: the pair probe as an evaluation hook of text_text runs (`eval.pair_probe=stsb` or
  `flickr8k_captions`): embeds its pairs with the module's encoder after every validation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from finetune_budget.errors import ConfigError, DataError

log = logging.getLogger(__name__)


# -- price regression probe ----------------------------------------------------------------------
def price_probe(
    embeddings: np.ndarray | torch.Tensor,
    prices: np.ndarray,
    folds: int = 5,
    max_iter: int = 100,
    learning_rate: float = 0.1,
    log_target: bool = True,
    seed: int = 0,
    max_bins: int = 63,
    pca_dims: int | None = None,
    n_threads: int | None = 1,
    **_: Any,
) -> dict[str, float]:
    """Out-of-fold predictions of the price from the embeddings, and how good they are.

    embeddings: (N, D); prices: (N,) > 0. With `log_target` the regressor fits log(price) and
    `r2` is measured on that log scale; `mae` and `median_ae` are always in price units
    (predictions mapped back with exp). Returns {"r2", "mae", "median_ae"}.
    pca_dims: reduce the embeddings to this many principal components first (fitted per fold).
    n_threads: OpenMP threads of the regressor; 1 (default) avoids the oversubscription that makes
    it 10-20x slower on a busy machine; None = all cores.
    """
    # scikit-learn where a probe runs: every text_text job imports this module (its hooks)
    from sklearn.decomposition import PCA
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.metrics import mean_absolute_error, median_absolute_error, r2_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from threadpoolctl import threadpool_limits

    x = np.asarray(
        embeddings.float().cpu() if torch.is_tensor(embeddings) else embeddings, dtype=np.float32
    )
    prices = np.asarray(prices, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != prices.shape[0]:
        raise DataError(f"price probe: {x.shape} embeddings do not match {prices.shape} prices")
    if x.shape[0] < 2 * folds:
        raise DataError(
            f"price probe: {x.shape[0]} listings are too few for {folds}-fold CV; "
            "use more listings (eval.price_probe.max_listings) or fewer folds"
        )
    if log_target and (prices <= 0).any():
        raise DataError(
            "price probe: log_target needs prices > 0; drop them or set log_target=false"
        )
    y = np.log(prices) if log_target else prices
    model = HistGradientBoostingRegressor(
        max_iter=max_iter,
        learning_rate=learning_rate,
        max_bins=max_bins,
        early_stopping=False,
        random_state=seed,
    )
    if pca_dims:
        model = make_pipeline(PCA(int(pca_dims), random_state=seed), model)
    cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
    with threadpool_limits(n_threads):
        pred = cross_val_predict(model, x, y, cv=cv)
    pred_price = np.exp(pred) if log_target else pred
    return {
        "r2": float(r2_score(y, pred)),
        "mae": float(mean_absolute_error(prices, pred_price)),
        "median_ae": float(median_absolute_error(prices, pred_price)),
    }


# -- pair classification probe -------------------------------------------------------------------
def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The cosine threshold (score >= t means duplicate) with the best accuracy on these pairs.

    scores: (P,), labels: (P,) in {0, 1}. Candidates are midpoints between sorted scores.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    order = np.argsort(scores)
    s, lab = scores[order], labels[order]
    # threshold between s[i-1] and s[i]: predicted positive = items i..P-1
    pos_right = np.concatenate([np.cumsum(lab[::-1])[::-1], [0]])  # positives at or after i
    neg_left = np.concatenate([[0], np.cumsum(~lab)])  # negatives before i
    correct = pos_right + neg_left  # (P + 1,)
    mids = np.concatenate([[s[0] - 1e-6], (s[1:] + s[:-1]) / 2, [s[-1] + 1e-6]])
    return float(mids[int(np.argmax(correct))])


def pair_probe(
    train_scores: np.ndarray,
    train_labels: np.ndarray,
    test_scores: np.ndarray,
    test_labels: np.ndarray,
) -> dict[str, float]:
    """Threshold from the training pairs; accuracy, error and ROC AUC on the held-out pairs.

    *_scores: (P,) cosine similarities; *_labels: (P,) 1 = duplicate, 0 = not.
    """
    from sklearn.metrics import roc_auc_score

    test_labels = np.asarray(test_labels, dtype=int)
    if len(np.unique(test_labels)) < 2 or len(np.unique(np.asarray(train_labels))) < 2:
        raise DataError(
            "pair probe: training and held-out pairs need both duplicates and non-duplicates"
        )
    threshold = best_threshold(train_scores, train_labels)
    accuracy = float(((np.asarray(test_scores) >= threshold).astype(int) == test_labels).mean())
    return {
        "pair_accuracy": accuracy,
        "pair_error": 1.0 - accuracy,
        "pair_auc": float(roc_auc_score(test_labels, test_scores)),
        "pair_threshold": threshold,
    }


@dataclass
class LabelledPairs:
    """a[i], b[i] are a duplicate pair when labels[i] == 1."""

    a: list[str]
    b: list[str]
    labels: np.ndarray

    def cap(self, max_pairs: int | None, seed: int = 0) -> LabelledPairs:
        if max_pairs is None or len(self.a) <= max_pairs:
            return self
        keep = np.sort(np.random.default_rng(seed).permutation(len(self.a))[:max_pairs])
        return LabelledPairs(
            [self.a[i] for i in keep], [self.b[i] for i in keep], self.labels[keep]
        )


def stsb_pairs(
    folder: str | Path, split: str, pos_min: float = 4.0, neg_max: float = 1.0
) -> LabelledPairs:
    """STS-B pairs scored >= pos_min (duplicates) or <= neg_max (not); others are left out."""
    from finetune_budget.data.text import _read_stsb, require_file

    frame = _read_stsb(require_file(Path(folder) / f"sts-{split}.csv", f"STS-B {split} file"))
    frame = frame[(frame.score >= pos_min) | (frame.score <= neg_max)]
    return LabelledPairs(
        frame.s1.tolist(), frame.s2.tolist(), (frame.score >= pos_min).to_numpy(int)
    )


def flickr8k_pairs(
    folder: str | Path, eval_images: int = 1000, seed: int = 0
) -> tuple[LabelledPairs, LabelledPairs]:
    """(train, held-out) pairs from Flickr8k captions, split by image like flickr8k_captions data:
    per image, its first two captions (duplicate) and its first caption with another image's
    (not)."""
    from finetune_budget.data.text import read_flickr8k_captions, split_images

    by_image = read_flickr8k_captions(folder).groupby("image", sort=False)["caption"].apply(list)
    rng = np.random.default_rng(seed)
    out = []
    for images in split_images(by_image.index.tolist(), eval_images):
        images = [im for im in images if len(by_image[im]) >= 2]
        other = rng.permutation(len(images))
        other = np.where(other == np.arange(len(images)), (other + 1) % len(images), other)
        a, b, labels = [], [], []
        for i, im in enumerate(images):
            a += [by_image[im][0], by_image[im][0]]
            b += [by_image[im][1], by_image[images[other[i]]][2 % len(by_image[images[other[i]]])]]
            labels += [1, 0]
        out.append(LabelledPairs(a, b, np.asarray(labels)))
    return out[0], out[1]


@torch.no_grad()
def embed_texts(
    encoder: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    max_length: int = 128,
    batch_size: int = 128,
) -> torch.Tensor:
    """texts -> (N, D) float32 embeddings on the CPU, in the order of `texts` (length-batched)."""
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = []
    for start in range(0, len(order), batch_size):
        batch = tokenizer(
            [texts[i] for i in order[start : start + batch_size]],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        parts.append(encoder(**{k: v.to(device) for k, v in batch.items()}).float().cpu())
    encoder.train(was_training)
    emb = torch.cat(parts)
    out = torch.empty_like(emb)
    out[torch.as_tensor(order)] = emb
    return out


class PairProbe:
    """Evaluation hook: `hook(module, emb, groups) -> {"probe/pair_accuracy": ..., ...}`.

    Embeds its training and held-out pairs with `module.encoder` (cosine of L2-normalised
    embeddings), so it follows fine-tuning epoch by epoch.
    """

    def __init__(
        self,
        train: LabelledPairs,
        test: LabelledPairs,
        tokenizer: Any,
        max_length: int = 128,
        batch_size: int = 256,
    ) -> None:
        self.train, self.test = train, test
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    def _scores(self, encoder: torch.nn.Module, pairs: LabelledPairs) -> np.ndarray:
        emb = embed_texts(
            encoder, self.tokenizer, pairs.a + pairs.b, self.max_length, self.batch_size
        )
        a, b = F.normalize(emb[: len(pairs.a)], dim=-1), F.normalize(emb[len(pairs.a) :], dim=-1)
        return (a * b).sum(-1).numpy()

    def __call__(
        self, module: Any, emb: torch.Tensor | None = None, groups: torch.Tensor | None = None
    ) -> dict[str, float]:
        start = time.perf_counter()
        scores = pair_probe(
            self._scores(module.encoder, self.train),
            self.train.labels,
            self._scores(module.encoder, self.test),
            self.test.labels,
        )
        log.info("pair probe: %s (%.1f s)", scores, time.perf_counter() - start)
        return {f"probe/{k}": v for k, v in scores.items() if k != "pair_threshold"}


# eval.pair_probe's options when given as a mapping (`{name: stsb, max_pairs: 200}`): the pairs
# kept per side, STS-B's score bounds for a positive and a negative pair and its held-out split,
# and the held-out Flickr8k images whose captions pair up.
PROBE_OPTIONS = {
    "name": None, "max_pairs": 2000, "pos_min": 4.0, "neg_max": 1.0, "eval_split": "dev",
    "eval_images": 1000,
}  # fmt: skip


def build_pair_probe(
    spec: str | Mapping[str, Any] | None,
    data_dir: str | Path,
    tokenizer: Any,
    max_length: int = 128,
) -> PairProbe | None:
    """`eval.pair_probe`: null, `stsb`, `flickr8k_captions`, or a mapping with `name` and the
    options of PROBE_OPTIONS."""
    if not spec:
        return None
    given = {"name": spec} if isinstance(spec, str) else dict(spec)
    unknown = sorted(set(given) - set(PROBE_OPTIONS))
    if unknown:
        raise ConfigError(
            f"eval.pair_probe.{unknown[0]} is not an option; use {', '.join(PROBE_OPTIONS)}"
        )
    opts = {**PROBE_OPTIONS, **given}
    name, max_pairs = opts["name"], opts["max_pairs"]
    if name == "stsb":
        folder = Path(data_dir) / "stsb"
        train = stsb_pairs(folder, "train", opts["pos_min"], opts["neg_max"])
        test = stsb_pairs(folder, opts["eval_split"], opts["pos_min"], opts["neg_max"])
    elif name == "flickr8k_captions":
        train, test = flickr8k_pairs(Path(data_dir) / "flickr8k", opts["eval_images"])
    else:
        raise ConfigError(
            f"eval.pair_probe={name!r} is unknown; use stsb, flickr8k_captions or null"
        )
    return PairProbe(train.cap(max_pairs), test.cap(max_pairs), tokenizer, max_length)


def attach_eval_hooks(module: Any, cfg: Any, tokenizer: Any) -> None:
    """Add the optional evaluations a text_text config asks for to `module.eval_hooks`:
    `eval.truncate_dims` (retrieval at truncated sizes) and `eval.pair_probe`."""
    from finetune_budget.retrieval.matryoshka import TruncationEval, truncation_dims

    ev = cfg.eval
    dims = truncation_dims(ev.get("truncate_dims"), module.encoder.dim, "eval.truncate_dims")
    if dims:
        module.eval_hooks.append(TruncationEval(dims, top_k=int(ev.top_k)))
    spec = ev.get("pair_probe")
    if spec:
        spec = spec if isinstance(spec, str) else dict(spec)
        probe = build_pair_probe(
            spec, cfg.paths.data_dir, tokenizer, max_length=int(cfg.model.max_length)
        )
        module.eval_hooks.append(probe)
