"""Images per second of the default image model (task=image_image: MobileNetV2 on CelebA) for
training and evaluation, through Lightning and through a plain PyTorch loop doing the same steps
(same initial weights, batches, optimiser, schedule, precision, gradient clipping), measured in one
run. The two are interleaved step by step (around each Lightning step a callback runs the plain
step on a copy of the model, before or after it in turn), so both see the same machine load;
per-step times are medians.
Also the DataLoader's decode+augment rate with data.num_workers workers.

    .venv/bin/python bench/bench_images.py                      # ~2 minutes on 2 idle CPU cores
    .venv/bin/python bench/bench_images.py --steps 20 model=efficientnet_lite0

Trailing key=value arguments are Hydra overrides of conf/train.yaml (task=image_image is implied).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict
from torch.utils.data import DataLoader

from finetune_budget.config import resolve_precision
from finetune_budget.retrieval import losses
from finetune_budget.retrieval.optim import lr_lambda
from finetune_budget.speed.allocator import keep_freed_memory
from finetune_budget.tasks.image_image import build

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class PlainTwin(L.Callback):
    """Times each Lightning step (gap between batch starts) and, after it, the same step done by
    hand on a copy of the model: autocast forward, loss, backward, clip, AdamW, LR schedule."""

    def __init__(self, module, precision: str, clip: float, total_steps: int) -> None:
        cfg = module.hparams
        self.embedder = copy.deepcopy(module.embedder)
        self.temperature = cfg.loss["temperature"]
        decay = [p for p in self.embedder.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.embedder.parameters() if p.ndim < 2]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = instantiate(cfg.optim["optimizer"])(groups)
        schedule = lr_lambda(cfg.optim.get("schedule", "warmup_constant"),
                             cfg.optim.get("warmup_steps", 0), total_steps)  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.bf16, self.clip = precision == "bf16-mixed", clip
        self.starts: list[float] = []
        self.plain_s: list[float] = []
        self.plain_eval_s: list[float] = []

    def plain_step(self, batch: dict[str, torch.Tensor]) -> None:
        self.embedder.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            emb = self.embedder(batch["images"])
            loss = losses.supervised_contrastive(emb, batch["labels"], self.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.embedder.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        float(loss.detach())  # Lightning's logging reads the loss every step too

    def plain_eval(self, batch: dict[str, torch.Tensor]) -> None:
        self.embedder.eval()
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=self.bf16):
            self.embedder(batch["images"]).float().cpu()

    # Whichever of a pair runs second tends to be faster (warm caches): by default the plain step
    # runs after Lightning's on even steps and before it on odd steps.
    plain_first: bool | None = None  # None: alternate; True/False: always before/after

    def _plain_goes_first(self, batch_idx: int) -> bool:
        return batch_idx % 2 == 1 if self.plain_first is None else self.plain_first

    def _timed_plain(self, batch) -> None:
        t0 = time.perf_counter()
        self.plain_step(batch)
        self.plain_s.append(time.perf_counter() - t0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())
        if self._plain_goes_first(batch_idx):
            self._timed_plain(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._plain_goes_first(batch_idx):
            self._timed_plain(batch)
        if batch_idx == trainer.num_training_batches - 1:
            self.starts.append(time.perf_counter())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.starts.append(time.perf_counter())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0):  # fmt: skip
        t0 = time.perf_counter()
        self.plain_eval(batch)
        self.plain_eval_s.append(time.perf_counter() - t0)

    def lightning_times(self, plain: list[float]) -> list[float]:
        """Per-step Lightning time: gap between consecutive batch starts minus the plain step."""
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]
        return [g - p for g, p in zip(gaps, plain, strict=False)]


class FixedBatches(L.LightningDataModule):
    """Serves pre-decoded batches, so both loops see identical tensors and no decoding cost."""

    def __init__(self, train: list, val: list, eval_groups: torch.Tensor) -> None:
        super().__init__()
        self.train, self.val, self.eval_groups = train, val, eval_groups

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=None)  # yields the stored batches as they are

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=None)


def _trainer(precision: str, clip: float, twin: PlainTwin) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, gradient_clip_val=clip, callbacks=[twin],
    )  # fmt: skip


def _rate(times: list[float], batch: int) -> float:
    """Images/s from the median per-step time, the first (warm-up) step left out."""
    return batch / statistics.median(times[1:])


def loader_rate(loader, n_batches: int) -> float:
    it = iter(loader)
    next(it)  # workers started, first batch ready
    t0, n = time.perf_counter(), 0
    for _ in range(n_batches):
        n += next(it)["images"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps (batches)")
    parser.add_argument("--eval-batches", type=int, default=5)
    parser.add_argument(
        "--plain",
        choices=("alternate", "before", "after"),
        default="alternate",
        help="when the plain step runs relative to Lightning's (training)",
    )
    args, overrides = parser.parse_known_args()
    keep_freed_memory()  # as train.py
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["task=image_image", *overrides])
    with open_dict(cfg):
        cfg.paths.data_dir = os.environ.get(
            "FINETUNE_BUDGET_DATA_DIR", str(ROOT.parent / "shared/data")
        )
        cfg.paths.output_dir = "/tmp/bench_images"
    precision = resolve_precision(cfg.trainer.precision, "cpu")
    clip = float(cfg.trainer.gradient_clip_val or 0.0)
    bs, ebs = int(cfg.data.batch_size), int(cfg.eval.batch_size)
    with open_dict(cfg):
        cfg.data.n = bs * args.steps

    L.seed_everything(cfg.seed, verbose=False)
    parts = build(cfg)
    dm0 = parts.datamodule
    dm0.num_workers = 0
    train_batches = list(dm0.train_dataloader())[: args.steps]
    val_batches = []
    for i, b in enumerate(dm0.val_dataloader()):
        if i == args.eval_batches:
            break
        val_batches.append(b)
    dm = FixedBatches(train_batches, val_batches, dm0.eval_groups)

    twin = PlainTwin(parts.module, precision, clip, len(train_batches))
    twin.plain_first = {"alternate": None, "before": True, "after": False}[args.plain]
    _trainer(precision, clip, twin).fit(parts.module, datamodule=dm)
    pl_train, pt_train = twin.lightning_times(twin.plain_s), twin.plain_s
    twin.starts = []
    evaluator = L.Trainer(
        accelerator="cpu", devices=1, precision=precision, logger=False, callbacks=[twin],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    evaluator.validate(parts.module, datamodule=dm, verbose=False)
    pl_eval, pt_eval = twin.lightning_times(twin.plain_eval_s), twin.plain_eval_s
    rates = {
        "train": (_rate(pl_train, bs), _rate(pt_train, bs)),
        "eval": (_rate(pl_eval, ebs), _rate(pt_eval, ebs)),
    }
    steps = {"train": (pl_train, pt_train), "eval": (pl_eval, pt_eval)}

    dm0.num_workers = int(cfg.data.num_workers)
    data_rate = loader_rate(dm0.train_dataloader(), min(4, args.steps - 1))

    print(f"\nimage_image bench: model={cfg.model.name} image_size={cfg.model.image_size} "
          f"precision={precision} batch={bs} (eval {ebs})")  # fmt: skip
    print(f"threads={torch.get_num_threads()} cpus={os.cpu_count()} torch {torch.__version__} "
          f"lightning {L.__version__}; median step, warm-up step left out")  # fmt: skip
    print(f"{'':7s}{'lightning img/s':>16s}{'plain img/s':>13s}{'ratio':>7s}   per-step seconds "
          "lightning | plain")  # fmt: skip
    for stage, (pl, pt) in rates.items():
        a, b = steps[stage]
        each = " ".join(f"{t:.2f}" for t in a) + " | " + " ".join(f"{t:.2f}" for t in b)
        print(f"{stage:7s}{pl:16.1f}{pt:13.1f}{pl / pt:7.3f}   {each}")
    print(
        f"DataLoader decode+augment with data.num_workers={cfg.data.num_workers}: "
        f"{data_rate:.1f} img/s"
    )
    print("repeat: .venv/bin/python bench/bench_images.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
