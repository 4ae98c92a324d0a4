"""Config helpers shared by the entry points: flattening, the `a..b` sweep syntax, precision."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

_RANGE = re.compile(r"^(?P<key>[^=]+)=(?P<lo>-?\d+)\.\.(?P<hi>-?\d+)$")


def expand_range_overrides(argv: Sequence[str]) -> list[str]:
    """Rewrite `key=a..b` (inclusive integer range) into Hydra's `key=range(a,b+1)`.

    `trainer.max_epochs=1..10` sweeps the ten values 1, 2, ..., 10.
    """
    out = []
    for arg in argv:
        match = _RANGE.match(arg)
        if match is None:
            out.append(arg)
            continue
        lo, hi = int(match["lo"]), int(match["hi"])
        if hi < lo:
            raise ValueError(f"{arg}: empty range, write it as low..high (e.g. 1..10)")
        out.append(f"{match['key']}=range({lo},{hi + 1})")
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"data.n": 1000, "trainer.max_epochs": 3, ...}: the CLI's dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def cpu_supports_bf16() -> bool:
    """True where CPU autocast to bf16 runs on native instructions (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.cpu.get_cpu_capability() in {"AVX512", "AVX512_BF16"}) and (
            _cpu_flag("avx512_bf16") or _cpu_flag("amx_bf16")
        )
    except Exception:  # noqa: BLE001 - any probe failure means "not supported"
        return False


def _cpu_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line for line in f if line.startswith("flags"))
    except OSError:
        return False


def resolve_precision(precision: str | int | None, accelerator: str | None = "auto") -> str:
    """`auto` -> bf16-mixed on CUDA with bf16 and on CPUs with native bf16, else 32-true."""
    if precision not in (None, "auto"):
        return str(precision)
    use_cuda = accelerator in ("gpu", "cuda") or (
        accelerator == "auto" and torch.cuda.is_available()
    )
    if use_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"
