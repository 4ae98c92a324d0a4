"""Training time and memory per labelled item from 1,000 to 100,000 items (the seeds' range).

    .venv/bin/python bench/bench_scale_items.py [--sizes 1000 10000 100000] [--model tiny_bert]
        [--eval-items 3000] [--out /tmp/scale_items]

No data set here holds 100,000 labelled texts (CLINC150 has 15,000 training items), so this
writes a synthetic labelled set to --out: 110,000 training texts in intent-like classes of 20
(each class its own signature words among shared filler words) and a held-out file of
--eval-items texts from other classes. Then, for each size, one `python train.py data=custom_text
data.n=<size> trainer.max_epochs=1` in a fresh process (tiny random BERT by default, CPU, fp32,
MLflow in --out): training seconds per item (the run's time/train_s / data.n), and the process's
peak resident memory (getrusage of the child). Flat seconds per item and flat memory mean the
pipeline (subsets, length-bucketed sampler, per-class batches, continuation state, evaluation)
holds at the seeds' scale; the held-out split is the same for every size, so evaluation is a
constant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from bench_eval_scale import cpu_model  # a sibling script: run as bench/<name>.py

ROOT = Path(__file__).resolve().parents[1]
CLASS_SIZE = 20
WORDS_PER_TEXT = 12
SIGNATURE_WORDS = 4


def synthetic_texts(n_classes: int, rng: np.random.Generator, first_class: int = 0) -> list[dict]:
    """n_classes x CLASS_SIZE texts: each of a class's texts draws half its words from the
    class's signature words and half from shared filler, in random order."""
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "vo", "re", "pi", "du", "ga", "ho"]

    def word(i: int) -> str:
        out = []
        while True:
            out.append(syllables[i % len(syllables)])
            i //= len(syllables)
            if not i:
                return "".join(out)

    filler = [word(i) for i in range(3000, 3600)]
    rows = []
    for c in range(first_class, first_class + n_classes):
        signature = [word(5000 + c * SIGNATURE_WORDS + k) for k in range(SIGNATURE_WORDS)]
        for _ in range(CLASS_SIZE):
            words = list(rng.choice(signature, WORDS_PER_TEXT // 2)) + list(
                rng.choice(filler, WORDS_PER_TEXT // 2)
            )
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "label": f"c{c}"})
    return rows


def write_data(out: Path, train_items: int, eval_items: int) -> tuple[Path, Path]:
    import pandas as pd

    rng = np.random.default_rng(0)
    train_classes = -(-train_items // CLASS_SIZE)
    train = pd.DataFrame(synthetic_texts(train_classes, rng))
    held = pd.DataFrame(synthetic_texts(-(-eval_items // CLASS_SIZE), rng, train_classes))
    out.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = out / "train.csv", out / "eval.csv"
    train.to_csv(train_path, index=False)
    held.head(eval_items).to_csv(eval_path, index=False)
    return train_path, eval_path


def run_size(n: int, model: str, train_path: Path, eval_path: Path, out: Path) -> dict:
    uri = f"sqlite:///{out / 'mlflow.db'}"
    cmd = [
        sys.executable, "train.py", "data=custom_text", f"data.train_path={train_path}",
        f"data.eval_path={eval_path}", f"data.n={n}", f"model={model}", "trainer.max_epochs=1",
        "trainer.accelerator=cpu", "trainer.precision=32-true", "logger=none",
        "trainer.enable_progress_bar=false", "tracking.save_checkpoint=false",
        "tracking.log_model=false", f"tracking.uri={uri}", "tracking.experiment=scale-items",
        f"paths.cache_dir={out / 'cache'}", f"hydra.run.dir={out / 'runs' / str(n)}",
    ]  # fmt: skip
    # a fresh wrapper process per size, so its children's peak memory is this run's alone
    wrapper = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(r.returncode)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"data.n={n} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    peak_kb = int(proc.stdout.rsplit("PEAK_KB", 1)[1].split()[0])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("scale-items")
    (run,) = client.search_runs(
        [exp.experiment_id], f"params.`data.n` = '{n}' and tags.run_type = 'train'", max_results=1
    )
    train_s = run.data.metrics["time/train_s"]
    return {
        "n": n,
        "train_s": train_s,
        "ms_per_item": 1000 * train_s / n,
        "peak_mb": peak_kb / 1024,
        "mrr_at_20": run.data.metrics.get("val/mrr_at_20"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--model", default="tiny_bert")
    parser.add_argument("--eval-items", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/scale_items"))
    args = parser.parse_args()
    train_path, eval_path = write_data(args.out, int(max(args.sizes) * 1.1), args.eval_items)
    print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores")
    print(
        "command: .venv/bin/python bench/bench_scale_items.py --sizes "
        + " ".join(map(str, args.sizes))
        + f" --model {args.model} --eval-items {args.eval_items}"
    )
    print(f"{'data.n':>8} {'train s':>9} {'ms/item':>8} {'peak MB':>8} {'mrr@20':>7}")
    rows = []
    for n in args.sizes:
        row = run_size(n, args.model, train_path, eval_path, args.out)
        rows.append(row)
        print(
            f"{row['n']:>8} {row['train_s']:>9.1f} {row['ms_per_item']:>8.3f} "
            f"{row['peak_mb']:>8.0f} {row['mrr_at_20']:>7.3f}",
            flush=True,
        )
    (args.out / "scale_items.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
