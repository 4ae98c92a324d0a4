"""One run identity (identity.py): a config key's role, written once, decides which of the reuse
keys it is in: resume's point (and the ROI table's config_key), the continuation state, the
epoch-0 cache and what a process loads once. The hashes are those of the lists the modules kept
before issue 29 (checked against that code, copied here)."""

from __future__ import annotations

import hashlib
import json

import pytest

from finetune_budget import __version__, identity
from finetune_budget.config import flatten, installed_versions, resolve_precision
from finetune_budget.identity import with_fingerprints
from finetune_budget.retrieval.metrics import METRICS_VERSION
from finetune_budget.speed import reuse
from finetune_budget.tracking.resume import config_key, point_key
from finetune_budget.training.baseline_cache import baseline_key
from finetune_budget.training.continuation import KEY_PACKAGES, continuation_key
from finetune_budget.training.run import run_config


def _epoch0(config: dict) -> str:
    trainer = config["trainer"]
    settings = {k: trainer[k] for k in ("precision", "accelerator", "limit_val_batches")}
    return baseline_key(
        config["task"]["name"],
        config["model"],
        config["data"],
        config["eval"],
        settings,
        None,
        "w",
    )


def keys(config: dict) -> dict[str, str]:
    """Every reuse key of a resolved run config, as the modules compute them."""
    return {
        "point": point_key(config),
        "config": config_key(flatten(config)),
        "continuation": continuation_key(config),
        "epoch0": _epoch0(config),
        "loaded": reuse.cache_key(
            identity.loaded_from("model", config["model"]),
            identity.loaded_from("data", config["data"]),
        ),
    }


def changed(base: dict[str, str], other: dict[str, str]) -> set[str]:
    return {name for name in base if base[name] != other[name]}


ALL = {"point", "config", "continuation", "epoch0", "loaded"}


@pytest.mark.parametrize("new_key", ["+model.some_new_knob=1", "+data.some_new_knob=1"])
def test_a_new_key_that_changes_results_changes_every_key(tiny_text_cfg, new_key):
    base = keys(run_config(tiny_text_cfg()))
    assert changed(base, keys(run_config(tiny_text_cfg(new_key)))) == ALL


@pytest.mark.parametrize(
    "override",
    [
        "tracking.run_name=other",
        "tracking.experiment=other",
        "paths.cache_dir=/elsewhere",
        "budget.rerun=true",
        "budget.continuation_max_configs=3",
        "callbacks.lr_monitor=null",
        "logger.mlflow.experiment_name=other",
        "trainer.enable_progress_bar=true",
        "trainer.log_every_n_steps=3",
    ],
)
def test_a_bookkeeping_key_changes_no_key(tiny_text_cfg, override):
    base = keys(run_config(tiny_text_cfg()))
    assert changed(base, keys(run_config(tiny_text_cfg(override)))) == set()


# The documented examples of each role, and the keys they are in (identity.py's table).
ROLE_EXAMPLES = [
    ("data.n=32", "train_only", {"point", "config", "continuation"}),
    ("data.subset_seed=5", "train_only", {"point", "config", "continuation"}),
    ("trainer.max_epochs=4", "epochs", {"point", "config"}),
    ("eval.cache_baseline=false", "run_option", {"point", "config"}),
    ("budget.continue_shorter_runs=false", "run_option", {"point", "config"}),
    ("trainer.enable_checkpointing=true", "run_option", {"point", "config"}),
    # result keys in groups the epoch-0 evaluation never reads
    ("optim.optimizer.lr=1e-3", "result", {"point", "config", "continuation"}),
    ("+optim.new_thing=1", "result", {"point", "config", "continuation"}),
    # result keys of the groups it reads, not read from disk
    ("eval.top_k=5", "result", {"point", "config", "continuation", "epoch0"}),
    ("model.max_length=16", "result", ALL),
]


@pytest.mark.parametrize(("override", "role", "in_keys"), ROLE_EXAMPLES)
def test_each_role_is_in_the_keys_its_table_row_names(tiny_text_cfg, override, role, in_keys):
    assert identity.role(override.lstrip("+").split("=")[0]) == role
    base = keys(run_config(tiny_text_cfg()))
    assert changed(base, keys(run_config(tiny_text_cfg(override)))) == in_keys


def test_roles_match_whole_names_not_string_prefixes():
    assert identity.role("model.name") == "result"  # the old prefix `mode` dropped model.*
    assert identity.role("mode") == "bookkeeping"  # evaluate.py's
    assert identity.role("data.n") == "train_only"
    assert identity.role("data.num_workers") == "train_only"
    assert identity.role("data.n_extra") == "result"
    assert identity.role("tracking.run_name") == "bookkeeping"
    assert identity.role("callbacks.lr_monitor.logging_interval") == "bookkeeping"
    assert identity.role("callbacks.early_stopping.patience") == "result"


def test_the_roi_table_tells_runs_of_two_models_apart():
    params = {"data.n": "100", "seed": "0", "trainer.max_epochs": "2", "tracking.run_name": "a"}
    minilm = {**params, "model.name": "all-MiniLM-L6-v2"}
    mpnet = {**params, "model.name": "all-mpnet-base-v2"}
    assert config_key(minilm) != config_key(mpnet)
    assert config_key(minilm) == config_key({**minilm, "tracking.run_name": "b"})


