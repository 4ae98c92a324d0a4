"""Process and kernel tricks; the leaf modules here import nothing of the package but its root.

Every fast path of the package, with its switch, default, reason, measured effect and plain path,
is in one table: speed/switches.py (`speed.*` in conf/train.yaml; `speed.all=false` turns them all
off). The fast paths that act inside a model or a run live there (models/unpadded.py,
models/dropout.py, retrieval/optim.py, app/cli.py); the process tricks live here. Not switches:
the run-level reuse a config already names (`budget.continue_shorter_runs`,
`eval.cache_baseline`, `data.length_bucket_pool`), which change what runs, not how fast it runs.
"""
