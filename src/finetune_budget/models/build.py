"""One way from a `conf/model/*.yaml` group to the encoder it describes: instantiate its
`_target_` (models.text.build_sentence_encoder, models.vision.ImageEmbedder or one of
models.clip's builders) with the group's other keys."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from finetune_budget.errors import BudgetError, ModelError

# The builder of each `model.family`, for configs logged before the model groups named their
# `_target_` (evaluate.py run_id=<an older run>).
LOGGED_BEFORE_TARGETS = {
    "sentence_encoder": "finetune_budget.models.text.build_sentence_encoder",
    "image_backbone": "finetune_budget.models.vision.ImageEmbedder",
    "open_clip": "finetune_budget.models.clip.build_open_clip",
    "clip_assembled": "finetune_budget.models.clip.build_assembled_clip",
    "tiny_clip": "finetune_budget.models.clip.build_tiny_clip",
}


def builder_of(model: dict[str, Any]) -> str | None:
    """The `_target_` of a model group (resolved, plain values), or None where it names none."""
    return model.get("_target_") or LOGGED_BEFORE_TARGETS.get(model.get("family"))


def build_model(model: dict[str, Any]) -> Any:
    """The encoder of a model group (resolved, plain values). The builders' own one-line errors
    reach the user as they were raised, not wrapped in Hydra's InstantiationException."""
    target = builder_of(model)
    if target is None:
        raise ModelError(f"model={model.get('name')} names no builder; give model._target_")
    try:
        return instantiate({**model, "_target_": target}, _convert_="all")
    except InstantiationException as e:
        if isinstance(e.__cause__, BudgetError):
            raise e.__cause__ from None
        raise ModelError(f"model={model.get('name')} could not be built ({target}): {e}") from e
