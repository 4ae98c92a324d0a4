"""DDP proof: 2 CPU processes (gloo) with per-process batch B train like 1 process with batch 2B.

The contrastive losses gather features with their gradients, so each process sees the other's
negatives. Each case runs a small linear encoder under DistributedDataParallel in 2 processes and
compares the mean of the per-process losses and the (DDP-averaged) weight gradients with one
process computing the same loss on the concatenated batch.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from finetune_budget import losses

B, D_IN, D = 8, 12, 6  # per-process batch, input and embedding width
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case(name: str) -> dict[str, torch.Tensor]:
    """Inputs of the global batch (2B items) and the encoder's initial weight."""
    g = torch.Generator().manual_seed(0)
    case = {
        "weight": torch.randn(D, D_IN, generator=g),
        "x": torch.randn(WORLD * B, D_IN, generator=g),
        "x_pos": torch.randn(WORLD * B, D_IN, generator=g),
    }
    if name == "supcon_uneven" or name == "triplet_uneven":
        # rank 0's half holds 4 labels seen once in the whole batch (anchors without positives),
        # rank 1's half has none: the ranks average over different numbers of anchors
        case["labels"] = torch.tensor([100, 101, 102, 103, 0, 0, 1, 1, 0, 1, 2, 2, 3, 3, 2, 3])
    else:
        case["labels"] = torch.randint(0, 5, (WORLD * B,), generator=g)
    return case


def _loss(name: str, encoder: nn.Module, x, x_pos, labels) -> torch.Tensor:
    emb = F.normalize(encoder(x), dim=-1)
    if name.startswith("infonce"):
        pos = F.normalize(encoder(x_pos), dim=-1)
        return losses.info_nce(emb, pos, temperature=0.1, symmetric=name == "infonce_symmetric")
    if name.startswith("supcon"):
        return losses.supervised_contrastive(emb, labels, temperature=0.1)
    return losses.batch_hard_triplet(emb, labels, margin=0.5)


def _encoder(weight: torch.Tensor) -> nn.Module:
    encoder = nn.Linear(D_IN, D, bias=False)
    with torch.no_grad():
        encoder.weight.copy_(weight)
    return encoder


CASES = ["infonce", "infonce_symmetric", "supcon", "supcon_uneven", "triplet", "triplet_uneven"]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        for name in CASES:
            case = _case(name)
            encoder = DistributedDataParallel(_encoder(case["weight"]))
            part = slice(rank * B, (rank + 1) * B)
            x, x_pos, labels = case["x"][part], case["x_pos"][part], case["labels"][part]
            loss = _loss(name, encoder, x, x_pos, labels)
            loss.backward()  # DDP averages the gradients over the processes
            result = {"loss": loss.detach(), "grad": encoder.module.weight.grad.clone()}
            torch.save(result, Path(out) / f"{name}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs every case once in 2 gloo processes (one spawn: starting them is the slow part)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("name", CASES)
def test_two_processes_match_one_process_with_double_batch(name: str, ddp_results: Path) -> None:
    ranks = [torch.load(ddp_results / f"{name}_rank{r}.pt") for r in range(WORLD)]

    case = _case(name)
    encoder = _encoder(case["weight"])
    loss = _loss(name, encoder, case["x"], case["x_pos"], case["labels"])
    loss.backward()

    ddp_loss = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(ddp_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    for r in ranks:  # DDP leaves the same averaged gradient on every process
        torch.testing.assert_close(r["grad"], encoder.weight.grad, rtol=1e-4, atol=1e-6)
    assert encoder.weight.grad.abs().sum() > 0  # the comparison is not between two zeros


def test_no_valid_anchor_on_any_rank_gives_zero_loss_without_hanging() -> None:
    """Every label distinct: supcon and triplet have no anchor; the loss is 0 with a zero grad."""
    encoder = _encoder(torch.randn(D, D_IN))
    emb = F.normalize(encoder(torch.randn(4, D_IN)), dim=-1)
    labels = torch.arange(4)
    loss = losses.supervised_contrastive(emb, labels) + losses.batch_hard_triplet(emb, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() == 0
