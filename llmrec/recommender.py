"""`Recommender`: a trained model, its catalogue and its FAISS index, behind raw item ids."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import yaml
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .errors import InvalidRequestError, LlmRecError, ModelFolderError, UnknownItemError
from .hub import EVAL_RESULTS_FILE, MODEL_CARD_FILE, TRAINING_CONFIG_FILE, push_to_hub, read_run_metadata, render_model_card
from .model_folder import CATALOGUE_FILE, CONFIG_FILE, INDEX_FILE, REQUIRED_FILES, WEIGHTS_FILE, check_folder
from .modeling import LlmRecModel, split_histories
from .modeling.modeling_llmrec import ENCODER_ADAPTER_FOLDER
from .modeling.precision import cast_encoder_bf16, check_precision, check_quantize, quantize_int8
from .modeling.text_encoding import embed_item_texts, load_tokenizer
from .retrieval import CandidatePipeline, ItemIndex, build_item_index
from .serving import (
    MAX_K, ServingState, check_batch_size, check_flag, check_item_ids, check_k, check_rows, id_collection, item_indices,
    ordered_list,
)
from .utils.integrity import check_links_stay_inside, record_checksums
from .utils.io import CARRYING_MARKER, atomic_write, remove_stale_temporaries, restore_interrupted_replace, write_json_atomic
from .utils.quiet import quiet_library_progress
from .utils.snapshots import download_snapshot, is_hub_repo_id
from .version import __version__

logger = logging.getLogger(__name__)

# Written only for some models; an old copy must not outlive a save that no longer writes it.
_OPTIONAL_OUTPUTS = frozenset({ENCODER_ADAPTER_FOLDER, EVAL_RESULTS_FILE, TRAINING_CONFIG_FILE})
# What llmrec wrote into folders that predate the `file_checksums` manifest in config.json (the tokenizer's
# own files are added from what the tokenizer writes now).
_LEGACY_OUTPUTS = frozenset(
    {*REQUIRED_FILES, INDEX_FILE + ".json", MODEL_CARD_FILE, *_OPTIONAL_OUTPUTS, "tokenizer.json", "tokenizer_config.json",
     "special_tokens_map.json", "vocab.txt", "added_tokens.json", "chat_template.jinja"}
)



class RankedItem(tuple):
    """One (item_id, score) answer, flagged `reserved` when it fills a slot held for new items (`new_items`).

    A tuple subclass so that `for item_id, score in answer` and comparisons with plain tuples work as before.
    """

    reserved: bool

    def __new__(cls, item_id: str, score: float, reserved: bool = False) -> "RankedItem":
        item = super().__new__(cls, (item_id, score))
        item.reserved = reserved
        return item


RankedItems = list[tuple[str, float]]
ItemFilter = Union[Callable[[str], bool], Iterable[str]]


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
        pipeline = CandidatePipeline(model, index, num_candidates=model.config.num_candidates)
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
        folder = cls._resolve_folder(path_or_repo_id, revision, token)
        cls.check_folder(folder, verify=verify)
        try:
            model = LlmRecModel.from_pretrained(folder, use_safetensors=True, trust_remote_code=False)
        except LlmRecError:
            raise
        except Exception as error:  # truncated or corrupt safetensors, shapes that do not match config.json
            raise ModelFolderError(
                f"Could not load the model weights {folder / WEIGHTS_FILE} ({type(error).__name__}: "
                f"{str(error)[:300]}); the file is corrupt or does not match {folder / CONFIG_FILE}. Copy or "
                "download the folder again."
            ) from error
        try:
            vocab_size = model.item_encoder.backbone.get_input_embeddings().num_embeddings
        except (AttributeError, NotImplementedError):  # an encoder without a token embedding table
            vocab_size = None
        tokenizer = load_tokenizer(folder, vocab_size)
        try:
            catalogue = Dataset.from_parquet(str(folder / CATALOGUE_FILE))
            item_ids, item_texts, popularity = catalogue["item_id"], catalogue["text"], catalogue["popularity"]
        except Exception as error:
            raise ModelFolderError(
                f"Could not read the catalogue {folder / CATALOGUE_FILE} ({type(error).__name__}: {error}); it "
                "must be Parquet with columns item_id, text, popularity. Copy or download the folder again."
            ) from error
        eval_results, training_config = read_run_metadata(folder)
        return cls(
            model.to(device),
            tokenizer,
            item_ids,
            item_texts,
            popularity,
            index=ItemIndex.load(folder / INDEX_FILE),
            eval_results=eval_results,
            training_config=training_config,
            precision=precision,
            quantize=quantize,
        )

    @staticmethod
    def _resolve_folder(path_or_repo_id: Union[str, Path], revision: Optional[str], token: Optional[str]) -> Path:
        """The local folder to load, after refusing links out of it (a Hub snapshot's may point into its cache)."""
        folder = Path(path_or_repo_id).expanduser()
        if folder.is_dir() or restore_interrupted_replace(folder):
            check_links_stay_inside(folder, walk=(ENCODER_ADAPTER_FOLDER,))
            remove_stale_temporaries(folder)  # what a save killed mid-write left beside the folder
            return folder
        if not is_hub_repo_id(path_or_repo_id):
            raise ModelFolderError(
                f"Model folder {folder} does not exist; pass the output_dir of a finetune run, a folder written by "
                "Recommender.save_pretrained, or a Hub repo id (user/name)."
            )
        return download_snapshot(str(path_or_repo_id), revision=revision, token=token, walk=(ENCODER_ADAPTER_FOLDER,))

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
        save_directory = Path(save_directory).expanduser().resolve()
        if save_directory.exists() and not save_directory.is_dir():
            raise ModelFolderError(f"{save_directory} is a file; save the model to a folder (new or existing).")
        if save_directory == Path.cwd().resolve() or save_directory in Path.cwd().resolve().parents:
            raise ModelFolderError(
                f"Not saving into {save_directory}: it is the working directory (or holds it), which a save swaps "
                "out as a whole. Save to a dedicated folder such as runs/my-model."
            )
        try:
            with self._write_lock, atomic_write(save_directory, carry_over=_user_entries) as staging:
                staging.mkdir()
                self._write_folder(staging, self._state, __version__)
                # Before any user file joins: only what llmrec wrote is checked on load. The card is left
                # out, since it is never read to load and the Hub lets people edit it.
                record_checksums(staging, CONFIG_FILE, exclude=(MODEL_CARD_FILE,))
        except LlmRecError:
            raise
        except Exception as error:  # a full or read-only disk: OSError, SafetensorError, FAISS's RuntimeError
            raise ModelFolderError(
                f"Could not save the model to {save_directory} ({type(error).__name__}: {str(error)[:300]}); the "
                "disk may be full or not writable. The previous folder, if there was one, is unchanged."
            ) from error
        logger.info("Saved model, tokenizer, catalogue, index and model card to %s", save_directory)

    def _write_folder(self, staging: Path, state: ServingState, version: str) -> None:
        """Every file llmrec writes, from one serving state (the caller holds the write lock)."""
        self.model.config.llmrec_version = version
        self.model.save_pretrained(staging)
        self.tokenizer.save_pretrained(staging)
        Dataset.from_dict(
            {"item_id": list(state.item_ids), "text": list(state.item_texts), "popularity": state.item_popularity.tolist()}
        ).to_parquet(str(staging / CATALOGUE_FILE))
        state.pipeline.index.save(staging / INDEX_FILE)
        if self.eval_results is not None:
            write_json_atomic(staging / EVAL_RESULTS_FILE, self.eval_results)
        if self.training_config is not None:
            (staging / TRAINING_CONFIG_FILE).write_text(yaml.safe_dump(self.training_config, sort_keys=False))
        self._model_card(state).save(staging / MODEL_CARD_FILE)

    def model_card(self, repo_id: Optional[str] = None) -> Any:
        """The `huggingface_hub.ModelCard` of this model, with its evaluation results when it has them."""
        return self._model_card(self._state, repo_id)

    def _model_card(self, state: ServingState, repo_id: Optional[str] = None) -> Any:
        return render_model_card(
            self.model.config, state.item_ids, self.eval_results, self.training_config, repo_id=repo_id,
            index_type=type(state.pipeline.index.faiss_index).__name__,  # the FAISS class the folder really holds
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        commit_message: str = "Upload llmrec model",
        dry_run: bool = False,
    ) -> list[str]:
        """Save to a temporary folder and upload it as one commit; returns the uploaded files."""
        with tempfile.TemporaryDirectory() as temporary:
            folder = Path(temporary) / "model"
            self.save_pretrained(folder)
            self.model_card(repo_id).save(folder / MODEL_CARD_FILE)
            return push_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message, dry_run=dry_run)

    # ----- catalogue -----------------------------------------------------------------------------------

    def add_items(self, item_ids: Sequence[str], item_texts: Sequence[str], batch_size: int = 256) -> None:
        """Embed new items from their text and add them to the index: recommendable at once, no retraining.

        New items have no learned ID embedding, so they are represented by their text alone, the same
        path ID dropout calibrated in training. Requests running meanwhile see the catalogue before or
        after, never a mix.
        """
        item_ids = check_item_ids(ordered_list(item_ids, "list of new item ids"), "list of new item ids")
        item_texts = ordered_list(item_texts, "list of new item texts")
        batch_size = check_batch_size(batch_size)
        if len(item_ids) != len(item_texts):
            raise InvalidRequestError(f"add_items got {len(item_ids)} ids but {len(item_texts)} texts; pass one text per id.")
        empty = [item_id for item_id, text in zip(item_ids, item_texts) if not isinstance(text, str) or not text.strip()]
        if empty:
            raise InvalidRequestError(f"Item(s) {empty[:10]} have no text; a new item is only known by its text.")
        if not item_ids:
            return
        with self._write_lock:
            state = self._state
            duplicates = sorted({item_id for item_id, count in Counter(item_ids).items() if count > 1 or item_id in state.item_index})
            if duplicates:
                raise InvalidRequestError(
                    f"Item id(s) {duplicates[:10]} are already in the catalogue or repeated; each item id can be added once."
                )
            text_embeddings = embed_item_texts(self.model, self.tokenizer, item_texts, batch_size)
            undo = _undo_growth(self.model)
            try:
                # The model grows in place, but requests read the state's own item vectors, not its buffers.
                self.model.add_items(text_embeddings)
                grown = state.extended(item_ids, item_texts, state.pipeline.extended(len(item_ids)))
            except BaseException:
                undo()
                raise
            self._state = grown  # the one assignment that publishes the new items
        logger.info("Added %d items; the catalogue now has %d.", len(item_ids), grown.num_items)

    # ----- serving -----------------------------------------------------------------------------------

    @staticmethod
    def _allowed_indices(state: ServingState, filter: Optional[ItemFilter]) -> Optional[np.ndarray]:
        """Item indices a filter admits: a callable on item ids, or a collection of allowed ids."""
        if filter is None:
            return None
        if callable(filter):
            return np.array([index for index, item_id in enumerate(state.item_ids, start=1) if filter(item_id)], dtype=np.int64)
        return np.array(sorted(set(item_indices(state, id_collection(filter, "filter"), "filter"))), dtype=np.int64)

    @staticmethod
    def _ranked(state: ServingState, indices: np.ndarray, scores: np.ndarray, k: int) -> RankedItems:
        ids = state.item_ids
        kept = np.flatnonzero((indices > 0) & np.isfinite(scores))[:k]  # build only the k answers, not every candidate's
        return [(ids[index - 1], float(score)) for index, score in zip(indices[kept].tolist(), scores[kept].tolist())]

    @staticmethod
    def _popular(state: ServingState, exclude: set[int], allowed: Optional[np.ndarray], k: int) -> RankedItems:
        """Users with no history get the most popular items: a documented fallback, not a crash."""
        order = state.popularity_order
        if allowed is not None:
            order = order[np.isin(order, allowed)]
        ranked = []
        for index in order:
            if index not in exclude:
                ranked.append((state.item_ids[index - 1], float(state.item_popularity[index - 1])))
                if len(ranked) == k:
                    break
        return ranked

    def recommend(
        self,
        history: Sequence[str],
        k: int = 10,
        *,
        exclude: Optional[Iterable[str]] = None,
        filter: Optional[ItemFilter] = None,
        exclude_history: bool = True,
        profile: Optional[str] = None,
        new_items: int = 0,
    ) -> RankedItems:
        """The `k` best items for one history (item ids, oldest first) as (item_id, score), best first.

        `exclude` lists items never to return, `filter` keeps only the items it admits (a callable on
        item ids, or a collection of allowed ids), and items of the history are left out unless
        `exclude_history=False`. Fewer than `k` items come back when fewer are eligible, so at most
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
        """
        return self.recommend_batch(
            [history], k, exclude=exclude, filter=filter, exclude_history=exclude_history,
            profiles=None if profile is None else [profile], new_items=new_items,
        )[0]

    def recommend_batch(
        self,
        histories: Sequence[Sequence[str]],
        k: int = 10,
        *,
        exclude: Optional[Iterable[str]] = None,
        filter: Optional[ItemFilter] = None,
        exclude_history: bool = True,
        profiles: Optional[Sequence[Optional[str]]] = None,
        new_items: int = 0,
    ) -> list[RankedItems]:
        """`recommend` for many histories at once: one FAISS search and one reranker call per batch.

        `profiles`, if given, holds one profile text (or None) per history; `new_items` as in `recommend`.
        """
        k = check_k(k, self.max_k)
        new_items = _check_new_items(new_items, k)
        exclude_history = check_flag(exclude_history, "exclude_history")
        state = self._state  # read once: an add_items meanwhile publishes a new state, never changes this one
        histories = check_rows(histories, "recommend_batch's histories")
        profiles = self._check_profiles(profiles, len(histories))
        index_histories = [item_indices(state, ordered_list(history, "history"), "history") for history in histories]
        excluded = set(item_indices(state, id_collection(exclude, "exclude list"), "exclude list")) if exclude is not None else set()
        allowed = self._allowed_indices(state, filter)
        results: list[Optional[RankedItems]] = [None] * len(histories)
        warm = []
        for row, history in enumerate(index_histories):
            if history or profiles[row] is not None:
                warm.append(row)
            else:
                results[row] = self._popular(state, excluded, allowed, k)
        if warm:
            warm_histories = [index_histories[row] for row in warm]
            never = [(set(history) if exclude_history else set()) | excluded for history in warm_histories]
            for row, ranked in zip(warm, self._retrieve_and_rerank(state, warm_histories, [profiles[row] for row in warm], never, allowed, k)):
                results[row] = ranked
        if new_items:
            self._reserve_new_items(state, index_histories, profiles, exclude_history, excluded, allowed, results, new_items)
        return results

    def _reserve_new_items(
        self, state: ServingState, histories: list[list[int]], profiles: list[Optional[str]], exclude_history: bool,
        excluded: set[int], allowed: Optional[np.ndarray], results: list, new_items: int,
    ) -> None:
        """Put up to `new_items` of the best new items (no trained ID row) into each answer's last slots, flagged."""
        warm_items = self.model.warm_items[1 : state.num_items + 1].cpu().numpy()
        fresh = np.flatnonzero(~warm_items) + 1
        if allowed is not None:
            fresh = np.intersect1d(fresh, allowed)
        fresh_ids = {state.item_ids[index - 1] for index in fresh.tolist()}
        best_fresh: list[RankedItems] = [[] for _ in histories]
        if len(fresh):
            never = [(set(history) if exclude_history else set()) | excluded for history in histories]
            # The new items ranked among themselves by the same retrieval + head as the full ranking.
            rows = [row for row, history in enumerate(histories) if history or profiles[row] is not None]
            if rows:
                ranked = self._retrieve_and_rerank(
                    state, [histories[row] for row in rows], [profiles[row] for row in rows], [never[row] for row in rows],
                    fresh, new_items,
                )
                for row, answer in zip(rows, ranked):
                    best_fresh[row] = answer
        for row, answer in enumerate(results):
            results[row] = _with_reserved_slots(answer, best_fresh[row], fresh_ids, new_items)

    def _retrieve_and_rerank(
        self, state: ServingState, histories: list[list[int]], profiles: list[Optional[str]], never: list[set[int]],
        allowed: Optional[np.ndarray], k: int,
    ) -> list[RankedItems]:
        """FAISS finds min(max(k, num_candidates), catalogue) items; the head reorders the first num_candidates."""
        pipeline = state.pipeline
        user_embeddings = self._user_embeddings(pipeline, histories, profiles)
        fetch = min(max(k, pipeline.num_candidates), state.num_items)
        retrieval_scores, candidates = pipeline.retrieve(histories, fetch, user_embeddings, exclude=never, allowed=allowed)
        head_width = max(0, min(pipeline.num_candidates, candidates.shape[1]))
        scores = np.empty((len(histories), 0), dtype=np.float32)
        if head_width:
            head_scores, _ = pipeline.rerank(histories, candidates[:, :head_width], user_embeddings=user_embeddings)
            scores = head_scores.float().cpu().numpy()
        order = np.argsort(-scores, axis=1, kind="stable")  # one call for the batch, not one per user
        head_candidates = np.take_along_axis(candidates[:, :head_width], order, axis=1)
        head_scores = np.take_along_axis(scores, order, axis=1)
        ranked = []
        for position in range(len(histories)):
            answer = self._ranked(state, head_candidates[position], head_scores[position], k)
            if len(answer) < k and candidates.shape[1] > head_width:
                answer += self._ranked(state, candidates[position, head_width:], retrieval_scores[position, head_width:], k - len(answer))
            ranked.append(answer)
        return ranked

    def _check_profiles(self, profiles: Optional[Sequence[Optional[str]]], count: int) -> list[Optional[str]]:
        if profiles is None:
            return [None] * count
        profiles = check_rows(profiles, "profiles")
        if len(profiles) != count:
            raise InvalidRequestError(f"Got {count} histories but {len(profiles)} profiles; pass one (or None) per history.")
        bad = [profile for profile in profiles if profile is not None and (not isinstance(profile, str) or not profile.strip())]
        if bad:
            raise InvalidRequestError(f"A profile must be a non-empty text (or None); got {bad[:3]!r}.")
        if self.model.profile_projection is None and any(profile is not None for profile in profiles):
            raise InvalidRequestError(
                "This model has no user-profile path (trained without use_user_profiles); recommend from a history, "
                "or fit profiles with llmrec.training.profiles.fit_user_profiles."
            )
        return profiles

    @torch.inference_mode()
    def _user_embeddings(self, pipeline: CandidatePipeline, histories: list[list[int]], profiles: list[Optional[str]]) -> torch.Tensor:
        """User vectors from histories and, where given, profile texts (encoded by the item BERT)."""
        if all(profile is None for profile in profiles):
            return pipeline.user_embeddings(histories)
        texts = [profile if profile is not None else "" for profile in profiles]
        profile_embeddings = embed_item_texts(self.model, self.tokenizer, texts)
        has_profile = torch.tensor([profile is not None for profile in profiles], device=profile_embeddings.device)
        window, older = split_histories(histories, self.model.config.max_history_length, pipeline.device)
        return self.model.encode_users(window, pipeline.item_embeddings, profile_embeddings, has_profile, older, last_only=True)[:, -1]

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
        width = max((len(row) for row in index_candidates), default=0)
        if width == 0:
            return [[] for _ in histories]
        padded = np.zeros((len(candidates), width), dtype=np.int64)
        for row, items in enumerate(index_candidates):
            padded[row, : len(items)] = items
        scores, _ = state.pipeline.rerank(index_histories, padded)
        scores = scores.float().cpu().numpy()
        ranked = []
        for row, items in enumerate(index_candidates):
            order = np.argsort(-scores[row, : len(items)], kind="stable")
            ranked.append(self._ranked(state, padded[row][order], scores[row][order], len(items)))
        return ranked

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


