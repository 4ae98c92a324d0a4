"""Lightning's MLflow logger for the step-level curves (train/loss, learning rate) of a run that
`tracked_run` owns.

Lightning's MLFlowLogger marks its run FINISHED whenever the trainer finalises its loggers: after
every `validate()` and at the end of `fit()`, while the job still has its continuation state,
checkpoint, summary and model to record. A process killed in between left a run FINISHED with a
partial record (after the epoch-0 evaluation: no trained epoch at all, so the rerun trained the
point again and the point had two finished runs). Here the run's status is set by its owner
alone: FINISHED once everything is recorded, FAILED or KILLED otherwise.
"""

from __future__ import annotations

from lightning.pytorch.loggers import MLFlowLogger


class RunStepLogger(MLFlowLogger):
    """MLFlowLogger that never ends the run it writes to (`tracked_run` does)."""

    def finalize(self, status: str = "success") -> None:
        """Nothing to end: the run's owner sets its status when the whole job is recorded."""
