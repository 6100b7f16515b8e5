"""Experiment tracking through Accelerate's trackers (`training.report_to`): hyperparameters once, then the
loss and validation metrics of every epoch, so a user can watch a run in TensorBoard, W&B, MLflow or Trackio."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from accelerate import Accelerator
from accelerate import utils as accelerate_utils
from accelerate.utils import ProjectConfiguration

from ..config import ConfigError, ExperimentConfig

PROJECT_NAME = "llmrec"
LOGGING_FOLDER = "logs"  # under output_dir, for trackers that write locally (TensorBoard); a save keeps it
# The trackers `training.report_to` names, each with the Accelerate check that its package is installed.
TRACKER_AVAILABLE: dict[str, Callable[[], bool]] = {
    "tensorboard": accelerate_utils.is_tensorboard_available,
    "wandb": accelerate_utils.is_wandb_available,
    "mlflow": accelerate_utils.is_mlflow_available,
    "trackio": accelerate_utils.is_trackio_available,
}


def check_tracker(report_to: str) -> None:
    """Refuse a tracker whose package is missing before training starts (Accelerate would only warn)."""
    if report_to != "none" and not TRACKER_AVAILABLE[report_to]():
        raise ConfigError(f"training.report_to {report_to!r} needs the {report_to} package; "
                          f"`pip install {report_to}`, or set training.report_to none.")


def tracking_arguments(config: ExperimentConfig) -> dict[str, Any]:
    """Keyword arguments of `Accelerator` for `training.report_to` (none: no tracker at all)."""
    report_to = config.training.report_to
    if report_to == "none":
        return {}
    folder = Path(config.output_dir)
    return {"log_with": report_to,
            "project_config": ProjectConfiguration(project_dir=str(folder), logging_dir=str(folder / LOGGING_FOLDER))}


def start_tracking(accelerator: Accelerator, config: ExperimentConfig) -> None:
    """Open the run in every tracker with the whole config as flat hyperparameters (`training.seed`, ...)."""
    if accelerator.log_with:  # the trackers Accelerate kept from `log_with`
        accelerator.init_trackers(PROJECT_NAME, config=flat_hyperparameters(config.to_dict()))


def log_epoch(accelerator: Accelerator, stage: str, epoch: int, loss: Optional[float], metrics: dict[str, Any]) -> None:
    """One point per epoch and stage: `retrieval/loss`, `retrieval/valid_ndcg@10`, ... (a no-op without trackers)."""
    values = {f"{stage}/valid_{name}": value for name, value in metrics.items() if isinstance(value, (int, float))}
    if loss is not None:
        values[f"{stage}/loss"] = loss
    values.pop(f"{stage}/valid_epoch", None)
    accelerator.log(values, step=epoch)


def flat_hyperparameters(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config values as `section.field` keys; trackers take only numbers, strings and booleans."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_hyperparameters(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
