"""How a `Recommender` answer is made: FAISS retrieval, the cross-attention head's reordering of the first
candidates, the MMR re-ranking `diversity` asks for, the popularity fallback for users with nothing to go on,
and the slots `new_items` holds for items without a trained ID embedding.

A `Ranker` is bound to the serving state one request read (`llmrec.serving.ServingState`) and uses nothing
else about the catalogue, so an `add_items` meanwhile never changes an answer half-way. Its arguments are
already checked item indices (1-based); `Recommender` turns raw ids into them and back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from .errors import InvalidRequestError
from .modeling import LlmRecModel, split_histories
from .modeling.text_encoding import embed_item_texts
from .retrieval import CandidatePipeline
from .serving import ServingState, check_rows, id_collection, item_indices


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


def check_new_items(new_items: Any, k: int) -> int:
    if isinstance(new_items, bool) or not isinstance(new_items, (int, np.integer)):
        raise InvalidRequestError(f"new_items must be an integer from 0 to k ({k}), got {new_items!r}.")
    if not 0 <= new_items <= k:
        raise InvalidRequestError(
            f"new_items={new_items} is outside 0..k ({k}); it is how many of the k slots are held for new items."
        )
    return int(new_items)


def check_diversity(diversity: Any) -> float:
    """The MMR trade-off λ as a float in [0, 1]; None is 0, the plain ranking."""
    if diversity is None:
        return 0.0
    if isinstance(diversity, (bool, np.bool_)) or not isinstance(diversity, (int, float, np.integer, np.floating)):
        raise InvalidRequestError(
            f"diversity must be a number from 0 to 1 (0 = the plain ranking, 1 = only diversity), got {diversity!r}."
        )
    if not 0.0 <= float(diversity) <= 1.0:  # NaN fails this too
        raise InvalidRequestError(
            f"diversity={diversity!r} is outside 0..1; it weighs dissimilarity to the items already picked against "
            "relevance (0 = the plain ranking)."
        )
    return float(diversity)


def mmr_order(scores: np.ndarray, similarities: np.ndarray, diversity: float, k: int) -> np.ndarray:
    """Positions of up to `k` items of a list, picked greedily by maximal marginal relevance.

    Each pick maximises (1 - λ)·rel(i) - λ·max_{j picked} sim(i, j), with rel the scores min-max normalised to
    [0, 1] over the whole list (all 1 when the scores are equal). The first pick has nothing to be unlike, so
    it is the most relevant item; ties go to the earlier position, so λ = 0 keeps a best-first list as it is.
    """
    scores = np.asarray(scores, dtype=np.float64)
    count = min(int(k), len(scores))
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    spread = scores.max() - scores.min()
    relevance = (scores - scores.min()) / spread if spread > 0 else np.ones_like(scores)
    chosen = [int(np.argmax(relevance))]
    closest = np.array(similarities[:, chosen[0]], dtype=np.float64)  # each item's highest similarity to the picks
    available = np.ones(len(scores), dtype=bool)
    available[chosen[0]] = False
    while len(chosen) < count:
        marginal = np.where(available, (1.0 - diversity) * relevance - diversity * closest, -np.inf)
        pick = int(np.argmax(marginal))
        chosen.append(pick)
        available[pick] = False
        closest = np.maximum(closest, similarities[:, pick])
    return np.asarray(chosen, dtype=np.int64)


def text_similarities(item_text_embeddings: torch.Tensor, item_indices: np.ndarray) -> np.ndarray:
    """Cosine similarities (n, n) of the items' encoder text embeddings: the space diversity is judged in."""
    rows = torch.as_tensor(np.asarray(item_indices, dtype=np.int64), device=item_text_embeddings.device)
    vectors = F.normalize(item_text_embeddings[rows].float(), dim=-1)
    return (vectors @ vectors.T).double().cpu().numpy()


