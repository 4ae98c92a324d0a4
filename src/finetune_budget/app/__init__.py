"""What the entry points run (the top layer: it may import any other, none imports it).

cli.py            train.py / evaluate.py / tune.py: config check, jobs, exit codes
modes.py          evaluate.py's modes: report, advise, check (light); dispatch to the others
model_modes.py    the modes that load a model (eval, export): torch and Lightning
runs.py           a run's model: kept in memory, logged, its checkpoint, or rebuilt
sweep_parent.py   a `-m` sweep's parent run and its report (a Hydra callback)
sweep_end.py      the model of the run the sweep's report recommends, logged
budget_search.py  the adaptive search's runs read from MLflow, its decisions recorded
launchers.py      the submitit launchers' logic (src/hydra_plugins/finetune_budget_launcher)
external_baseline.py   a hosted embedding model scored on the same split
tuning/           Optuna searches (tune.py)
"""
