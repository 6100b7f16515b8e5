"""What a `Recommender` serves from, as one immutable value, how `add_items` grows it, and the checks every
request argument passes.

A request reads the recommender's `ServingState` once and uses nothing else about the catalogue, so
`add_items`, which builds a grown state aside (`grown_state`) and publishes it with one assignment, is either
wholly visible to a request or not at all: ids, index rows, cached item vectors and texts always agree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from .errors import InvalidRequestError, UnknownItemError
from .limits import MAX_K
from .modeling import LlmRecModel
from .modeling.text_encoding import embed_item_texts
from .retrieval import CandidatePipeline


@dataclass(frozen=True)
class ServingState:
    """The catalogue (ids, texts, popularity, id -> item index) and the pipeline (FAISS index, cached item
    representations, reranking cache) that serve it. Never mutated once published; `extended` makes a new one."""

    item_ids: tuple[str, ...]
    item_texts: tuple[str, ...]
    item_popularity: np.ndarray  # read-only, (num_items,)
    item_index: Mapping[str, int]  # read-only, raw id -> 1-based item index
    pipeline: CandidatePipeline
    popularity_order: np.ndarray  # read-only item indices, most popular first (the cold-user fallback)

    @classmethod
    def build(
        cls, item_ids: Sequence[str], item_texts: Sequence[str], item_popularity: Sequence[float], pipeline: CandidatePipeline
    ) -> "ServingState":
        popularity = np.array(item_popularity, dtype=np.float64)
        order = np.argsort(-popularity, kind="stable") + 1
        popularity.flags.writeable = order.flags.writeable = False
        ids = tuple(str(item_id) for item_id in item_ids)
        index = MappingProxyType({item_id: position + 1 for position, item_id in enumerate(ids)})
        return cls(ids, tuple(str(text) for text in item_texts), popularity, index, pipeline, order)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def extended(self, item_ids: Sequence[str], item_texts: Sequence[str], pipeline: CandidatePipeline) -> "ServingState":
        """This catalogue followed by new items (popularity 0), served by `pipeline` (already grown by them)."""
        return ServingState.build(
            self.item_ids + tuple(item_ids),
            self.item_texts + tuple(item_texts),
            np.concatenate([self.item_popularity, np.zeros(len(item_ids))]),
            pipeline,
        )

    def with_texts(self, item_texts: Sequence[str]) -> "ServingState":
        return ServingState.build(self.item_ids, item_texts, self.item_popularity, self.pipeline)


# ----- growing the catalogue -------------------------------------------------------------------------------


def check_items_to_add(item_ids: Any, item_texts: Any, batch_size: Any) -> tuple[list[str], list, int]:
    """`add_items`' arguments: one non-empty text per new id, as (ids as strings, texts, batch size)."""
    item_ids = check_item_ids(ordered_list(item_ids, "list of new item ids"), "list of new item ids")
    item_texts = ordered_list(item_texts, "list of new item texts")
    batch_size = check_batch_size(batch_size)
    if len(item_ids) != len(item_texts):
        raise InvalidRequestError(f"add_items got {len(item_ids)} ids but {len(item_texts)} texts; pass one text per id.")
    empty = [item_id for item_id, text in zip(item_ids, item_texts) if not isinstance(text, str) or not text.strip()]
    if empty:
        raise InvalidRequestError(f"Item(s) {empty[:10]} have no text; a new item is only known by its text.")
    return item_ids, item_texts, batch_size


def grown_state(
    state: ServingState, model: LlmRecModel, tokenizer: PreTrainedTokenizerBase, item_ids: list[str],
    item_texts: list, batch_size: int,
) -> ServingState:
    """`state` followed by new items embedded from their text; the caller publishes it (and holds the write lock).

    The model grows in place, but requests read the state's own item vectors, not its buffers; if growing
    fails halfway, the model's catalogue buffers are put back as they were.
    """
    duplicates = sorted({item_id for item_id, count in Counter(item_ids).items() if count > 1 or item_id in state.item_index})
    if duplicates:
        raise InvalidRequestError(
            f"Item id(s) {duplicates[:10]} are already in the catalogue or repeated; each item id can be added once."
        )
    text_embeddings = embed_item_texts(model, tokenizer, item_texts, batch_size)
    undo = _undo_growth(model)
    try:
        model.add_items(text_embeddings)
        return state.extended(item_ids, item_texts, state.pipeline.extended(len(item_ids)))
    except BaseException:
        undo()
        raise


