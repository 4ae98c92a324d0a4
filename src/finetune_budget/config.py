"""Config helpers shared by the entry points: flattening, the `a..b` sweep syntax, precision,
installed package versions, the `${checkout:...}` resolver (conf/paths/default.yaml) and the checks
run before the heavy imports (check_config). Imports nothing heavy at module level."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from finetune_budget.errors import ConfigError

log = logging.getLogger(__name__)


def checkout() -> Path:
    """The project checkout, the folder holding conf/ and train.py: the package's own checkout
    (`<checkout>/src/finetune_budget`, installed editable by `make install`); for a package
    installed elsewhere, the folder of the running Hydra app's conf/ (train.py's folder)."""
    here = Path(__file__).resolve().parents[2]
    if (here / "conf").is_dir():
        return here
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            for source in HydraConfig.get().runtime.config_sources:
                if source.provider == "main" and source.schema == "file":
                    return Path(source.path).resolve().parent
    except Exception as e:  # noqa: BLE001 - no Hydra job: the working directory
        log.debug("no Hydra config source: %s", e)
    return Path.cwd()


def checkout_path(relative: str = "") -> str:
    """`${checkout:../shared/data}`: a path relative to the checkout, whatever the working
    directory (the default data folder sits beside the checkout, in ../shared/data)."""
    return os.path.normpath(checkout() / relative)


OmegaConf.register_new_resolver("checkout", checkout_path, replace=True)


@functools.cache
def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def installed_versions(names: Sequence[str]) -> dict[str, str]:
    """{package: version} of those of `names` that are installed, read once per process (run
    tags, continuation keys and a logged model's requirements all ask on every job)."""
    return {name: v for name in names if (v := _installed(name)) is not None}


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
    import torch

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
    import torch

    if precision not in (None, "auto"):
        return str(precision)
    use_cuda = accelerator in ("gpu", "cuda") or (
        accelerator == "auto" and torch.cuda.is_available()
    )
    if use_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"


# ---- checks run before the heavy imports: a typo is reported in about a second ----------------

# key -> (smallest allowed value, whether it may equal it); None passes (where the config allows).
LOWER_BOUNDS: dict[str, tuple[float, bool]] = {
    "data.n": (1, True),
    "data.batch_size": (1, True),
    "trainer.max_epochs": (1, True),
    "eval.top_k": (1, True),
    "eval.batch_size": (1, True),
    "optim.optimizer.lr": (0, False),
    "loss.temperature": (0, False),
    "budget.gain_floor": (0, False),
    "budget.max_train_s": (0, False),
    "tracking.stale_after_s": (0, True),
    "seed": (0, True),
}
# Keys whose values are counts whatever the defaults say.
INTEGER_KEYS = ("data.n", "trainer.max_epochs", "eval.top_k", "data.batch_size", "seed")
TRACKING_SCHEMES = {
    "": None,
    "file": None,
    "sqlite": None,
    "http": 80,
    "https": 443,
    "postgresql": 5432,
    "mysql": 3306,
    "mssql": 1433,
    "databricks": None,
}
# data.format -> files a data folder (data.path) must hold.
EXPECTED_FILES = {
    "stsb": ("sts-train.csv", "sts-{eval_split}.csv"),
    "flickr8k": ("captions.txt", "images"),
    "flickr8k_captions": ("captions.txt",),
}
DATA_PATH_KEYS = ("path", "train_path", "eval_path", "csv", "root")
# Trainer arguments Lightning takes in several types (devices=auto|2|[0,1], limits int|float).
UNION_KEYS = {
    "trainer.devices",
    "trainer.precision",
    "trainer.val_check_interval",
    "trainer.limit_train_batches",
    "trainer.limit_val_batches",
    "trainer.limit_test_batches",
    "trainer.overfit_batches",
}
# evaluate.py modes that read a data set (the report and others read MLflow only).
DATA_MODES = ("eval", "external_baseline")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "a list like [a,b]"
    if isinstance(value, Mapping):
        return "a mapping like {key: value}"
    return "a string"


def type_error(key: str, value: Any, default: Any) -> str | None:
    """Why `value` cannot stand where the config's default is `default` (None: it can)."""
    if default is None or value is None or key in UNION_KEYS:
        return None
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, Mapping):
        ok = isinstance(value, Mapping)
    elif isinstance(default, Sequence) and not isinstance(default, str):
        ok = isinstance(value, Sequence) and not isinstance(value, str)
    else:
        return None  # strings take any value (precision=16, names, paths)
    if ok:
        return None
    return f"{key}={value} is not {_kind(default)}; write it like {key}={_show(default)}"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _select(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(cfg):  # a plain mapping
        for part in key.split("."):
            cfg = cfg.get(part) if isinstance(cfg, Mapping) else None
        return cfg
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - an interpolation that does not resolve here
        return None
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=False)
    return value


