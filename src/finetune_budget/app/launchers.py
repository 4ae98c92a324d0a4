"""Hydra's submitit launchers, with a config's epoch budgets grouped into one job.

    python train.py -m hydra/launcher=local data.n=100,500 trainer.max_epochs=1..10
    python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu data.n=100,500,1000 \
        trainer.max_epochs=1..10

Configs: conf/hydra/launcher/{local,slurm}.yaml; the classes they name are in
hydra_plugins.finetune_budget_launcher (Hydra instantiates launchers from that package only).
docs/scale_out.md. The plugin's
launchers submit every job of a sweep at once, so the `trainer.max_epochs=k` job would start before
the job whose epoch-j state it continues (training.continuation) has saved it, and every
epoch budget would train from scratch. These launchers submit one submitit job per group instead:
the sweep's jobs whose configs differ only in `trainer.max_epochs` (and may continue one another),
run in one process in increasing order of `max_epochs`, so job k finds job j's state. Jobs that do
not continue (another schedule, several devices, `budget.continue_shorter_runs=false`) get a
submitit job each, as with the plugin.

Each Hydra job stays its own MLflow run; jobs that fail are reported back to the launching process,
which exits 1 at the end (finetune_budget.app.cli).

Families in parallel (hydra/launcher=local): the groups are independent chains, so they run at
once, at most `hydra.launcher.parallel` processes (`auto`: from the free memory of each GPU, or
from the cores on a CPU-only machine; `family_slots`). On GPUs each family is pinned to one device
(CUDA_VISIBLE_DEVICES), several families share a device where its free memory holds them; on a CPU
the cores are split between the processes (OMP_NUM_THREADS), so two families on two cores train
with one thread each instead of contending for both.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf, open_dict

from finetune_budget.app import cli
from finetune_budget.errors import ConfigError
from finetune_budget.tracking.parent import PARENT_ENV, current_parent

log = logging.getLogger(__name__)

EPOCHS_KEY = "trainer.max_epochs"
# The GPU a family's process is pinned to: submitit's local controller sets CUDA_VISIBLE_DEVICES
# from gpus_per_node alone (always from device 0), so the process sets it from this before CUDA
# starts.
FAMILY_GPU_ENV = "FINETUNE_BUDGET_FAMILY_GPU"


def group_epoch_budgets(
    job_overrides: Sequence[Sequence[str]], continuable: Sequence[bool]
) -> list[list[int]]:
    """Indices of `job_overrides` grouped into submitit jobs, each group in increasing
    `trainer.max_epochs`: jobs whose overrides are the same apart from `trainer.max_epochs` share a
    group when they are `continuable`; every other job is a group of its own."""
    parser = OverridesParser.create()
    groups: dict[tuple[str, ...], list[tuple[int, int]]] = {}
    alone: list[list[int]] = []
    for idx, (overrides, ok) in enumerate(zip(job_overrides, continuable, strict=True)):
        parsed = parser.parse_overrides(list(overrides))
        epochs = [o for o in parsed if o.get_key_element() == EPOCHS_KEY]
        if not ok or len(epochs) != 1:
            alone.append([idx])
            continue
        rest = tuple(sorted(o.input_line for o in parsed if o.get_key_element() != EPOCHS_KEY))
        groups.setdefault(rest, []).append((int(epochs[0].value()), idx))
    grouped = [[idx for _, idx in sorted(members)] for members in groups.values()]
    return sorted(grouped + alone, key=lambda g: g[0])


def family_slots(
    parallel: int | str,
    families: int,
    cores: int,
    gpu_free_gb: Sequence[float] = (),
    gpu_memory_per_job_gb: float = 8.0,
) -> list[tuple[int | None, int]]:
    """The slots families run in: (GPU index or None, threads) per slot, at most `families`.
    `parallel` is a number of slots or "auto": on GPUs as many per device as its free memory holds
    at `gpu_memory_per_job_gb` each (at least one per device), capped by the cores; on a CPU-only
    machine one slot per core. Threads split the cores evenly between the slots."""
    if parallel != "auto" and (not isinstance(parallel, int) or parallel < 1):
        raise ConfigError(
            f"hydra.launcher.parallel={parallel!r} is not a number of processes: give an "
            "integer >= 1, or auto"
        )
    if gpu_free_gb:
        per_device = [max(1, math.floor(free / gpu_memory_per_job_gb)) for free in gpu_free_gb]
        devices = _interleave(per_device)  # the first families spread over the devices
        limit = len(devices) if parallel == "auto" else parallel
        limit = min(limit, max(1, cores), families)
        return [(devices[i % len(devices)], max(1, cores // limit)) for i in range(limit)]
    limit = max(1, cores) if parallel == "auto" else parallel
    limit = max(1, min(limit, families))
    return [(None, max(1, cores // limit)) for _ in range(limit)]


def _interleave(per_device: Sequence[int]) -> list[int]:
    """Device indices, one slot of each device in turn: [0, 1, 0, 1, 0] for (3, 2)."""
    out: list[int] = []
    for round_ in range(max(per_device)):
        out.extend(d for d, k in enumerate(per_device) if round_ < k)
    return out


def _free_gpu_memory_gb() -> list[float]:
    """Free memory of each visible GPU in GB (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(d)[0] / 1e9 for d in range(torch.cuda.device_count())]


