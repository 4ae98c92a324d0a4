"""Real weights, real data: fine-tuning all-MiniLM-L6-v2 on a CLINC150 subset beats epoch 0."""

from __future__ import annotations

import pytest

from finetune_budget.training.run import train
from tests.conftest import requires_data


@pytest.mark.slow
@requires_data("clinc150")
def test_minilm_fine_tuned_on_clinc150_beats_the_pretrained_model(make_cfg):
    cfg = make_cfg(
        "data.n=500",
        "trainer.max_epochs=1",
        "optim.optimizer.lr=5e-5",
        "trainer.accelerator=cpu",
        "tracking.save_checkpoint=false",
    )
    history = train(cfg).history
    before, after = history[0]["val/mrr_at_20"], history[-1]["val/mrr_at_20"]
    assert before > 0.8  # the real pretrained model, not a random one
    assert after > before
    assert history[-1]["gain/mrr_at_20"] > 0 and history[-1]["roi_s/mrr_at_20"] > 0
