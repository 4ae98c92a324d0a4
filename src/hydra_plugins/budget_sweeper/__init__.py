"""Hydra's adaptive budget sweeper: `python train.py -m hydra/sweeper=budget` (docs/results.md)."""
