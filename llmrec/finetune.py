"""One fine-tuning run from config to saved model folder: train (`llmrec.training`), evaluate every system
(`llmrec.evaluation`), then save a `Recommender` with its index, `eval_results.json` and model card.

It sits above the recommender because it ends in one; `llmrec.training.run_finetune` still reaches it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

from .config import ExperimentConfig
from .errors import ModelFolderError
from .evaluation import evaluate_systems, split_evaluations
from .recommender import Recommender
from .retrieval import CandidatePipeline
from .training.pipeline import TrainedModel, TrainingSetup, prepare_training, train_model

logger = logging.getLogger(__name__)


def run_finetune(
    config: ExperimentConfig, resume_from: Optional[str] = None, resume_ignore_rng: bool = False
) -> dict[str, Any]:
    """Train both stages, evaluate popularity / retrieval / rerank, and save everything to `output_dir`.

    `resume_from` continues an interrupted run from a checkpoint folder, or from the most advanced one in
    `<output_dir>/checkpoints` if it is "latest" (the newest intact one; a broken one is skipped with a warning);
    the config must match the checkpoint's (ConfigError otherwise). Random states that cannot be restored are a
    ConfigError too, since the run would then not reproduce an uninterrupted one, unless `resume_ignore_rng`.

    With `training.init_from`, training continues the saved model in that folder on this data instead of
    starting from the bare encoder (`continuation`: its items keep their indices, new items are added).

    With `model.use_user_profiles`, the profile projection is fitted after both stages (towers and head
    frozen, `training.profile_*`) on the users' profile texts, and a split with cold examples is evaluated
    three ways: `cold_test` (their history alone, as without profiles), `cold_test_with_profile` (history +
    profile) and, for `cold_users`, `cold_test_profile_only` (the cold users that have a profile, no history).
    """
    started = time.perf_counter()
    # Before any data is loaded, so a bad setting or a missing or mismatched checkpoint fails at once.
    setup = prepare_training(config, resume_from, resume_ignore_rng)
    loading_started = time.perf_counter()
    saved = load_init_folder(config) if config.training.init_from is not None else None
    loading_seconds = time.perf_counter() - loading_started
    trained = train_model(config, setup, saved)
    trained.timings["data_seconds"] += loading_seconds  # opening the folder to continue is part of the data stage

    stage_start = time.perf_counter()
    pipeline = trained.trainer.candidate_pipeline(serving_index=True)
    split = trained.split
    results: dict[str, Any] = evaluate_systems(
        split_evaluations(split, pipeline, trained.popularity, trained.profile_embeddings, trained.has_profile),
        split.num_items, ks=config.evaluation.ks, batch_size=config.evaluation.batch_size, accelerator=setup.accelerator,
        item_text_embeddings=pipeline.item_text_embeddings, item_popularity=trained.popularity,
    )
    trained.timings["evaluation_seconds"] = time.perf_counter() - stage_start

    accelerator = setup.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained.timings["total_seconds"] = time.perf_counter() - started  # up to saving, which records these numbers
        results.update(_run_record(config, setup, trained, saved))
        _save(config, trained, pipeline, results)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def load_init_folder(config: ExperimentConfig) -> Recommender:
    """The saved model to continue (checked: every file's checksum, weights against config.json)."""
    folder = Path(config.training.init_from).expanduser()
    try:
        return Recommender.from_pretrained(folder)
    except ModelFolderError as error:
        raise ModelFolderError(f"training.init_from {folder} cannot be loaded: {error}") from None


def _run_record(
    config: ExperimentConfig, setup: TrainingSetup, trained: TrainedModel, saved: Optional[Recommender]
) -> dict[str, Any]:
    """What eval_results.json records beside the metrics: best epochs, losses, timings, processes, config."""
    split = trained.split
    return {
        "best_valid_epochs": trained.best_valid_epochs,
        **({"profile_training_losses": trained.profile_losses} if trained.profile_losses is not None else {}),
        "timings": trained.timings,
        "num_processes": setup.accelerator.num_processes,
        **({"init_from": {"folder": str(config.training.init_from), "items_kept": len(saved.item_ids),
                          "items_added": split.num_items - len(saved.item_ids)}} if saved is not None else {}),
        "config": config.to_dict(),
    }


def _save(config: ExperimentConfig, trained: TrainedModel, pipeline: CandidatePipeline, results: dict[str, Any]) -> None:
    """One atomic folder: model (a LoRA-tuned encoder as its adapter), index, eval_results.json, config.yaml and
    the model card rendered from them."""
    split = trained.split
    recommender = Recommender(
        trained.model.cpu(), trained.tokenizer, split.item_ids, split.item_texts, trained.popularity[1:],
        index=pipeline.index, eval_results=results, training_config=config.to_dict(),
    )
    output_dir = Path(config.output_dir)
    recommender.save_pretrained(output_dir)
    logger.info("Saved model, index, model card and eval_results.json to %s.", output_dir)