def _check_new_items(new_items: Any, k: int) -> int:
    if isinstance(new_items, bool) or not isinstance(new_items, (int, np.integer)):
        raise InvalidRequestError(f"new_items must be an integer from 0 to k ({k}), got {new_items!r}.")
    if not 0 <= new_items <= k:
        raise InvalidRequestError(
            f"new_items={new_items} is outside 0..k ({k}); it is how many of the k slots are held for new items."
        )
    return int(new_items)


def _with_reserved_slots(answer: RankedItems, best_fresh: RankedItems, fresh_ids: set[str], new_items: int) -> list[RankedItem]:
    """`answer` with its last non-new slots given to the best new items missing from it, up to `new_items` new ones.

    The first `new_items` new items (those ranked in on their own first) are flagged `reserved`.
    """
    in_answer = {item_id for item_id, _ in answer}
    present = sum(item_id in fresh_ids for item_id in in_answer)
    replaceable = len(answer) - present
    to_add = [item for item in best_fresh if item[0] not in in_answer][: min(max(0, new_items - present), replaceable)]
    kept, drop = list(answer), len(to_add)
    for position in reversed(range(len(kept))):
        if drop == 0:
            break
        if kept[position][0] not in fresh_ids:
            del kept[position]
            drop -= 1
    flagged, marked = [], 0
    for item_id, score in kept + to_add:
        reserved = item_id in fresh_ids and marked < new_items
        marked += reserved
        flagged.append(RankedItem(item_id, score, reserved))
    return flagged


