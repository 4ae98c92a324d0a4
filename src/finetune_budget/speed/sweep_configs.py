"""A `-m` grid's job configs without composing each one from the YAML files.

Hydra's launcher composes every job's config from scratch (`load_sweep_config`: read and merge
the config tree, then apply the job's overrides), every job alike, though most of a grid's jobs
share one tree (docs/performance.md has what it costs). Jobs that differ only in the
values of plain keys (`data.n=500`, `trainer.max_epochs=3`: no config group option, no `+`/`~`,
no package, no `hydra.` key, a scalar value) have the same composed tree up to those values. So
`DerivedSweepConfigs` composes the first job of each such family with Hydra and derives the
others from a copy of it: the job's values applied the way Hydra applies command-line overrides
(`ConfigLoaderImpl._apply_overrides_to_config`), and the bookkeeping Hydra writes per job
(`hydra.overrides.task`, `hydra.job.override_dirname`, `hydra.runtime.cwd`, `hydra.job.env_set`).
Any other job is composed by Hydra. `tests/test_config.py` checks the derived configs equal
Hydra's own, node for node.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.config_loader import ConfigLoader
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from omegaconf import DictConfig, OmegaConf, open_dict

SCALARS = (bool, int, float, str, type(None))


def _value_only(override: Override, groups: set[str]) -> bool:
    """Whether `override` sets a plain key's value (what a derived config may change)."""
    return (
        not override.is_hydra_override()
        and not (override.is_add() or override.is_force_add() or override.is_delete())
        and override.package is None
        and override.value_type == ValueType.ELEMENT
        and override.key_or_group not in groups
        and isinstance(override.value(), SCALARS)
    )


def family(overrides: list[Override], groups: set[str]) -> tuple[str, ...]:
    """What the jobs whose configs derive from one another share: the keys of the value-only
    overrides, in order, and every other override as written."""
    return tuple(
        f"{o.key_or_group}=<value>" if _value_only(o, groups) else str(o.input_line)
        for o in overrides
    )


class DerivedSweepConfigs(ConfigLoader):
    """Hydra's config loader (`loader`), with `load_sweep_config` deriving the configs of a
    family's later jobs from its first (see the module's docstring). Everything else is the
    loader's."""

    def __init__(self, loader: ConfigLoader) -> None:
        self.loader = loader
        self.composed: dict[tuple, DictConfig] = {}  # family -> its first job's config
        self.derived = 0

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> Any:
        parsed = OverridesParser.create().parse_overrides(overrides=list(sweep_overrides))
        groups = set(master_config.hydra.runtime.choices)
        key = family(parsed, groups)
        first = self.composed.get(key)
        if first is None:
            cfg = self.loader.load_sweep_config(master_config, list(sweep_overrides))
            self.composed[key] = copy.deepcopy(cfg)  # the launcher numbers the one it gets
            return cfg
        cfg = copy.deepcopy(first)
        ConfigLoaderImpl._apply_overrides_to_config(
            [o for o in parsed if _value_only(o, groups)], cfg
        )
        task = [o for o in parsed if not o.is_hydra_override()]
        dirname = cfg.hydra.job.config.override_dirname
        with open_dict(cfg.hydra):
            cfg.hydra.overrides.task = [o.input_line for o in task]
            cfg.hydra.job.override_dirname = get_overrides_dirname(
                overrides=task,
                kv_sep=dirname.kv_sep,
                item_sep=dirname.item_sep,
                exclude_keys=dirname.exclude_keys,
            )
            cfg.hydra.runtime.cwd = os.getcwd()
            for name in cfg.hydra.job.env_copy:
                cfg.hydra.job.env_set[name] = os.environ[name]
        OmegaConf.copy_cache(from_config=master_config, to_config=cfg)
        self.derived += 1
        return cfg

    # -- the rest is Hydra's --------------------------------------------------------------------
    def load_configuration(self, *args: Any, **kwargs: Any) -> Any:
        return self.loader.load_configuration(*args, **kwargs)

    def get_search_path(self) -> Any:
        return self.loader.get_search_path()

    def get_sources(self) -> Any:
        return self.loader.get_sources()

    def list_groups(self, parent_name: str) -> Any:
        return self.loader.list_groups(parent_name)

    def get_group_options(self, *args: Any, **kwargs: Any) -> Any:
        return self.loader.get_group_options(*args, **kwargs)

    def compute_defaults_list(self, *args: Any, **kwargs: Any) -> Any:
        return self.loader.compute_defaults_list(*args, **kwargs)
