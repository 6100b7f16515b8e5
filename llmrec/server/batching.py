"""Micro-batching: concurrent /recommend requests scored in one `recommend_batch` call.

Requests are grouped by everything but their history (recommender, k, exclude, filter, exclude_history, ...),
so a group's one call answers each member exactly as `recommend` would. Scoring runs in a worker thread,
so the event loop keeps accepting requests meanwhile; they form the next batch, which is what makes
batching pay under load while a lone request waits at most `wait_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import LlmRecError

logger = logging.getLogger(__name__)

RankedItems = list[tuple[str, float]]


@dataclass(frozen=True)
class RecommendOptions:
    """Everything a batch shares; hashable so equal options land in one group."""

    k: Any
    exclude: Optional[tuple] = None
    filter: Optional[tuple] = None
    exclude_history: Any = None  # None: the model's retrieval.exclude_history
    new_items: Any = 0
    diversity: Any = None  # None: the plain ranking

    def keywords(self) -> dict[str, Any]:
        return {"exclude": self.exclude, "filter": self.filter, "exclude_history": self.exclude_history,
                "new_items": self.new_items, "diversity": self.diversity}


@dataclass
class _Pending:
    recommender: Any
    history: list
    options: RecommendOptions
    answer: asyncio.Future = field(repr=False)

    @property
    def group(self) -> Hashable:
        return id(self.recommender), self.options


class MicroBatcher:
    """Gathers requests for up to `wait_seconds` or `max_batch_size`, then scores each group in one call."""

    def __init__(self, wait_seconds: float, max_batch_size: int, on_batch: Callable[[int], None] = lambda size: None) -> None:
        self.wait_seconds = wait_seconds
        self.max_batch_size = max_batch_size
        self.on_batch = on_batch
        self._queue: Optional[asyncio.Queue] = None
        self._worker: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    async def recommend(self, recommender: Any, history: list, options: RecommendOptions) -> RankedItems:
        """What `recommender.recommend(history, options.k, **options.keywords())` returns, scored with company."""
        queue = self._ensure_worker()
        answer = asyncio.get_running_loop().create_future()
        await queue.put(_Pending(recommender, history, options, answer))
        return await answer

    def _ensure_worker(self) -> asyncio.Queue:
        # One worker per event loop: a test client may run each request in a loop of its own.
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._run(self._queue), name="llmrec-micro-batcher")
        return self._queue

    async def close(self) -> None:
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._worker = None

    async def _run(self, queue: asyncio.Queue) -> None:
        while True:
            batch = await self._gather(queue)
            groups: dict[Hashable, list[_Pending]] = {}
            for pending in batch:
                groups.setdefault(pending.group, []).append(pending)
            for members in groups.values():
                try:
                    await self._score(members)
                except asyncio.CancelledError:
                    for pending in members:
                        pending.answer.cancel()
                    raise

    async def _gather(self, queue: asyncio.Queue) -> list[_Pending]:
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_seconds
        while len(batch) < self.max_batch_size:
            if not queue.empty():  # what queued while the last batch was scored joins at once
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _score(self, members: list[_Pending]) -> None:
        live = [pending for pending in members if not pending.answer.done()]  # a client may have gone
        if not live:
            return
        self.on_batch(len(live))
        try:
            results = await asyncio.to_thread(_recommend_group, live)
        except Exception as error:  # not an llmrec error (those are answered one by one): a bug, for every member
            logger.exception("recommend_batch failed for a batch of %d", len(live))
            results = [error] * len(live)
        for pending, result in zip(live, results):
            if pending.answer.done():
                continue
            if isinstance(result, BaseException):
                pending.answer.set_exception(result)
            else:
                pending.answer.set_result(result)


def _recommend_group(members: list[_Pending]) -> list[Any]:
    """One `recommend_batch` call; when it refuses (one member's bad id or k), each member is answered alone,
    so one bad request never fails its neighbours and each gets its own error."""
    recommender, options = members[0].recommender, members[0].options
    try:
        return recommender.recommend_batch([pending.history for pending in members], options.k, **options.keywords())
    except LlmRecError as error:
        if len(members) == 1:
            return [error]
    results: list[Any] = []
    for pending in members:
        try:
            results.append(recommender.recommend(pending.history, options.k, **options.keywords()))
        except LlmRecError as error:
            results.append(error)
    return results
