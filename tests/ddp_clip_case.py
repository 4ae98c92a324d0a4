"""The tiny CLIP of tests/test_text_image.py and the worker that computes its loss on 2 gloo
processes: a module of its own, so that the processes mp.spawn starts (each imports the module of
the function it runs) import the task and open_clip only, not the test module and its fixtures."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from finetune_budget.tasks.text_image import ClipFineTuner

# conf/model/*.yaml as plain dicts: the groups hold the defaults, a test names what it changes
MODEL_CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def model_conf(option: str, **changes) -> dict:
    """conf/model/<option>.yaml with `changes`, resolved as the task receives it."""
    group = OmegaConf.merge(OmegaConf.load(MODEL_CONF / f"{option}.yaml"), changes)
    return OmegaConf.to_container(OmegaConf.create({"model": group}), resolve=True)["model"]


TINY = model_conf("tiny_clip", embed_dim=16, width=16, image_size=32, max_length=16)


def run_clip_loss_on_rank(rank: int, port: int, out: str) -> None:
    """Rank r: its half of the batch, ClipLoss with features gathered with their gradients."""
    import os

    import torch.distributed as dist
    from open_clip.loss import ClipLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        module, batch = clip_case()
        module.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=2)
        half = {k: v[rank * 4 : (rank + 1) * 4] for k, v in batch.items()}
        loss = module.compute_loss(half)
        loss.backward()
        grads = {}
        for n, p in module.clip.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)  # what DDP does: the mean of the ranks' gradients
            grads[n] = g / 2
        losses = [torch.zeros(()) for _ in range(2)]
        dist.all_gather(losses, loss.detach())
        if rank == 0:
            torch.save({"loss": torch.stack(losses).mean(), "grads": grads}, out)
    finally:
        dist.destroy_process_group()


def clip_case():
    torch.manual_seed(0)
    module = ClipFineTuner(
        model=TINY,
        optim={"optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3}},
    )
    module.eval()  # BatchNorm statistics are per device under DDP; compare the loss itself
    g = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randn(8, 3, 32, 32, generator=g),
        "text": torch.randint(1, 49405, (8, 16), generator=g),
    }
    return module, batch
