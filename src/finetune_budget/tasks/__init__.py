"""Tasks: what a run fine-tunes and on what, one module per task.

    task.py         TaskParts, build_task (the task group's `_target_`: its `build`)
    module.py       FineTuner: what every task's LightningModule shares (held-out evaluation,
                    loss choice, optimiser, finite-loss checks)
    text_text.py    sentence encoders on labelled texts or pairs (SupCon / InfoNCE)
    text_image.py   open_clip dual encoders on image-caption pairs (CLIP loss)
    image_image.py  image backbones on labelled images (SupCon / triplet)
    mlm_price.py    masked-LM domain adaptation judged by a price probe

Data live in `finetune_budget.data` (every task's DataModule derives from `data.base`), models in
`finetune_budget.models`, losses in `finetune_budget.retrieval.losses`.
"""

from __future__ import annotations

from finetune_budget.tasks.task import TaskParts, build_task, plain

__all__ = ["TaskParts", "build_task", "plain"]