# -- the keys before issue 29, copied from that code ---------------------------------------------
BOOKKEEPING_PREFIXES = (
    "tracking.",
    "paths.",
    "hydra.",
    "logger.",
    "callbacks.lr_monitor",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.default_root_dir",
    "trainer.log_every_n_steps",
    "budget.rerun",
    "budget.continuation_max_configs",
    "mode",
    "run_id",
    "checkpoint",
)
IGNORED_PREFIXES = (
    "trainer.max_epochs",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.enable_checkpointing",
    "trainer.default_root_dir",
    "trainer.log_every_n_steps",
    "paths.",
    "tracking.",
    "logger.",
    "eval.cache_baseline",
    "budget.continue_shorter_runs",
    "budget.continuation_",
    "hydra.",
)
TRAIN_ONLY_DATA_KEYS = {
    "n",
    "subset_seed",
    "batch_size",
    "samples_per_class",
    "num_workers",
    "augment",
}


def _sha(blob: str) -> str:
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def old_point_key(config: dict) -> str:
    flat = flatten(config)
    params = {
        k: str(v)[:6000]
        for k, v in flat.items()
        if not (k.startswith(BOOKKEEPING_PREFIXES) or k in ("hydra", "tracking", "paths"))
    }
    part = _sha(json.dumps(params, sort_keys=True))
    files = with_fingerprints({k: config.get(k) for k in ("data", "model")})
    return _sha(json.dumps([part, __version__, files], default=str))


def old_continuation_key(config: dict) -> str:
    flat = {k: v for k, v in flatten(config).items() if not k.startswith(IGNORED_PREFIXES)}
    trainer = config.get("trainer", {})
    flat["resolved.precision"] = resolve_precision(
        trainer.get("precision"), trainer.get("accelerator", "auto")
    )
    flat["resolved.versions"] = installed_versions(KEY_PACKAGES)
    flat["resolved.files"] = with_fingerprints(
        {"data": config.get("data", {}), "model": config.get("model", {})}
    )
    return _sha(json.dumps(flat, sort_keys=True, default=str))


def old_epoch0_key(config: dict) -> str:
    trainer = config["trainer"]
    payload = {
        "task": config["task"]["name"],
        "model": with_fingerprints(dict(config["model"])),
        "weights": "w",
        "data": with_fingerprints(
            {k: v for k, v in config["data"].items() if k not in TRAIN_ONLY_DATA_KEYS}
        ),
        "eval": {k: v for k, v in config["eval"].items() if k != "cache_baseline"},
        "trainer": {k: trainer[k] for k in ("precision", "accelerator", "limit_val_batches")},
        "seed": None,
        "metrics_version": METRICS_VERSION,
        "package_version": __version__,
    }
    return _sha(json.dumps(payload, sort_keys=True, default=str))


def _as_stored_before_targets(config: dict) -> dict:
    """The config as runs were stored before the task, data and model groups named their builders
    and before the speed switchboard: no `speed` group, and the text models' groups (MiniLM, MPNet,
    the tiny BERT) ending in `fast_dropout: true` and `unpad: auto` (their YAML files then)."""
    before = {
        group: {k: v for k, v in node.items() if k != "_target_"}
        if group in ("task", "data", "model")
        else node
        for group, node in config.items()
        if group != "speed"
    }
    if before["model"].get("name") in ("all-MiniLM-L6-v2", "all-mpnet-base-v2", "tiny-bert"):
        before["model"] = {**before["model"], "fast_dropout": True, "unpad": "auto"}
    return before


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("task=image_image",),
        ("task=text_image",),
        ("task=mlm_price",),
        ("model=tiny_bert", "trainer.precision=32-true", "data.n=64"),
        ("logger=none",),
        ("callbacks=with_early_stopping",),
        ("debug=fast",),
        ("experiment=data_budget",),
        ("trainer=ddp",),
    ],
)
def test_stored_runs_states_and_baselines_keep_their_keys(make_cfg, overrides):
    config = run_config(make_cfg(*overrides))
    before = _as_stored_before_targets(config)
    assert all(config[group]["_target_"] for group in ("task", "data", "model"))
    assert point_key(config) == old_point_key(before)
    assert continuation_key(config) == old_continuation_key(before)
    assert _epoch0(config) == old_epoch0_key(before)
    assert config_key(flatten(config)) == config_key(flatten(before))


@pytest.mark.parametrize("switch", ["all", "fast_dropout", "unpadded_encoder"])
def test_a_fast_path_switched_off_is_another_point(tiny_text_cfg, switch):
    base = run_config(tiny_text_cfg())
    off = run_config(tiny_text_cfg(f"speed.{switch}=false"))
    assert point_key(off) != point_key(base)
    assert continuation_key(off) != continuation_key(base)
    assert config_key(flatten(off)) != config_key(flatten(base))
    # the logged params (strings) give the same config key as the config
    assert config_key({k: str(v) for k, v in flatten(off).items()}) == config_key(flatten(off))


def test_the_continuation_key_no_longer_holds_rerun_or_the_lr_monitor(tiny_text_cfg):
    """Before issue 29 these two bookkeeping keys were in the continuation key (not the point
    key): a `budget.rerun=true` job could not continue from a state of the same config."""
    base = run_config(tiny_text_cfg())
    rerun = run_config(tiny_text_cfg("budget.rerun=true"))
    assert old_continuation_key(rerun) != old_continuation_key(base)
    stored = _as_stored_before_targets(base)
    assert continuation_key(rerun) == continuation_key(base) == old_continuation_key(stored)
