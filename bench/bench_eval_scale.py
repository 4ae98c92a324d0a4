"""Seconds and peak extra memory of the held-out retrieval metrics at 10k, 30k and 100k items.

    .venv/bin/python bench/bench_eval_scale.py [--sizes 10000 30000 100000] [--dim 384]
        [--group-size 20] [--top-k 20]

Synthetic L2-normalised embeddings (dim 384) in groups of 20, every item querying all others (the
text task's evaluation), scored by `retrieval_metrics` on the CPU. Each size runs in a fresh
subprocess: after building the embeddings and a small warm-up call (the kernels a training process
has already loaded), it reads its resident memory, times one call, and reports the growth of the
peak (resource.getrusage ru_maxrss, which sees torch's allocations; tracemalloc does not). The
goal (issue 32): 100,000 items within 2 GB of extra memory, growing linearly with the items;
the (Q, G) bool relevance matrix the metrics built before took Q x G bytes on its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

MB = 2**20


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _rss_mb() -> float:
    """Resident memory now (Linux /proc/self/statm)."""
    import os

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / MB


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(n: int, dim: int, group_size: int, top_k: int) -> dict[str, float]:
    """One size in this process: seconds and peak memory growth of one `retrieval_metrics`."""
    import torch
    import torch.nn.functional as F

    from finetune_budget.retrieval.metrics import chunk_rows, retrieval_metrics

    gen = torch.Generator().manual_seed(0)
    emb = torch.empty(n, dim)
    for start in range(0, n, 4096):  # a block at a time: no full-size temporary
        block = torch.randn(min(4096, n - start), dim, generator=gen)
        emb[start : start + len(block)] = F.normalize(block, dim=-1)
    groups = torch.arange(n) // group_size
    retrieval_metrics(emb[:500], query_groups=groups[:500], top_k=top_k)  # warm-up
    rss, peak_before = _rss_mb(), _peak_mb()
    start = time.perf_counter()
    scores = retrieval_metrics(emb, query_groups=groups, top_k=top_k)
    seconds = time.perf_counter() - start
    peak = _peak_mb()
    return {
        "n": n,
        "seconds": seconds,
        "extra_mb": peak - rss,
        "peak_in_call": peak > peak_before,
        "embeddings_mb": emb.numel() * 4 / MB,
        "chunk_rows": chunk_rows(n, emb.device),
        "threads": torch.get_num_threads(),
        f"mrr_at_{top_k}": scores[f"mrr_at_{top_k}"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--group-size", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dim, args.group_size, args.top_k)))
        return
    shape = f"--dim {args.dim} --group-size {args.group_size} --top-k {args.top_k}"
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(n), *shape.split()]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"held-out retrieval metrics, dim {args.dim}, groups of {args.group_size}, top "
        f"{args.top_k}, CPU; {cpu_model()}, torch threads: {rows[0]['threads']}"
    )
    print("     items   seconds   peak extra MB   MB per 1k more   chunk   (Q, G) bool matrix MB")
    prev = None
    for r in rows:
        n = r["n"]
        slope = (
            f"{(r['extra_mb'] - prev['extra_mb']) / (n - prev['n']) * 1000:16.2f}"
            if prev
            else f"{'':16}"
        )
        note = "" if r["peak_in_call"] else "  (peak before the call: an upper bound)"
        print(
            f"{n:>10,} {r['seconds']:>9.2f} {r['extra_mb']:>15.0f} {slope} "
            f"{r['chunk_rows']:>7} {n * n / MB:>23,.0f}{note}"
        )
        prev = r
    print(
        f"(embeddings themselves, not counted: {rows[-1]['embeddings_mb']:.0f} MB at the largest)"
    )
    sizes = " ".join(str(n) for n in args.sizes)
    print(f"repeat: .venv/bin/python bench/bench_eval_scale.py --sizes {sizes} {shape}")


if __name__ == "__main__":
    main()