class GroupedSubmititLauncher(BaseSubmititLauncher):
    """BaseSubmititLauncher whose submitit jobs are groups of Hydra jobs (see the module doc)."""

    # keys of conf/hydra/launcher/local.yaml that are this launcher's, not submitit's
    FAMILY_KEYS = ("parallel", "gpu_memory_per_job_gb")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.family_params = {k: self.params.pop(k) for k in self.FAMILY_KEYS if k in self.params}

    def __call__(  # type: ignore[override]  # runs in the submitit job's process
        self,
        jobs: list[tuple[list[str], int]],
        job_dir_key: str,
        singleton_state: dict[type, Singleton],
        parent_run_id: str | None,
    ) -> list[tuple[JobReturn, list[str]]]:
        """Run the Hydra jobs `[(overrides, job_num), ...]` one after the other; return each
        one's JobReturn and the failures it reported (cli.FAILED_JOBS)."""
        import submitit

        assert self.hydra_context is not None and self.config is not None
        assert self.task_function is not None
        if FAMILY_GPU_ENV in os.environ:
            os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.pop(FAMILY_GPU_ENV)
        if parent_run_id:
            os.environ[PARENT_ENV] = parent_run_id
        Singleton.set_state(singleton_state)
        setup_globals()
        results = []
        for overrides, job_num in jobs:
            sweep_config = self.hydra_context.config_loader.load_sweep_config(
                self.config, overrides
            )
            with open_dict(sweep_config.hydra.job) as job:
                job.id = submitit.JobEnvironment().job_id
                job.num = job_num
            failed_before = len(cli.FAILED_JOBS)
            ret = run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=sweep_config,
                job_dir_key=job_dir_key,
                job_subdir_key="hydra.sweep.subdir",
            )
            results.append((ret, cli.FAILED_JOBS[failed_before:]))
        return results

    def _continuable(self, job_overrides: Sequence[Sequence[str]]) -> list[bool]:
        # imported here, not above: Hydra imports this module (through the plugin) in every
        # command, and training.continuation brings lightning (seconds before a config error)
        from finetune_budget.training.continuation import why_not_continuable

        assert self.hydra_context is not None and self.config is not None
        flags = []
        for overrides in job_overrides:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            flags.append(why_not_continuable(cfg) is None)
        return flags

    def _executor(self) -> Any:
        """submitit's executor with the launcher's parameters, as the plugin's launch builds it."""
        import submitit

        if self._EXECUTOR == "slurm" and shutil.which("sbatch") is None:
            raise ConfigError(
                "hydra/launcher=slurm needs SLURM, and sbatch is not on PATH here: run the "
                "command on the cluster's login node, or use hydra/launcher=local on one machine"
            )
        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=self.params["submitit_folder"],
            **{
                f"{self._EXECUTOR}_{k}": v
                for k, v in self.params.items()
                if k == "max_num_timeout"
            },
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                k if k in base else f"{self._EXECUTOR}_{k}": v
                for k, v in self.params.items()
                if k not in init_keys
            }
        )
        return executor

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        try:
            executor = self._executor()
        except ConfigError as e:  # one line, not Hydra's traceback
            raise SystemExit(f"error: {e}") from None
        groups = group_epoch_budgets(job_overrides, self._continuable(job_overrides))
        log.info(
            "Submitit '%s' sweep output dir: %s; %d jobs in %d submitit jobs",
            self._EXECUTOR,
            sweep_dir,
            len(job_overrides),
            len(groups),
        )
        state, parent = Singleton.get_state(), current_parent()
        args = []
        for group in groups:
            jobs = [(list(job_overrides[i]), initial_job_idx + i) for i in group]
            for overrides, num in jobs:
                log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
            args.append((jobs, "hydra.sweep.dir", state, parent))
        if self._EXECUTOR == "local":
            submitted = self._run_families(executor, args)
        else:  # SLURM schedules the array itself (hydra.launcher.array_parallelism)
            submitted = executor.map_array(self, *zip(*args, strict=True))
        returns: list[JobReturn | None] = [None] * len(job_overrides)
        for group, job in zip(groups, submitted, strict=True):
            for i, (ret, failures) in zip(group, _group_results(job, group), strict=True):
                returns[i] = ret if ret is not None else _lost(job_overrides[i])
                for failure in failures:  # the job's one-line error, here too
                    log.error("error in job #%d: %s", initial_job_idx + i, failure)
                cli.FAILED_JOBS.extend(failures)
        return returns  # type: ignore[return-value]

    def _run_families(self, executor: Any, args: list[tuple]) -> list[Any]:
        """Submit one local process per family, at most one per slot at a time; return the
        submitted jobs in the order of `args` once every one has been started."""
        assert self.config is not None
        parallel = self.family_params["parallel"]  # the schema (FamiliesLocalConf) sets both
        # a job on several devices (DDP) holds them all: one family at a time, not pinned
        pin = str(self.config.trainer.devices) == "1"
        try:
            slots = family_slots(
                parallel if pin else 1,
                len(args),
                os.cpu_count() or 1,
                _free_gpu_memory_gb() if pin else [],
                float(self.family_params["gpu_memory_per_job_gb"]),
            )
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
        log.info(
            "%d families in %d processes at a time (%s)",
            len(args),
            len(slots),
            ", ".join(
                f"GPU {gpu}" if gpu is not None else f"{threads} thread(s)"
                for gpu, threads in slots
            ),
        )
        submitted: list[Any] = []
        busy: dict[int, Any] = {}  # slot -> its running job
        for arg in args:
            while len(busy) == len(slots):
                busy = {slot: job for slot, job in busy.items() if not job.done()}
                if len(busy) == len(slots):
                    time.sleep(0.2)
            slot = min(set(range(len(slots))) - set(busy))
            gpu, threads = slots[slot]
            family_env = {"OMP_NUM_THREADS": str(threads)}  # the child process inherits them
            if pin and gpu is not None:
                family_env[FAMILY_GPU_ENV] = str(gpu)
            before = {k: os.environ.get(k) for k in family_env}
            os.environ.update(family_env)
            try:
                busy[slot] = executor.submit(self, *arg)
            finally:
                for k, v in before.items():
                    if v is None:
                        os.environ.pop(k)
                    else:
                        os.environ[k] = v
            submitted.append(busy[slot])
        return submitted


def _group_results(job: Any, group: list[int]) -> list[tuple[JobReturn | None, list[str]]]:
    """What a submitit job returned, or for a job that died (time limit, out of memory, killed)
    no JobReturn and one failure line per Hydra job of its group; the sweep's other jobs go on."""
    try:
        return job.results()[0]
    except Exception as e:  # noqa: BLE001 - reported as the group's failure
        first = (str(e).strip().splitlines() or [""])[0][:300]
        why = f"submitit job {job.job_id} ended without a result ({type(e).__name__}: {first})"
        return [(None, [f"{why}; its log: {job.paths.stderr}"]) for _ in group]


def _lost(overrides: Sequence[str]) -> JobReturn:
    """A job whose process died: NaN, as cli.guarded_job returns for a failed job."""
    return JobReturn(
        overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=float("nan")
    )
