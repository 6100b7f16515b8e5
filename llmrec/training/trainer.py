"""Two-stage training under Accelerate: stage 1 the user/item towers, stage 2 the reranking head.

Both stages share one loop (`_fit`): mixed precision, gradient accumulation, checkpoints every N steps
and early stopping on validation NDCG@10, keeping the best weights.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import ExperimentConfig
from ..data import SequentialSplit
from ..evaluation import evaluate_ranking, scores_from_candidates
from ..modeling import LlmRecModel, pad_histories
from ..modeling.text_encoding import encode_catalogue
from ..retrieval import CandidatePipeline, build_item_index
from .examples import RerankExample, collate_next_item, collate_rerank, next_item_windows, rerank_prefixes

logger = logging.getLogger(__name__)

SELECTION_METRIC = "ndcg@10"
# Largest full-softmax logits tensor per batch (positions x catalogue, fp32) that `loss: auto` allows: 1 GiB.
FULL_SOFTMAX_MAX_LOGITS = 2**28


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


class LlmRecTrainer:
    """Trains an `LlmRecModel` on a `SequentialSplit`.

    With a frozen encoder the catalogue is encoded once and the towers train on cached text embeddings
    with a full softmax over the catalogue. With LoRA, each step re-encodes only the (deduplicated)
    items its batch touches and trains with a sampled softmax.
    """

    def __init__(
        self,
        model: LlmRecModel,
        split: SequentialSplit,
        config: ExperimentConfig,
        accelerator: Accelerator,
        tokenized_items: dict[str, torch.Tensor],
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
        self.checkpoint_dir = Path(config.output_dir) / "checkpoints"
        self.timings: dict[str, float] = {}

    # ----- stage 1 -----------------------------------------------------------------------------------

    def train_retrieval(self) -> dict[str, float]:
        """Stage 1: next-item prediction over whole histories; returns the best validation metrics."""
        settings = self.config.training
        self._set_trainable(lambda name: not name.startswith("reranker."))
        max_length = self.model.config.max_history_length
        windows = next_item_windows(self.split.train_sequences, max_length)
        loader = DataLoader(
            windows,
            batch_size=settings.retrieval_batch_size,
            shuffle=True,
            collate_fn=lambda batch: self._with_item_inputs(collate_next_item(batch, max_length)),
        )
        logger.info("Stage 1: %d training windows, loss %s.", len(windows), self.loss_type)
        start = time.perf_counter()
        best = self._fit(
            "retrieval", loader, settings.retrieval_epochs, settings.retrieval_learning_rate, self.evaluate_retrieval_valid
        )
        self.timings["retrieval_training_seconds"] = time.perf_counter() - start
        return best

    def _with_item_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add sampled negatives and, when the encoder trains, the texts of the items this batch touches."""
        if self.loss_type == "sampled_softmax":
            targets = batch["target_item_indices"]
            negatives = torch.multinomial(self.sampling_probabilities, self.config.training.num_sampled_negatives, replacement=True)
            sampled = torch.unique(torch.cat([targets[targets > 0], negatives]))
            batch["sampled_item_indices"] = sampled
            batch["sampled_log_q"] = log_inclusion_probability(
                self.sampling_probabilities[sampled], self.config.training.num_sampled_negatives
            )
        if self.encoder_trainable:
            touched = [batch["history_item_indices"].flatten(), batch["target_item_indices"].flatten()]
            if "sampled_item_indices" in batch:
                touched.append(batch["sampled_item_indices"])
            items = torch.unique(torch.cat(touched))
            items = items[items > 0]
            width = int(self.tokenized_items["attention_mask"][items].sum(dim=1).max())
            batch["text_inputs"] = {
                "item_indices": items,
                "input_ids": self.tokenized_items["input_ids"][items, :width],
                "attention_mask": self.tokenized_items["attention_mask"][items, :width],
            }
        return batch

    def refresh_item_cache(self) -> None:
        """Re-encode the catalogue when the encoder has changed (LoRA); free with a frozen encoder."""
        if self.encoder_trainable:
            encode_catalogue(
                self.accelerator.unwrap_model(self.model), self.tokenized_items, self.config.training.encode_batch_size,
                show_progress=self.accelerator.is_local_main_process,
            )

    # ----- stage 2 -----------------------------------------------------------------------------------

    def train_reranker(self) -> dict[str, float]:
        """Stage 2: listwise softmax over FAISS candidates (hard negatives) of recent training positions."""
        settings = self.config.training
        self._set_trainable(lambda name: name.startswith("reranker."))
        pipeline = self.candidate_pipeline()
        histories, targets = rerank_prefixes(self.split.train_sequences, settings.rerank_positions_per_user)
        examples = []
        for start in range(0, len(histories), self.config.evaluation.batch_size):
            batch_histories = histories[start : start + self.config.evaluation.batch_size]
            _, candidates = pipeline.retrieve(batch_histories)
            for history, target, row in zip(batch_histories, targets[start:], candidates):
                hit = np.flatnonzero(row == target)
                # A target the retriever missed teaches the head nothing it can use at serving time.
                if hit.size:
                    examples.append(RerankExample(history, row, int(hit[0])))
        logger.info("Stage 2: %d of %d positions have their next item among the candidates.", len(examples), len(histories))
        max_length = self.model.config.max_history_length
        loader = DataLoader(
            examples,
            batch_size=settings.rerank_batch_size,
            shuffle=True,
            collate_fn=lambda batch: collate_rerank(batch, max_length),
        )
        start = time.perf_counter()
        best = self._fit("rerank", loader, settings.rerank_epochs, settings.rerank_learning_rate, self.evaluate_rerank_valid)
        self.timings["rerank_training_seconds"] = time.perf_counter() - start
        return best

    # ----- shared loop -------------------------------------------------------------------------------

    def _set_trainable(self, is_trainable: Callable[[str], bool]) -> None:
        """Freeze all but `is_trainable` parameters; encoder weights train only through LoRA adapters."""
        for name, parameter in self.accelerator.unwrap_model(self.model).named_parameters():
            parameter.requires_grad_(is_trainable(name) and ("lora_" in name or "item_encoder." not in name))

    def _fit(self, stage: str, loader: DataLoader, epochs: int, learning_rate: float, evaluate: Callable[[], dict]) -> dict:
        settings = self.config.training
        accelerator = self.accelerator
        unwrapped = accelerator.unwrap_model(self.model)
        parameters = [parameter for parameter in unwrapped.parameters() if parameter.requires_grad]
        if not parameters or epochs == 0:
            metrics = {**evaluate(), "epoch": 0}
            logger.info("%s: nothing to train; valid %s", stage, _format(metrics))
            return metrics
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=settings.weight_decay)
        model, optimizer, loader = accelerator.prepare(self.model, optimizer, loader)
        # Epoch 0 is the starting point: a stage that never beats it on validation keeps its initial weights.
        best_metrics = {**evaluate(), "epoch": 0}
        best_state = self._trainable_state(unwrapped)
        logger.info("%s before training: valid %s", stage, _format(best_metrics))
        evaluations_without_gain = 0
        global_step = 0
        for epoch in range(1, epochs + 1):
            self._train_mode(unwrapped, stage)
            losses = []
            # disable=None: a bar on a terminal, none in log files.
            progress = tqdm(
                loader, desc=f"{stage} epoch {epoch}/{epochs}", leave=False,
                disable=None if accelerator.is_local_main_process else True,
            )
            for batch in progress:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                losses.append(loss.item())
                if accelerator.sync_gradients:
                    global_step += 1
                    if settings.checkpoint_every_steps and global_step % settings.checkpoint_every_steps == 0:
                        self._save_checkpoint(f"{stage}-step-{global_step}")
                progress.set_postfix(loss=f"{losses[-1]:.4f}")
            mean_loss = float(np.mean(losses)) if losses else math.nan
            if epoch % settings.eval_every_epochs and epoch != epochs:
                logger.info("%s epoch %d: loss %.4f", stage, epoch, mean_loss)
                continue
            if stage == "retrieval":
                self.refresh_item_cache()
            metrics = evaluate()
            logger.info("%s epoch %d: loss %.4f, valid %s", stage, epoch, mean_loss, _format(metrics))
            if metrics[SELECTION_METRIC] > best_metrics[SELECTION_METRIC]:
                best_metrics = {**metrics, "epoch": epoch}
                best_state = self._trainable_state(unwrapped)
                evaluations_without_gain = 0
            else:
                evaluations_without_gain += 1
                if settings.early_stopping_patience and evaluations_without_gain >= settings.early_stopping_patience:
                    logger.info("%s: early stop after epoch %d (best epoch %d).", stage, epoch, best_metrics["epoch"])
                    break
        unwrapped.load_state_dict(best_state, strict=False)
        if stage == "retrieval":
            self.refresh_item_cache()
        self.model = accelerator.unwrap_model(model)
        accelerator.free_memory()
        unwrapped.eval()
        return best_metrics

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

    def _save_checkpoint(self, name: str) -> None:
        self.accelerator.save_state(str(self.checkpoint_dir / name))
        if self.accelerator.is_main_process:
            # Keep the two most recent checkpoints: enough to resume, bounded on disk.
            existing = sorted(self.checkpoint_dir.glob("*-step-*"), key=lambda path: path.stat().st_mtime)
            for old in existing[:-2]:
                shutil.rmtree(old, ignore_errors=True)

    # ----- evaluation --------------------------------------------------------------------------------

    def candidate_pipeline(self) -> CandidatePipeline:
        model = self.accelerator.unwrap_model(self.model)
        return CandidatePipeline(
            model, build_item_index(model), self.config.retrieval.num_candidates, self.config.retrieval.exclude_history
        )

    def dense_retrieval_scores(self) -> Callable:
        """Exact cosine scores over the whole catalogue; ranks as the flat FAISS index does (cheap for validation)."""
        model = self.accelerator.unwrap_model(self.model)
        with torch.inference_mode():
            item_embeddings = model.item_embeddings()

        @torch.inference_mode()
        def score(histories):
            padded = pad_histories(histories, model.config.max_history_length, item_embeddings.device)
            return model.similarity(model.encode_users(padded, item_embeddings)[:, -1], item_embeddings)

        return score

    def evaluate_retrieval_valid(self) -> dict[str, float]:
        self.accelerator.unwrap_model(self.model).eval()
        valid = self.split.valid
        return evaluate_ranking(
            self.dense_retrieval_scores(), valid.histories, valid.targets, self.split.num_items,
            ks=self.config.evaluation.ks, batch_size=self.config.evaluation.batch_size, desc="valid retrieval",
        )

    def evaluate_rerank_valid(self) -> dict[str, float]:
        self.accelerator.unwrap_model(self.model).eval()
        valid = self.split.valid
        return evaluate_ranking(
            rerank_score_function(self.candidate_pipeline(), self.split.num_items), valid.histories, valid.targets,
            self.split.num_items, ks=self.config.evaluation.ks, batch_size=self.config.evaluation.batch_size,
            desc="valid rerank",
        )


def retrieval_score_function(pipeline: CandidatePipeline, num_items: int) -> Callable:
    """FAISS top-N as a full-catalogue score row (-inf outside the candidates)."""

    def score(histories):
        candidate_scores, candidate_indices = pipeline.retrieve(histories)
        return scores_from_candidates(torch.as_tensor(candidate_indices), torch.as_tensor(candidate_scores), num_items)

    return score


def rerank_score_function(pipeline: CandidatePipeline, num_items: int) -> Callable:
    """FAISS top-N reranked by the head; an item the retriever missed stays at -inf, i.e. a miss."""

    def score(histories):
        candidate_indices, candidate_scores = pipeline.retrieve_and_rerank(histories)
        return scores_from_candidates(torch.as_tensor(candidate_indices), candidate_scores.cpu(), num_items)

    return score


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key not in ("num_users", "epoch"))
