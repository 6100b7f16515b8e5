"""Two-stage training under Accelerate: stage 1 the user/item towers, stage 2 the reranking head, and with
`model.use_user_profiles` a third, the profile projection.

`LlmRecTrainer` says what each stage trains on: its examples, loaders, negatives and validation. The loop
every stage shares (epochs, checkpoints, early stopping on validation NDCG@10, best weights, resuming) is
`loop.StageLoop`; the checkpoint folders are `checkpoints`, the stage-1 loss choice `retrieval_loss`.
The names below that moved there are imported here too, for their old path `llmrec.training.trainer`.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ..config import ExperimentConfig
from ..data import SequentialSplit
from ..modeling import LlmRecForReranking, LlmRecForRetrieval, LlmRecModel, split_histories
from ..modeling.task_models import LlmRecForProfiles, LlmRecTaskModel
from ..modeling.text_encoding import encode_catalogue
from ..retrieval import CandidatePipeline, build_item_index
from ..utils.length_order import length_sorted_batches
# Moved names, imported for their old path llmrec.training.trainer.
from .checkpoints import (  # noqa: F401
    BEST_STATE_NAME, CHECKPOINTS_KEPT, TRAINER_STATE_NAME, checkpoint_problem, checkpoint_root, find_checkpoint,
    list_checkpoints, read_rng_state, read_trainer_state,
)
from .examples import (
    RerankExample, collate_next_item, collate_rerank, held_out_prefixes, next_item_windows, rerank_prefixes,
    retrieval_sequences,
)
from .loop import StageLoop
from .profiles import collate_profiles, profile_examples
from .progress import SELECTION_METRIC, STAGES, TrainingProgress  # noqa: F401
# retrieval_score_function is imported for its old path, llmrec.training.trainer.retrieval_score_function.
from .ranking import evaluate_ranking, rerank_score_function, retrieval_score_function  # noqa: F401
from .resume_checks import check_resumable, data_fingerprint  # noqa: F401
from .retrieval_loss import (  # noqa: F401
    FULL_SOFTMAX_MAX_LOGITS, SPARSE_ID_GRADIENTS_MIN_ITEMS, choose_retrieval_loss, log_inclusion_probability,
    negative_sampling_probabilities, use_sparse_id_gradients,
)
from .samplers import LengthGroupedBatchSampler, NegativeSampler, derived_seed

logger = logging.getLogger(__name__)


def stage2_candidate_items(model: LlmRecModel) -> Optional[np.ndarray]:
    """The items stage-2 candidate lists may hold: with `exclude_unseen_items_from_loss`, only warm ones.

    An item without training interactions is never a stage-2 target, so in the candidate lists it would
    only ever be a negative and the head would learn to bury it: exactly the new items it must rank.
    Like the stage-1 softmax, the lists leave such items out. None = every item.
    """
    if model.config.exclude_unseen_items_from_loss and model.warm_items.any():
        return torch.nonzero(model.warm_items).flatten().cpu().numpy()
    return None


class LlmRecTrainer(StageLoop):
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
        # Negatives are drawn in proportion to popularity; logQ corrects the sampled softmax for it.
        self.sampling_probabilities = negative_sampling_probabilities(split.item_popularity())
        self.negative_sampler = NegativeSampler(self.sampling_probabilities)
        super().__init__(resume_from, resume_ignore_rng)

    @functools.cached_property
    def data_fingerprint(self) -> str:
        return data_fingerprint(self.split)

    # ----- stage 1 -----------------------------------------------------------------------------------

    def train_retrieval(self) -> dict[str, float]:
        """Stage 1: next-item prediction over whole histories; returns the best validation metrics."""
        settings = self.config.training
        self._set_trainable(lambda name: not name.startswith("reranker."))
        max_length = self.model.config.max_history_length
        sequences = self.split.train_sequences
        if settings.rerank_holdout:
            sequences = retrieval_sequences(sequences, settings.rerank_positions_per_user)
        windows = next_item_windows(sequences, max_length, keep_older=self.model.config.history_summary)
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
        """Stage 2: listwise softmax over FAISS candidates (hard negatives) of recent training positions, or with
        `training.rerank_holdout` of the positions stage 1 held out."""
        settings = self.config.training
        self._set_trainable(lambda name: name.startswith("reranker."))
        pipeline = self.candidate_pipeline()
        prefixes = held_out_prefixes if settings.rerank_holdout else rerank_prefixes
        histories, targets = prefixes(self.split.train_sequences, settings.rerank_positions_per_user)
        max_length = self.model.config.max_history_length
        candidates = self._stage2_candidates(pipeline, histories, stage2_candidate_items(self.accelerator.unwrap_model(self.model)))
        examples = []
        for history, target, row in zip(histories, targets, candidates):
            hit = np.flatnonzero(row == target)
            # A target the retriever missed teaches the head nothing it can use at serving time.
            if hit.size:
                examples.append(RerankExample(history, row, int(hit[0])))
        logger.info("Stage 2: %d of %d positions (%.1f%%) have their next item among the candidates.",
                    len(examples), len(histories), 100 * len(examples) / max(1, len(histories)))
        loader = self._shuffled_loader(
            "rerank", examples, settings.rerank_batch_size, lambda batch: collate_rerank(batch, max_length),
            [min(len(example.history), max_length) for example in examples],
        )
        return self._fit("rerank", loader, settings.rerank_epochs, settings.rerank_learning_rate, self.evaluate_rerank_valid)

    # ----- stage 3: user profiles ----------------------------------------------------------------------

    def train_profiles(self, profile_text_embeddings: torch.Tensor, has_profile: torch.Tensor) -> dict[str, float]:
        """The profile projection (`LlmRecForProfiles`), towers and head frozen; `profile_text_embeddings` and
        `has_profile` have a row per user (`profiles.embed_user_profiles`). Validation ranks each valid target
        from its user's profile alone (`evaluate_profiles_valid`)."""
        settings = self.config.training
        self.accelerator.unwrap_model(self.model).enable_user_profiles()
        self.profile_text_embeddings, self.has_profile = profile_text_embeddings.cpu(), has_profile.cpu()
        self._set_trainable(lambda name: name.startswith("profile_projection."))
        examples = profile_examples(self.split.train_sequences, self.has_profile)
        max_length = self.model.config.max_history_length
        loader = self._shuffled_loader(
            "profiles", examples, settings.retrieval_batch_size,
            lambda batch: collate_profiles(batch, self.profile_text_embeddings, max_length),
            [min(len(example.sequence), max_length) for example in examples],
        )
        logger.info("User profiles: fitting the profile projection on %d users (towers frozen).", len(examples))
        return self._fit("profiles", loader, settings.profile_epochs, settings.profile_learning_rate, self.evaluate_profiles_valid)

    # ----- loaders and optimizers ----------------------------------------------------------------------

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

    def _task_model(self, stage: str) -> LlmRecTaskModel:
        """Stage 1 trains the towers with `loss_type`'s next-item loss, stage 2 the head with its listwise loss,
        the profile fit the profile projection with `LlmRecForProfiles`' loss."""
        model = self.accelerator.unwrap_model(self.model)
        if stage == "retrieval":
            return LlmRecForRetrieval(model, loss=self.loss_type)
        return LlmRecForReranking(model) if stage == "rerank" else LlmRecForProfiles(model)

    def _set_trainable(self, is_trainable: Callable[[str], bool]) -> None:
        """Freeze all but `is_trainable` parameters; encoder weights train only through LoRA adapters."""
        for name, parameter in self.accelerator.unwrap_model(self.model).named_parameters():
            parameter.requires_grad_(is_trainable(name) and ("lora_" in name or "item_encoder." not in name))

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
        return use_sparse_id_gradients(
            self.config.training.sparse_id_gradients, self.loss_type, self.split.num_items, self.accelerator.num_processes
        )

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

    def evaluate_profiles_valid(self) -> dict[str, float]:
        """Exact retrieval NDCG@k of the valid targets of users with a profile, ranked from the profile alone.

        That is the cold user the path is for, and the measure that moves: with a history beside it, the
        profile changes little (on planted data, valid NDCG@10 stays at 1.0 whatever the projection).
        """
        model = self.accelerator.unwrap_model(self.model).eval()
        valid = self.split.valid
        users = [user for user in valid.user_indices if self.has_profile[user]]
        targets = [target for user, target in zip(valid.user_indices, valid.targets) if self.has_profile[user]]
        profiles = self.profile_text_embeddings[users]
        with torch.inference_mode():
            item_embeddings = model.item_embeddings()

        @torch.inference_mode()
        def score(histories: list[list[int]], positions: np.ndarray) -> torch.Tensor:
            device = item_embeddings.device
            empty = torch.zeros(len(histories), 1, dtype=torch.long, device=device)
            rows = torch.as_tensor(np.asarray(positions), dtype=torch.long)
            user_embeddings = model.encode_users(empty, item_embeddings, profiles[rows].to(device))[:, -1]
            return model.similarity(user_embeddings, item_embeddings)

        score.takes_positions = True
        return evaluate_ranking(
            score, [[] for _ in targets], targets, self.split.num_items, ks=self.config.evaluation.ks,
            batch_size=self.config.evaluation.batch_size, desc="valid profiles", accelerator=self.accelerator,
        )

    def evaluate_rerank_valid(self) -> dict[str, float]:
        self.accelerator.unwrap_model(self.model).eval()
        valid = self.split.valid
        return evaluate_ranking(
            rerank_score_function(self.candidate_pipeline(), self.split.num_items), valid.histories, valid.targets,
            self.split.num_items, ks=self.config.evaluation.ks, batch_size=self.config.evaluation.batch_size,
            desc="valid rerank", accelerator=self.accelerator,
        )

