"""A user's session as a sequence of commands against one MLflow store, and the invariants
checked after each (the tests are tests/test_session_invariants.py and test_session_longer.py;
the invariants are listed there)."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import DATA_DIR, ROOT, TINY, offline_env, store_uri
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

EXPERIMENT = "finetune-budget"
METRIC = "val/ndcg_at_20"  # budget.metric: the main job's table and the answers are of it
GAIN = "gain/ndcg_at_20"
FLOOR = 0.01  # budget.gain_floor's default
EPOCH_PREFIXES = ("val/", "time/", "data/", "gain/", "gain_abs/", "roi_label/", "roi_s/")
COMMON = (
    *TINY,
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "eval.batch_size=64",
)

LR = "optim.optimizer.lr=1e-3"  # the tiny random model moves in one epoch


def expected_gain(value: float, base: float) -> float:
    """The relative gain by its definition (README): (m - m0) / max(|m0|, floor)."""
    return (value - base) / max(abs(base), FLOOR)


@dataclass
class Session:
    """One user's folder: an MLflow store, a cache, sweep folders and the commands' outputs."""

    tmp: Path
    log: list[str] = field(default_factory=list)
    count: int = 0

    @property
    def uri(self) -> str:
        return store_uri(self.tmp / "mlflow.db")

    def command(self, script: str, *overrides: str) -> list[str]:
        self.count += 1
        return [
            sys.executable,
            script,
            *overrides,
            *COMMON,
            f"paths.data_dir={DATA_DIR}",
            f"tracking.uri={self.uri}",
            f"paths.cache_dir={self.tmp / 'cache'}",
            f"hydra.run.dir={self.tmp / 'out' / str(self.count)}",
            f"hydra.sweep.dir={self.tmp / 'multirun' / str(self.count)}",
        ]

    def run(self, cmd: list[str], kill_after_s: float | None = None) -> tuple[int | None, str]:
        """Run a command as the user does; with kill_after_s, SIGKILL its whole process group
        then (None as its exit code when it was killed before it ended)."""
        out = self.tmp / f"cmd{self.count}.log"
        with open(out, "w") as f:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=offline_env(),
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=kill_after_s if kill_after_s is not None else 900)
                code: int | None = proc.returncode
            except subprocess.TimeoutExpired:
                if kill_after_s is None:
                    raise
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                code = None
        text = out.read_text()
        self.log.append(f"{' '.join(cmd[1:4])}... -> {'killed' if code is None else code}")
        return code, text


# -- the store, read directly ---------------------------------------------------------------------
def snapshot(uri: str) -> dict[str, dict]:
    """Every run of the experiment: status, end time, params, tags, and the per-epoch metric
    histories of training runs as (step, value, timestamp) lists."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return {}
    state = {}
    for run in client.search_runs([exp.experiment_id], "", ViewType.ALL, max_results=5000):
        history = {}
        if run.data.tags.get("run_type") == "train":
            for key in run.data.metrics:
                if key.startswith(EPOCH_PREFIXES):
                    history[key] = sorted(
                        (m.step, m.value, m.timestamp)
                        for m in client.get_metric_history(run.info.run_id, key)
                    )
        state[run.info.run_id] = {
            "status": run.info.status,
            "end_time": run.info.end_time,
            "params": dict(run.data.params),
            "tags": dict(run.data.tags),
            "history": history,
        }
    return state


def check_invariants(state: dict[str, dict], earlier: list[dict[str, dict]], ended: bool) -> None:
    """The invariants of one state of the store; `earlier`: the states before it; `ended`: the
    command before this state ran to its end (was not killed)."""
    finished_by_point: dict[str, list[str]] = {}
    for run_id, run in state.items():
        if ended:
            assert run["status"] != "RUNNING", f"run {run_id} left RUNNING"
        if run["tags"].get("run_type") != "train":
            continue
        for key, entries in run["history"].items():
            steps = [step for step, _, _ in entries]
            assert len(steps) == len(set(steps)), f"run {run_id}: {key} {entries}"
        if run["status"] != "FINISHED":
            continue
        if run["params"].get("budget.rerun") != "True" and run["tags"].get("state") != "pruned":
            finished_by_point.setdefault(run["tags"]["point_key"], []).append(run_id)
        values = {step: value for step, value, _ in run["history"].get(METRIC, [])}
        gains = {step: value for step, value, _ in run["history"].get(GAIN, [])}
        assert 0 in values and any(step > 0 for step in values), f"run {run_id}: {values}"
        for step, gain in gains.items():
            assert step > 0, f"run {run_id}: a gain logged at epoch 0"
            assert gain == pytest.approx(expected_gain(values[step], values[0]), abs=1e-12)
    for point, run_ids in finished_by_point.items():
        assert len(run_ids) == 1, f"point {point} finished {len(run_ids)} times: {run_ids}"
    for before in earlier:  # nothing a user finished is lost or rewritten
        for run_id, run in before.items():
            if run["status"] != "FINISHED" or run["tags"].get("run_type") != "train":
                continue
            now = state[run_id]
            assert now["status"] == "FINISHED", f"run {run_id} was FINISHED, now {now['status']}"
            assert now["params"] == run["params"] and now["history"] == run["history"], run_id


