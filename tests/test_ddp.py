"""DDP on CPU (gloo): 2 processes with per-process batch B train like 1 process with batch 2B,
and `train()` on 2 processes splits each epoch's items between them and records one MLflow run.

The contrastive losses gather features with their gradients, so each process sees the other's
negatives. Each loss case runs a small linear encoder under DistributedDataParallel in 2 processes
and compares the mean of the per-process losses and the (DDP-averaged) weight gradients with one
process computing the same loss on the concatenated batch. The end-to-end cases run train.py
under Lightning's launcher (`trainer=ddp trainer.devices=2`) and under torchrun: every kind of
training data under one of them, each of them under two kinds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import DATA_DIR, ROOT, requires_data, store_uri
from ddp_loss_cases import (
    CASES,
    D_IN,
    WORLD,
    D,
    case_inputs,
    case_loss,
    linear_encoder,
    run_cases_on_rank,
)
from ddp_recorder import IndexRecorder
from test_image_image import _write_classes

from finetune_budget.distributed import RANK_VARIABLES, is_main_process
from finetune_budget.retrieval import losses
from finetune_budget.tracking.mlflow_run import tracked_run
from finetune_budget.training.run import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs every case once in 2 gloo processes (one spawn: starting them is the slow part)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(run_cases_on_rank, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.slow  # 2 gloo processes spawned: `make test` runs it
@pytest.mark.parametrize("name", CASES)
def test_two_processes_match_one_process_with_double_batch(name: str, ddp_results: Path) -> None:
    ranks = [torch.load(ddp_results / f"{name}_rank{r}.pt") for r in range(WORLD)]

    case = case_inputs(name)
    encoder = linear_encoder(case["weight"])
    loss = case_loss(name, encoder, case["x"], case["x_pos"], case["labels"])
    loss.backward()

    ddp_loss = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(ddp_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    for r in ranks:  # DDP leaves the same averaged gradient on every process
        torch.testing.assert_close(r["grad"], encoder.weight.grad, rtol=1e-4, atol=1e-6)
    assert encoder.weight.grad.abs().sum() > 0  # the comparison is not between two zeros


def test_no_valid_anchor_on_any_rank_gives_zero_loss_without_hanging() -> None:
    """Every label distinct: supcon and triplet have no anchor; the loss is 0 with a zero grad."""
    encoder = linear_encoder(torch.randn(D, D_IN))
    emb = F.normalize(encoder(torch.randn(4, D_IN)), dim=-1)
    labels = torch.arange(4)
    loss = losses.supervised_contrastive(emb, labels) + losses.batch_hard_triplet(emb, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() == 0


# -- train() end to end on 2 gloo processes ------------------------------------------------------
# Each run: n=32 training items, 8 per process and step (2 rounds of 16 per epoch), 2 epochs.
N, PER_RANK = 32, 8
EPOCHS = 2
TASKS = {
    # no length buckets: they regroup a batch of 2B otherwise than two ranks' batches of B
    "text_labels": ("model=tiny_bert", "data=clinc150", "trainer.limit_val_batches=1",
                    "eval.batch_size=32", "data.samples_per_class=2", "data.length_bucket_pool=0",
                    "+model.config.hidden_dropout_prob=0",
                    "+model.config.attention_probs_dropout_prob=0"),
    "text_pairs": ("model=tiny_bert", "data=stsb", "trainer.limit_val_batches=1",
                   "eval.batch_size=32"),
    "images": ("task=image_image", "model=tiny_cnn", "data=custom_images",
               "data.eval_fraction=0.25", "data.samples_per_class=2", "data.num_workers=0",
               "eval.batch_size=32"),
    "clip": ("task=text_image", "model=tiny_clip", "data=flickr8k", "data.eval_subset=4",
             "data.num_workers=0", "eval.batch_size=32"),
}  # fmt: skip
LAUNCHERS = {
    "lightning": [sys.executable, "train.py"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2", "train.py"],
}  # fmt: skip


def _train_on_2_processes(task: str, launcher: str, tmp_path: Path) -> subprocess.CompletedProcess:
    overrides = [
        *TASKS[task], "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.precision=32-true", f"trainer.max_epochs={EPOCHS}", f"data.n={N}",
        f"data.batch_size={PER_RANK}", "trainer.enable_progress_bar=false",
        "tracking.save_checkpoint=false", "eval.cache_baseline=false",
        f"tracking.uri={store_uri(tmp_path / 'mlflow.db')}", "tracking.experiment=ddp",
        f"paths.data_dir={DATA_DIR}", f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'out'}",
        "+callbacks.record._target_=ddp_recorder.IndexRecorder",
        f"+callbacks.record.out={tmp_path / 'record'}",
    ]  # fmt: skip
    if task == "images":
        _write_classes(tmp_path / "photos")  # 8 classes x 6: 36 training, 12 held-out images
        overrides.append(f"data.root={tmp_path / 'photos'}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
        "OMP_NUM_THREADS": "1",
    }
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "FINETUNE_BUDGET_RUN_ID"):
        env.pop(k, None)
    return subprocess.run(
        [*LAUNCHERS[launcher], *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


_RUNS: dict[tuple[str, str], tuple[Path, subprocess.CompletedProcess]] = {}


def _run(task: str, launcher: str, factory: pytest.TempPathFactory):
    """Each (task, launcher) runs once per session; tests share its records."""
    if (task, launcher) not in _RUNS:
        tmp = factory.mktemp(f"{task}_{launcher}")
        _RUNS[task, launcher] = tmp, _train_on_2_processes(task, launcher, tmp)
    return _RUNS[task, launcher]


def _records(tmp: Path) -> list[list[dict]]:
    return [json.loads((tmp / "record" / f"rank{r}.json").read_text()) for r in (0, 1)]


# Every kind of data under one launcher, each launcher under two kinds (one text, one not): past
# their start the launchers run the same train.py, and the kinds differ only after it.
PAIRINGS = [
    ("text_labels", "lightning"),
    ("text_pairs", "torchrun"),
    ("images", "torchrun"),
    ("clip", "lightning"),
]
assert {t for t, _ in PAIRINGS} == set(TASKS) and {la for _, la in PAIRINGS} == set(LAUNCHERS)


@pytest.mark.slow  # train.py on 2 processes: long integration tests, `make test` runs them
@pytest.mark.parametrize(("task", "launcher"), PAIRINGS)
def test_train_on_2_processes_splits_every_epoch_and_records_one_run(
    task, launcher, tmp_path_factory
):
    needs = {"text_labels": "clinc150", "text_pairs": "stsb", "clip": "flickr8k"}.get(task)
    if needs and not (DATA_DIR / needs).exists():
        pytest.skip(f"{needs} not found in {DATA_DIR}")
    tmp_path, proc = _run(task, launcher, tmp_path_factory)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # across the 2 processes every training item is used exactly once per epoch, and at every
    # step both hold a batch of the same size (the losses' all-gathers need equal shapes)
    ranks = _records(tmp_path)
    seen = []
    for epoch in range(EPOCHS):
        batches = [[b["index"] for b in rank if b["epoch"] == epoch] for rank in ranks]
        assert len(batches[0]) == len(batches[1]) == N // (2 * PER_RANK)
        assert all(len(a) == len(b) == PER_RANK for a, b in zip(*batches, strict=True))
        items = [i for rank in batches for batch in rank for i in batch]
        assert len(items) == len(set(items)) == N, f"epoch {epoch}: {sorted(items)}"
        seen.append(items)
    assert set(seen[0]) == set(seen[1]) and seen[0] != seen[1]  # same items, a new order

    # one MLflow run, FINISHED, counting each item once per epoch
    client = mlflow.tracking.MlflowClient(store_uri(tmp_path / "mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    samples = client.get_metric_history(runs[0].info.run_id, "data/samples_seen")
    assert {m.step: m.value for m in samples} == {e: e * N for e in range(EPOCHS + 1)}
    assert proc.stdout.count("MLflow run ") == 1  # only rank 0 prints its table


@requires_data("clinc150")
@pytest.mark.slow  # train.py on 2 processes: a long integration test, `make test` runs it
def test_train_on_2_processes_equals_1_process_with_the_double_batch(tmp_path_factory, make_cfg):
    """Text labels, no dropout: step k of 2 processes with batch B uses the items of step k of 1
    process with batch 2B, and the mean of the 2 processes' losses equals its loss at every step
    of 2 epochs, also after updates (so the gradients, averaged by DDP, were the same)."""
    tmp, proc = _run("text_labels", "lightning", tmp_path_factory)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = _records(tmp)
    cfg = make_cfg(
        *TASKS["text_labels"], "trainer.accelerator=cpu", "trainer.precision=32-true",
        f"trainer.max_epochs={EPOCHS}", f"data.n={N}", f"data.batch_size={2 * PER_RANK}",
        "trainer.enable_progress_bar=false", "tracking.save_checkpoint=false",
        "eval.cache_baseline=false", "budget.continue_shorter_runs=false", "logger=none",
    )  # fmt: skip
    one = IndexRecorder(str(tmp / "one_process"))
    train(cfg, callbacks=[one])
    assert [b["index"] for b in one.batches] == [
        a["index"] + b["index"] for a, b in zip(*ranks, strict=True)
    ]
    two_losses = [(a["loss"] + b["loss"]) / 2 for a, b in zip(*ranks, strict=True)]
    one_losses = [b["loss"] for b in one.batches]
    assert len(one_losses) == EPOCHS * N // (2 * PER_RANK)
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-4)
    # batches without a same-label pair have loss 0; a non-zero loss after an earlier non-zero
    # one (whose gradients updated the model) checks that the updates were the same too
    assert sum(loss > 0 for loss in one_losses) >= 2, one_losses


def test_only_global_rank_0_creates_a_run(monkeypatch, tmp_path):
    """Ranks 1.. of Lightning's launcher (LOCAL_RANK, NODE_RANK), torchrun (RANK, GROUP_RANK) and
    srun (SLURM_PROCID) create no MLflow run; a one-device run always does."""
    uri = store_uri(tmp_path / "mlflow.db")
    two_devices = {"devices": 2, "num_nodes": 1}
    for variable in RANK_VARIABLES:
        for v in RANK_VARIABLES:
            monkeypatch.delenv(v, raising=False)
        assert is_main_process(two_devices)
        monkeypatch.setenv(variable, "1")
        assert not is_main_process(two_devices) and not is_main_process(), variable
        assert is_main_process({"devices": 1}) and is_main_process({"devices": [3]})
        with tracked_run(
            uri, "ddp", {"seed": 0}, stale_after_s=None, main_process=is_main_process(two_devices)
        ) as r:
            r.log_metrics({"val/mrr_at_20": 1.0}, step=0)
            r.set_tags({"x": "y"})
    client = mlflow.tracking.MlflowClient(uri)
    assert client.get_experiment_by_name("ddp") is None  # nothing was created
