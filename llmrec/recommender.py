"""`Recommender`: a trained model, its catalogue and its FAISS index, behind raw item ids.

This is the public face; the work is done by its neighbours: `llmrec.model_io` loads and saves the folder,
`llmrec.serving` holds the serving state (and grows it for `add_items`), `llmrec.ranking` makes the answers,
and `llmrec.hub` uploads to the Hub.
"""

from __future__ import annotations

import inspect
import logging
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .errors import InvalidRequestError, ModelFolderError
from .hub import push_to_hub
from .model_card import render_model_card
from .model_folder import INDEX_FILE, MODEL_CARD_FILE, check_folder, read_run_metadata
from .model_io import load_model, load_model_tokenizer, read_catalogue, resolve_folder, save_folder, write_model_files
from .modeling import LlmRecModel
from .modeling.precision import cast_encoder_bf16, check_precision, check_quantize, quantize_int8
from .ranking import (  # noqa: F401 (RankedItem, re-exported)
    ItemFilter, RankedItem, RankedItems, Ranker, check_diversity, check_new_items, check_profiles,
)
from .retrieval import CandidatePipeline, ItemIndex, build_item_index
from .serving import (
    MAX_K, ServingState, check_flag, check_items_to_add, check_k, check_rows, grown_state, id_collection, item_indices,
    ordered_list,
)
from .utils.quiet import quiet_library_progress

logger = logging.getLogger(__name__)


