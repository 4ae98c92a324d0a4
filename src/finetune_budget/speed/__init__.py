"""Process and kernel tricks; the leaf modules here import nothing of the package but its root.

Every fast path of the package, with its switch (default), where it lives and where the plain
path is; the fast paths that act inside a model or a run live there, and are listed here so that
this is the one place to read them all. Their measured effects: docs/performance.md.

- unpadded encoder: `model.unpad` (`auto`: on for a BERT with SDPA attention), models/unpadded.py;
  plain: `false`, transformers' padded forward.
- fast dropout: `model.fast_dropout` (true in the sentence-encoder configs), models/dropout.py;
  plain: `false`, torch's dropout.
- kept word-embedding gradient: no switch, on where a fit runs on one CPU device,
  speed/embedding_grad.py; plain: DDP, GPUs, tied or small tables get torch's dense gradient.
- the optimizer's own clipping: no switch, wherever a fused optimizer clips,
  retrieval/optim.py (`clip_for_fused`); plain: `torch.nn.utils.clip_grad_norm_` for sparse or
  non-CPU gradients.
- freed memory kept: `FINETUNE_BUDGET_KEEP_FREED_MEMORY` (on, set by the entry points),
  speed/allocator.py; plain: `=0`, glibc's defaults.
- collector paused at start-up: no switch, the entry points only, speed/collector.py; plain: a
  library caller keeps its own setting.
- quick exit: `FINETUNE_BUDGET_FULL_EXIT` (unset), app/cli.py `exit_now`; plain: `=1`, Python's
  full teardown.
- derived sweep configs: `hydra/sweeper=grid` (default), speed/sweep_configs.py; plain:
  `hydra/sweeper=basic`, Hydra composes every job.
- forked report: no switch, 2+ cores and fork, speed/forked.py; plain: one core, no fork or a
  daemonic process, one process writing the same files.
- continuation of shorter runs: `budget.continue_shorter_runs` (true), training/continuation.py;
  plain: `false`, every job from scratch.
- baseline cache: `eval.cache_baseline` (true), training/baseline_cache.py; plain: `false`, every
  job evaluates the pretrained model.
- loaded once per process: no switch, speed/reuse.py; plain: a launcher with a process per job.
"""
