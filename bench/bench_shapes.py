"""What rounding the unpadded BERT's row count (models/unpadded.py, `row_count`) does to training:

    .venv/bin/python bench/bench_shapes.py [--rounds 3] [--epochs 5]

On the CPU oneDNN builds a kernel for every matrix shape it has not met (and keeps the last
1024); the unpadded BERT's products have as many rows as the batch has real tokens, a new count
nearly every step. Alternates fresh processes that run the per-token layers on exactly the real
tokens ("exact") and on `row_count` rows ("rounded"), each training the default MiniLM on
CLINC150 (labelled items, batch 32, the plain loop of bench_text.py at --precision) over
--epochs sets of new batches, as a user's epochs are; the same batches again would find their
kernels built. Prints each process's ms per step over the sets after the first, the median of
each side, their ratio, and the distinct row counts and extra rows of each side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def child(n: int, epochs: int, exact: bool, precision: str) -> None:
    import torch

    import finetune_budget.models.unpadded as unpadded
    from finetune_budget.config import resolve_precision
    from finetune_budget.speed.allocator import keep_freed_memory

    keep_freed_memory()
    sys.path.insert(0, os.path.dirname(__file__))
    import bench_text as B

    if exact:
        unpadded.row_count = lambda tokens: tokens
    torch.manual_seed(0)
    batches = B.clinc150_batches(n)
    sets = [batches[i::epochs] for i in range(epochs)]  # each an epoch's new batches
    tokens = [  # real tokens a step encodes (labelled items: one text a row)
        sum(int(v["attention_mask"].sum()) for v in b.values() if isinstance(v, dict))
        for b in batches
    ]
    rows = [unpadded.row_count(t) for t in tokens]
    module = B.EmbeddingFineTuner(B.MODEL, B.LOSS, B.OPTIM, data_kind="labels")
    precision = resolve_precision(precision, "cpu")
    walls = [B.plain_train(module, s, precision) / len(s) for s in sets]
    print(
        json.dumps(
            {
                "first": walls[0],
                "later": statistics.median(walls[1:]),
                "shapes": len(set(rows)),
                "extra_rows": sum(rows) / sum(tokens) - 1,
                "steps": len(batches),
                "precision": precision,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5, help="sets of new batches, in turn")
    parser.add_argument("--n", type=int, default=4096, help="training items (all sets)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--child", choices=("exact", "rounded"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.n, args.epochs, args.child == "exact", args.precision)
    results: dict[str, list[dict]] = {"exact": [], "rounded": []}
    for _ in range(args.rounds):
        for side in results:
            out = subprocess.run(
                [sys.executable, __file__, "--child", side, "--n", str(args.n),
                 "--epochs", str(args.epochs), "--precision", args.precision],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            results[side].append(json.loads(out.strip().splitlines()[-1]))
    first = results["exact"][0]
    print(
        f"{first['steps']} steps of batch 32 in {args.epochs} sets, {first['precision']}; ms per "
        f"step over sets 2-{args.epochs} (first set in brackets), one process each"
    )
    median = {}
    for side, runs in results.items():
        median[side] = statistics.median(r["later"] for r in runs)
        each = " ".join(f"{r['later'] * 1e3:.1f} ({r['first'] * 1e3:.1f})" for r in runs)
        print(
            f"{side:8s} median {median[side] * 1e3:6.1f}   each: {each}   "
            f"{runs[0]['shapes']} row counts, {runs[0]['extra_rows']:.1%} extra rows"
        )
    print(f"exact / rounded: {median['exact'] / median['rounded']:.3f} (> 1: rounding is faster)")
    print(
        f"repeat: nice -n 5 .venv/bin/python bench/bench_shapes.py --rounds {args.rounds} "
        f"--epochs {args.epochs} --n {args.n} --precision {args.precision}"
    )


if __name__ == "__main__":
    main()
