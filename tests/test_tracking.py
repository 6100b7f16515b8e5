"""training.report_to: Accelerate's trackers get the config and every epoch's loss and validation metrics."""

from __future__ import annotations

import pytest
from accelerate.tracking import GeneralTracker

from llmrec.config import ConfigError, load_config
from llmrec.training import tracking


class RecordingTracker(GeneralTracker):
    """A tracker that keeps what Accelerate hands it, in place of TensorBoard or W&B."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.hyperparameters: dict = {}
        self.points: list[tuple[int, dict]] = []

    @property
    def tracker(self) -> "RecordingTracker":
        return self

    def store_init_configuration(self, values: dict) -> None:
        self.hyperparameters = dict(values)

    def log(self, values: dict, step=None, **kwargs) -> None:
        self.points.append((step, dict(values)))


def test_a_run_reports_its_config_and_each_epochs_loss_and_metrics(monkeypatch, tmp_path, planted_data_dir, tiny_encoder_dir):
    from conftest import tiny_overrides

    from llmrec.finetune import run_finetune

    recorder = RecordingTracker()
    monkeypatch.setattr("llmrec.training.pipeline.tracking_arguments", lambda config: {"log_with": [recorder]})
    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "run")
    overrides["training"].update({"retrieval_epochs": 2, "rerank_epochs": 1})
    run_finetune(load_config(overrides=overrides))

    assert recorder.hyperparameters["training.retrieval_epochs"] == 2
    assert recorder.hyperparameters["model.hidden_size"] == 32
    assert recorder.hyperparameters["evaluation.ks"] == "[10, 20]"  # lists become text: trackers take scalars
    by_stage: dict[str, dict[int, dict]] = {}
    for step, values in recorder.points:
        for key, value in values.items():
            stage, name = key.split("/")
            by_stage.setdefault(stage, {}).setdefault(step, {})[name] = value
    assert sorted(by_stage) == ["rerank", "retrieval"]
    assert {1, 2} <= set(by_stage["retrieval"]) and 1 in by_stage["rerank"]
    for stage, epochs in (("retrieval", (1, 2)), ("rerank", (1,))):
        for epoch in epochs:
            point = by_stage[stage][epoch]
            assert point["loss"] > 0
            assert 0 <= point["valid_ndcg@10"] <= point["valid_hr@10"] <= 1


def test_report_to_names_a_known_tracker_that_is_installed(monkeypatch):
    with pytest.raises(ConfigError, match=r"training.report_to must be one of \['none', 'tensorboard'"):
        load_config(overrides=["--training.report_to", "neptune"])
    monkeypatch.setitem(tracking.TRACKER_AVAILABLE, "wandb", lambda: False)
    with pytest.raises(ConfigError, match=r"needs the wandb package; `pip install wandb`"):
        tracking.check_tracker("wandb")
    tracking.check_tracker("none")
    monkeypatch.setitem(tracking.TRACKER_AVAILABLE, "wandb", lambda: True)
    tracking.check_tracker("wandb")
    config = load_config(overrides=["--training.report_to", "tensorboard", "--output_dir", "runs/x"])
    arguments = tracking.tracking_arguments(config)
    assert arguments["log_with"] == "tensorboard"
    assert arguments["project_config"].logging_dir.endswith("runs/x/logs")
    assert tracking.tracking_arguments(load_config()) == {}
