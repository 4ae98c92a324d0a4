"""Domain adaptation by masked-LM, judged by a price regression probe (task=mlm_price).

    python train.py -m task=mlm_price data.n=100,500,1000,5000

The sentence encoder's transformer continues pretraining with masked-LM on `data.n` unlabelled
listing descriptions (a nested subset; HTML stripped; each text cut into chunks of the model's
maximum length; 20% of tokens masked). After every epoch (and at epoch 0, before adaptation) every
listing is embedded and a gradient-boosted regressor predicts its log price under k-fold CV:
`probe/r2`, `probe/mae`, `probe/median_ae`. At the end the adapted encoder is saved as a
sentence-transformers folder (`<output_dir>/adapted_model`), reloaded, and checked to give the
same embeddings as the trained one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForMaskedLM,
    DataCollatorForLanguageModeling,
)

from finetune_budget.data.airbnb import Listings, load_listings
from finetune_budget.data.base import BudgetDataModule, build_datamodule, take_base_keys
from finetune_budget.errors import ConfigError, ModelError
from finetune_budget.export.formats import encoder_as_sentence_transformer
from finetune_budget.models.text import (
    SentenceEncoder,
    build_sentence_encoder,
    load_tokenizer,
    load_transformer,
)
from finetune_budget.retrieval.optim import weight_decay_groups
from finetune_budget.retrieval.probes import embed_texts, price_probe
from finetune_budget.tasks.module import FineTuner
from finetune_budget.tasks.task import TaskParts

log = logging.getLogger(__name__)

# The listings the probe uses when eval.price_probe.max_listings subsamples them: fixed, so every
# run of a study probes the same listings.
PROBE_SEED = 20240
SAVE_CHECK_TOL = 1e-5


# -- data ----------------------------------------------------------------------------------------
def chunk_texts(
    texts: list[str], tokenizer: Any, chunk_length: int, min_tokens: int = 2
) -> list[list[int]]:
    """Each text -> consecutive chunks of at most `chunk_length` tokens (special tokens included;
    the tokenizer's overflowing tokens). Chunks with fewer than `min_tokens` text tokens are
    dropped. Returns token ids per chunk."""
    special = tokenizer.num_special_tokens_to_add(pair=False)
    if chunk_length - special < 1:
        raise ConfigError(f"data.chunk_length={chunk_length} leaves no room for text tokens")
    if not texts:
        return []
    ids = tokenizer(
        texts, truncation=True, max_length=chunk_length, return_overflowing_tokens=True
    )["input_ids"]
    return [c for c in ids if len(c) - special >= min_tokens]


class MaskedLMDataModule(BudgetDataModule):
    """Training: masked-LM batches of chunks of the first `n` texts of a seeded permutation
    ({"input_ids", "attention_mask", "labels"}: (B, T), "index": (B,) chunk ids). Validation:
    every listing (or a fixed subsample) for the probe ({"input": tokenised (B, T'), "index":
    (B,)})."""

    def __init__(
        self,
        listings: Listings | None = None,
        tokenizer: Any = None,
        *,
        probe_max_listings: int | None = None,
        probe_max_length: int = 128,
        chunk_length: int = 128,
        mlm_probability: float = 0.2,
        **source: Any,
    ) -> None:
        """listings: the loaded listings, or None to load the ones `source` describes (the
        `data` group's path, text_column and price_column). probe_max_listings / probe_max_length:
        the probe's listings (None: all) and their token limit; chunk_length / mlm_probability:
        the training chunks and the share of their tokens masked. The subset and loader keys
        (data.base.BASE_KEYS) go to the base."""
        base = take_base_keys(source, batch_size=16)
        if listings is None:
            listings = load_listings(source["path"], source["text_column"], source["price_column"])
        if not 0 < mlm_probability < 1:
            raise ConfigError(
                f"data.mlm_probability={mlm_probability} must lie in (0, 1), e.g. 0.2"
            )
        super().__init__(len(listings), name="the listings", **base)
        self.listings = listings
        self.tokenizer = tokenizer
        self.chunk_length = int(chunk_length)
        self.probe_max_length = int(probe_max_length)
        self.collator = DataCollatorForLanguageModeling(
            tokenizer, mlm=True, mlm_probability=mlm_probability
        )
        total = len(listings)
        if probe_max_listings and probe_max_listings < total:
            keep = np.random.default_rng(PROBE_SEED).permutation(total)[: int(probe_max_listings)]
            self.probe_items = np.sort(keep)
        else:
            self.probe_items = np.arange(total)
        self.probe_prices = listings.prices[self.probe_items]
        self._chunks: list[list[int]] | None = None

    @property
    def chunks(self) -> list[list[int]]:
        """Token ids (with special tokens) of every chunk of the training texts."""
        if self._chunks is None:
            texts = [self.listings.texts[i] for i in self.subset]
            self._chunks = chunk_texts(texts, self.tokenizer, self.chunk_length)
            log.info(
                "masked-LM: %d texts -> %d chunks of <= %d tokens",
                len(texts),
                len(self._chunks),
                self.chunk_length,
            )
        return self._chunks

    def collate_train(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = dict(self.collator([{"input_ids": self.chunks[i]} for i in indices]))
        return {**batch, "index": torch.as_tensor(indices)}

    def collate_eval(self, indices: list[int]) -> dict[str, Any]:
        texts = [self.listings.texts[self.probe_items[i]] for i in indices]
        tokens = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.probe_max_length,
            return_tensors="pt",
        )
        return {"input": dict(tokens), "index": torch.as_tensor(indices)}

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(list(range(len(self.chunks))), self.collate_train)

    def val_dataloader(self) -> DataLoader:
        texts = self.listings.texts
        order = sorted(range(len(self.probe_items)), key=lambda i: len(texts[self.probe_items[i]]))
        return self.eval_loader(order, self.collate_eval)


# -- model ---------------------------------------------------------------------------------------
def build_masked_lm(
    pretrained: str | None,
    config: dict[str, Any] | None = None,
    fast_dropout: bool | None = None,
    **_: Any,
) -> torch.nn.Module:
    """A transformer with a masked-LM head. Sentence encoders (all-MiniLM-L6-v2) ship without
    one: transformers then initialises the head randomly, which masked-LM training fixes.
    fast_dropout: as load_transformer's."""
    return load_transformer(pretrained, config, AutoModelForMaskedLM, fast_dropout)


def save_sentence_encoder(
    encoder: SentenceEncoder, tokenizer: Any, folder: str | Path, max_length: int
) -> Path:
    """Save a (projection-free) encoder as a sentence-transformers folder
    (export.formats.encoder_as_sentence_transformer). Loads with `SentenceTransformer(folder)` and
    `build_sentence_encoder(pretrained=folder)`."""
    if encoder.projection is not None:
        raise ConfigError(
            "saving a sentence encoder with a projection head is not supported here; "
            "use model.output_dim=null"
        )
    folder = Path(folder)
    encoder_as_sentence_transformer(encoder, tokenizer, max_length).save(str(folder))
    return folder


def check_saved_encoder(
    encoder: SentenceEncoder, folder: str | Path, tokenizer: Any, texts: list[str], max_length: int
) -> float:
    """Max |difference| between the embeddings (N, D) of `texts` by the trained encoder and by
    the one reloaded from `folder`; raises ModelError above 1e-5."""
    reloaded = build_sentence_encoder(
        pretrained=str(folder), pooling=encoder.pooling, normalize=encoder.normalize
    )
    reloaded.to(next(encoder.parameters()).device)
    trained = embed_texts(encoder, tokenizer, texts, max_length)
    again = embed_texts(reloaded, tokenizer, texts, max_length)
    diff = float((trained - again).abs().max())
    if not diff <= SAVE_CHECK_TOL:
        raise ModelError(
            f"the model saved in {folder} gives embeddings {diff:.2g} away from the "
            "trained one; report this with the run's config"
        )
    return diff


def mlm_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The masked-LM head of `model` when it is one module next to the base model (BERT `cls`,
    MPNet/RoBERTa `lm_head`), else None."""
    others = [m for _, m in model.named_children() if m is not model.base_model]
    return others[0] if len(others) == 1 else None


def masked_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the masked tokens; batch: input_ids, attention_mask, labels (B, T), -100
    where not masked. Equals `model(**batch).loss` but runs the vocabulary-sized head only on the
    masked positions (~20% of the tokens), which halves a MiniLM step on a CPU."""
    head = mlm_head(model)
    if head is None:
        keys = ("input_ids", "attention_mask", "labels")
        return model(**{k: batch[k] for k in keys if k in batch}).loss
    hidden = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    selected = batch["labels"] != -100
    logits = head(hidden[selected])
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"][selected])


class MaskedLMAdapter(FineTuner):
    """Masked-LM training of a sentence encoder's transformer; the price probe after each
    validation sets `eval_metrics` = {"probe/r2", "probe/mae", "probe/median_ae"}."""

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        probe: dict[str, Any],
        save_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if model.get("output_dim"):
            raise ConfigError(
                "task=mlm_price adapts the transformer only; set model.output_dim=null"
            )
        self.mlm = build_masked_lm(**model)
        self.mlm.train()
        # shares the transformer's weights with the masked-LM model (no copy)
        self.encoder = SentenceEncoder(
            self.mlm.base_model,
            pooling=model["pooling"],
            normalize=model["normalize"],
        )
        self.saved_model: str | None = None
        self.save_check_diff: float | None = None
        # recorded on the MLflow run by the budget tracker at the end of fit
        self.run_tags: dict[str, str] = {}
        self.run_metrics: dict[str, float] = {}

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return masked_lm_loss(self.mlm, batch)

    def embed_eval(self, batch: dict[str, Any]) -> tuple[str, torch.Tensor]:
        return "items", self.encoder(**batch["input"])

    primary_metric = "probe/r2"

    def score(self, parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """The price probe on the held-out listings' embeddings."""
        index, emb = parts["items"]
        prices = self.trainer.datamodule.probe_prices[index.numpy()]
        start = time.perf_counter()
        scores = price_probe(emb.numpy(), prices, **self.hparams.probe)
        log.info(
            "price probe on %d listings: %s (%.1f s)",
            len(emb),
            scores,
            time.perf_counter() - start,
        )
        return {f"probe/{k}": v for k, v in scores.items()}

    def on_train_end(self) -> None:
        """Save the adapted encoder, reload it, check the embeddings agree; the tracker records
        the folder (tag `adapted_model`) and the check (`check/save_max_abs_diff`)."""
        if not self.hparams.save_dir or not self.trainer.is_global_zero:
            return
        dm = self.trainer.datamodule
        folder = save_sentence_encoder(
            self.encoder, dm.tokenizer, self.hparams.save_dir, dm.chunk_length
        )
        texts = [dm.listings.texts[i] for i in dm.probe_items[:32]]
        self.save_check_diff = check_saved_encoder(
            self.encoder, folder, dm.tokenizer, texts, dm.probe_max_length
        )
        self.saved_model = str(Path(folder).resolve())
        log.info(
            "adapted encoder saved in %s (reloaded embeddings differ by %.2g)",
            self.saved_model,
            self.save_check_diff,
        )
        self.run_tags["adapted_model"] = self.saved_model
        self.run_metrics["check/save_max_abs_diff"] = self.save_check_diff

    def param_groups(self) -> list[dict]:
        return weight_decay_groups(self.mlm.named_parameters())


# -- task ----------------------------------------------------------------------------------------
def build(cfg: DictConfig, save_model: bool, **_: Any) -> TaskParts:
    """TaskParts of task=mlm_price from the composed config. save_model: keep the adapted
    encoder as a sentence-transformers folder (task.save_model; the task group's name, modality
    and budget_metric are read where runs are tagged and scored)."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    probe = OmegaConf.to_container(cfg.eval.price_probe, resolve=True)
    dm = build_datamodule(
        cfg.data,
        MaskedLMDataModule,
        "data=airbnb_amsterdam",
        tokenizer=load_tokenizer(model_cfg["tokenizer"]),
        chunk_length=cfg.data.chunk_length or model_cfg["max_length"],
        probe_max_length=probe.pop("max_length"),
        probe_max_listings=probe.pop("max_listings"),
        eval_batch_size=cfg.eval.batch_size,
        seed=cfg.seed,
    )
    save_dir = str(Path(cfg.paths.output_dir) / "adapted_model") if save_model else None
    module = MaskedLMAdapter(
        model_cfg, OmegaConf.to_container(cfg.optim, resolve=True), probe, save_dir
    )
    return TaskParts(dm, module, dm.n_train, model_cfg["pretrained"] is None)
