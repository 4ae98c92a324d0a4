"""AdamW's step on the CPU: torch's per-parameter loop (its CPU default), foreach=True and
fused=True (optim.fused=auto), on MiniLM training steps (CLINC150, batches of 32, bf16
autocast), interleaved in one process so that machine load hits all three alike.

    .venv/bin/python bench/bench_optimizer.py [--n 512] [--repeats 3]

Prints items/s of each and the milliseconds per step spent in forward+backward, gradient
clipping and the optimizer step.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_text as bt  # noqa: E402

from finetune_budget.data.text import load_clinc150  # noqa: E402
from finetune_budget.data.text_datamodule import TextRetrievalDataModule  # noqa: E402
from finetune_budget.models.text import load_tokenizer  # noqa: E402
from finetune_budget.tasks.text_text import EmbeddingFineTuner  # noqa: E402

VARIANTS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/clinc150/data_full.json")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="the first is a warm-up")
    args = p.parse_args()
    data = load_clinc150(args.data)
    tokenizer = load_tokenizer(bt.MODEL["pretrained"])
    dm = TextRetrievalDataModule(
        data, tokenizer, n=args.n, batch_size=32, samples_per_class=4, max_length=128
    )
    batches = list(dm.train_dataloader())
    base = EmbeddingFineTuner(bt.MODEL, bt.LOSS, bt.OPTIM, data_kind="labels")
    seconds = {k: [] for k in VARIANTS}
    parts = {k: {"fwd+bwd": 0.0, "clip": 0.0, "step": 0.0} for k in VARIANTS}
    for rep in range(args.repeats):
        for name, kw in VARIANTS.items():
            module = copy.deepcopy(base).train()
            opt = torch.optim.AdamW(module.parameters(), lr=2e-5, weight_decay=0.01, **kw)
            t0 = time.perf_counter()
            for batch in batches:
                a = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = module.compute_loss(batch)
                loss.backward()
                b = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
                c = time.perf_counter()
                opt.step()
                opt.zero_grad(set_to_none=True)
                d = time.perf_counter()
                if rep > 0:
                    for key, dt in (("fwd+bwd", b - a), ("clip", c - b), ("step", d - c)):
                        parts[name][key] += dt
            seconds[name].append(time.perf_counter() - t0)
    steps = len(batches) * max(args.repeats - 1, 1)
    threads = torch.get_num_threads()
    print(f"MiniLM, {len(batches)} batches of 32, bf16 autocast, {threads} threads")
    for name in VARIANTS:
        best = min(seconds[name][1:] or seconds[name])
        ms = {k: 1000 * v / steps for k, v in parts[name].items()}
        print(
            f"{name:9s} {len(batches) * 32 / best:7.1f} items/s   ms per step: fwd+bwd "
            f"{ms['fwd+bwd']:.1f}, clip {ms['clip']:.1f}, optimizer {ms['step']:.1f}"
        )
    print(
        f"repeat: .venv/bin/python bench/bench_optimizer.py --n {args.n} --repeats {args.repeats}"
    )


if __name__ == "__main__":
    main()
