"""`Recommender`: a trained model, its catalogue and its FAISS index, behind raw item ids."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .errors import ModelFolderError, UnknownItemError
from .modeling import MODEL_FORMAT_VERSION, LlmRecModel
from .retrieval import CandidatePipeline, ItemIndex, build_item_index

logger = logging.getLogger(__name__)

CATALOGUE_FILE = "catalogue.parquet"
INDEX_FILE = "item_index.faiss"
REQUIRED_FILES = ("config.json", "model.safetensors", CATALOGUE_FILE, INDEX_FILE)

RankedItems = list[tuple[str, float]]


class Recommender:
    """Recommend, rerank and explain with raw item ids (strings), best first.

    Thread safety: every call only reads the model, the index and the cached item representations, and
    runs under `torch.inference_mode`, so one instance can serve many threads.
    """

    def __init__(
        self,
        model: LlmRecModel,
        tokenizer: PreTrainedTokenizerBase,
        item_ids: Sequence[str],
        item_texts: Sequence[str],
        item_popularity: Sequence[float],
        index: Optional[ItemIndex] = None,
    ) -> None:
        if len(item_ids) != model.config.num_items:
            raise ModelFolderError(
                f"The catalogue has {len(item_ids)} items but the model was built for {model.config.num_items}."
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.item_ids = [str(item_id) for item_id in item_ids]
        self.item_texts = list(item_texts)
        self.item_popularity = np.asarray(item_popularity, dtype=np.float64)
        self.item_index = {item_id: position + 1 for position, item_id in enumerate(self.item_ids)}
        index = index if index is not None else build_item_index(model)
        if index.num_items != len(self.item_ids):
            raise ModelFolderError(
                f"The FAISS index holds {index.num_items} items but the catalogue has {len(self.item_ids)}; "
                "rebuild the index from this model (llmrec.retrieval.build_item_index)."
            )
        self.pipeline = CandidatePipeline(model, index, num_candidates=model.config.num_candidates)

    # ----- loading and saving -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_repo_id: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "Recommender":
        """Load a folder written by `save_pretrained` (or a Hub repo id holding one)."""
        folder = Path(path_or_repo_id)
        if not folder.is_dir():
            if str(path_or_repo_id).count("/") != 1 or str(path_or_repo_id).startswith((".", "/")):
                raise ModelFolderError(f"Model folder {folder} does not exist; pass the output_dir of a finetune run.")
            from huggingface_hub import snapshot_download

            try:
                folder = Path(snapshot_download(str(path_or_repo_id)))
            except Exception as error:  # offline, unknown repo, no permission: one clear message
                raise ModelFolderError(
                    f"{path_or_repo_id} is neither a local model folder nor a Hub repo that could be downloaded "
                    f"({type(error).__name__}: {error})."
                ) from error
        missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
        if missing:
            raise ModelFolderError(f"Model folder {folder} is missing {', '.join(missing)}; save it again with save_pretrained.")
        version = json.loads((folder / "config.json").read_text()).get("format_version")
        if version != MODEL_FORMAT_VERSION:
            raise ModelFolderError(
                f"{folder / 'config.json'} has format_version {version}, this llmrec reads {MODEL_FORMAT_VERSION}; "
                "use the llmrec version that wrote it or retrain."
            )
        model = LlmRecModel.from_pretrained(folder, use_safetensors=True).to(device)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        catalogue = Dataset.from_parquet(str(folder / CATALOGUE_FILE))
        return cls(
            model,
            tokenizer,
            catalogue["item_id"],
            catalogue["text"],
            catalogue["popularity"],
            index=ItemIndex.load(folder / INDEX_FILE),
        )

    def save_pretrained(self, save_directory: Union[str, Path]) -> None:
        """Write config, weights (safetensors), tokenizer, catalogue and index; each file lands atomically."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=save_directory))
        try:
            self.model.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            Dataset.from_dict(
                {"item_id": self.item_ids, "text": self.item_texts, "popularity": self.item_popularity.tolist()}
            ).to_parquet(str(staging / CATALOGUE_FILE))
            self.pipeline.index.save(staging / INDEX_FILE)
            for file in sorted(staging.iterdir()):
                os.replace(file, save_directory / file.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # ----- serving -----------------------------------------------------------------------------------

    def _indices(self, item_ids: Sequence[str]) -> list[int]:
        if isinstance(item_ids, str):
            raise TypeError("Pass a list of item ids, not a single string.")
        unknown = [item_id for item_id in item_ids if str(item_id) not in self.item_index]
        if unknown:
            raise UnknownItemError(unknown)
        return [self.item_index[str(item_id)] for item_id in item_ids]

    def _ranked(self, indices: np.ndarray, scores: np.ndarray, k: int) -> RankedItems:
        ranked = [(self.item_ids[index - 1], float(score)) for index, score in zip(indices, scores) if index > 0 and np.isfinite(score)]
        return ranked[:k]

    def _popular(self, exclude: set[int], k: int) -> RankedItems:
        """Cold users (no history) get the most popular items: a documented fallback, not a crash."""
        order = np.argsort(-self.item_popularity, kind="stable") + 1
        return [(self.item_ids[index - 1], float(self.item_popularity[index - 1])) for index in order if index not in exclude][:k]

    def recommend(self, history: Sequence[str], k: int = 10) -> RankedItems:
        return self.recommend_batch([history], k)[0]

    def recommend_batch(self, histories: Sequence[Sequence[str]], k: int = 10) -> list[RankedItems]:
        """Retrieve `num_candidates` items per user with FAISS, rerank them and keep the best `k`."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}.")
        index_histories = [self._indices(history) for history in histories]
        results: list[Optional[RankedItems]] = [None] * len(histories)
        warm = [row for row, history in enumerate(index_histories) if history]
        for row, history in enumerate(index_histories):
            if not history:
                results[row] = self._popular(set(), k)
        if warm:
            warm_histories = [index_histories[row] for row in warm]
            candidates, scores = self.pipeline.retrieve_and_rerank(warm_histories, max(k, self.pipeline.num_candidates))
            scores = scores.float().cpu().numpy()
            for position, row in enumerate(warm):
                order = np.argsort(-scores[position], kind="stable")
                results[row] = self._ranked(candidates[position][order], scores[position][order], k)
        return results

    def rerank(self, history: Sequence[str], candidates: Sequence[str]) -> RankedItems:
        return self.rerank_batch([history], [candidates])[0]

    def rerank_batch(self, histories: Sequence[Sequence[str]], candidates: Sequence[Sequence[str]]) -> list[RankedItems]:
        """Score the given candidates for each history with the cross-attention head, best first."""
        if len(histories) != len(candidates):
            raise ValueError(f"Got {len(histories)} histories but {len(candidates)} candidate lists.")
        index_histories = [self._indices(history) for history in histories]
        index_candidates = [self._indices(row) for row in candidates]
        width = max((len(row) for row in index_candidates), default=0)
        if width == 0:
            return [[] for _ in histories]
        padded = np.zeros((len(candidates), width), dtype=np.int64)
        for row, items in enumerate(index_candidates):
            padded[row, : len(items)] = items
        scores, _ = self.pipeline.rerank(index_histories, padded)
        scores = scores.float().cpu().numpy()
        ranked = []
        for row, items in enumerate(index_candidates):
            order = np.argsort(-scores[row, : len(items)], kind="stable")
            ranked.append(self._ranked(padded[row][order], scores[row][order], len(items)))
        return ranked

    def explain(self, history: Sequence[str], item_id: str, per_head: bool = False) -> list[tuple[str, float]] | list[tuple[str, list[float]]]:
        """How much each history item weighed in `item_id`'s score: cross-attention averaged over heads."""
        history_indices = self._indices(history)
        if not history_indices:
            raise ValueError("explain() needs a non-empty history: attention weights are over history items.")
        (candidate,) = self._indices([item_id])
        _, attentions = self.pipeline.rerank([history_indices], np.array([[candidate]]), output_attentions=True)
        weights = attentions[0, :, 0].float().cpu()  # (heads, L) over the left-padded history
        recent = history[-weights.shape[-1] :]
        weights = weights[:, weights.shape[-1] - len(recent) :]
        if per_head:
            return [(str(item), weights[:, column].tolist()) for column, item in enumerate(recent)]
        mean = weights.mean(dim=0)
        return [(str(item), float(mean[column])) for column, item in enumerate(recent)]