def report_gains(out_dir: Path) -> dict[tuple[str, int], float]:
    with open(out_dir / "roi_table.csv") as f:
        return {
            (row["run_id"], int(float(row["epoch"]))): float(row[GAIN])
            for row in csv.DictReader(f)
            if row[GAIN] not in ("", "nan")
        }


def check_report(state: dict[str, dict], out_dir: Path) -> None:
    """The report's gain of each (run, epoch) is the run's logged gain there."""
    table = report_gains(out_dir)
    assert table, "the report has no gains"
    for (run_id, epoch), gain in table.items():
        logged = {step: value for step, value, _ in state[run_id]["history"][GAIN]}
        assert gain == pytest.approx(logged[epoch], abs=1e-12), (run_id, epoch)


# -- the user's commands --------------------------------------------------------------------------
def last_train_run(state: dict[str, dict]) -> str | None:
    done = [
        (run["end_time"], run_id)
        for run_id, run in state.items()
        if run["status"] == "FINISHED" and run["tags"].get("run_type") == "train"
    ]
    return max(done)[1] if done else None


def step_command(s: Session, name: str, state: dict[str, dict]) -> list[str] | None:
    if name == "main":
        return s.command("train.py", "data.n=64", "trainer.max_epochs=2", LR)
    if name in ("sweep", "rerun"):  # a rerun is the same command again
        return s.command("train.py", "-m", "data.n=32,64", "trainer.max_epochs=1..2", LR)
    if name == "report":
        return s.command(
            "evaluate.py",
            "mode=report",
            "report.bootstrap=40",
            f"report.out_dir={s.tmp / 'report'}",
        )
    if name == "advise":
        return s.command("evaluate.py", "mode=advise")
    if name == "check":
        return s.command("evaluate.py", "mode=check")
    if name == "export":
        run_id = last_train_run(state)
        if run_id is None:
            return None
        return s.command(
            "evaluate.py", "mode=export", f"run_id={run_id}", f"export.dir={s.tmp / 'export'}"
        )
    if name == "search":
        return s.command(
            "train.py",
            "-m",
            "hydra/sweeper=budget",
            "hydra.sweeper.pilot_n=[16,32]",
            "hydra.sweeper.seeds=[0]",
            "hydra.sweeper.epochs=1",
            "hydra.sweeper.max_steps=1",
            LR,
        )
    if name == "tune":
        return s.command(
            "tune.py",
            "hparams_search=tiny",
            "hydra.sweeper.n_trials=2",
            "tune.pruner=none",
            f"hydra.sweeper.storage=sqlite:///{s.tmp / 'optuna.db'}",
        )
    raise ValueError(name)


KILLABLE = ("main", "sweep", "rerun", "export", "search", "tune")
STEPS = ("main", "sweep", "rerun", "report", "advise", "export", "search", "tune", "check")


def play(tmp: Path, seed: int, length: int, kill_chance: float = 0.35) -> list[str]:
    """A random session of `length` commands; the invariants checked after each."""
    rng = random.Random(seed)
    s = Session(tmp)
    states: list[dict[str, dict]] = []
    names = [rng.choice(("main", "sweep"))]
    names += [rng.choice(STEPS) for _ in range(length - 1)]
    for name in names:
        state = states[-1] if states else {}
        cmd = step_command(s, name, state)
        if cmd is None:
            continue
        kill = name in KILLABLE and rng.random() < kill_chance
        code, out = s.run(cmd, kill_after_s=rng.uniform(3.0, 25.0) if kill else None)
        if code is None:  # killed: the next command finds what it left
            states.append(snapshot(s.uri))
            check_invariants(states[-1], states[:-1], ended=False)
            continue
        assert code == 0, f"{s.log}\n{out[-3000:]}"
        states.append(snapshot(s.uri))
        check_invariants(states[-1], states[:-1], ended=True)
        if name == "report":
            check_report(states[-1], tmp / "report")
        if name == "advise":  # read again: the same answer, and nothing written
            again, out2 = s.run(step_command(s, "advise", states[-1]))
            assert again == 0 and answer(out2) == answer(out), f"{out}\n---\n{out2}"
            assert snapshot(s.uri) == states[-1]
        if name == "check":
            assert "no problems found" in out, out[-3000:]
    code, out = s.run(step_command(s, "check", states[-1]))
    assert code == 0 and "no problems found" in out, f"{s.log}\n{out[-3000:]}"
    return s.log


def answer(output: str) -> list[str]:
    """The answer's lines (the log's time-stamped lines left out)."""
    return [line for line in output.splitlines() if line and not line.startswith("[20")]
