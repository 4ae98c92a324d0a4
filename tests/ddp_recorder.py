"""A Lightning callback that records which training items each process trained on, for the
end-to-end DDP tests (tests/test_ddp.py); added to a run with
`+callbacks.record._target_=ddp_recorder.IndexRecorder +callbacks.record.out=<dir>` and `tests/`
on PYTHONPATH."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class IndexRecorder(L.Callback):
    """Writes <out>/rank<r>.json: [{"epoch", "step", "index": [training item ids], "loss"}], one
    entry per training batch of this process."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.batches: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.batches.append(
            {
                "epoch": trainer.current_epoch,
                "step": batch_idx,
                "index": batch["index"].tolist(),
                "loss": float(loss.detach()),
            }
        )

    def on_fit_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.batches))