def _undo_growth(model: LlmRecModel) -> Callable[[], None]:
    """A function that puts back the model's catalogue buffers as they are now (if add_items fails halfway)."""
    saved = (model.item_text_embeddings, model.warm_items, model.item_id_embeddings, model.config.num_items)

    def undo() -> None:
        model.item_text_embeddings, model.warm_items = saved[0], saved[1]
        if saved[2] is not None:
            model.item_id_embeddings = saved[2]
        model.config.num_items = saved[3]

    return undo


def _written_by_llmrec(folder: Path, staging: Path) -> frozenset[str]:
    """Top-level names llmrec wrote into an existing folder: its manifest, or for older llmrec folders the fixed names."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return frozenset()
    if not isinstance(config, dict) or config.get("model_type") != "llmrec":
        return frozenset()  # not an llmrec folder: llmrec wrote nothing in it
    checksums = config.get("file_checksums")
    if isinstance(checksums, dict):
        # The card is llmrec's too, though left out of the checksums (people edit it on the Hub).
        written = {Path(name).parts[0] for name in checksums if isinstance(name, str) and Path(name).parts}
        return frozenset({CONFIG_FILE, MODEL_CARD_FILE} | written)
    return _LEGACY_OUTPUTS | {entry.name for entry in staging.iterdir()}


def _user_entries(folder: Path, staging: Path) -> list[str]:
    """Entries of `folder` that llmrec did not write, to carry into the new folder `staging`.

    Refuses, naming them, when such an entry has a name llmrec writes: the save would overwrite it.
    """
    written = _written_by_llmrec(folder, staging)
    ours = {entry.name for entry in staging.iterdir()} | _OPTIONAL_OUTPUTS
    keep, clashes = [], []
    for entry in folder.iterdir():
        name = entry.name
        leftover = name.startswith(".") and any(name.startswith(f".{own}.tmp-") or name.startswith(f".{own}.old-") for own in ours)
        if name in written or name == CARRYING_MARKER or leftover:
            continue
        (clashes if name in ours else keep).append(name)
    if clashes:
        raise ModelFolderError(
            f"Not saving into {folder}: it holds {', '.join(sorted(clashes))}, which llmrec did not write there but "
            "would overwrite. Move those files away, or save to another (new or llmrec) folder."
        )
    return keep
