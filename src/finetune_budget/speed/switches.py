"""One switchboard for every fast path: its name, default, what it does, why, its measured
effect and the plain path beside it, read here and nowhere else.

    python train.py speed.all=false            # every fast path off: the plain paths
    python train.py speed.fast_dropout=false   # one of them off
    FINETUNE_BUDGET_SPEED=false python train.py   # all off, from the process's first line

The values come from the `speed:` node of conf/train.yaml (evaluate.py and tune.py read it too),
set by `configure(cfg.speed)` when a job starts (cli.guarded_job, training.run.train); a library
caller that never configures gets the defaults. A fast path runs where `enabled(name)`: the
switch and `speed.all` are both on. A site reads its switch once where it builds its object (a
model when it is made, as timm's `use_fused_attn()`), and keeps the plain path beside the fast
one, so a test can run both.

`speed.all` defaults to FINETUNE_BUDGET_SPEED (true when unset): the one switch that acts before
a config is read. The collector is paused while an entry point imports, before Hydra composes
the config: only the environment stops that pause; `speed.pause_collector=false` then turns the
collector on at the job's start without freezing anything.

The effects are measured side by side in one run (`bench/bench_switches.py`, and the benches
docs/performance.md names): "Xeon" is the 2-core Intel Xeon in fp32, "AMD EPYC" the 2-core AMD
EPYC in bf16; "under load": while other work shared the two cores (ratios within ~30% of 1 are
noise there). On a GPU the in-step paths (unpadded_encoder aside) fall back to torch's own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_budget.errors import ConfigError

ENV = "FINETUNE_BUDGET_SPEED"
OFF = ("0", "false", "off", "no")


@dataclass(frozen=True)
class Switch:
    default: bool
    where: str  # the module holding the fast path
    does: str
    why: str
    effect: str  # measured, with the machine and the command that repeats it
    plain: str  # what runs when the switch is off


SWITCHES: dict[str, Switch] = {
    "unpadded_encoder": Switch(
        True,
        "models/unpadded.py",
        "a BERT's embeddings, projections, feed-forward and layer norms run on the real tokens "
        "only (rounded up to a multiple of 16 rows); attention alone sees the padded batch",
        "a quarter of a CLINC150 batch's tokens are padding after length bucketing, more for "
        "pairs; it calls BertModel's own modules in BertModel.forward's order",
        "1.04x (labelled items) to 1.41x (pairs) a CPU step, Xeon, bench_text.py --compare-unpad",
        "transformers' padded forward (also for models other than a BERT with SDPA attention)",
    ),
    "fast_dropout": Switch(
        True,
        "models/dropout.py",
        "dropout masks from numpy's SFC64 bits seeded from torch's generator, attention "
        "dropout too (an attention registered with transformers); CPU training only",
        "torch draws a CPU mask element by element (~10 ns each): ~10% of a MiniLM step",
        "1.11x a CPU step, Xeon, bench_text.py --compare-dropout",
        "torch's nn.Dropout and SDPA dropout (CUDA: always; its fused dropout is fast)",
    ),
    "own_clipping": Switch(
        True,
        "retrieval/optim.py",
        "the gradient norm as one BLAS dot product per CPU gradient; no multiply when the "
        "coefficient is 1",
        "torch's per-tensor norm runs at half the speed on the CPU and always multiplies",
        "17.5 -> 6.8 ms on MiniLM's gradients, Xeon; 1.29x a step under load, bench_switches.py",
        "torch.nn.utils.clip_grad_norm_ (GPU or sparse gradients: always)",
    ),
    "keep_freed_memory": Switch(
        True,
        "speed/allocator.py",
        "glibc's mallopt: large blocks from the heap, trimmed only above 1 GiB free",
        "glibc maps and zeroes a step's large freed blocks again at every step",
        "221.8 against 244.9 ms a step, AMD EPYC bf16, bench_allocator.py; peak memory +2-12%",
        "glibc's defaults (other C libraries: always)",
    ),
    "pause_collector": Switch(
        True,
        "speed/collector.py",
        "the cyclic collector off while an entry point imports; the ~800k objects alive when "
        "the first job starts frozen (gc.freeze), then the collector on",
        "its full passes over the imports' objects free almost nothing",
        "the collector's time in the user's sweep 3.56 -> 1.00 s, Xeon",
        "Python's collector as it is (a library caller: always)",
    ),
    "quick_exit": Switch(
        True,
        "app/cli.py",
        "threads joined, atexit handlers run, streams flushed, then os._exit: no teardown of "
        "every module (calls threading's private _shutdown, as Python's exit does)",
        "tearing down torch, Lightning and MLflow takes seconds and changes nothing",
        "3.5-5 s less a process (a sweep's exit 5.1 -> 0.5 s), AMD EPYC; 7.09 -> 0.41 s, Xeon "
        "under load, bench_switches.py",
        "sys.exit: Python's full teardown",
    ),
    "derived_sweep_configs": Switch(
        True,
        "speed/sweep_configs.py",
        "a -m grid's jobs that differ only in plain keys' values are a copy of the first "
        "one's config with Hydra's own override code (a private Hydra function) applied",
        "Hydra composes every job from the YAML files (~0.14 s each) and again to check them",
        "7 ms a job against 0.137 s (4.25 s of the user's 30 jobs), Xeon; 28 against 326 ms "
        "under load, bench_switches.py",
        "Hydra's basic sweeper: every job composed (and checked) by Hydra",
    ),
    "forked_report": Switch(
        True,
        "speed/forked.py",
        "the report's curve fits and figures shared with a forked process; the recommended "
        "model logged alongside",
        "seconds of single-threaded numpy and matplotlib each, with a second core idle",
        "build_report 9.57 -> 5.58 s, Xeon",
        "one process, the same files to the byte (one core, no fork: always)",
    ),
    "process_reuse": Switch(
        True,
        "speed/reuse.py",
        "weights, tokenizer, data and token ids loaded once for all the jobs of a process",
        "a -m sweep's jobs run in one process and would load the same files again",
        "tokenising 0.15 -> 0.05 s an evaluation of 3,000 texts; a MiniLM load a job",
        "every job loads what it needs",
    ),
}

_values: dict[str, bool] = {}  # set by configure(); empty: the defaults and the environment


def env_all() -> bool:
    """FINETUNE_BUDGET_SPEED: false, 0, off or no turns every fast path off."""
    return os.environ.get(ENV, "").strip().lower() not in OFF


def values(node: Mapping[str, Any] | None = None) -> dict[str, bool]:
    """Each switch's value (`all` applied) from a `speed:` node: a missing key is its default;
    an unknown name or a value that is not a bool stops with a one-line error."""
    node = dict(node or {})
    unknown = sorted(set(node) - set(SWITCHES) - {"all"})
    if unknown:
        raise ConfigError(
            f"speed.{unknown[0]} is not a switch; use speed.all or one of: {', '.join(SWITCHES)}"
        )
    for key, value in node.items():
        if not isinstance(value, bool):
            raise ConfigError(f"speed.{key}={value!r}: use true or false")
    on = node.get("all", True) and env_all()
    return {name: on and node.get(name, s.default) for name, s in SWITCHES.items()}


def configure(node: Mapping[str, Any] | None) -> dict[str, bool]:
    """Set every switch from a job's `speed:` node (None: the defaults); returns the values."""
    global _values
    _values = values(node)
    return dict(_values)


def enabled(name: str) -> bool:
    """Whether fast path `name` runs (the last configure(), else its default)."""
    if name not in SWITCHES:
        raise KeyError(f"{name!r} is not a switch of speed/switches.py")
    return _values[name] if _values else values()[name]