class Recommender:
    """Recommend, rerank and explain with raw item ids (strings), best first.

    Serving reads cached item representations and reranker projections (`CandidatePipeline`); BERT runs
    only for text: items added with `add_items` and user profiles. `precision="bf16"` keeps the text
    encoder's weights in bf16 (GPU, or a CPU with bf16 instructions); `quantize="int8"` (CPU) makes the
    encoder and the reranking head's MLPs dynamic int8 (`llmrec.modeling.precision`).

    Thread safety: `recommend`, `rerank`, `explain` and their batch forms only read, under
    `torch.inference_mode`: each reads the serving state (`llmrec.serving.ServingState`: catalogue, index,
    caches) once and uses only it. `add_items` builds a grown state aside and publishes it with one
    assignment, so it may run while other threads read; `add_items` and `save_pretrained` take one lock,
    so a save writes weights, config and catalogue of the same moment (an `add_items` waits for it).

    `max_k` caps `k` (default `llmrec.limits.MAX_K`); a larger `k` raises `InvalidRequestError`.
    """

    def __init__(
        self,
        model: LlmRecModel,
        tokenizer: PreTrainedTokenizerBase,
        item_ids: Sequence[str],
        item_texts: Sequence[str],
        item_popularity: Sequence[float],
        index: Optional[ItemIndex] = None,
        eval_results: Optional[dict[str, Any]] = None,
        training_config: Optional[dict[str, Any]] = None,
        precision: str = "fp32",
        quantize: Optional[str] = None,
        max_k: int = MAX_K,
    ) -> None:
        if not (len(item_ids) == len(item_texts) == len(item_popularity) == model.config.num_items):
            raise ModelFolderError(
                f"The catalogue has {len(item_ids)} ids, {len(item_texts)} texts and {len(item_popularity)} "
                f"popularity values, but the model was built for {model.config.num_items} items."
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        if len(set(map(str, item_ids))) != len(item_ids):
            raise ModelFolderError("The catalogue lists some item ids more than once; item ids must be unique.")
        index = index if index is not None else build_item_index(model)
        if index.num_items != len(item_ids):
            raise ModelFolderError(
                f"The FAISS index holds {index.num_items} items but the catalogue has {len(item_ids)}; "
                "rebuild the index from this model (`llmrec index MODEL --rebuild`)."
            )
        if index.dim != model.config.hidden_size:
            raise ModelFolderError(
                f"The FAISS index stores {index.dim}-dimensional vectors but the model's item embeddings have "
                f"{model.config.hidden_size}; rebuild the index from this model (`llmrec index MODEL --rebuild`)."
            )
        self.eval_results = eval_results
        self.training_config = training_config
        self.max_k = max_k
        self.precision = check_precision(precision)
        self.quantize = check_quantize(quantize, self.model.item_text_embeddings.device)
        if self.quantize is not None and self.precision != "fp32":
            raise ValueError("Choose one of precision='bf16' and quantize='int8'; int8 quantises fp32 weights.")
        pipeline = CandidatePipeline(
            model, index, num_candidates=model.config.num_candidates, exclude_history=model.config.exclude_history
        )
        self._state = ServingState.build(item_ids, item_texts, item_popularity, pipeline)
        if self.precision == "bf16":
            cast_encoder_bf16(self.model.item_encoder)
        if self.quantize == "int8":
            # After the serving cache is built, so cached catalogue rows stay exact; the head's attention
            # projections are cached, so only its per-request MLPs are worth quantising.
            quantize_int8(self.model.item_encoder)
            quantize_int8(self.model.reranker.feed_forward)
            quantize_int8(self.model.reranker.scorer)
        self._write_lock = threading.Lock()

    @property
    def max_k(self) -> int:
        """The largest `k` a request may ask for."""
        return self._max_k

    @max_k.setter
    def max_k(self, max_k: int) -> None:
        if isinstance(max_k, bool) or not isinstance(max_k, (int, np.integer)) or max_k <= 0:
            raise InvalidRequestError(f"max_k must be a positive integer, got {max_k!r}.")
        self._max_k = int(max_k)

    # Read-only views of the current serving state; a request reads `self._state` once instead.
    @property
    def item_ids(self) -> tuple[str, ...]:
        return self._state.item_ids

    @property
    def item_texts(self) -> tuple[str, ...]:
        return self._state.item_texts

    @item_texts.setter
    def item_texts(self, item_texts: Sequence[str]) -> None:
        """Replace the item texts shown and saved (not the embeddings already computed from them)."""
        item_texts = ordered_list(item_texts, "item texts")
        with self._write_lock:
            if len(item_texts) != self._state.num_items:
                raise InvalidRequestError(f"Got {len(item_texts)} texts for {self._state.num_items} items; pass one per item.")
            self._state = self._state.with_texts(item_texts)

    @property
    def item_popularity(self) -> np.ndarray:
        return self._state.item_popularity

    @property
    def item_index(self) -> Any:
        """Raw item id -> 1-based item index (a read-only mapping)."""
        return self._state.item_index

    @property
    def pipeline(self) -> CandidatePipeline:
        return self._state.pipeline

    @property
    def num_items(self) -> int:
        return self._state.num_items

    # ----- loading and saving -----------------------------------------------------------------------

    @classmethod
    @quiet_library_progress()
    def from_pretrained(
        cls,
        path_or_repo_id: Union[str, Path],
        device: Union[str, torch.device] = "cpu",
        revision: Optional[str] = None,
        token: Optional[str] = None,
        precision: str = "fp32",
        quantize: Optional[str] = None,
        verify: bool = True,
    ) -> "Recommender":
        """Load a folder written by `save_pretrained`, or a Hub model repo holding one.

        `precision` ("fp32" or "bf16") and `quantize` (None or "int8", CPU only) trade accuracy for
        speed in serving; see the class docstring. A quantised recommender cannot be saved again.

        Only safetensors, Parquet, JSON and FAISS files are read: no pickle, and never code from the folder
        (one that carries `*.py` files or an `auto_map` is refused). Every file llmrec wrote is checked
        against the SHA-256 recorded in `config.json` (`verify=False` skips that, e.g. for a quick start
        of a large model), weights must match the config exactly, and links may not leave the folder.
        Every problem with the folder raises `ModelFolderError` naming the file and what to do.
        """
        folder = resolve_folder(path_or_repo_id, revision, token)
        cls.check_folder(folder, verify=verify)
        model = load_model(folder)
        tokenizer = load_model_tokenizer(folder, model)
        item_ids, item_texts, popularity = read_catalogue(folder)
        eval_results, training_config = read_run_metadata(folder)
        return cls(
            model.to(device), tokenizer, item_ids, item_texts, popularity, index=ItemIndex.load(folder / INDEX_FILE),
            eval_results=eval_results, training_config=training_config, precision=precision, quantize=quantize,
        )

    check_folder = staticmethod(check_folder)

    @quiet_library_progress()
    def save_pretrained(self, save_directory: Union[str, Path]) -> None:
        """Write one self-contained folder: config, safetensors weights (or a LoRA adapter), tokenizer,
        catalogue, FAISS index, training metadata and the model card (`README.md`).

        The folder is written beside the target and swapped in as a whole, so a crash at any moment
        leaves either the old complete folder or the new one. Entries of the target that llmrec did not
        write (training `checkpoints/`, `.git/`, `.env`, a user's notes) are carried over; a user's file
        with one of llmrec's names (say a `README.md` of a folder llmrec never saved to) makes the save
        refuse with `ModelFolderError` naming it. What llmrec wrote is read from the `file_checksums` of
        the target's `config.json`, or for older llmrec folders from llmrec's fixed file names. The save
        holds the lock `add_items` takes, so weights, config and catalogue come from the same moment.
        """
        if self.quantize is not None or self.precision != "fp32":
            raise InvalidRequestError(
                f"This recommender was loaded for serving with reduced precision (precision={self.precision!r}, "
                f"quantize={self.quantize!r}); its weights are not saved. Load the folder without those options "
                "to save or push it."
            )
        saved_to = save_folder(save_directory, self._write_folder, self._write_lock)
        logger.info("Saved model, tokenizer, catalogue, index and model card to %s", saved_to)

    def _write_folder(self, staging: Path) -> None:
        """Every file llmrec writes, from the serving state of this moment (the caller holds the write lock)."""
        state = self._state
        write_model_files(staging, self.model, self.tokenizer, state, self.eval_results, self.training_config)
        self._model_card(state).save(staging / MODEL_CARD_FILE)

    def model_card(self, repo_id: Optional[str] = None) -> Any:
        """The `huggingface_hub.ModelCard` of this model, with its evaluation results when it has them."""
        return self._model_card(self._state, repo_id)

    def _model_card(self, state: ServingState, repo_id: Optional[str] = None) -> Any:
        return render_model_card(
            self.model.config, state.item_ids, self.eval_results, self.training_config, repo_id=repo_id,
            index_type=type(state.pipeline.index.faiss_index).__name__,  # the FAISS class the folder really holds
        )

    def push_to_hub(self, repo_id: str, **upload_options: Any) -> list[str]:
        """Save to a temporary folder and upload it as one commit; returns the uploaded files.

        `upload_options` are `llmrec.hub.push_to_hub`'s keyword arguments (private, token, commit_message,
        dry_run), which does the upload.
        """
        inspect.signature(push_to_hub).bind(None, repo_id, **upload_options)  # a misspelled option fails before the save
        with tempfile.TemporaryDirectory() as temporary:
            folder = Path(temporary) / "model"
            self.save_pretrained(folder)
            self.model_card(repo_id).save(folder / MODEL_CARD_FILE)
            return push_to_hub(folder, repo_id, **upload_options)

    # ----- catalogue -----------------------------------------------------------------------------------

    def add_items(self, item_ids: Sequence[str], item_texts: Sequence[str], batch_size: int = 256) -> None:
        """Embed new items from their text and add them to the index: recommendable at once, no retraining.

        New items have no learned ID embedding, so they are represented by their text alone, the same
        path ID dropout calibrated in training. Requests running meanwhile see the catalogue before or
        after, never a mix.
        """
        item_ids, item_texts, batch_size = check_items_to_add(item_ids, item_texts, batch_size)
        if not item_ids:
            return
        with self._write_lock:
            grown = grown_state(self._state, self.model, self.tokenizer, item_ids, item_texts, batch_size)
            self._state = grown  # the one assignment that publishes the new items
        logger.info("Added %d items; the catalogue now has %d.", len(item_ids), grown.num_items)

    # ----- serving -----------------------------------------------------------------------------------

    def recommend(
        self,
        history: Sequence[str],
        k: int = 10,
        *,
        exclude: Optional[Iterable[str]] = None,
        filter: Optional[ItemFilter] = None,
        exclude_history: Optional[bool] = None,
        profile: Optional[str] = None,
        new_items: int = 0,
        diversity: Optional[float] = None,
    ) -> RankedItems:
        """The `k` best items for one history (item ids, oldest first) as (item_id, score), best first.

        `exclude` lists items never to return, `filter` keeps only the items it admits (a callable on
        item ids, or a collection of allowed ids), and items of the history are left out unless
        `exclude_history=False` (None: as the model was trained, `retrieval.exclude_history`, true by default). Fewer than `k` items come back when fewer are eligible, so at most
        min(k, catalogue size); `k` above `max_k` raises `InvalidRequestError`.

        The head reranks the retriever's first `num_candidates` (config.json) items; when `k` is larger,
        the items beyond them follow in retrieval order with their retrieval scores (cosine / temperature,
        not comparable with the head's): the head is trained to reorder that many candidates only.

        `profile` is a free-text description of the user ("likes 90s sci-fi and dark comedies"), read by
        the same BERT as the items, for models with a profile path (`use_user_profiles`). A user with a
        profile is recommended for by the model even with an empty history (a cold user); an empty history
        without a profile gets the most popular eligible items, scored by their training popularity.

        `new_items=n` reserves up to n of the k slots for the best-scoring items without a trained ID
        embedding (those added with `add_items`, or never interacted with in training): new items already
        in the top k count towards n, the rest replace the last slots, in their score order. Every answer is
        then a `RankedItem` whose `reserved` flag marks those items. n=0 (the default) is the plain ranking.

        `diversity=λ` (a number in [0, 1]) re-ranks the head's ranked candidates by maximal marginal relevance
        in the encoder's text-embedding space: each next item maximises (1 - λ)·rel - λ·(its highest cosine to
        the items already picked), rel being the head's score min-max scaled to [0, 1] over the candidates.
        Every item keeps its relevance score, so the scores of a diversified answer need not decrease. The
        order of the steps: exclusions and filter, retrieval and head, MMR, then the `new_items` slots as
        above; a user with neither history nor profile still gets the popularity fallback. λ = 0 or None (the
        default) is the plain ranking, exactly.
        """
        return self.recommend_batch(
            [history], k, exclude=exclude, filter=filter, exclude_history=exclude_history,
            profiles=None if profile is None else [profile], new_items=new_items, diversity=diversity,
        )[0]

    def recommend_batch(
        self,
        histories: Sequence[Sequence[str]],
        k: int = 10,
        *,
        exclude: Optional[Iterable[str]] = None,
        filter: Optional[ItemFilter] = None,
        exclude_history: Optional[bool] = None,
        profiles: Optional[Sequence[Optional[str]]] = None,
        new_items: int = 0,
        diversity: Optional[float] = None,
    ) -> list[RankedItems]:
        """`recommend` for many histories at once: one FAISS search and one reranker call per batch.

        `profiles`, if given, holds one profile text (or None) per history; `new_items` and `diversity` as in
        `recommend`.
        """
        k = check_k(k, self.max_k)
        new_items = check_new_items(new_items, k)
        diversity = check_diversity(diversity)
        exclude_history = self.model.config.exclude_history if exclude_history is None else check_flag(
            exclude_history, "exclude_history"
        )
        state = self._state  # read once: an add_items meanwhile publishes a new state, never changes this one
        ranker = Ranker(self.model, self.tokenizer, state)
        histories = check_rows(histories, "recommend_batch's histories")
        profiles = check_profiles(self.model, profiles, len(histories))
        index_histories = [item_indices(state, ordered_list(history, "history"), "history") for history in histories]
        excluded = set(item_indices(state, id_collection(exclude, "exclude list"), "exclude list")) if exclude is not None else set()
        allowed = ranker.allowed_indices(filter)
        return ranker.recommend(index_histories, profiles, excluded, allowed, exclude_history, k, new_items, diversity)

    def rerank(self, history: Sequence[str], candidates: Sequence[str]) -> RankedItems:
        """Score the given candidates for one history with the cross-attention head, best first."""
        return self.rerank_batch([history], [candidates])[0]

    def rerank_batch(self, histories: Sequence[Sequence[str]], candidates: Sequence[Sequence[str]]) -> list[RankedItems]:
        """`rerank` for many (history, candidates) pairs in one batched call.

        Every candidate is scored, history items included; each candidate list must not repeat an id.
        With an empty history the head sees no history, and scores fall back to what it learned without one.
        """
        state = self._state
        histories = check_rows(histories, "rerank_batch's histories")
        candidates = check_rows(candidates, "rerank_batch's candidate lists")
        if len(histories) != len(candidates):
            raise InvalidRequestError(f"Got {len(histories)} histories but {len(candidates)} candidate lists; pass one list per history.")
        index_histories = [item_indices(state, ordered_list(history, "history"), "history") for history in histories]
        candidates = [ordered_list(row, "candidate list") for row in candidates]
        index_candidates = [item_indices(state, row, "candidate list") for row in candidates]
        for row in candidates:
            repeated = sorted(item_id for item_id, count in Counter(map(str, row)).items() if count > 1)
            if repeated:
                raise InvalidRequestError(f"Candidate id(s) {repeated[:10]} appear more than once; pass each candidate once.")
        return Ranker(self.model, self.tokenizer, state).rerank(index_histories, index_candidates)

    def explain(
        self, history: Sequence[str], item_id: str, per_head: bool = False
    ) -> Union[list[tuple[str, float]], list[tuple[str, list[float]]]]:
        """How much each history item weighed in `item_id`'s reranking score, oldest first.

        The weights are the cross-attention of the candidate over the history (the last
        `max_history_length` items), averaged over heads (or one list per item with `per_head`); they are
        non-negative and sum to 1 over the history.
        """
        state = self._state
        history = ordered_list(history, "history")
        per_head = check_flag(per_head, "per_head")
        history_indices = item_indices(state, history, "history")
        if not history_indices:
            raise InvalidRequestError("explain() needs a non-empty history: attention weights are over history items.")
        (candidate,) = item_indices(state, [item_id], "item to explain")
        _, attentions = state.pipeline.rerank([history_indices], np.array([[candidate]]), output_attentions=True)
        weights = attentions[0, :, 0].float().cpu()  # (heads, L) over the left-padded history
        recent = history[-weights.shape[-1] :]
        weights = weights[:, weights.shape[-1] - len(recent) :]
        if per_head:
            return [(str(item), weights[:, column].tolist()) for column, item in enumerate(recent)]
        mean = weights.mean(dim=0)
        return [(str(item), float(mean[column])) for column, item in enumerate(recent)]
