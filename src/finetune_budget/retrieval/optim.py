"""What every task's LightningModule shares: AdamW-style optimiser groups, the learning-rate
schedule, and the divergence checks that stop a run with a clear message."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate

from finetune_budget.errors import ConfigError, DivergedError
from finetune_budget.speed.switches import enabled


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimiser step s."""
    warmup_steps = max(0, int(warmup_steps))

    def warm(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0

    if schedule == "warmup_constant":
        return warm
    if schedule not in ("linear", "cosine"):
        raise ConfigError(
            f"optim.schedule={schedule!r} is unknown; use warmup_constant, linear or cosine"
        )
    decay_steps = max(1, total_steps - warmup_steps)

    def decayed(step: int) -> float:
        if step < warmup_steps:
            return warm(step)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return decayed


def weight_decay_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> list[dict]:
    """Trainable parameters in two groups: decayed weights, and biases/norms without decay."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def use_fused(module: L.LightningModule, make: Any, optim: dict[str, Any], groups) -> bool:
    """optim.fused: `auto` = the optimizer's fused kernel (one kernel for all parameters instead
    of a Python loop over them: ~4x less optimizer time per MiniLM step on the CPU) where torch
    has one (Adam, AdamW, SGD, Adagrad), the parameters are floating point on the CPU or a CUDA
    device and optim.optimizer sets neither `fused` nor `foreach`; true; false. Under 16-mixed's
    gradient scaler the fused step takes the scaler's inf check itself (no host sync a step, as
    torch's loop has); `clip_for_fused` unscales the gradients before clipping them."""
    choice = str(optim["fused"]).lower()
    if choice not in ("auto", "true", "false"):
        raise ConfigError(f"optim.fused={optim['fused']!r}: use auto, true or false")
    if choice == "false":
        return False
    func = getattr(make, "func", make)
    keywords = getattr(make, "keywords", {}) or {}
    try:
        accepts = "fused" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        accepts = False
    if not accepts or "fused" in keywords or "foreach" in keywords:
        if choice == "true" and not accepts:
            raise ConfigError(f"optim.fused=true: {func.__name__} has no fused kernel")
        return choice == "true" and "fused" not in keywords
    if choice == "true":
        return True
    params = [p for g in groups for p in g["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def clip_for_fused(
    module: L.LightningModule,
    optimizer,
    clip_val,
    algorithm,
) -> bool:
    """Clip the gradients of a fused optimizer here (Lightning's mixed-precision plugin refuses
    to, as a fused step unscales by itself). Under a gradient scaler (16-mixed) they are unscaled
    first, as torch's AMP recipe for clipping does; the scaler's step then passes the fused
    kernel only its inf check, so a step with inf/NaN gradients is still skipped. Returns False
    when Lightning should clip."""
    if not clip_val or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    scaler = getattr(getattr(module._trainer, "precision_plugin", None), "scaler", None)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if (algorithm or "norm") == "norm":
        clip_grad_norm(params, float(clip_val))
    else:
        torch.nn.utils.clip_grad_value_(params, float(clip_val))
    return True


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_(params, max_norm)` (2-norm over all gradients), in a third
    of its time for CPU gradients: each float32/64 gradient's squared norm is one BLAS dot product
    (torch's per-tensor norm runs at half that speed on the CPU), and gradients within the norm are
    left alone (torch multiplies them by 1.0 then, a pass over every gradient: the same values).
    Gradients on other devices, and every gradient where `speed.own_clipping=false`, go to
    torch's own (the plain path). Returns the total norm."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.tensor(0.0)
    plain = not enabled("own_clipping")
    if plain or any(g.device.type != "cpu" or g.layout != torch.strided for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    squares = [
        torch.dot(g.reshape(-1), g.reshape(-1)).float()
        if g.dtype in (torch.float32, torch.float64)
        else torch.linalg.vector_norm(g, dtype=torch.float32).square()
        for g in grads
    ]
    total = torch.stack(squares).sum().sqrt()
    coef = max_norm / (total + 1e-6)  # torch's coefficient
    if not bool(coef >= 1.0):  # also when the norm is NaN or inf, as torch: the grads get it
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total


def optimizer_with_schedule(
    module: L.LightningModule, optim: dict[str, Any], param_groups: list[dict]
) -> dict[str, Any]:
    """configure_optimizers' answer: `optim.optimizer` (a partial) and the per-step schedule."""
    make = instantiate(optim["optimizer"])
    groups = [g for g in param_groups if g["params"]]
    extra = {"fused": True} if use_fused(module, make, optim, groups) else {}
    optimizer = make(groups, **extra)
    total = int(module.trainer.estimated_stepping_batches) if module._trainer is not None else 1
    schedule = lr_lambda(optim["schedule"], optim["warmup_steps"], total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _lr(module: L.LightningModule) -> float:
    try:
        return float(module.optimizers().param_groups[0]["lr"])
    except Exception:  # noqa: BLE001 - no optimiser attached (validation only)
        return float(module.hparams.optim["optimizer"]["lr"])


def check_finite_loss(module: L.LightningModule, loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise DivergedError(
            f"training loss became {loss.item()} at epoch {module.current_epoch + 1}, step "
            f"{module.global_step}; lower optim.optimizer.lr (now {_lr(module):.2g}) or use "
            "trainer.precision=32-true"
        )


def check_finite_embeddings(module: L.LightningModule, *embeddings: torch.Tensor) -> None:
    if not all(torch.isfinite(e).all() for e in embeddings):
        raise DivergedError(
            f"the model's embeddings became NaN/inf by epoch {module.current_epoch + 1}; lower "
            f"optim.optimizer.lr (now {_lr(module):.2g}) or use trainer.precision=32-true"
        )
