"""The end of a sweep: its report, and the recommended run's model logged to MLflow, one after the
other or the model logged while a forked process draws the report's figures (what a sweep does).

    .venv/bin/python bench/bench_sweep.py --keep /tmp/sweep_store   # a sweep's store, kept
    .venv/bin/python bench/bench_sweep_end.py /tmp/sweep_store --repeats 3
    .venv/bin/python bench/bench_sweep_end.py /tmp/sweep_store --set budget.metric=val/mrr_at_20

Each call runs in a fresh process (so each imports sentence-transformers and walks MLflow's
package map once, as a sweep does) on a fresh copy of the store, with the chosen runs' weights
in memory as a sweep's jobs leave them (the pretrained weights: the time is the same); the
two ways alternate. Prints each call's seconds and the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "bench-sweep"


def one_call(way: str, store: str, work: str, overrides: list[str]) -> float:
    """In this (fresh) process: the sweep's end on a copy of `store`; its seconds."""
    sys.path.insert(0, str(ROOT / "src"))
    from hydra import compose, initialize_config_dir
    from mlflow.tracking import MlflowClient

    from finetune_budget.app.runs import config_of_run
    from finetune_budget.app.sweep_end import log_sweep_choice, sweep_choices
    from finetune_budget.report.build import ReportSettings, build_report
    from finetune_budget.speed import reuse
    from finetune_budget.tasks import build_task

    shutil.copytree(store, work, ignore=shutil.ignore_patterns("multirun", "cache"))
    uri = f"sqlite:///{work}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parent = next(
        r.info.run_id
        for r in client.search_runs([exp], max_results=5000)
        if r.data.tags.get("run_type") == "sweep"
    )
    children = client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=5000
    )
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        config = compose(config_name="train", overrides=[f"tracking.uri={uri}", *overrides])

    # the report a sweep's parent makes (budget.metric first), which runs it logs, and their
    # weights in memory as its jobs leave them
    metric = config.budget.metric
    probe_settings = {"out_dir": f"{work}/probe", "log_to_mlflow": False}
    probe = build_report(uri, EXPERIMENT, ReportSettings.from_config(probe_settings, metric))
    settings = ReportSettings.from_config({"out_dir": f"{work}/report"}, metric)
    for run_id, _ in sweep_choices(config, children, probe.advice):
        cfg, _ = config_of_run(uri, run_id)
        reuse.keep_final_weights(run_id, build_task(cfg).module, 4096)
    start = time.perf_counter()
    if way == "after":
        report = build_report(uri, EXPERIMENT, settings, parent, attach_to_run=parent)
        log_sweep_choice(config, parent, children, report.advice)
    else:
        build_report(
            uri,
            EXPERIMENT,
            settings,
            parent,
            attach_to_run=parent,
            alongside=lambda advice: log_sweep_choice(config, parent, children, advice),
        )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store", help="a folder bench_sweep.py --keep wrote")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--call", nargs=2, metavar=("WAY", "WORK"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="a config override (repeat)"
    )
    args = parser.parse_args()
    if args.call:  # the child process of one call
        seconds = one_call(args.call[0], args.store, args.call[1], args.overrides)
        print(f"SECONDS {seconds:.3f}")
        return
    seconds: dict[str, list[float]] = {"after": [], "alongside": []}
    with tempfile.TemporaryDirectory(prefix="bench_sweep_end_") as tmp:
        for i in range(args.repeats):
            for way in seconds:
                work = str(Path(tmp) / f"{way}{i}")
                out = subprocess.run(
                    [sys.executable, __file__, args.store, "--call", way, work]
                    + [f"--set={o}" for o in args.overrides],
                    capture_output=True,
                    text=True,
                    env={"HF_HUB_OFFLINE": "1", **os.environ},
                )
                lines = [x for x in out.stdout.splitlines() if x.startswith("SECONDS")]
                if out.returncode != 0 or not lines:
                    raise SystemExit(f"the {way} call failed:\n{out.stderr[-3000:]}")
                seconds[way].append(float(lines[0].split()[1]))
                print(f"{way:10s} {seconds[way][-1]:7.2f} s")
    for way, values in seconds.items():
        print(f"median {way:10s} {statistics.median(values):7.2f} s  ({len(values)} calls)")
    print(
        "after: the report, then the model logged; alongside: the model logged while a forked "
        "process draws the figures"
    )
    extra = "".join(f" --set {o}" for o in args.overrides)
    print(f"repeat: nice -n 5 .venv/bin/python bench/bench_sweep_end.py {args.store}{extra}")


if __name__ == "__main__":
    main()
