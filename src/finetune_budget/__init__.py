"""finetune-budget: how much labelled data and training time does fine-tuning an embedding need?"""

from __future__ import annotations

__version__ = "0.1.0"
