"""Optuna searches (tune.py and train.py -m with the Optuna sweeper) on a tiny random BERT."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import CONF, DATA_DIR, ROOT, TINY, offline_env, requires_data, run_workers, store_uri
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune_budget.app.tuning import (
    Objective,
    apply_overrides,
    objective_values,
    parse_search_space,
    run_search,
)
from finetune_budget.app.tuning.search import SearchError, _probe, make_pruner
from finetune_budget.errors import ConfigError, ModelError
from finetune_budget.models.text import build_sentence_encoder

pytestmark = requires_data("clinc150")

FAST = (
    *TINY,
    "trainer.limit_val_batches=2",
    "eval.batch_size=64",
    "budget.continue_shorter_runs=false",
    "logger=none",
    "callbacks.lr_monitor=null",
)


def search_cfg(tmp_path: Path, *overrides: str, search: str = "tiny") -> DictConfig:
    """train.yaml + hparams_search=<search>, with the hydra node (the sweeper) kept."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"hparams_search={search}", *FAST, *overrides],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.paths.data_dir = str(DATA_DIR)
        cfg.paths.output_dir = str(tmp_path / "output")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.tracking.uri = store_uri(tmp_path / "mlflow.db")
        cfg.trainer.enable_progress_bar = False
        cfg.hydra.sweeper.storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    return cfg


def set_space(cfg: DictConfig, **params: str) -> None:
    with open_dict(cfg):
        cfg.hydra.sweeper.params = {k.replace("__", "."): v for k, v in params.items()}


def children(cfg: DictConfig, parent: str) -> list:
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=100)


