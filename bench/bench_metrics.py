"""Seconds to score a held-out split: each retrieval metric on CLINC150's shape by default.

    .venv/bin/python bench/bench_metrics.py [--n 3000] [--groups 150] [--dim 384] [--repeats 3]

Random L2-normalised embeddings, every item querying all others (the text task's evaluation).
Prints the candidate lists' time, each torchmetrics metric's time (a Python loop over queries) and
the vectorised map_at_k's, as medians over repeats measured in one process.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from finetune_budget.metrics import (
    _metric_set,
    average_precision_at_k,
    candidate_lists,
    retrieval_metrics,
)


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--groups", type=int, default=150)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(args.n, args.dim, generator=g), dim=-1)
    groups = torch.arange(args.n) % args.groups
    relevant = groups[:, None] == groups[None, :]
    k = args.top_k
    cand = candidate_lists(emb, emb, relevant, k, exclude_self=True)
    scores = cand.scores - cand.scores.min() + 1.0
    print(f"{args.n} items, {args.groups} groups, dim {args.dim}, top {k}; {platform.processor()}")
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (median seconds)")
    rows = [
        (
            "candidate lists",
            _median_s(
                lambda: candidate_lists(emb, emb, relevant, k, exclude_self=True), args.repeats
            ),
        ),
    ]
    for name, metric in _metric_set(k, (1, 5, 10)).items():
        rows.append(
            (
                f"{name} (torchmetrics)",
                _median_s(
                    lambda m=metric: m(scores, cand.targets, indexes=cand.query_ids), args.repeats
                ),
            )
        )
    rows.append(
        (
            f"map_at_{k} (vectorised)",
            _median_s(
                lambda: average_precision_at_k(cand.top_hits, cand.n_relevant, k).mean(),
                args.repeats,
            ),
        )
    )
    rows.append(
        (
            "retrieval_metrics, all",
            _median_s(lambda: retrieval_metrics(emb, query_groups=groups, top_k=k), args.repeats),
        )
    )
    width = max(len(r[0]) for r in rows)
    for name, seconds in rows:
        print(f"{name.ljust(width)}  {seconds:8.3f} s")
    print(
        f"repeat: .venv/bin/python bench/bench_metrics.py --n {args.n} --groups {args.groups} "
        f"--dim {args.dim} --repeats {args.repeats}"
    )


if __name__ == "__main__":
    main()
