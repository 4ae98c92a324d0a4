"""What a user's whole session must keep true, checked after every command of random sequences of
the user's own commands (main job, sweep, rerun, report, advise, export, budget search, tune,
check) against one MLflow store, with `kill -9` at random moments:

- every (run, metric, epoch) has one value;
- each point (config, seed, version) has one FINISHED training run;
- a run's logged gain at an epoch is its logged metric over its logged epoch 0, and the report's
  gain for the run at that epoch is the same number;
- the answer (`mode=advise`) read twice in a row is the same, and the second reading changes
  nothing in the store;
- no run is left RUNNING once a command has run to its end after the processes exited;
- nothing a user finished is lost or rewritten: a FINISHED training run keeps its status, params
  and per-epoch history in every later state;
- `mode=check` agrees: it passes whenever the checks above pass.

`make test` runs a short sequence, the issue's own session and, in test_session_longer.py (a file
of its own so that pytest-xdist runs it beside this one), 2 longer random sequences
(FINETUNE_BUDGET_SESSIONS=<n>: n of them); each command is a new process, so all four sessions
are `slow` and `make test-fast` leaves them out. The sessions and the checks: tests/sessions.py.
"""

from __future__ import annotations

import math
import os
import sys
import time

import pytest
from conftest import requires_data, store_uri
from mlflow.tracking import MlflowClient
from sessions import (
    EXPERIMENT,
    GAIN,
    METRIC,
    Session,
    answer,
    check_invariants,
    expected_gain,
    last_train_run,
    play,
    report_gains,
    snapshot,
    step_command,
)

from finetune_budget.tracking.mlflow_run import RUN_ID_ENV

pytestmark = requires_data("clinc150")


# -- the tests ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_answer_is_the_same_before_and_after_the_model_is_logged(tmp_path):
    """The issue's session: the main job (its model logged), then the sweep that reuses it, then
    the report and the answer; then a model logged at the sweep's end and by `mode=export`, and
    the report and the answer again."""
    s = Session(tmp_path)
    code, main_out = s.run(step_command(s, "main", {}))
    assert code == 0, main_out[-3000:]
    main_run = last_train_run(snapshot(s.uri))
    # the main job's own table: its gain at epoch 2 (the table's last row, column gain/ndcg_at_20)
    header, *rows = [line.split() for line in main_out.splitlines() if line.strip()][-4:]
    main_gain = float(rows[-1][header.index(GAIN)])
    code, out = s.run(step_command(s, "sweep", {}))
    assert code == 0 and "reused" in out, out[-3000:]
    state = snapshot(s.uri)
    check_invariants(state, [], ended=True)
    assert "logged_model" in state[main_run]["tags"]
    report = tmp_path / "report"
    code, out = s.run(step_command(s, "report", state))
    assert code == 0, out[-3000:]
    before = report_gains(report)
    assert before[(main_run, 2)] == pytest.approx(main_gain, rel=1e-3, abs=1e-7)
    _, advice_before = s.run(step_command(s, "advise", state))
    unlogged = [
        run_id
        for run_id, run in state.items()
        if run["tags"].get("run_type") == "train" and "logged_model" not in run["tags"]
    ]
    code, out = s.run(
        s.command("evaluate.py", "mode=export", f"run_id={unlogged[0]}", f"export.dir={tmp_path}")
    )
    assert code == 0, out[-3000:]
    after_state = snapshot(s.uri)
    check_invariants(after_state, [state], ended=True)
    code, out = s.run(step_command(s, "report", after_state))
    assert code == 0 and report_gains(report) == before
    _, advice_after = s.run(step_command(s, "advise", after_state))
    assert answer(advice_after) == answer(advice_before)


@pytest.mark.slow
def test_a_random_session_keeps_the_record_true(tmp_path):
    log = play(tmp_path, seed=0, length=5)
    assert len(log) >= 5


def test_a_store_written_by_the_old_model_logging_is_read_as_trained(tmp_path):
    """Release 0.1.0 logged a model's metrics at step 0 of its run after training. Such a store
    is read correctly (epoch 0 is the first step-0 value), and `mode=check` names the problem."""
    import mlflow

    from finetune_budget.tracking.query import roi_table

    uri = store_uri(tmp_path / "old.db")
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT)
    run = client.create_run(
        exp, tags={"run_type": "train", "task": "t", "model": "m", "data": "d"}
    )
    rid = run.info.run_id
    for key, value in (("data.n", 100), ("seed", 0), ("trainer.max_epochs", 2)):
        client.log_param(rid, key, str(value))
    t0 = int(time.time() * 1000)
    for epoch, value in ((0, 0.80), (1, 0.84), (2, 0.88)):
        client.log_metric(rid, METRIC, value, timestamp=t0 + epoch, step=epoch)
        client.log_metric(rid, "time/train_s", 5.0 * epoch, timestamp=t0 + epoch, step=epoch)
        if epoch:
            client.log_metric(
                rid, GAIN, expected_gain(value, 0.80), timestamp=t0 + epoch, step=epoch
            )
    # the old export.log_model: mlflow.log_metrics(final metrics, model_id=..., run_id=...)
    mlflow.set_tracking_uri(uri)
    model = mlflow.initialize_logged_model(name="model", experiment_id=exp)
    mlflow.log_metrics(
        {METRIC: 0.88, GAIN: expected_gain(0.88, 0.80), "time/train_s": 10.0},
        model_id=model.model_id,
        run_id=rid,
    )
    client.set_terminated(rid)
    assert [m.step for m in client.get_metric_history(rid, METRIC)].count(0) == 2
    table = roi_table(uri, EXPERIMENT, [METRIC]).set_index("epoch")
    assert table.loc[0, METRIC] == 0.80
    assert table.loc[2, GAIN] == pytest.approx(0.10)  # (0.88 - 0.80) / 0.80
    assert table.loc[1, GAIN] == pytest.approx(0.05)
    assert not math.isnan(table.loc[2, "seconds"]) and table.loc[2, "seconds"] == 10.0
    s = Session(tmp_path)
    code, out = s.run(
        [
            sys.executable,
            "evaluate.py",
            "mode=check",
            f"tracking.uri={uri}",
            f"hydra.run.dir={tmp_path / 'out'}",
        ]
    )
    assert code == 1, out
    assert f"run {rid}: " in out and "step-0 value" in out and "1 problem(s)" in out


def test_a_run_is_running_until_everything_is_recorded(tiny_text_cfg, monkeypatch):
    """Lightning's MLflow logger ended its run after the epoch-0 evaluation and after fit(); a
    process killed then left a FINISHED run with a partial record. The run is RUNNING at every
    moment before the job has recorded everything, and FINISHED after."""
    from lightning import Callback

    from finetune_budget.training import run as training

    cfg = tiny_text_cfg("trainer.max_epochs=2", "optim.optimizer.lr=1e-3")
    client = MlflowClient(cfg.tracking.uri)
    seen: list[tuple[str, str]] = []

    class Status(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(("epoch start", client.get_run(os.environ[RUN_ID_ENV]).info.status))

    summarise = training.summarise

    def summarise_then_look(cfg, run, history):
        seen.append(("after fit", client.get_run(run.run_id).info.status))
        summarise(cfg, run, history)

    monkeypatch.setattr(training, "summarise", summarise_then_look)
    result = training.train(cfg, callbacks=[Status()])
    assert seen == [("epoch start", "RUNNING")] * 2 + [("after fit", "RUNNING")]
    assert client.get_run(result.run_id).info.status == "FINISHED"
