"""Where a stage's training loop stands, and the rule that keeps the best epoch and stops early.

`TrainingProgress` is all a checkpoint stores about the loop beyond `Accelerator.save_state` and the best
weights (it goes into `trainer_state.json` as a dict), so its fields are part of the checkpoint format.
"""

from __future__ import annotations

import dataclasses
import logging

logger = logging.getLogger(__name__)

SELECTION_METRIC = "ndcg@10"
STAGES = ("retrieval", "rerank", "profiles")


@dataclasses.dataclass
class TrainingProgress:
    """Where one stage's loop stands: what a checkpoint needs beyond `Accelerator.save_state` and the best weights."""

    stage: str
    epoch: int = 1  # the epoch in progress, from 1
    batches_done: int = 0  # batches of `epoch` trained on; a resumed loader skips them
    global_step: int = 0  # optimizer steps in this stage
    epoch_loss_sum: float = 0.0  # over the `batches_done` batches, for the epoch's mean loss
    best_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # best valid epoch so far (0 = untrained)
    evaluations_without_gain: int = 0
    training_seconds: float = 0.0
    epoch_losses: list[float] = dataclasses.field(default_factory=list)  # mean training loss of each finished epoch
    finished: bool = False  # the stage ended and its best weights are in the model

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches_done = 0
        self.epoch_loss_sum = 0.0

    @property
    def order(self) -> tuple[int, bool, int]:
        """Sorts checkpoints by how far training had got."""
        return STAGES.index(self.stage), self.finished, self.global_step

    def record_validation(self, metrics: dict[str, float], early_stopping_patience: int) -> bool:
        """Keep `metrics` if they beat the best epoch on `SELECTION_METRIC`; stop after `patience` evaluations without.

        Returns whether this epoch is the new best, i.e. whether its weights must be kept.
        A patience of 0 never stops early.
        """
        if metrics[SELECTION_METRIC] > self.best_metrics[SELECTION_METRIC]:
            self.best_metrics = {**metrics, "epoch": self.epoch}
            self.evaluations_without_gain = 0
            return True
        self.evaluations_without_gain += 1
        if early_stopping_patience and self.evaluations_without_gain >= early_stopping_patience:
            logger.info("%s: early stop after epoch %d (best epoch %d).", self.stage, self.epoch, self.best_metrics["epoch"])
            self.finished = True
        return False


def format_metrics(metrics: dict[str, float]) -> str:
    """One log line's worth of validation metrics (the user count and epoch are bookkeeping, not metrics)."""
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key not in ("num_users", "epoch"))
