"""Hydra launcher plugins of finetune-budget (conf/hydra/launcher/); the logic is in
finetune_budget.app.launchers."""
