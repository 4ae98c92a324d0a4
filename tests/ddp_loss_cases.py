"""The loss cases of tests/test_ddp.py and the worker that runs them in 2 gloo processes: a module
of its own that imports only torch and the losses, so that the processes mp.spawn starts (each
imports the module of the function it runs) start in ~2 s instead of the test module's ~8 s."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from finetune_budget.retrieval import losses

B, D_IN, D = 8, 12, 6  # per-process batch, input and embedding width
WORLD = 2


def case_inputs(name: str) -> dict[str, torch.Tensor]:
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


def case_loss(name: str, encoder: nn.Module, x, x_pos, labels) -> torch.Tensor:
    emb = F.normalize(encoder(x), dim=-1)
    if name.startswith("infonce"):
        pos = F.normalize(encoder(x_pos), dim=-1)
        return losses.info_nce(emb, pos, temperature=0.1, symmetric=name == "infonce_symmetric")
    if name.startswith("supcon"):
        return losses.supervised_contrastive(emb, labels, temperature=0.1)
    return losses.batch_hard_triplet(emb, labels, margin=0.5)


def linear_encoder(weight: torch.Tensor) -> nn.Module:
    encoder = nn.Linear(D_IN, D, bias=False)
    with torch.no_grad():
        encoder.weight.copy_(weight)
    return encoder


CASES = ["infonce", "infonce_symmetric", "supcon", "supcon_uneven", "triplet", "triplet_uneven"]


def run_cases_on_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        for name in CASES:
            case = case_inputs(name)
            encoder = DistributedDataParallel(linear_encoder(case["weight"]))
            part = slice(rank * B, (rank + 1) * B)
            x, x_pos, labels = case["x"][part], case["x_pos"][part], case["labels"][part]
            loss = case_loss(name, encoder, x, x_pos, labels)
            loss.backward()  # DDP averages the gradients over the processes
            result = {"loss": loss.detach(), "grad": encoder.module.weight.grad.clone()}
            torch.save(result, Path(out) / f"{name}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()