def diversified(indices: np.ndarray, scores: np.ndarray, item_text_embeddings: torch.Tensor, diversity: float,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `k` items of a best-first (item indices, scores) list in MMR order, each with its own score.

    Padding (index 0) and non-finite scores are dropped first, as they would never be answered.
    """
    keep = np.flatnonzero((indices > 0) & np.isfinite(scores))
    indices, scores = indices[keep], scores[keep]
    if len(indices) == 0:
        return indices, scores
    order = mmr_order(scores, text_similarities(item_text_embeddings, indices), diversity, k)
    return indices[order], scores[order]


def check_profiles(model: LlmRecModel, profiles: Optional[Sequence[Optional[str]]], count: int) -> list[Optional[str]]:
    """One profile text (or None) per history; texts only for a model with a profile path."""
    if profiles is None:
        return [None] * count
    profiles = check_rows(profiles, "profiles")
    if len(profiles) != count:
        raise InvalidRequestError(f"Got {count} histories but {len(profiles)} profiles; pass one (or None) per history.")
    bad = [profile for profile in profiles if profile is not None and (not isinstance(profile, str) or not profile.strip())]
    if bad:
        raise InvalidRequestError(f"A profile must be a non-empty text (or None); got {bad[:3]!r}.")
    if model.profile_projection is None and any(profile is not None for profile in profiles):
        raise InvalidRequestError(
            "This model has no user-profile path (trained without use_user_profiles); recommend from a history, "
            "or fit profiles with llmrec.training.profiles.fit_user_profiles."
        )
    return profiles


@dataclass(frozen=True)
class Ranker:
    """The model (and its tokenizer, for profile texts) over one serving state, for one request."""

    model: LlmRecModel
    tokenizer: PreTrainedTokenizerBase
    state: ServingState

    def allowed_indices(self, filter: Optional[ItemFilter]) -> Optional[np.ndarray]:
        """Item indices a filter admits: a callable on item ids, or a collection of allowed ids."""
        state = self.state
        if filter is None:
            return None
        if callable(filter):
            return np.array([index for index, item_id in enumerate(state.item_ids, start=1) if filter(item_id)], dtype=np.int64)
        return np.array(sorted(set(item_indices(state, id_collection(filter, "filter"), "filter"))), dtype=np.int64)

    def recommend(
        self, histories: list[list[int]], profiles: list[Optional[str]], excluded: set[int], allowed: Optional[np.ndarray],
        exclude_history: bool, k: int, new_items: int, diversity: float = 0.0,
    ) -> list[RankedItems]:
        """The best `k` items per history; a user with neither history nor profile gets the most popular ones.

        With `diversity` λ > 0 the head's ranked candidates are re-ranked by MMR before the answer is cut to
        `k`; the slots for new items are then filled as without it, and the popularity fallback is left as is.
        """
        results: list[Optional[RankedItems]] = [None] * len(histories)
        warm = []
        for row, history in enumerate(histories):
            if history or profiles[row] is not None:
                warm.append(row)
            else:
                results[row] = self._popular(excluded, allowed, k)
        warm_histories = [histories[row] for row in warm]
        never = [(set(history) if exclude_history else set()) | excluded for history in warm_histories]
        user_embeddings = None
        if warm:
            # One user-tower pass serves the full ranking and the new items' slots alike.
            user_embeddings = self._user_embeddings(self.state.pipeline, warm_histories, [profiles[row] for row in warm])
            answers = self._retrieve_and_rerank(warm_histories, user_embeddings, never, allowed, k, diversity)
            for row, ranked in zip(warm, answers):
                results[row] = ranked
        if new_items:
            self._reserve_new_items(warm, warm_histories, user_embeddings, never, allowed, results, new_items)
        return results

    def rerank(self, histories: list[list[int]], candidates: list[list[int]]) -> list[RankedItems]:
        """Every candidate of each row scored by the head, best first (rows padded to one batch)."""
        width = max((len(row) for row in candidates), default=0)
        if width == 0:
            return [[] for _ in histories]
        padded = np.zeros((len(candidates), width), dtype=np.int64)
        for row, items in enumerate(candidates):
            padded[row, : len(items)] = items
        scores, _ = self.state.pipeline.rerank(histories, padded)
        scores = scores.float().cpu().numpy()
        ranked = []
        for row, items in enumerate(candidates):
            order = np.argsort(-scores[row, : len(items)], kind="stable")
            ranked.append(self._ranked(padded[row][order], scores[row][order], len(items)))
        return ranked

    def _ranked(self, indices: np.ndarray, scores: np.ndarray, k: int) -> RankedItems:
        ids = self.state.item_ids
        kept = np.flatnonzero((indices > 0) & np.isfinite(scores))[:k]  # build only the k answers, not every candidate's
        return [(ids[index - 1], float(score)) for index, score in zip(indices[kept].tolist(), scores[kept].tolist())]

    def _popular(self, exclude: set[int], allowed: Optional[np.ndarray], k: int) -> RankedItems:
        """Users with no history get the most popular items: a documented fallback, not a crash."""
        state = self.state
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

    def _retrieve_and_rerank(
        self, histories: list[list[int]], user_embeddings: torch.Tensor, never: list[set[int]],
        allowed: Optional[np.ndarray], k: int, diversity: float = 0.0,
    ) -> list[RankedItems]:
        """FAISS finds min(max(k, num_candidates), catalogue) items; the head reorders the first num_candidates.

        `diversity` > 0 re-orders the head's list by MMR (`diversified`); any items beyond it keep retrieval order.
        """
        pipeline = self.state.pipeline
        fetch = min(max(k, pipeline.num_candidates), self.state.num_items)
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
            listed, listed_scores = head_candidates[position], head_scores[position]
            if diversity > 0:
                listed, listed_scores = diversified(listed, listed_scores, pipeline.item_text_embeddings, diversity, k)
            answer = self._ranked(listed, listed_scores, k)
            if len(answer) < k and candidates.shape[1] > head_width:
                answer += self._ranked(candidates[position, head_width:], retrieval_scores[position, head_width:], k - len(answer))
            ranked.append(answer)
        return ranked

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

    def _reserve_new_items(
        self, rows: list[int], histories: list[list[int]], user_embeddings: Optional[torch.Tensor], never: list[set[int]],
        allowed: Optional[np.ndarray], results: list, new_items: int,
    ) -> None:
        """Put up to `new_items` of the best new items (no trained ID row) into each answer's last slots, flagged.

        `rows` are the answers with a history or profile, whose `histories`, `user_embeddings` and `never` sets
        the full ranking used; the popularity answers of the others get no new items (nothing to rank them by).
        """
        state = self.state
        warm_items = self.model.warm_items[1 : state.num_items + 1].cpu().numpy()
        fresh = np.flatnonzero(~warm_items) + 1
        if allowed is not None:
            fresh = np.intersect1d(fresh, allowed)
        fresh_ids = {state.item_ids[index - 1] for index in fresh.tolist()}
        best_fresh: list[RankedItems] = [[] for _ in results]
        if len(fresh) and rows:
            # The new items ranked among themselves by the same retrieval + head as the full ranking.
            ranked = self._retrieve_and_rerank(histories, user_embeddings, never, fresh, new_items)
            for row, answer in zip(rows, ranked):
                best_fresh[row] = answer
        for row, answer in enumerate(results):
            results[row] = _with_reserved_slots(answer, best_fresh[row], fresh_ids, new_items)


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
