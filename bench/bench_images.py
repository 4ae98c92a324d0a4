"""Images per second of the default image model (task=image_image: MobileNetV2 on CelebA) for
training and evaluation, through Lightning and through a plain PyTorch loop doing the same steps
(same initial weights, batches, optimiser, schedule, precision, gradient clipping), measured in one
run, alternating the two to share the machine's noise. Also the DataLoader's decode+augment rate.

    .venv/bin/python bench/bench_images.py                      # ~2 minutes on 2 CPU cores
    .venv/bin/python bench/bench_images.py --steps 20 --repeats 3 model=efficientnet_lite0

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

from finetune_budget import losses
from finetune_budget.config import resolve_precision
from finetune_budget.image_module import build_image_image
from finetune_budget.metrics import retrieval_metrics
from finetune_budget.module import lr_lambda

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class StepClock(L.Callback):
    """Timestamps at the start of every training batch and at the end of the last one."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stamps.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == trainer.num_training_batches - 1:
            self.stamps.append(time.perf_counter())


class FixedBatches(L.LightningDataModule):
    """Serves pre-decoded batches, so both loops see identical tensors and no decoding cost."""

    def __init__(self, train: list, val: list, eval_groups: torch.Tensor) -> None:
        super().__init__()
        self.train, self.val, self.eval_groups = train, val, eval_groups

    def train_dataloader(self):
        return self.train

    def val_dataloader(self):
        return self.val


def steady_rate(stamps: list[float], batch_size: int) -> float:
    """Images/s over all steps but the first (warm-up); stamps: each step's start, the end."""
    return (len(stamps) - 2) * batch_size / (stamps[-1] - stamps[1])


def lightning_train(module, dm, precision: str, clip: float) -> float:
    clock = StepClock()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, gradient_clip_val=clip, callbacks=[clock],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return steady_rate(clock.stamps, dm.train[0]["images"].shape[0])


def plain_train(module, batches: list, precision: str, clip: float) -> float:
    """The same step by hand: autocast forward, loss, backward, clip, AdamW, LR schedule."""
    embedder, cfg = module.embedder, module.hparams
    embedder.train()
    decay = [p for p in embedder.parameters() if p.ndim >= 2]
    no_decay = [p for p in embedder.parameters() if p.ndim < 2]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = instantiate(cfg.optim["optimizer"])(groups)
    schedule = lr_lambda(cfg.optim.get("schedule", "warmup_constant"),
                         cfg.optim.get("warmup_steps", 0), len(batches))  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    bf16 = precision == "bf16-mixed"
    stamps = []
    for batch in batches:
        stamps.append(time.perf_counter())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = embedder(batch["images"])
            loss = losses.supervised_contrastive(emb, batch["labels"], cfg.loss["temperature"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(embedder.parameters(), clip)
        optimizer.step()
        scheduler.step()
        float(loss.detach())  # Lightning's logging reads the loss each step too
    stamps.append(time.perf_counter())
    return steady_rate(stamps, batches[0]["images"].shape[0])


def lightning_eval(module, dm, precision: str) -> float:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    n = sum(b["images"].shape[0] for b in dm.val)
    t0 = time.perf_counter()
    trainer.validate(module, datamodule=dm, verbose=False)
    return n / (time.perf_counter() - t0)


def plain_eval(module, batches: list, groups: torch.Tensor, precision: str) -> float:
    embedder = module.embedder.eval()
    n = sum(b["images"].shape[0] for b in batches)
    t0 = time.perf_counter()
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"),
    ):
        parts = [(b["index"], embedder(b["images"]).float()) for b in batches]
    index = torch.cat([i for i, _ in parts])
    retrieval_metrics(torch.cat([e for _, e in parts]), query_groups=groups[index], top_k=20)
    embedder.train()
    return n / (time.perf_counter() - t0)


def loader_rate(loader, n_batches: int) -> float:
    it = iter(loader)
    next(it)  # workers started, first batch ready
    t0, n = time.perf_counter(), 0
    for _ in range(n_batches):
        n += next(it)["images"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=7, help="training steps per measurement")
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args, overrides = parser.parse_known_args()
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
    parts = build_image_image(cfg)
    dm0 = parts.datamodule
    dm0.num_workers = 0
    train_batches = list(dm0.train_dataloader())[: args.steps]
    val_batches = []
    for i, b in enumerate(dm0.val_dataloader()):
        if i == args.eval_batches:
            break
        val_batches.append(b)
    dm = FixedBatches(train_batches, val_batches, dm0.eval_groups)
    initial = copy.deepcopy(parts.module.state_dict())

    rates: dict[str, list[float]] = {k: [] for k in ("pl_train", "pt_train", "pl_eval", "pt_eval")}
    for _ in range(args.repeats):
        for kind in ("pt", "pl"):  # alternate, so both see the same machine load
            parts.module.load_state_dict(initial)
            if kind == "pl":
                rates["pl_train"].append(lightning_train(parts.module, dm, precision, clip))
                rates["pl_eval"].append(lightning_eval(parts.module, dm, precision))
            else:
                rates["pt_train"].append(plain_train(parts.module, train_batches, precision, clip))
                rates["pt_eval"].append(plain_eval(parts.module, val_batches, dm.eval_groups,
                                                   precision))  # fmt: skip

    dm0.num_workers = int(cfg.data.num_workers)
    data_rate = loader_rate(dm0.train_dataloader(), min(4, args.steps - 1))

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nimage_image bench: model={cfg.model.name} image_size={cfg.model.image_size} "
          f"precision={precision} batch={bs} (eval {ebs})")  # fmt: skip
    print(f"threads={torch.get_num_threads()} cpus={os.cpu_count()} torch {torch.__version__} "
          f"lightning {L.__version__}")  # fmt: skip
    print(f"{'':10s}{'lightning img/s':>17s}{'plain img/s':>13s}{'ratio':>8s}   (median of "
          f"{args.repeats}; per repeat: lightning / plain)")  # fmt: skip
    for stage in ("train", "eval"):
        pl, pt = med[f"pl_{stage}"], med[f"pt_{stage}"]
        each = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in
                         zip(rates[f"pl_{stage}"], rates[f"pt_{stage}"], strict=True))  # fmt: skip
        print(f"{stage:10s}{pl:17.1f}{pt:13.1f}{pl / pt:8.3f}   ({each})")
    print(
        f"DataLoader decode+augment with data.num_workers={cfg.data.num_workers}: "
        f"{data_rate:.1f} img/s"
    )
    print("repeat: .venv/bin/python bench/bench_images.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
