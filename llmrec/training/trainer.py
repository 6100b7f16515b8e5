"""Two-stage training under Accelerate: stage 1 the user/item towers, stage 2 the reranking head.

Both stages share one loop (`_fit`): mixed precision, gradient accumulation, checkpoints every N steps
and early stopping on validation NDCG@10, keeping the best weights.

A checkpoint is `Accelerator.save_state` (model, optimizer, scaler, RNG states) plus `trainer_state.json`
(where the loop stands, the run's config) and `best_state.safetensors` (the best weights so far). Resuming
from one continues the interrupted run exactly: the data order depends only on (seed, stage, epoch), the
batches already seen are skipped, and nothing between the restored RNG state and the next batch draws
from the global RNG.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import OPTIMIZER_NAME, RNG_STATE_NAME, SAFE_WEIGHTS_NAME
from accelerate.utils import load as load_torch_file
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import ExperimentConfig, resumable_settings
from ..data import SequentialSplit
from ..errors import ConfigError
from ..modeling import LlmRecModel, split_histories
from ..modeling.text_encoding import encode_catalogue
from ..retrieval import CandidatePipeline, build_item_index
from ..utils.io import atomic_write, write_json_atomic
from ..utils.length_order import length_sorted_batches
from .examples import RerankExample, collate_next_item, collate_rerank, next_item_windows, rerank_prefixes
# retrieval_score_function is imported for its old path, llmrec.training.trainer.retrieval_score_function.
from .ranking import evaluate_ranking, rerank_score_function, retrieval_score_function  # noqa: F401
from .samplers import LengthGroupedBatchSampler, NegativeSampler, derived_seed

logger = logging.getLogger(__name__)

SELECTION_METRIC = "ndcg@10"
STAGES = ("retrieval", "rerank")
TRAINER_STATE_NAME = "trainer_state.json"
BEST_STATE_NAME = "best_state.safetensors"
CHECKPOINTS_KEPT = 2
# Largest full-softmax logits tensor per batch (positions x catalogue, fp32) that `loss: auto` allows: 1 GiB.
FULL_SOFTMAX_MAX_LOGITS = 2**28
# From this catalogue size on, sampled softmax updates the item ID table sparsely by default (`_optimizers`).
SPARSE_ID_GRADIENTS_MIN_ITEMS = 100_000


def log_inclusion_probability(probabilities: torch.Tensor, num_samples: int) -> torch.Tensor:
    """log P(item drawn at least once in `num_samples` draws with replacement) = log(1 - (1 - p)^n).

    This, not log p, is the logQ correction for a deduplicated sample: a popular item that is in nearly
    every sample must not be pushed down by log p (the expected-count form TensorFlow's samplers use).
    """
    return torch.log(-torch.expm1(num_samples * torch.log1p(-probabilities)))


def choose_retrieval_loss(config: ExperimentConfig, num_items: int) -> str:
    """Full softmax over the catalogue where it fits and the item cache is fixed; sampled softmax otherwise.

    With LoRA the item side changes every step, and scoring the whole catalogue would mean re-encoding it.
    """
    if config.training.loss != "auto":
        return config.training.loss
    logits_per_batch = config.training.retrieval_batch_size * config.model.max_history_length * (num_items + 1)
    if config.lora is not None or logits_per_batch > FULL_SOFTMAX_MAX_LOGITS:
        return "sampled_softmax"
    return "full_softmax"


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
    finished: bool = False  # the stage ended and its best weights are in the model

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches_done = 0
        self.epoch_loss_sum = 0.0

    @property
    def order(self) -> tuple[int, bool, int]:
        """Sorts checkpoints by how far training had got."""
        return STAGES.index(self.stage), self.finished, self.global_step


def checkpoint_root(config: ExperimentConfig) -> Path:
    return Path(config.output_dir) / "checkpoints"


def read_trainer_state(checkpoint: Union[str, Path]) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))


def list_checkpoints(folder: Union[str, Path]) -> list[Path]:
    """Published checkpoints in `folder`, least advanced first; hidden staging folders of interrupted saves are not."""
    found = []
    for candidate in Path(folder).glob("[!.]*"):
        try:
            progress = TrainingProgress(**read_trainer_state(candidate)["progress"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append((progress.order, candidate))
    return [path for _, path in sorted(found)]


def find_checkpoint(config: ExperimentConfig, resume_from: Union[str, Path], ignore_rng_state: bool = False) -> Path:
    """The checkpoint to resume from, checked against `config`.

    "latest" is the most advanced intact checkpoint in `<output_dir>/checkpoints`; broken ones (see
    `checkpoint_problem`) are skipped with a warning that names them. A checkpoint given by path must be intact.
    Random states that cannot be read are a ConfigError unless `ignore_rng_state`.
    """
    if str(resume_from) == "latest":
        checkpoint = _latest_intact_checkpoint(checkpoint_root(config))
    else:
        checkpoint = Path(resume_from).expanduser()
        if not (checkpoint / TRAINER_STATE_NAME).is_file():
            raise ConfigError(
                f"{checkpoint} is not a checkpoint folder (no {TRAINER_STATE_NAME}); give one of the folders in "
                "<output_dir>/checkpoints, or resume from the latest one."
            )
        problem = checkpoint_problem(checkpoint)
        if problem:
            raise ConfigError(f"Cannot resume from {checkpoint}: it is broken ({problem}). Resume from another "
                              "checkpoint of <output_dir>/checkpoints, or from the latest intact one with --resume.")
    trainer_state = read_trainer_state(checkpoint)
    check_resumable(trainer_state, config, checkpoint)
    for process_index in range(int(trainer_state["num_processes"])):
        try:
            read_rng_state(checkpoint, process_index)
        except ConfigError as error:
            if not ignore_rng_state:
                raise
            logger.warning("%s Resuming without them, as --resume-ignore-rng asks.", error)
    return checkpoint


def _latest_intact_checkpoint(folder: Path) -> Path:
    checkpoints = list_checkpoints(folder)
    published = sorted(path for path in folder.glob("[!.]*") if path.is_dir()) if folder.is_dir() else []
    # A folder whose trainer state is unreadable cannot be ordered: it is only reported.
    broken = {path: "trainer_state.json is missing or unreadable" for path in published if path not in checkpoints}
    chosen = None
    for checkpoint in reversed(checkpoints):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            chosen = checkpoint
            break
        broken[checkpoint] = problem
    for path, problem in broken.items():
        logger.warning("Checkpoint %s is broken (%s); it is not resumed from.", path, problem)
    if chosen is None:
        found = f" ({len(broken)} broken one(s) were skipped, see the warnings)" if broken else ""
        raise ConfigError(
            f"Nothing to resume from: no intact checkpoint in {folder}{found}. Checkpoints are saved when "
            "training.checkpoint_every_steps > 0; run without resuming to start from scratch."
        )
    if broken:
        logger.warning("Resuming from %s, the most advanced intact checkpoint.", chosen)
    return chosen


def checkpoint_problem(checkpoint: Path) -> Optional[str]:
    """Why `checkpoint` cannot be resumed from, or None if it is intact.

    Intact: trainer_state.json parses into a known progress, the weights and best weights have readable
    safetensors headers whose tensors fit in the file, the optimizer state is a complete torch archive
    (its zip directory is at the end of the file, so a truncated one fails), and every process has its
    random-state file.
    """
    try:
        trainer_state = read_trainer_state(checkpoint)
        TrainingProgress(**trainer_state["progress"])
        num_processes = int(trainer_state["num_processes"])
        for key in ("config", "finished_stages", "timings", "data_fingerprint"):
            trainer_state[key]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{TRAINER_STATE_NAME} is unreadable: {_first_line(error)}"
    for name in (SAFE_WEIGHTS_NAME, BEST_STATE_NAME):
        problem = _safetensors_problem(checkpoint / name)
        if problem:
            return problem
    optimizer_file = checkpoint / f"{OPTIMIZER_NAME}.bin"
    if not zipfile.is_zipfile(optimizer_file):
        return f"{optimizer_file.name} is missing or truncated"
    missing = [name for name in (_rng_file_name(index) for index in range(num_processes)) if not (checkpoint / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    return None


def _safetensors_problem(path: Path) -> Optional[str]:
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()  # the header; safe_open also checks that every tensor's bytes lie inside the file
    except Exception as error:  # SafetensorError and OSError: the file is truncated or garbled
        return f"{path.name} is unreadable ({_first_line(error)})"
    return None


def _first_line(error: BaseException, width: int = 120) -> str:
    """Torch's load errors run to a page of advice; a log line or error message needs their first line."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= width else text[: width - 1] + "…"


def _rng_file_name(process_index: int) -> str:
    return f"{RNG_STATE_NAME}_{process_index}.pkl"


def read_rng_state(checkpoint: Path, process_index: int) -> dict[str, Any]:
    """The random states `Accelerator.save_state` wrote for one process, or a ConfigError saying why not.

    Accelerate's `load_state` only logs when it cannot restore them, and the resumed run would then draw
    other dropout masks and negatives than the interrupted one, so they are read here first. The file is
    the user's own training output, written by `Accelerator.save_state` with torch.save; it is read as
    `load_state` reads it (accelerate's `load`, i.e. torch.load with weights_only=True), which runs no code.
    """
    path = checkpoint / _rng_file_name(process_index)
    try:
        states = load_torch_file(path)
        required = ("random_state", "numpy_random_seed", "torch_manual_seed")
        if not isinstance(states, dict) or any(key not in states for key in required):
            raise ValueError(f"it lacks {', '.join(key for key in required if not isinstance(states, dict) or key not in states)}")
        if not isinstance(states["torch_manual_seed"], torch.Tensor):
            raise ValueError("torch_manual_seed is not a tensor")
    except Exception as error:  # truncated, garbled or foreign: any failure means the states are lost
        raise ConfigError(
            f"The random states of checkpoint {checkpoint} ({path.name}) cannot be read ({_first_line(error)}), so the resumed run "
            "would not reproduce an uninterrupted one. Resume from an older checkpoint (--resume CHECKPOINT), or "
            "pass --resume-ignore-rng to resume anyway."
        ) from None
    return states


def check_resumable(trainer_state: dict[str, Any], config: ExperimentConfig, checkpoint: Path) -> None:
    """Refuse a checkpoint whose run had other data, model or training settings than `config`."""
    saved, current = _flatten(trainer_state["config"]), _flatten(config.to_dict())
    resumable = resumable_settings()  # declared on the config fields ("resumable" metadata)
    # A setting added to llmrec after the checkpoint was written had its default value in that run.
    defaults = _flatten(ExperimentConfig().to_dict())
    saved.update({name: defaults[name] for name in current.keys() - saved.keys() if name in defaults})
    differences = [
        f"{name}: {_shown(saved, name)} in the checkpoint, {_shown(current, name)} now"
        for name in sorted(set(saved) | set(current))
        if name not in resumable and (name in saved, saved.get(name)) != (name in current, current.get(name))
    ]
    if differences:
        raise ConfigError(
            f"Cannot resume from {checkpoint}: its run used a different configuration ({'; '.join(differences)}). "
            "Resume with the settings the checkpoint was trained with, or start a new run."
        )


def _shown(values: dict[str, Any], name: str) -> str:
    return repr(values[name]) if name in values else "not set"


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def data_fingerprint(split: SequentialSplit) -> str:
    """A hash of the catalogue, the training sequences and the evaluation examples: same config, changed files."""
    content = [split.item_ids, split.item_texts, split.user_ids, split.train_sequences]
    for examples in (split.valid, split.test):
        content += [examples.user_indices, examples.histories, examples.targets]
    encoded = json.dumps(content, default=lambda value: value.tolist()).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


class LlmRecTrainer:
    """Trains an `LlmRecModel` on a `SequentialSplit`.

    With a frozen encoder the catalogue is encoded once and the towers train on cached text embeddings
    with a full softmax over the catalogue. With LoRA, each step re-encodes only the (deduplicated)
    items its batch touches and trains with a sampled softmax.

    `resume_from` (a checkpoint folder, see `find_checkpoint`) continues an interrupted run: stages the
    checkpoint had finished are not trained again, and the stage it was in goes on from its next batch.
    """

    def __init__(
        self,
        model: LlmRecModel,
        split: SequentialSplit,
        config: ExperimentConfig,
        accelerator: Accelerator,
        tokenized_items: dict[str, torch.Tensor],
        resume_from: Optional[Union[str, Path]] = None,
        resume_ignore_rng: bool = False,
    ) -> None:
        self.model = model
        self.split = split
        self.config = config
        self.accelerator = accelerator
        self.tokenized_items = tokenized_items
        self.encoder_trainable = config.lora is not None
        self.loss_type = choose_retrieval_loss(config, split.num_items)
        popularity = torch.as_tensor(split.item_popularity(), dtype=torch.float)
        # Negatives are drawn in proportion to popularity (+1 so unseen items can be drawn); logQ
        # subtracts the log of each item's chance to be in the sample, so the sampled softmax estimates the full one.
        self.sampling_probabilities = (popularity + 1).index_fill(0, torch.tensor([0]), 0.0)
        self.sampling_probabilities /= self.sampling_probabilities.sum()
        self.negative_sampler = NegativeSampler(self.sampling_probabilities)
        self.checkpoint_dir = checkpoint_root(config)
        self.timings: dict[str, float] = {}
        self.finished_stages: dict[str, dict] = {}  # stage -> its best valid metrics
        self._collate_position = (1, 0)  # (epoch, batch) of the next batch the loader collates
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.resume_ignore_rng = resume_ignore_rng
        self.resumed: Optional[TrainingProgress] = None
        if self.resume_from is not None:
            self._read_resume_point()
        self._clear_stale_checkpoints()

    @functools.cached_property
    def data_fingerprint(self) -> str:
        return data_fingerprint(self.split)

    # ----- stage 1 -----------------------------------------------------------------------------------

    def train_retrieval(self) -> dict[str, float]:
        """Stage 1: next-item prediction over whole histories; returns the best validation metrics."""
        settings = self.config.training
        self._set_trainable(lambda name: not name.startswith("reranker."))
        max_length = self.model.config.max_history_length
        windows = next_item_windows(self.split.train_sequences, max_length, keep_older=self.model.config.history_summary)
        # A window's padded width and its number of targets (the loss terms) are both its inputs in the window.
        positions = [min(len(window) - 1, max_length) for window in windows]
        loader = self._shuffled_loader(
            "retrieval", windows, settings.retrieval_batch_size,
            lambda batch: self._with_item_inputs(collate_next_item(batch, max_length)), positions, loss_terms=positions,
        )
        logger.info("Stage 1: %d training windows, loss %s.", len(windows), self.loss_type)
        return self._fit(
            "retrieval", loader, settings.retrieval_epochs, settings.retrieval_learning_rate, self.evaluate_retrieval_valid
        )

    def _with_item_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add sampled negatives and, when the encoder trains, the texts of the items this batch touches."""
        if self.loss_type == "sampled_softmax":
            targets = batch["target_item_indices"]
            negatives = self.negative_sampler.draw(self.config.training.num_sampled_negatives, self._negatives_generator())
            sampled = torch.unique(torch.cat([targets[targets > 0], negatives]))
            batch["sampled_item_indices"] = sampled
            batch["sampled_log_q"] = log_inclusion_probability(
                self.sampling_probabilities[sampled], self.config.training.num_sampled_negatives
            )
        if self.encoder_trainable:
            touched = [batch["history_item_indices"].flatten(), batch["target_item_indices"].flatten()]
            for name in ("sampled_item_indices", "older_item_indices"):
                if name in batch:
                    touched.append(batch[name].flatten())
            items = torch.unique(torch.cat(touched))
            items = items[items > 0]
            width = int(self.tokenized_items["attention_mask"][items].sum(dim=1).max())
            batch["text_inputs"] = {
                "item_indices": items,
                "input_ids": self.tokenized_items["input_ids"][items, :width],
                "attention_mask": self.tokenized_items["attention_mask"][items, :width],
            }
        return batch

    def _negatives_generator(self) -> torch.Generator:
        """Seeded per (epoch, batch, process), not drawn from the global RNG.

        The loader collates one batch ahead of training, so global-RNG draws here would sit on the other
        side of a checkpoint than the batch they belong to, and a resumed run would draw other negatives.
        """
        epoch, batch = self._collate_position
        self._collate_position = (epoch, batch + 1)
        seed = derived_seed(self.config.training.seed, STAGES.index("retrieval"), epoch, batch, self.accelerator.process_index)
        return torch.Generator().manual_seed(seed)

    def refresh_item_cache(self) -> None:
        """Re-encode the catalogue when the encoder has changed (LoRA); free with a frozen encoder."""
        if self.encoder_trainable:
            encode_catalogue(
                self.accelerator.unwrap_model(self.model), self.tokenized_items, self.config.training.encode_batch_size,
                show_progress=self.accelerator.is_local_main_process,
                precision="bf16" if self.config.training.mixed_precision == "bf16" else "fp32",
                accelerator=self.accelerator,
            )

    # ----- stage 2 -----------------------------------------------------------------------------------

    def train_reranker(self) -> dict[str, float]:
        """Stage 2: listwise softmax over FAISS candidates (hard negatives) of recent training positions."""
        settings = self.config.training
        self._set_trainable(lambda name: name.startswith("reranker."))
        pipeline = self.candidate_pipeline()
        histories, targets = rerank_prefixes(self.split.train_sequences, settings.rerank_positions_per_user)
        # An item without training interactions is never a stage-2 target, so in the candidate lists it would
        # only ever be a negative and the head would learn to bury it: exactly the new items it must rank.
        # Like the stage-1 softmax (`exclude_unseen_items_from_loss`), the lists leave such items out.
        model = self.accelerator.unwrap_model(self.model)
        allowed = None
        if model.config.exclude_unseen_items_from_loss and model.warm_items.any():
            allowed = torch.nonzero(model.warm_items).flatten().cpu().numpy()
        max_length = self.model.config.max_history_length
        candidates = self._stage2_candidates(pipeline, histories, allowed)
        examples = []
        for history, target, row in zip(histories, targets, candidates):
            hit = np.flatnonzero(row == target)
            # A target the retriever missed teaches the head nothing it can use at serving time.
            if hit.size:
                examples.append(RerankExample(history, row, int(hit[0])))
        logger.info("Stage 2: %d of %d positions have their next item among the candidates.", len(examples), len(histories))
        loader = self._shuffled_loader(
            "rerank", examples, settings.rerank_batch_size, lambda batch: collate_rerank(batch, max_length),
            [min(len(example.history), max_length) for example in examples],
        )
        return self._fit("rerank", loader, settings.rerank_epochs, settings.rerank_learning_rate, self.evaluate_rerank_valid)

    # ----- shared loop -------------------------------------------------------------------------------

    def _stage2_candidates(
        self, pipeline: CandidatePipeline, histories: list[list[int]], allowed: Optional[np.ndarray]
    ) -> list[np.ndarray]:
        """FAISS candidates of every history, in their order; batched by length so each batch pads only to its longest."""
        candidates: list[Optional[np.ndarray]] = [None] * len(histories)
        for positions in length_sorted_batches([len(history) for history in histories], self.config.evaluation.batch_size):
            _, rows = pipeline.retrieve([histories[position] for position in positions], allowed=allowed)
            for position, row in zip(positions, rows):
                candidates[position] = row
        return candidates

    def _shuffled_loader(
        self, stage: str, examples: list, batch_size: int, collate: Callable, lengths: Sequence[int],
        loss_terms: Optional[Sequence[int]] = None,
    ) -> DataLoader:
        """Seeded batches (`LengthGroupedBatchSampler`; of similar lengths with `training.group_by_length`), each
        padded to its own longest."""
        seed = derived_seed(self.config.training.seed, STAGES.index(stage))
        # Its own generator, so that starting an epoch (the loader draws a worker base seed) leaves the global RNG alone.
        return DataLoader(
            examples,
            batch_sampler=LengthGroupedBatchSampler(
                lengths, batch_size, seed, loss_terms, group_by_length=self.config.training.group_by_length
            ),
            collate_fn=collate,
            generator=torch.Generator().manual_seed(seed),
        )

    def _set_trainable(self, is_trainable: Callable[[str], bool]) -> None:
        """Freeze all but `is_trainable` parameters; encoder weights train only through LoRA adapters."""
        for name, parameter in self.accelerator.unwrap_model(self.model).named_parameters():
            parameter.requires_grad_(is_trainable(name) and ("lora_" in name or "item_encoder." not in name))

    def _fit(self, stage: str, loader: DataLoader, epochs: int, learning_rate: float, evaluate: Callable[[], dict]) -> dict:
        if self.resumed is not None and STAGES.index(self.resumed.stage) > STAGES.index(stage):
            return self._restore_finished_stage(stage)
        started = time.perf_counter()
        settings = self.config.training
        accelerator = self.accelerator
        unwrapped = accelerator.unwrap_model(self.model)
        parameters = [parameter for parameter in unwrapped.parameters() if parameter.requires_grad]
        if not parameters or epochs == 0:
            metrics = {**evaluate(), "epoch": 0}
            logger.info("%s: nothing to train; valid %s", stage, _format(metrics))
            self._record_stage(stage, metrics, time.perf_counter() - started)
            return metrics
        sampler = loader.batch_sampler
        model, *optimizers, loader = accelerator.prepare(self.model, *self._optimizers(stage, parameters, learning_rate), loader)
        progress, best_state = self._start_stage(stage, unwrapped, evaluate)
        saved_at_end = progress.finished  # resumed from the checkpoint this stage wrote when it ended
        clock_start = started - progress.training_seconds
        while not progress.finished:
            self._train_mode(unwrapped, stage)
            sampler.epoch = progress.epoch
            self._collate_position = (progress.epoch, progress.batches_done)
            remaining = accelerator.skip_first_batches(loader, progress.batches_done) if progress.batches_done else loader
            # disable=None: a bar on a terminal, none in log files.
            bar = tqdm(
                remaining, desc=f"{stage} epoch {progress.epoch}/{epochs}", leave=False, total=len(loader),
                initial=progress.batches_done, disable=None if accelerator.is_local_main_process else True,
            )
            for batch in bar:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    for optimizer in optimizers:
                        optimizer.step()
                        optimizer.zero_grad()
                loss_value = loss.item()
                progress.epoch_loss_sum += loss_value
                progress.batches_done += 1
                if accelerator.sync_gradients:
                    progress.global_step += 1
                    if settings.checkpoint_every_steps and progress.global_step % settings.checkpoint_every_steps == 0:
                        progress.training_seconds = time.perf_counter() - clock_start
                        self._save_checkpoint(progress, best_state)
                bar.set_postfix(loss=f"{loss_value:.4f}")
            best_state = self._end_epoch(progress, best_state, unwrapped, epochs, evaluate)
        progress.training_seconds = time.perf_counter() - clock_start
        if unwrapped.item_id_embeddings is not None:
            unwrapped.item_id_embeddings.sparse = False  # full-catalogue uses after training take the dense path
        self._end_stage(progress, best_state, unwrapped, save_checkpoint=bool(settings.checkpoint_every_steps) and not saved_at_end)
        self.model = accelerator.unwrap_model(model)
        accelerator.free_memory()
        unwrapped.eval()
        return progress.best_metrics

    def _optimizers(self, stage: str, parameters: list[nn.Parameter], learning_rate: float) -> list[torch.optim.Optimizer]:
        """AdamW; with sparse ID gradients (`use_sparse_id_gradients`), SparseAdam for the item ID table beside it.

        AdamW moves every row of a dense table at every step (its moments are never zero again), which at
        1M items costs more than the rest of the step; SparseAdam updates only the rows the step touched.
        """
        weight_decay = self.config.training.weight_decay
        id_table = self.accelerator.unwrap_model(self.model).item_id_embeddings
        sparse = stage == "retrieval" and self.use_sparse_id_gradients and id_table is not None and id_table.weight.requires_grad
        if id_table is not None:
            id_table.sparse = sparse  # a training-time switch only: not in the state dict or config.json
        if not sparse:
            return [torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)]
        if weight_decay:
            logger.warning("training.weight_decay does not apply to the item ID table under sparse ID gradients.")
        dense = [parameter for parameter in parameters if parameter is not id_table.weight]
        return [torch.optim.AdamW(dense, lr=learning_rate, weight_decay=weight_decay),
                torch.optim.SparseAdam([id_table.weight], lr=learning_rate)]

    @property
    def use_sparse_id_gradients(self) -> bool:
        """`training.sparse_id_gradients`, or by default: sampled softmax, a large catalogue, one process."""
        requested = self.config.training.sparse_id_gradients
        if requested is not None:
            return bool(requested) and self.loss_type == "sampled_softmax"
        return (self.loss_type == "sampled_softmax" and self.split.num_items >= SPARSE_ID_GRADIENTS_MIN_ITEMS
                and self.accelerator.num_processes == 1)

    def _start_stage(
        self, stage: str, model: LlmRecModel, evaluate: Callable[[], dict]
    ) -> tuple[TrainingProgress, dict[str, torch.Tensor]]:
        """Fresh progress and best state, or those of the checkpoint being resumed if it was saved in this stage."""
        if self.resumed is not None and self.resumed.stage == stage:
            return self._load_checkpoint()
        # Epoch 0 is the starting point: a stage that never beats it on validation keeps its initial weights.
        progress = TrainingProgress(stage, best_metrics={**evaluate(), "epoch": 0})
        logger.info("%s before training: valid %s", stage, _format(progress.best_metrics))
        return progress, self._trainable_state(model)

    def _end_epoch(
        self, progress: TrainingProgress, best_state: dict, model: LlmRecModel, epochs: int, evaluate: Callable[[], dict]
    ) -> dict[str, torch.Tensor]:
        """Validate (every `eval_every_epochs`), keep the best weights, decide on early stopping; returns the best state."""
        settings, stage, epoch = self.config.training, progress.stage, progress.epoch
        mean_loss = progress.epoch_loss_sum / progress.batches_done if progress.batches_done else math.nan
        progress.finished = epoch >= epochs
        if epoch % settings.eval_every_epochs and not progress.finished:
            logger.info("%s epoch %d: loss %.4f", stage, epoch, mean_loss)
            progress.next_epoch()
            return best_state
        if stage == "retrieval":
            self.refresh_item_cache()
        metrics = evaluate()
        logger.info("%s epoch %d: loss %.4f, valid %s", stage, epoch, mean_loss, _format(metrics))
        if metrics[SELECTION_METRIC] > progress.best_metrics[SELECTION_METRIC]:
            progress.best_metrics = {**metrics, "epoch": epoch}
            progress.evaluations_without_gain = 0
            best_state = self._trainable_state(model)
        else:
            progress.evaluations_without_gain += 1
            if settings.early_stopping_patience and progress.evaluations_without_gain >= settings.early_stopping_patience:
                logger.info("%s: early stop after epoch %d (best epoch %d).", stage, epoch, progress.best_metrics["epoch"])
                progress.finished = True
        if not progress.finished:
            progress.next_epoch()
        return best_state

    def _end_stage(
        self, progress: TrainingProgress, best_state: dict[str, torch.Tensor], model: LlmRecModel, save_checkpoint: bool
    ) -> None:
        """Put the best weights back; once they are in a checkpoint, a kill in the next stage does not train this one again."""
        model.load_state_dict(best_state, strict=False)
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
        # Stage 2 reads frozen towers: keep their dropout (and ID dropout) off while the head trains.
        if stage == "retrieval":
            model.train()
        else:
            model.eval()
            model.reranker.train()

    # ----- checkpoints -------------------------------------------------------------------------------

    def _save_checkpoint(self, progress: TrainingProgress, best_state: dict[str, torch.Tensor]) -> None:
        """Accelerate state plus the loop's progress, published by one rename once complete.

        A kill mid-save leaves only a hidden staging folder, which resuming ignores and the next run clears.
        """
        accelerator = self.accelerator
        name = f"{progress.stage}-done" if progress.finished else f"{progress.stage}-step-{progress.global_step}"
        staging = self.checkpoint_dir / f".staging-{name}"  # the same path on every process
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_file({key: value.detach().cpu().contiguous() for key, value in best_state.items()}, staging / BEST_STATE_NAME)
            write_json_atomic(staging / TRAINER_STATE_NAME, self._trainer_state(progress))
            with atomic_write(self.checkpoint_dir / name) as temporary:
                os.replace(staging, temporary)
            # Keep the most advanced checkpoints: enough to resume, bounded on disk.
            for old in list_checkpoints(self.checkpoint_dir)[:-CHECKPOINTS_KEPT]:
                _remove_folder(old)
        accelerator.wait_for_everyone()

    def _trainer_state(self, progress: TrainingProgress) -> dict[str, Any]:
        return {
            "progress": dataclasses.asdict(progress),
            "finished_stages": self.finished_stages,
            "timings": self.timings,
            "num_processes": self.accelerator.num_processes,
            "data_fingerprint": self.data_fingerprint,
            "config": self.config.to_dict(),
        }

    def _read_resume_point(self) -> None:
        trainer_state = read_trainer_state(self.resume_from)
        check_resumable(trainer_state, self.config, self.resume_from)
        if trainer_state["data_fingerprint"] != self.data_fingerprint:
            raise ConfigError(
                f"Cannot resume from {self.resume_from}: the data (catalogue, training sequences or evaluation "
                "examples) differ from the data it was trained on, although the data settings are the same."
            )
        if trainer_state["num_processes"] != self.accelerator.num_processes:
            raise ConfigError(
                f"Cannot resume from {self.resume_from}: it was written by {trainer_state['num_processes']} "
                f"process(es) and this run has {self.accelerator.num_processes}; each process has its own share of "
                "the data and its own RNG state, so resume with the same number of processes."
            )
        self.resumed = TrainingProgress(**trainer_state["progress"])
        self.finished_stages = trainer_state["finished_stages"]
        self.timings = trainer_state["timings"]
        where = "its end" if self.resumed.finished else f"epoch {self.resumed.epoch}, batch {self.resumed.batches_done}"
        logger.info("Resuming from %s: stage %s at %s.", self.resume_from, self.resumed.stage, where)

    def _load_checkpoint(self) -> tuple[TrainingProgress, dict[str, torch.Tensor]]:
        """Model, optimizer, RNG states and loop progress of the stage the checkpoint was saved in."""
        self.accelerator.load_state(str(self.resume_from))
        self._check_rng_restored()
        device = self.accelerator.device
        best_state = {key: value.to(device) for key, value in load_file(self.resume_from / BEST_STATE_NAME).items()}
        progress, self.resumed = self.resumed, None  # later stages start afresh
        return progress, best_state

    def _check_rng_restored(self) -> None:
        """`load_state` swallows a failure to restore the random states: compare them with the file's."""
        try:
            states = read_rng_state(self.resume_from, self.accelerator.process_index)
            if not torch.equal(torch.get_rng_state(), states["torch_manual_seed"]):
                raise ConfigError(
                    f"The random states of checkpoint {self.resume_from} could not be restored, so the resumed run "
                    "would not reproduce an uninterrupted one. Resume from an older checkpoint, or pass "
                    "--resume-ignore-rng to resume anyway."
                )
        except ConfigError as error:
            if not self.resume_ignore_rng:
                raise
            logger.warning("%s Resuming without them, as --resume-ignore-rng asks.", error)

    def _restore_finished_stage(self, stage: str) -> dict[str, float]:
        """A checkpoint of a later stage holds this stage's final weights (and item cache): load them, do not train."""
        state = load_file(self.resume_from / SAFE_WEIGHTS_NAME)
        consume_prefix_in_state_dict_if_present(state, "module.")  # saved from the DDP-wrapped model
        model = self.accelerator.unwrap_model(self.model)
        model.load_state_dict(state)
        model.eval()  # as a trained stage leaves it: the next stage retrieves its candidates without dropout
        logger.info("%s: finished in checkpoint %s; not training it again.", stage, self.resume_from)
        return self.finished_stages[stage]

    def _clear_stale_checkpoints(self) -> None:
        """Remove staging folders of interrupted saves and, unless resuming, an earlier run's checkpoints.

        Those would otherwise be mixed up with this run's when picking the latest or pruning.
        """
        if not self.accelerator.is_main_process or not self.checkpoint_dir.is_dir():
            return
        for leftover in self.checkpoint_dir.glob(".*"):
            _remove_folder(leftover)
        if self.resume_from is None and self.config.training.checkpoint_every_steps:
            earlier = list_checkpoints(self.checkpoint_dir)
            if earlier:
                logger.warning(
                    "Not resuming: removing %d checkpoint(s) of an earlier run from %s (resume to continue from them).",
                    len(earlier), self.checkpoint_dir,
                )
            for checkpoint in earlier:
                _remove_folder(checkpoint)

    # ----- evaluation --------------------------------------------------------------------------------

    def candidate_pipeline(self, serving_index: bool = False) -> CandidatePipeline:
        """FAISS + reranker over the current model. Training (hard negatives) and validation search exactly;
        `serving_index=True` builds the configured `retrieval.index_type`, the index the saved model serves
        from and the one its test metrics are measured with."""
        model = self.accelerator.unwrap_model(self.model)
        retrieval = self.config.retrieval
        index = build_item_index(model, retrieval.index_type, **retrieval.index_params()) if serving_index else build_item_index(model)
        return CandidatePipeline(model, index, retrieval.num_candidates, retrieval.exclude_history)

    def dense_retrieval_scores(self) -> Callable:
        """Exact cosine scores over the whole catalogue; ranks as the flat FAISS index does (cheap for validation)."""
        model = self.accelerator.unwrap_model(self.model)
        with torch.inference_mode():
            item_embeddings = model.item_embeddings()

        @torch.inference_mode()
        def score(histories):
            window, older = split_histories(histories, model.config.max_history_length, item_embeddings.device)
            user_embeddings = model.encode_users(window, item_embeddings, older_item_indices=older)[:, -1]
            return model.similarity(user_embeddings, item_embeddings)

        return score

    def evaluate_retrieval_valid(self) -> dict[str, float]:
        self.accelerator.unwrap_model(self.model).eval()
        valid = self.split.valid
        return evaluate_ranking(
            self.dense_retrieval_scores(), valid.histories, valid.targets, self.split.num_items,
            ks=self.config.evaluation.ks, batch_size=self.config.evaluation.batch_size, desc="valid retrieval",
            accelerator=self.accelerator,
        )

    def evaluate_rerank_valid(self) -> dict[str, float]:
        self.accelerator.unwrap_model(self.model).eval()
        valid = self.split.valid
        return evaluate_ranking(
            rerank_score_function(self.candidate_pipeline(), self.split.num_items), valid.histories, valid.targets,
            self.split.num_items, ks=self.config.evaluation.ks, batch_size=self.config.evaluation.batch_size,
            desc="valid rerank", accelerator=self.accelerator,
        )


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key not in ("num_users", "epoch"))


def _remove_folder(folder: Path) -> None:
    """Hide a folder before deleting it, so a kill mid-delete cannot leave a partial checkpoint that looks published."""
    hidden = folder.parent / f".deleting-{folder.name}"
    try:
        os.replace(folder, hidden)
    except OSError:
        hidden = folder
    if hidden.is_dir():
        shutil.rmtree(hidden, ignore_errors=True)
    else:
        hidden.unlink(missing_ok=True)
