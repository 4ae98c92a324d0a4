"""The user's budget sweep: wall time against its floor (the training and evaluation it needs).

    .venv/bin/python bench/bench_sweep.py   # data.n=100,500,1000 trainer.max_epochs=1..10
    .venv/bin/python bench/bench_sweep.py --grid small   # data.n=100,300 trainer.max_epochs=1..3
    .venv/bin/python bench/bench_sweep.py --grid small -- model=tiny_bert   # extra overrides

Runs `train.py -m <grid>` as the user would, into a temporary MLflow store, cache and sweep folder
(nothing of yours is read or written), then reads the store:

- wall: the command's wall-clock time, start of the process to its exit (sweep report included);
- floor: for each config (runs that share a `continuation_key`), the logged `time/train_s` of its
  longest run, plus every evaluation the sweep needs once: `time/eval_s` of epochs 1..K of that
  run and of each distinct epoch-0 baseline;
- ratio = wall / floor (goal: <= 1.15), and where the rest went (start-up, per-job overhead, the
  sweep report at the end).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRIDS = {
    "user": ["data.n=100,500,1000", "trainer.max_epochs=1..10"],
    "small": ["data.n=100,300", "trainer.max_epochs=1..3"],
}


def floor_of(uri: str, experiment: str) -> dict[str, float]:
    """Floor, job overheads and report time from the runs of the sweep's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    jobs = [r for r in runs if r.data.tags.get("run_type") == "train"]
    parents = [r for r in runs if r.data.tags.get("run_type") == "sweep"]
    longest: dict[str, object] = {}
    for r in jobs:
        key = r.data.tags.get("continuation_key", r.info.run_id)
        epochs = int(r.data.params.get("trainer.max_epochs", 0))
        if key not in longest or epochs > int(longest[key].data.params["trainer.max_epochs"]):
            longest[key] = r
    train_s = eval_s = 0.0
    baselines: dict[str, float] = {}
    for r in longest.values():
        history = client.get_metric_history(r.info.run_id, "time/eval_s")
        evals = {m.step: m.value for m in history}
        train_s += client.get_metric_history(r.info.run_id, "time/train_s")[-1].value
        eval_s += sum(v for step, v in evals.items() if step > 0)
        baselines[r.data.tags.get("baseline_key", r.info.run_id)] = evals.get(0, 0.0)
    job_wall = sum((r.info.end_time - r.info.start_time) / 1000 for r in jobs)
    first_start = min(r.info.start_time for r in jobs) / 1000
    last_end = max(r.info.end_time for r in jobs) / 1000
    report_s = max(p.info.end_time for p in parents) / 1000 - last_end if parents else float("nan")
    continued = sum("continued_from" in r.data.tags for r in jobs)
    statuses = defaultdict(int)
    for r in jobs:
        statuses[r.info.status] += 1
    return {
        "jobs": len(jobs),
        "configs": len(longest),
        "continued": continued,
        "finished": statuses["FINISHED"],
        "train_s": train_s,
        "eval_s": eval_s + sum(baselines.values()),
        "floor_s": train_s + eval_s + sum(baselines.values()),
        "job_wall_s": job_wall,
        "first_start": first_start,
        "last_end": last_end,
        "report_s": report_s,
    }


# (label, file suffix, function name): cumulative seconds of each in the profiled sweep
PHASES = (
    ("Hydra: compose each job's config", "config_loader_impl.py", "load_sweep_config"),
    ("MLflow: create run, params, config", "mlflow_run.py", "tracked_run"),
    ("MLflow: log_batch calls (all)", "client.py", "log_batch"),
    ("build the task (data, model, tokenizer)", "__init__.py", "build_task"),
    ("build the Trainer", "training/run.py", "build_trainer"),
    ("epoch-0 baseline (cache or evaluate)", "training/run.py", "evaluate_baseline"),
    ("Trainer.fit (training + evaluation)", "trainer.py", "fit"),
    ("continuation: keep the epoch state", "continuation.py", "save"),
    ("continuation: restore the epoch state", "continuation.py", "load_checkpoint"),
    ("tracking.save_checkpoint (last.ckpt)", "trainer.py", "save_checkpoint"),
    ("sweep report", "build.py", "build_report"),
)


def print_profile(path: Path) -> None:
    import pstats

    stats = pstats.Stats(str(path)).stats
    print("profile (cumulative s; phases overlap where one calls another):")
    for label, suffix, name in PHASES:
        total = sum(
            v[3] for (file, _, func), v in stats.items() if func == name and file.endswith(suffix)
        )
        calls = sum(
            v[1] for (file, _, func), v in stats.items() if func == name and file.endswith(suffix)
        )
        print(f"  {label:44s}{total:8.1f} s  ({calls} calls)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="user")
    parser.add_argument("--keep", default=None, help="write the store here and keep it")
    parser.add_argument(
        "--profile", action="store_true", help="run under cProfile; print where the time went"
    )
    parser.add_argument("overrides", nargs="*", help="extra overrides after --")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_sweep_"))
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    experiment = "bench-sweep"
    profile = work / "sweep.prof"
    command = [
        sys.executable,
        *(["-m", "cProfile", "-o", str(profile)] if args.profile else []),
        str(ROOT / "train.py"),
        "-m",
        *GRIDS[args.grid],
        f"tracking.uri={uri}",
        f"tracking.experiment={experiment}",
        f"paths.cache_dir={work / 'cache'}",
        f"hydra.sweep.dir={work / 'multirun'}",
        "trainer.enable_progress_bar=false",
        # cProfile writes its file at a normal exit, not at cli.exit_now's os._exit
        *(["speed.quick_exit=false"] if args.profile else []),
        *args.overrides,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    start = time.time()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    end = time.time()
    wall = end - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"the sweep exited {proc.returncode}")
    f = floor_of(uri, experiment)
    startup = f["first_start"] - start
    job_overhead = f["job_wall_s"] - f["floor_s"]
    print(f"grid: {' '.join(GRIDS[args.grid])} {' '.join(args.overrides)}".rstrip())
    print(
        f"jobs: {f['jobs']} ({f['finished']} finished, {f['continued']} continued a shorter "
        f"run), configs: {f['configs']}"
    )
    print(f"wall               {wall:9.1f} s")
    print(
        f"floor              {f['floor_s']:9.1f} s   (training {f['train_s']:.1f} s + "
        f"evaluation {f['eval_s']:.1f} s)"
    )
    print(f"ratio wall/floor   {wall / f['floor_s']:9.3f}     (goal <= 1.15)")
    print(f"  start-up         {startup:9.1f} s   (process start to the first run)")
    print(f"  inside the jobs  {job_overhead:9.1f} s   (job run time minus the floor)")
    print(f"  sweep report     {f['report_s']:9.1f} s   (last job's end to the parent's end)")
    print(f"  after the report {end - f['last_end'] - f['report_s']:9.1f} s   (to process exit)")
    if args.profile:
        print_profile(profile)
    print(f"store: {uri}" + ("" if args.keep else " (temporary)"))
    print(
        "repeat: nice -n 5 .venv/bin/python bench/bench_sweep.py --grid "
        + args.grid
        + (" -- " + " ".join(shlex.quote(o) for o in args.overrides) if args.overrides else "")
    )


if __name__ == "__main__":
    main()
