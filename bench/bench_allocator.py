"""What keeping freed memory (allocator.keep_freed_memory, train.py's default) does to training:

    .venv/bin/python bench/bench_allocator.py [--rounds 3] [--n 512]

Alternates fresh processes with speed.keep_freed_memory off and on, each training the
default MiniLM on the same CLINC150 batches (labelled items, batch 32, bf16 autocast, the plain
loop of bench_text.py, 3 epochs after a warm-up), and prints per training step: the wall time,
the CPU time in user space and in the kernel (page faults: the kernel mapping and zeroing freed
blocks again), the minor page faults, and each process's peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def child(n: int, keep: bool) -> None:
    import copy
    import resource

    import torch

    from finetune_budget.speed import switches
    from finetune_budget.speed.allocator import keep_freed_memory

    switches.configure({"keep_freed_memory": keep})
    kept = keep_freed_memory()
    sys.path.insert(0, os.path.dirname(__file__))
    import bench_text as B

    torch.manual_seed(0)
    batches = B.clinc150_batches(n)
    base = B.EmbeddingFineTuner(B.MODEL, B.LOSS, B.OPTIM, data_kind="labels")
    B.plain_train(copy.deepcopy(base), batches[:2], "bf16-mixed")  # warm-up
    usage = lambda: resource.getrusage(resource.RUSAGE_SELF)  # noqa: E731
    before, cpu = usage(), os.times()
    walls = [B.plain_train(copy.deepcopy(base), batches, "bf16-mixed") for _ in range(3)]
    after, cpu_after = usage(), os.times()
    steps = 3 * len(batches)
    print(
        json.dumps(
            {
                "kept": kept,
                "wall": min(walls) / len(batches),
                "user": (cpu_after.user - cpu.user) / steps,
                "sys": (cpu_after.system - cpu.system) / steps,
                "faults": (after.ru_minflt - before.ru_minflt) / steps,
                "maxrss_mb": after.ru_maxrss / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=512, help="training items per epoch")
    parser.add_argument("--child", choices=("0", "1"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.n, args.child == "1")
    rows: dict[str, list[dict]] = {"0": [], "1": []}
    for _ in range(args.rounds):
        for keep in rows:
            out = subprocess.run(
                [sys.executable, __file__, "--child", keep, "--n", str(args.n)],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            rows[keep].append(json.loads(out.strip().splitlines()[-1]))
    print(f"per training step, median of {args.rounds} processes each (wall: best epoch of 3)")
    print(
        f"{'freed memory':14s}{'wall ms':>9s}{'user ms':>9s}{'sys ms':>8s}"
        f"{'faults':>9s}{'peak MB':>9s}"
    )
    for keep, label in (("0", "returned"), ("1", "kept")):
        med = {k: statistics.median(r[k] for r in rows[keep]) for k in rows[keep][0]}
        print(
            f"{label:14s}{med['wall'] * 1e3:9.1f}{med['user'] * 1e3:9.1f}{med['sys'] * 1e3:8.1f}"
            f"{med['faults']:9.0f}{med['maxrss_mb']:9.0f}"
        )
    walls = {k: " ".join(f"{r['wall'] * 1e3:.1f}" for r in v) for k, v in rows.items()}
    print(f"each process's wall ms/step: returned {walls['0']}; kept {walls['1']}")
    print("user and sys are CPU time summed over the threads; wall moves with the machine's load")
    print(f"repeat: nice -n 5 .venv/bin/python bench/bench_allocator.py --rounds {args.rounds}")


if __name__ == "__main__":
    main()