def _undo_growth(model: LlmRecModel) -> Callable[[], None]:
    """A function that puts back the model's catalogue buffers as they are now (if add_items fails halfway)."""
    saved = (model.item_text_embeddings, model.warm_items, model.item_id_embeddings, model.config.num_items,
             getattr(model, "item_popularity_feature", None))

    def undo() -> None:
        model.item_text_embeddings, model.warm_items = saved[0], saved[1]
        if saved[4] is not None:
            model.item_popularity_feature = saved[4]
        if saved[2] is not None:
            model.item_id_embeddings = saved[2]
        model.config.num_items = saved[3]

    return undo


# ----- request arguments ---------------------------------------------------------------------------------


def check_k(k: Any, max_k: int) -> int:
    """A positive integer up to `max_k`; the answer then holds min(k, eligible items)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise InvalidRequestError(f"k must be a positive integer, got {k!r}.")
    if k > max_k:
        raise InvalidRequestError(
            f"k={k} is above this recommender's cap of {max_k} items per answer. Ask for fewer, or raise the cap "
            "with Recommender(..., max_k=N) or `recommender.max_k = N` (the default is llmrec.limits.MAX_K)."
        )
    return int(k)


def check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidRequestError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def ordered_list(value: Any, what: str) -> list:
    """A list from an ordered collection; sets and mappings have no order the answer could depend on."""
    if value is None:
        raise InvalidRequestError(f"The {what} is missing (None); pass a list of item ids (it may be empty).")
    if isinstance(value, (str, bytes)):
        raise InvalidRequestError(f"The {what} must be a list of item ids, not the single string {value!r}.")
    if isinstance(value, (Set, Mapping)):
        raise InvalidRequestError(
            f"The {what} must be an ordered list or tuple, not a {type(value).__name__}: its order decides the answer."
        )
    if isinstance(value, np.ndarray) and value.ndim != 1:
        raise InvalidRequestError(f"The {what} must be one-dimensional; got an array of shape {value.shape}.")
    if not isinstance(value, Iterable):
        raise InvalidRequestError(f"The {what} must be a list of item ids, got {type(value).__name__} {value!r}.")
    return list(value)


def id_collection(value: Any, what: str) -> list:
    """Item ids whose order does not matter (exclude lists, allowed ids): sets are fine too."""
    if isinstance(value, (Set, frozenset)):
        return list(value)
    return ordered_list(value, what)


def _is_item_id(value: Any) -> bool:
    return isinstance(value, (str, int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_item_ids(item_ids: list, what: str) -> list[str]:
    """Item ids as strings: strings or integers, never empty text."""
    bad_types = [item_id for item_id in item_ids if not _is_item_id(item_id)]
    if bad_types:
        raise InvalidRequestError(
            f"The {what} holds values that are not item ids: {bad_types[:5]!r}; item ids are strings (or integers)."
        )
    as_text = [str(item_id) for item_id in item_ids]
    if any(not item_id.strip() for item_id in as_text):
        raise InvalidRequestError(f"The {what} holds an empty item id ({[i for i in as_text if not i.strip()][:3]!r}).")
    return as_text


def item_indices(state: ServingState, item_ids: list, what: str) -> list[int]:
    """1-based item indices of known ids; unknown ones raise UnknownItemError naming them."""
    try:  # the common case, known string ids, in one pass; anything else takes the checked path below
        return list(map(state.item_index.__getitem__, item_ids))
    except (KeyError, TypeError):
        pass
    as_text = [str(item_id) for item_id in item_ids] if all(_is_item_id(i) for i in item_ids) else None
    if as_text is None or any(item_id not in state.item_index for item_id in as_text):
        as_text = check_item_ids(item_ids, what)
        unknown = [item_id for item_id, text in zip(item_ids, as_text) if text not in state.item_index]
        if unknown:
            raise UnknownItemError(unknown)
    return [state.item_index[item_id] for item_id in as_text]


def check_rows(value: Any, what: str) -> list:
    """The outer list of a batch call (one entry per user)."""
    if value is None or isinstance(value, (str, bytes, Set, Mapping)) or not isinstance(value, Iterable):
        raise InvalidRequestError(f"{what} must be a list with one entry per user, got {type(value).__name__}.")
    return list(value)


def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise InvalidRequestError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return int(batch_size)
