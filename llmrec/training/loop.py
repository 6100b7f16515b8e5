"""The training loop every stage shares (towers, head, profile fit), with its checkpoints and resuming.

`StageLoop._fit` runs one stage: mixed precision and gradient accumulation through Accelerate, a
checkpoint every `training.checkpoint_every_steps` optimizer steps, validation every
`eval_every_epochs` epochs, early stopping on validation NDCG@10, and the best weights put back at the end.

Resuming from a checkpoint continues the interrupted run exactly: the data order depends only on (seed,
stage, epoch), the batches already seen are skipped, and nothing between the restored RNG state and the
next batch draws from the global RNG.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from accelerate import Accelerator
from accelerate.utils import SAFE_WEIGHTS_NAME
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import ExperimentConfig
from ..modeling import LlmRecModel
from ..modeling.task_models import LlmRecTaskModel
from .checkpoints import (
    BEST_STATE_NAME, check_rng_restored, check_task_model_weights, checkpoint_root, clear_stale_checkpoints,
    read_trainer_state, save_checkpoint,
)
from .progress import STAGES, TrainingProgress, format_metrics
from .resume_checks import check_resumable, check_same_run_setup
from .tracking import log_epoch

logger = logging.getLogger(__name__)


class StageLoop:
    """Epochs, checkpoints, validation and best-weight tracking for the stages of `LlmRecTrainer`.

    A base class so the loop can be read on its own. The subclass sets `model` (the `LlmRecModel` every stage
    trains), `config` and `accelerator` (and whatever `data_fingerprint` reads) before calling `__init__`, and
    provides `data_fingerprint`, `refresh_item_cache()`, `_task_model()` and `_optimizers()`.
    Each stage trains through its own task model (`LlmRecForRetrieval`, `LlmRecForReranking`,
    `LlmRecForProfiles`) around that one model; best weights are kept under the model's own parameter names, checkpoints under the task's.
    """

    model: LlmRecModel
    config: ExperimentConfig
    accelerator: Accelerator
    data_fingerprint: str

    def __init__(self, resume_from: Optional[Union[str, Path]] = None, resume_ignore_rng: bool = False) -> None:
        self.checkpoint_dir = checkpoint_root(self.config)
        self.timings: dict[str, float] = {}
        self.finished_stages: dict[str, dict] = {}  # stage -> its best valid metrics
        self.epoch_losses: dict[str, list[float]] = {}  # stage -> the mean training loss of each of its epochs
        self._collate_position = (1, 0)  # (epoch, batch) of the next batch the loader collates
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.resume_ignore_rng = resume_ignore_rng
        self.resumed: Optional[TrainingProgress] = None
        if self.resume_from is not None:
            self._read_resume_point()
        if self.accelerator.is_main_process:
            clear_stale_checkpoints(
                self.checkpoint_dir,
                remove_earlier_run=self.resume_from is None and bool(self.config.training.checkpoint_every_steps),
            )

    def refresh_item_cache(self) -> None:
        """Called whenever stage-1 weights change (best weights restored, validation): re-encode what depends on them."""
        raise NotImplementedError

    def _task_model(self, stage: str) -> LlmRecTaskModel:
        """The training mode of `stage` around `self.model`: its forward computes the stage's loss."""
        raise NotImplementedError

    def _optimizers(self, stage: str, parameters: list[nn.Parameter], learning_rate: float) -> list[torch.optim.Optimizer]:
        raise NotImplementedError

    def _fit(self, stage: str, loader: DataLoader, epochs: int, learning_rate: float, evaluate: Callable[[], dict]) -> dict:
        """Train `stage` for up to `epochs` epochs (or finish it from the checkpoint); returns its best valid metrics."""
        if self.resumed is not None and STAGES.index(self.resumed.stage) > STAGES.index(stage):
            return self._restore_finished_stage(stage)
        started = time.perf_counter()
        settings = self.config.training
        accelerator = self.accelerator
        unwrapped = accelerator.unwrap_model(self.model)
        parameters = [parameter for parameter in unwrapped.parameters() if parameter.requires_grad]
        if not parameters or epochs == 0:
            metrics = {**evaluate(), "epoch": 0}
            logger.info("%s: nothing to train; valid %s", stage, format_metrics(metrics))
            self._record_stage(stage, metrics, time.perf_counter() - started)
            return metrics
        sampler = loader.batch_sampler
        task, *optimizers, loader = accelerator.prepare(
            self._task_model(stage), *self._optimizers(stage, parameters, learning_rate), loader
        )
        progress, best_state = self._start_stage(stage, unwrapped, evaluate)
        saved_at_end = progress.finished  # resumed from the checkpoint this stage wrote when it ended
        clock_start = started - progress.training_seconds
        while not progress.finished:
            self._train_mode(unwrapped, stage)
            sampler.epoch = progress.epoch
            self._collate_position = (progress.epoch, progress.batches_done)
            self._train_epoch(progress, task, optimizers, loader, epochs, best_state, clock_start)
            best_state = self._end_epoch(progress, best_state, unwrapped, epochs, evaluate)
        progress.training_seconds = time.perf_counter() - clock_start
        if unwrapped.item_id_embeddings is not None:
            unwrapped.item_id_embeddings.sparse = False  # full-catalogue uses after training take the dense path
        self._end_stage(progress, best_state, unwrapped, save_checkpoint=bool(settings.checkpoint_every_steps) and not saved_at_end)
        del task
        accelerator.free_memory()
        unwrapped.eval()
        return progress.best_metrics

    def _train_epoch(
        self, progress: TrainingProgress, task: nn.Module, optimizers: list, loader: DataLoader, epochs: int,
        best_state: dict[str, torch.Tensor], clock_start: float,
    ) -> None:
        """The rest of `progress.epoch`: its batches not yet trained on, a checkpoint every N optimizer steps."""
        accelerator, every_steps = self.accelerator, self.config.training.checkpoint_every_steps
        remaining = accelerator.skip_first_batches(loader, progress.batches_done) if progress.batches_done else loader
        # disable=None: a bar on a terminal, none in log files.
        bar = tqdm(
            remaining, desc=f"{progress.stage} epoch {progress.epoch}/{epochs}", leave=False, total=len(loader),
            initial=progress.batches_done, disable=None if accelerator.is_local_main_process else True,
        )
        for batch in bar:
            with accelerator.accumulate(task):
                loss = task(**batch).loss
                accelerator.backward(loss)
                for optimizer in optimizers:
                    optimizer.step()
                    optimizer.zero_grad()
            loss_value = loss.item()
            progress.epoch_loss_sum += loss_value
            progress.batches_done += 1
            if accelerator.sync_gradients:
                progress.global_step += 1
                if every_steps and progress.global_step % every_steps == 0:
                    progress.training_seconds = time.perf_counter() - clock_start
                    self._save_checkpoint(progress, best_state)
            bar.set_postfix(loss=f"{loss_value:.4f}")

    def _start_stage(
        self, stage: str, model: LlmRecModel, evaluate: Callable[[], dict]
    ) -> tuple[TrainingProgress, dict[str, torch.Tensor]]:
        """Fresh progress and best state, or those of the checkpoint being resumed if it was saved in this stage."""
        if self.resumed is not None and self.resumed.stage == stage:
            return self._load_checkpoint()
        # Epoch 0 is the starting point: a stage that never beats it on validation keeps its initial weights.
        progress = TrainingProgress(stage, best_metrics={**evaluate(), "epoch": 0})
        logger.info("%s before training: valid %s", stage, format_metrics(progress.best_metrics))
        log_epoch(self.accelerator, stage, 0, None, progress.best_metrics)
        return progress, self._trainable_state(model)

    def _end_epoch(
        self, progress: TrainingProgress, best_state: dict, model: LlmRecModel, epochs: int, evaluate: Callable[[], dict]
    ) -> dict[str, torch.Tensor]:
        """Validate (every `eval_every_epochs`), keep the best weights, decide on early stopping; returns the best state."""
        settings, stage, epoch = self.config.training, progress.stage, progress.epoch
        mean_loss = progress.epoch_loss_sum / progress.batches_done if progress.batches_done else math.nan
        progress.epoch_losses.append(mean_loss)
        progress.finished = epoch >= epochs
        if epoch % settings.eval_every_epochs and not progress.finished:
            logger.info("%s epoch %d: loss %.4f", stage, epoch, mean_loss)
            log_epoch(self.accelerator, stage, epoch, mean_loss, {})
            progress.next_epoch()
            return best_state
        if stage == "retrieval":
            self.refresh_item_cache()
        metrics = evaluate()
        logger.info("%s epoch %d: loss %.4f, valid %s", stage, epoch, mean_loss, format_metrics(metrics))
        log_epoch(self.accelerator, stage, epoch, mean_loss, metrics)
        if progress.record_validation(metrics, settings.early_stopping_patience):
            best_state = self._trainable_state(model)
        if not progress.finished:
            progress.next_epoch()
        return best_state

    def _end_stage(
        self, progress: TrainingProgress, best_state: dict[str, torch.Tensor], model: LlmRecModel, save_checkpoint: bool
    ) -> None:
        """Put the best weights back; once they are in a checkpoint, a kill in the next stage does not train this one again."""
        model.load_state_dict(best_state, strict=False)
        self.epoch_losses[progress.stage] = progress.epoch_losses
        if progress.stage == "retrieval":
            self.refresh_item_cache()
        self._record_stage(progress.stage, progress.best_metrics, progress.training_seconds)
        if save_checkpoint:
            self._save_checkpoint(progress, best_state)

    def _record_stage(self, stage: str, best_metrics: dict, seconds: float) -> None:
        self.finished_stages[stage] = best_metrics
        self.timings[f"{stage}_training_seconds"] = seconds

    @staticmethod
    def _trainable_state(model: LlmRecModel) -> dict[str, torch.Tensor]:
        return {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}

    @staticmethod
    def _train_mode(model: LlmRecModel, stage: str) -> None:
        # Later stages read frozen towers: keep their dropout (and ID dropout) off while the head trains.
        if stage == "retrieval":
            model.train()
        else:
            model.eval()
            if stage == "rerank":
                model.reranker.train()

    # ----- checkpoints -------------------------------------------------------------------------------

    def _save_checkpoint(self, progress: TrainingProgress, best_state: dict[str, torch.Tensor]) -> None:
        """Accelerate state plus the loop's progress (see `checkpoints.save_checkpoint`).

        A kill mid-save leaves only a hidden staging folder, which resuming ignores and the next run clears.
        """
        name = f"{progress.stage}-done" if progress.finished else f"{progress.stage}-step-{progress.global_step}"
        save_checkpoint(self.accelerator, self.checkpoint_dir, name, best_state, self._trainer_state(progress))

    def _trainer_state(self, progress: TrainingProgress) -> dict[str, Any]:
        return {
            "progress": dataclasses.asdict(progress),
            "finished_stages": self.finished_stages,
            "timings": self.timings,
            "epoch_losses": self.epoch_losses,
            "num_processes": self.accelerator.num_processes,
            "data_fingerprint": self.data_fingerprint,
            "config": self.config.to_dict(),
        }

    def _read_resume_point(self) -> None:
        trainer_state = read_trainer_state(self.resume_from)
        check_resumable(trainer_state, self.config, self.resume_from)
        check_same_run_setup(trainer_state, self.resume_from, self.data_fingerprint, self.accelerator.num_processes)
        self.resumed = TrainingProgress(**trainer_state["progress"])
        self.finished_stages = trainer_state["finished_stages"]
        self.timings = trainer_state["timings"]
        self.epoch_losses = trainer_state.get("epoch_losses", {})  # absent from checkpoints of earlier releases
        where = "its end" if self.resumed.finished else f"epoch {self.resumed.epoch}, batch {self.resumed.batches_done}"
        logger.info("Resuming from %s: stage %s at %s.", self.resume_from, self.resumed.stage, where)

    def _load_checkpoint(self) -> tuple[TrainingProgress, dict[str, torch.Tensor]]:
        """Model, optimizer, RNG states and loop progress of the stage the checkpoint was saved in."""
        check_task_model_weights(self.resume_from, f"{LlmRecTaskModel.base_model_prefix}.")
        self.accelerator.load_state(str(self.resume_from))
        check_rng_restored(self.resume_from, self.accelerator.process_index, self.resume_ignore_rng)
        device = self.accelerator.device
        best_state = {key: value.to(device) for key, value in load_file(self.resume_from / BEST_STATE_NAME).items()}
        progress, self.resumed = self.resumed, None  # later stages start afresh
        return progress, best_state

    def _restore_finished_stage(self, stage: str) -> dict[str, float]:
        """A checkpoint of a later stage holds this stage's final weights (and item cache): load them, do not train."""
        state = load_file(self.resume_from / SAFE_WEIGHTS_NAME)
        consume_prefix_in_state_dict_if_present(state, "module.")  # saved from the DDP-wrapped task model
        consume_prefix_in_state_dict_if_present(state, f"{LlmRecTaskModel.base_model_prefix}.")  # the task's LlmRecModel
        model = self.accelerator.unwrap_model(self.model)
        if any(name.startswith("profile_projection.") for name in state):
            model.enable_user_profiles()  # the checkpoint is from the profile fit, which adds that path
        model.load_state_dict(state)
        model.eval()  # as a trained stage leaves it: the next stage retrieves its candidates without dropout
        logger.info("%s: finished in checkpoint %s; not training it again.", stage, self.resume_from)
        return self.finished_stages[stage]
