"""The default data folder (conf/paths/default.yaml): ../shared/data beside the checkout, found
from any working directory; paths.data_dir=... and FINETUNE_BUDGET_DATA_DIR override it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from finetune_budget.config import data_errors  # also registers ${checkout:...}

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ENV = "FINETUNE_BUDGET_DATA_DIR"
needs_shared = pytest.mark.skipif(
    not (SHARED / "clinc150").is_dir(), reason=f"no data sets in {SHARED} beside the checkout"
)


def compose_in(folder: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> DictConfig:
    """conf/train.yaml composed as train.py composes it, with `folder` the working directory."""
    monkeypatch.chdir(folder)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


@needs_shared
def test_train_py_run_elsewhere_reads_the_data_beside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--cfg", "job", "--resolve"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = yaml.safe_load(out.stdout)
    assert Path(cfg["paths"]["data_dir"]) == SHARED.resolve()
    assert Path(cfg["data"]["path"]).is_file()


@needs_shared
@pytest.mark.parametrize("data", ["clinc150", "stsb"])
def test_the_config_check_finds_the_default_data_from_another_folder(data, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    cfg = compose_in(tmp_path, monkeypatch, f"data={data}")
    assert data_errors(cfg.data) == []
    assert Path(cfg.data.path).is_relative_to(SHARED.resolve())


def test_paths_data_dir_and_the_environment_variable_override_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "from_env"))
    assert compose_in(tmp_path, monkeypatch).data.path == str(
        tmp_path / "from_env" / "clinc150" / "data_full.json"
    )
    cfg = compose_in(tmp_path, monkeypatch, f"paths.data_dir={tmp_path / 'from_cli'}")
    assert cfg.data.path == str(tmp_path / "from_cli" / "clinc150" / "data_full.json")


def test_a_missing_data_folder_is_one_line_that_names_both_settings(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "nowhere"))
    errors = data_errors(compose_in(tmp_path, monkeypatch).data)
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith(
        f"data.path={tmp_path / 'nowhere' / 'clinc150' / 'data_full.json'} does not exist"
    )
    assert "paths.data_dir=" in errors[0] and f"{ENV}=" in errors[0]