def value_errors(cfg: Any) -> list[str]:
    """Known keys with a wrong type or out of range (integers for counts, positive rates, ...)."""
    errors = []
    for key in INTEGER_KEYS:
        value = _select(cfg, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            errors.append(f"{key}={value} is not an integer; write it like {key}=100")
    for key, (low, inclusive) in LOWER_BOUNDS.items():
        value = _select(cfg, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            if value is not None and key not in INTEGER_KEYS:
                errors.append(f"{key}={value} is not a number; write it like {key}=1")
            continue
        if value < low or (value == low and not inclusive):
            bound = f">= {low}" if inclusive else f"> {low}"
            errors.append(f"{key}={value} must be {bound}")
    return errors


_DEFAULTS: dict[tuple, Any] = {}


def override_errors(cfg: Any) -> list[str]:
    """The command line's `key=value` overrides whose value has another type than the config's
    default for that key (`data.n=lots`, `trainer.max_epochs=abc`, `budget.rerun=maybe`).

    Needs a running Hydra job (the overrides and the composed defaults); [] outside one.
    """
    try:
        from hydra import compose
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if not HydraConfig.initialized():
            return []
        hc = HydraConfig.get()
        overrides = list(hc.overrides.task)
        choices = set(hc.runtime.choices)
        parsed = OverridesParser.create().parse_overrides(overrides)
        groups = [o.input_line for o in parsed if o.key_or_group in choices]
        values = [
            o
            for o in parsed
            if o.key_or_group not in choices
            and not o.key_or_group.startswith("hydra")
            and not o.is_delete()
        ]
        if not values:
            return []
        key = (hc.job.config_name, tuple(groups))
        if key not in _DEFAULTS:  # the jobs of a sweep share their group choices
            _DEFAULTS[key] = compose(config_name=hc.job.config_name, overrides=groups)
        defaults = _DEFAULTS[key]
    except Exception as e:  # noqa: BLE001 - the checks are a courtesy; the run checks again
        log.debug("override type check skipped: %s", e)
        return []
    errors = []
    for o in values:
        key = o.key_or_group
        message = type_error(key, _select(cfg, key), _select(defaults, key))
        if message is not None:
            errors.append(message)
    return errors


def tracking_uri_error(uri: Any, timeout_s: float = 3.0) -> str | None:
    """Why MLflow cannot use `uri` (an unsupported scheme, a missing folder, no server)."""
    import socket
    from urllib.parse import urlsplit

    uri = str(uri)
    fix = "use tracking.uri=sqlite:///mlflow.db (or set MLFLOW_TRACKING_URI)"
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if len(scheme) == 1:  # a Windows drive letter: a path
        scheme = ""
    if scheme not in TRACKING_SCHEMES:
        return (
            f"tracking.uri={uri}: MLflow does not support the scheme {parts.scheme!r}; "
            "use sqlite:///<file>.db, a folder, http(s)://<host>:<port> or postgresql://..."
        )
    if scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        if path in ("", ":memory:") or uri.startswith("sqlite:///:memory:"):
            return None
        folder = Path(path).expanduser().resolve().parent
        if not folder.is_dir():
            return f"tracking.uri={uri}: the folder {folder} does not exist; create it or {fix}"
        return None
    port = TRACKING_SCHEMES[scheme]
    if port is None:
        return None
    try:
        host, port = parts.hostname, parts.port or port
    except ValueError:
        return f"tracking.uri={uri} has a bad port; write it like http://127.0.0.1:5000"
    if not host:
        return f"tracking.uri={uri} names no host; write it like http://127.0.0.1:5000"
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as e:
        return (
            f"tracking.uri={uri}: cannot reach {host}:{port} ({e.strerror or e}); start the "
            f"server (mlflow server --port {port}) or {fix}"
        )


def data_errors(data: Any) -> list[str]:
    """Data files and folders the data config names that do not exist, or lack expected files."""
    from omegaconf import OmegaConf

    if data is None:
        return []
    errors = []
    for key in DATA_PATH_KEYS:
        if key not in data.keys():  # `in` is False for a missing (???) value
            continue
        if OmegaConf.is_missing(data, key):
            errors.append(f"data.{key} is not set; give data.{key}=<path> (see conf/data/)")
            continue
        value = _select(data, key)
        if value is None:
            continue
        path = Path(str(value)).expanduser()
        if not path.exists():
            raw = str(OmegaConf.to_container(data, resolve=False).get(key))
            fix = (
                "set paths.data_dir=<folder with the data sets> (or FINETUNE_BUDGET_DATA_DIR="
                f"<folder>) or data.{key}=<path>"
                if "paths.data_dir" in raw
                else f"give data.{key}=<an existing path>"
            )
            errors.append(f"data.{key}={path} does not exist; {fix}")
    fmt = _select(data, "format")
    folder = _select(data, "path")
    if fmt in EXPECTED_FILES and folder is not None and Path(str(folder)).is_dir():
        split = _select(data, "eval_split") or ""
        lacking = [
            name.format(eval_split=split)
            for name in EXPECTED_FILES[fmt]
            if not (Path(str(folder)) / name.format(eval_split=split)).exists()
        ]
        if lacking:
            errors.append(
                f"data.path={folder} has no {', '.join(lacking)}; point data.path (or "
                f"paths.data_dir) at the folder holding the {fmt} files"
            )
    return errors


def checkpoint_error(path: Any) -> str | None:
    """Why `path` is not a checkpoint file (torch.save writes a zip, older versions a pickle)."""
    p = Path(str(path)).expanduser()
    fix = "give checkpoint=<a .ckpt file train.py saved> or run_id=<its MLflow run>"
    if not p.is_file():
        return f"checkpoint={p} is not a file; {fix}"
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"checkpoint={p} cannot be read ({e.strerror}); {fix}"
    if head != b"PK\x03\x04" and not head.startswith(b"\x80"):
        return f"checkpoint={p} is not a PyTorch checkpoint; {fix}"
    return None


def device_error(trainer: Any) -> str | None:
    """A CUDA or MPS accelerator asked for where there is none (or fewer devices than asked)."""
    accelerator = str(_select(trainer, "accelerator") or "auto").lower()
    if accelerator not in ("gpu", "cuda", "mps"):
        return None
    import torch

    if accelerator == "mps":
        if not torch.backends.mps.is_available():
            return "trainer.accelerator=mps but this machine has no MPS device; use trainer=cpu"
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return (
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU "
            "(torch.cuda.is_available() is False); use trainer=cpu or trainer.accelerator=cpu"
        )
    devices = _select(trainer, "devices")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > count:
        return (
            f"trainer.devices={devices} but this machine has {count} GPU(s); use at most {count}"
        )
    return None


def config_errors(cfg: Any) -> list[str]:
    """Everything checkable before the heavy imports (types, ranges, files, store, device)."""
    errors = override_errors(cfg) or value_errors(cfg)
    if errors:
        return errors
    if "tracking" in cfg:
        message = tracking_uri_error(_select(cfg, "tracking.uri"))
        if message:
            errors.append(message)
    if "data" in cfg and cfg.get("mode", "eval") in DATA_MODES:
        errors += data_errors(cfg.data)
    if cfg.get("checkpoint"):
        message = checkpoint_error(cfg.checkpoint)
        if message:
            errors.append(message)
    if "trainer" in cfg and cfg.get("mode", "eval") in DATA_MODES:
        message = device_error(cfg.trainer)
        if message:
            errors.append(message)
    return errors


def check_config(cfg: Any) -> None:
    """Raise ConfigError with the first problem config_errors finds (one line, names the fix)."""
    errors = config_errors(cfg)
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(errors[0] + more)