# -- search spaces, objectives, configs (no training) ---------------------------------------------
def test_search_space_is_read_from_the_sweeper_params(tmp_path: Path) -> None:
    cfg = search_cfg(tmp_path, search="lr_batch")
    space, fixed = parse_search_space(cfg.hydra.sweeper.params)
    assert set(space) == {
        "optim.optimizer.lr",
        "data.batch_size",
        "loss.temperature",
        "model.freeze_layers",
    }
    assert space["optim.optimizer.lr"].log and space["optim.optimizer.lr"].high == 1e-3
    assert list(space["data.batch_size"].choices) == [16, 32, 64]
    assert fixed == {}
    out = apply_overrides(cfg, {"optim.optimizer.lr": 3e-4, "model.freeze_layers": 1})
    assert out.optim.optimizer.lr == 3e-4 and out.model.freeze_layers == 1
    assert cfg.optim.optimizer.lr != 3e-4  # a copy
    with pytest.raises(ConfigError, match="no such config key"):
        apply_overrides(cfg, {"optim.optimizer.learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="train.py -m"):
        apply_overrides(cfg, {"model": "minilm_l6"})


def test_all_search_configs_compose_and_name_their_objectives(tmp_path: Path) -> None:
    for path in sorted((CONF / "hparams_search").glob("*.yaml")):
        cfg = search_cfg(tmp_path, search=path.stem)
        sweeper = cfg.hydra.sweeper
        assert sweeper.storage.startswith("sqlite:///") and sweeper.study_name, path.name
        assert sweeper.sampler.seed is not None, path.name
        directions = [o.direction for o in map(lambda n: Objective(**n), cfg.tune.objectives)]
        given = (
            [sweeper.direction] if isinstance(sweeper.direction, str) else list(sweeper.direction)
        )
        assert [str(d).split(".")[-1] for d in given] == directions, path.name
        space, _ = parse_search_space(sweeper.params)
        apply_overrides(cfg, {k: _probe(d) for k, d in space.items()})  # keys exist


def test_objective_values_come_from_the_best_epoch_of_the_first_objective() -> None:
    history = [
        {"epoch": 0, "val/mrr_at_20": 0.9, "gain/mrr_at_20": float("nan"), "time/train_s": 0.0},
        {"epoch": 1, "val/mrr_at_20": 0.5, "gain/mrr_at_20": 0.1, "time/train_s": 2.0},
        {"epoch": 2, "val/mrr_at_20": 0.7, "gain/mrr_at_20": 0.4, "time/train_s": 4.0},
        {"epoch": 3, "val/mrr_at_20": 0.6, "gain/mrr_at_20": 0.2, "time/train_s": 6.0},
    ]
    gain_time = [Objective("gain/mrr_at_20"), Objective("time/train_s", "minimize")]
    assert objective_values(history, gain_time) == [0.4, 4.0]
    # epoch 0 (the pretrained model) is never the trial's value
    assert objective_values(history, [Objective("val/mrr_at_20")]) == [0.7]
    assert math.isnan(objective_values(history[:1], [Objective("val/mrr_at_20")])[0])


def test_freeze_layers_freezes_embeddings_and_bottom_layers() -> None:
    config = {
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 100,
    }
    enc = build_sentence_encoder(None, config, freeze_layers=2)
    layers = enc.transformer.encoder.layer
    assert not any(p.requires_grad for p in enc.transformer.embeddings.parameters())
    assert not any(p.requires_grad for layer in layers[:2] for p in layer.parameters())
    assert all(p.requires_grad for p in layers[2].parameters())
    assert all(p.requires_grad for p in build_sentence_encoder(None, config).parameters())
    with pytest.raises(ModelError, match="0..2"):
        build_sentence_encoder(None, config, freeze_layers=3)


def test_bad_search_settings_are_one_line_errors(tmp_path: Path) -> None:
    cfg = search_cfg(tmp_path, "tune.pruner=sometimes")
    with pytest.raises(ConfigError, match="tune.pruner='sometimes' is unknown"):
        run_search(cfg)
    cfg = search_cfg(tmp_path, "tune.pruner=median", search="budget_pareto")
    with pytest.raises(ConfigError, match="tune.pruner=none"):
        run_search(cfg)
    cfg = search_cfg(tmp_path, "+tune.pruners.median.patience=3")
    with pytest.raises(ConfigError, match="tune.pruners.median=.* does not fit MedianPruner"):
        run_search(cfg)
    cfg = search_cfg(tmp_path, "hydra.sweeper.direction=minimize")
    with pytest.raises(ConfigError, match="make them the same"):
        run_search(cfg)
    cfg = search_cfg(tmp_path)
    with open_dict(cfg):
        del cfg.tune
    with pytest.raises(ConfigError, match="hparams_search="):
        run_search(cfg)


def test_each_pruner_is_built_from_its_own_settings(tmp_path: Path) -> None:
    cfg = search_cfg(
        tmp_path, "tune.pruner=hyperband", "tune.pruners.hyperband.reduction_factor=2"
    )
    pruner = make_pruner(cfg.tune.pruner, cfg.tune.pruners[cfg.tune.pruner])
    assert isinstance(pruner, optuna.pruners.HyperbandPruner) and pruner._reduction_factor == 2
    for name in ("median", "percentile", "successive_halving"):
        assert make_pruner(name, cfg.tune.pruners[name]) is not None
    assert isinstance(make_pruner("none", None), optuna.pruners.NopPruner)


def test_early_stopping_is_off_by_default_and_an_option(make_cfg) -> None:
    assert "early_stopping" not in make_cfg(*TINY).callbacks
    cfg = make_cfg(*TINY, "callbacks=with_early_stopping", "callbacks.early_stopping.patience=1")
    callback = instantiate(cfg.callbacks.early_stopping)
    assert callback.monitor == cfg.budget.metric == "val/ndcg_at_20" and callback.patience == 1
    assert "lr_monitor" in cfg.callbacks  # the default callbacks stay


def test_early_stopping_ends_an_ordinary_run_when_the_metric_falls(tiny_text_cfg) -> None:
    from finetune_budget.training.run import train

    # lr=1.0 wrecks the tiny model: the metric falls after the first epoch
    cfg = tiny_text_cfg(
        "callbacks=with_early_stopping",
        "callbacks.early_stopping.patience=1",
        "optim.optimizer.lr=1.0",
        "trainer.max_epochs=4",
        "data.n=32",
        "budget.continue_shorter_runs=false",
    )
    result = train(cfg)
    epochs = [r["epoch"] for r in result.history]
    assert max(epochs) < 4, result.history


# -- searches ------------------------------------------------------------------------------------
def test_search_records_nested_tagged_runs_and_resumes(tmp_path: Path) -> None:
    cfg = search_cfg(
        tmp_path,
        "tune.pruner=none",
        "hydra.sweeper.n_trials=3",
        "data.n=32",
        "trainer.max_epochs=1",
    )
    result = run_search(cfg)
    study = result.study
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    runs = children(cfg, result.parent_run_id)
    assert len(runs) == 3
    assert {r.data.tags["trial"] for r in runs} == {"0", "1", "2"}
    assert {r.data.tags["study"] for r in runs} == {"tiny"}
    assert {r.data.tags["state"] for r in runs} == {"complete"}
    assert {r.info.status for r in runs} == {"FINISHED"}
    by_id = {r.info.run_id: r for r in runs}
    for t in study.trials:  # the trial's value is the run's best val/ndcg_at_20 (budget.metric)
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert t.value == pytest.approx(run.data.metrics["best/ndcg_at_20"])
        assert run.data.params["optim.optimizer.lr"] == str(t.params["optim.optimizer.lr"])
    parent = MlflowClient(cfg.tracking.uri).get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["run_type"] == "search"
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert parent.data.tags["best.data.batch_size"] == str(study.best_params["data.batch_size"])
    assert parent.data.metrics["best/val/ndcg_at_20"] == pytest.approx(study.best_value)
    assert parent.data.metrics["trials/complete_n"] == 3

    # the same command with more trials resumes the study under the same parent
    with open_dict(cfg):
        cfg.hydra.sweeper.n_trials = 4
    again = run_search(cfg)
    assert len(again.study.trials) == 4 and again.worker_trials == [3]
    assert again.parent_run_id == result.parent_run_id
    assert len(children(cfg, result.parent_run_id)) == 4


def test_pruner_stops_trials_in_a_bad_region_before_their_last_epoch(tmp_path: Path) -> None:
    cfg = search_cfg(
        tmp_path,
        "tune.pruner=median",
        "hydra.sweeper.n_trials=4",
        "data.n=32",
        "trainer.max_epochs=3",
        "tune.pruners.median.n_startup_trials=2",
        "tune.pruners.median.n_warmup_steps=0",
    )
    good = [{"optim.optimizer.lr": 0.01, "data.batch_size": b} for b in (16, 32)]
    bad = [{"optim.optimizer.lr": 1.0, "data.batch_size": b} for b in (16, 32)]
    with open_dict(cfg):
        cfg.tune.enqueue = [*good, *bad]
    result = run_search(cfg)
    states = [t.state for t in result.study.trials]
    assert states[:2] == [optuna.trial.TrialState.COMPLETE] * 2
    pruned = [t for t in result.study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.params["optim.optimizer.lr"] == 1.0 for t in pruned)
    client = MlflowClient(cfg.tracking.uri)
    for t in pruned:
        assert t.user_attrs["pruned_epoch"] < 3
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["state"] == "pruned"
        assert run.data.tags["pruned_epoch"] == str(t.user_attrs["pruned_epoch"])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/mrr_at_20")]
        assert max(steps) == t.user_attrs["pruned_epoch"]  # it trained no further
    assert result.counts["pruned"] == len(pruned)


def test_failed_trials_are_recorded_and_too_many_stop_the_search(tmp_path: Path) -> None:
    cfg = search_cfg(
        tmp_path,
        "tune.pruner=none",
        "hydra.sweeper.n_trials=5",
        "data.n=32",
        "trainer.max_epochs=1",
        "hydra.sweeper.max_failure_rate=0.5",
    )
    set_space(cfg, loss__temperature="choice(0.05, 0.0)")  # 0.0: the loss is NaN at once
    with open_dict(cfg):
        cfg.tune.enqueue = [{"loss.temperature": t} for t in (0.05, 0.0, 0.0, 0.05, 0.05)]
    with pytest.raises(SearchError, match=r"2 of 3 trials failed.*max_failure_rate=0.5.*Diverged"):
        run_search(cfg)
    study = optuna.load_study(study_name="tiny", storage=cfg.hydra.sweeper.storage)
    F, C = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE
    assert [t.state for t in study.trials] == [C, F, F]  # trial 2 ran after trial 1 failed
    client = MlflowClient(cfg.tracking.uri)
    for t in study.trials[1:]:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["state"] == "failed"
        assert run.data.tags["error"].startswith("DivergedError")
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FAILED" and "max_failure_rate" in parent.data.tags["error"]


def test_pareto_search_returns_a_front_of_gain_against_seconds(tmp_path: Path) -> None:
    cfg = search_cfg(
        tmp_path,
        "hydra.sweeper.n_trials=3",
        "data.n=64",
        "trainer.max_epochs=1",
        search="budget_pareto",
    )
    # one epoch of 512 labels against one of 32: 16 steps against 1, seconds far apart beyond a
    # loaded machine's noise (and whatever warm-up an earlier test of the process left), at
    # the only epoch a trial's values can come from
    set_space(cfg, data__n="choice(32, 512)", optim__optimizer__lr="choice(0.01, 1.0)")
    with open_dict(cfg):
        cfg.tune.enqueue = [
            {"data.n": 512, "optim.optimizer.lr": 0.01},
            {"data.n": 32, "optim.optimizer.lr": 0.01},
            {"data.n": 512, "optim.optimizer.lr": 1.0},  # slow and bad: dominated
        ]
    result = run_search(cfg)
    rows = result.rows
    assert len(rows) >= 2, [(t.number, t.values) for t in result.study.trials]
    assert {r["trial"] for r in rows} <= {t.number for t in result.study.best_trials}
    assert 2 not in {r["trial"] for r in rows}  # its gain is negative: not a budget to buy
    for cheap, dear in zip(rows, rows[1:], strict=False):  # more seconds buy more gain
        assert cheap["time/train_s"] < dear["time/train_s"]
        assert cheap["gain/mrr_at_20"] < dear["gain/mrr_at_20"]
    assert rows[-1]["share_of_best"] == 1.0
    assert result.cheapest is not None and result.cheapest["share_of_best"] >= 0.9
    assert all(r["share_of_best"] < 0.9 for r in rows[: rows.index(result.cheapest)])
    parent = MlflowClient(cfg.tracking.uri).get_run(result.parent_run_id)
    assert parent.data.tags["pareto_trials"] == ",".join(str(r["trial"]) for r in rows)
    assert parent.data.tags["cheapest_trial"] == str(result.cheapest["trial"])


# -- several processes ---------------------------------------------------------------------------
def _cli(tmp_path: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        *args,
        *FAST,
        f"paths.data_dir={DATA_DIR}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"tracking.uri={store_uri(tmp_path / 'mlflow.db')}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
        "trainer.enable_progress_bar=false",
        "data.n=32",
        "trainer.max_epochs=1",
    ]


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path: Path) -> None:
    run_workers(
        [
            _cli(
                tmp_path,
                "tune.py",
                "hparams_search=tiny",
                "tune.pruner=none",
                "hydra.sweeper.n_trials=4",
                f"tune.worker={w}",
                f"hydra.run.dir={tmp_path / f'worker{w}'}",
            )
            for w in (0, 1)
        ]
    )
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = study.trials
    assert 4 <= len(trials) <= 5  # a worker may start one while the other ends the 4th
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    by_worker = {w: {t.number for t in trials if t.user_attrs["worker"] == w} for w in (0, 1)}
    assert by_worker[0] and by_worker[1] and not by_worker[0] & by_worker[1]
    cfg = OmegaConf.create(
        {
            "tracking": {
                "uri": store_uri(tmp_path / "mlflow.db"),
                "experiment": "finetune-budget",
            }
        }
    )
    runs = children(cfg, study.user_attrs["mlflow_parent_run_id"])
    assert sorted(int(r.data.tags["trial"]) for r in runs) == [t.number for t in trials]
    assert {r.info.run_id for r in runs} == {t.user_attrs["mlflow_run_id"] for t in trials}


@pytest.mark.slow
def test_hydra_optuna_sweeper_runs_two_trials(tmp_path: Path) -> None:
    cmd = _cli(
        tmp_path,
        "train.py",
        "-m",
        "hparams_search=tiny",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    )
    proc = subprocess.run(
        cmd, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    client = MlflowClient(store_uri(tmp_path / "mlflow.db"))
    exp = client.get_experiment_by_name("finetune-budget").experiment_id
    runs = client.search_runs([exp], "tags.run_type = 'train'")
    # what the sweeper optimised is the best val/ndcg_at_20 of a trained epoch of each run
    assert sorted(t.value for t in study.trials) == pytest.approx(
        sorted(r.data.metrics["best/ndcg_at_20"] for r in runs)
    )
    assert (tmp_path / "multirun" / "optimization_results.yaml").exists()
