"""Bad input gets one line that says what is wrong and how to fix it, a non-zero exit and no
traceback (HYDRA_FULL_ERROR=1 shows it). The config checks run before torch, lightning and mlflow
are imported; `time python train.py data.n=lots` shows how long that takes."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from finetune_budget.app.runs import load_weights
from finetune_budget.config import device_error
from finetune_budget.data.images import ImageDataset
from finetune_budget.data.text import load_table
from finetune_budget.errors import DataError, ModelError, one_line
from finetune_budget.tasks import build_task
from tests.conftest import DATA_DIR, ROOT, store_uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, script: str, *overrides: str, env: dict | None = None):
    out = subprocess.run(
        [
            sys.executable,
            script,
            f"tracking.uri={store_uri(tmp_path / 'mlflow.db')}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'out'}",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})},
    )
    return out.returncode, out.stdout + out.stderr


def _cases(tmp_path) -> list[tuple[str, list[str], str]]:
    empty = tmp_path / "empty_data"
    empty.mkdir()
    (empty / "stsb").mkdir()
    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("these are my notes, not weights")
    return [
        ("train.py", ["data.n=lots"], "data.n=lots is not an integer; write it like data.n="),
        ("train.py", ["trainer.max_epochs=abc"], "trainer.max_epochs=abc is not an integer"),
        ("train.py", ["budget.rerun=maybe"], "budget.rerun=maybe is not true or false"),
        ("train.py", ["data.n=0"], "data.n=0 must be >= 1"),
        ("train.py", ["tracking.uri=foo://bar"], "MLflow does not support the scheme 'foo'"),
        (
            "train.py",
            [f"tracking.uri=http://127.0.0.1:{_free_port()}"],
            "cannot reach 127.0.0.1",
        ),
        (
            "train.py",
            [f"paths.data_dir={empty}"],
            "clinc150/data_full.json does not exist; set paths.data_dir=",
        ),
        (
            "train.py",
            [f"paths.data_dir={empty}", "data=stsb"],
            "has no sts-train.csv, sts-dev.csv",
        ),
        ("train.py", ["data=custom_text"], "data.train_path is not set"),
        ("evaluate.py", [f"checkpoint={not_ckpt}"], "is not a PyTorch checkpoint"),
    ]


def test_each_bad_input_gives_one_line_and_exit_1(tmp_path):
    for script, overrides, message in _cases(tmp_path):
        code, log = _run(tmp_path, script, *overrides)
        assert code == 1, (overrides, log[-2000:])
        errors = [line for line in log.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0], (overrides, log[-2000:])
        assert "Traceback" not in log, overrides


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_gpu_asked_for_where_there_is_none(tmp_path):
    code, log = _run(tmp_path, "train.py", "trainer=gpu")
    assert code == 1 and "Traceback" not in log
    assert "trainer.accelerator=gpu but this machine has no CUDA GPU" in log
    assert "use trainer=cpu" in log


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_asked_for_where_there_is_none():
    assert "no MPS device" in device_error({"accelerator": "mps"})
    assert device_error({"accelerator": "cpu"}) is None


def test_the_traceback_stays_available_with_hydra_full_error(tmp_path):
    code, log = _run(tmp_path, "train.py", "data.n=lots", env={"HYDRA_FULL_ERROR": "1"})
    assert code == 1 and "Traceback" in log and "data.n=lots is not an integer" in log


def test_empty_texts_or_labels_in_a_csv(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("text,label\nhello,a\n ,a\nbye,b\nagain,b\n")
    with pytest.raises(DataError, match=r"1 row\(s\) have an empty 'text' .* data row 2"):
        load_table(path)
    path.write_text("text,label\nhello,a\nhi,\nbye,b\nagain,b\n")
    with pytest.raises(DataError, match=r"1 row\(s\) have an empty 'label'"):
        load_table(path)


def test_held_out_items_also_in_the_training_file_are_counted(tmp_path, caplog):
    train, held = tmp_path / "train.csv", tmp_path / "held.csv"
    train.write_text("text,label\nred apple,a\ngreen apple,a\nblue sea,b\ndeep sea,b\n")
    held.write_text("text,label\nred apple,a\nsour apple,a\nblue sea,b\ncalm sea,b\n")
    with caplog.at_level(logging.WARNING):
        load_table(train, eval_path=held)
    (warning,) = [r.getMessage() for r in caplog.records if "also appear" in r.getMessage()]
    assert warning.startswith("2 of the 4 held-out items")


def test_an_image_that_fails_to_decode_in_a_loader_worker(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(good)
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dataset = ImageDataset([str(good), str(bad)], [0, 1], lambda im: torch.zeros(3), "labels")
    with pytest.raises(DataError) as info:
        list(DataLoader(dataset, batch_size=1, num_workers=1))
    assert one_line(info.value).startswith(f"image {bad} cannot be read")
    assert one_line(info.value).endswith("remove or replace the file")


def test_a_file_that_is_not_a_checkpoint_or_of_another_model(tiny_text_cfg, make_cfg, tmp_path):
    module = build_task(tiny_text_cfg()).module
    notes = tmp_path / "notes.ckpt"
    notes.write_text("not weights")
    with pytest.raises(ModelError, match="is not a PyTorch checkpoint"):
        load_weights(module, str(notes))
    image_cfg = make_cfg(
        "task=image_image", "model=tiny_cnn", "trainer.accelerator=cpu", "data.n=8"
    )
    image_cfg.data.num_workers = 0
    if not (DATA_DIR / "celeba_subset").exists():
        pytest.skip("celeba_subset not found")
    other = build_task(image_cfg).module
    path = tmp_path / "image.ckpt"
    torch.save({"state_dict": other.state_dict(), "hyper_parameters": dict(other.hparams)}, path)
    with pytest.raises(ModelError, match="is of model 'tiny_cnn', not 'tiny-bert'.*model="):
        load_weights(module, str(path))
    torch.save({"state_dict": other.state_dict()}, path)  # no hparams: the weights do not fit
    with pytest.raises(ModelError, match="does not fit .*unexpected weights"):
        load_weights(module, str(path))
