"""What every request of one app shares: the served model (swapped whole on reload), settings, the
micro-batcher, metrics and the lock that orders writes; and the server's own llmrec errors."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..errors import InvalidRequestError, LlmRecError
from .batching import MicroBatcher
from .metrics import ServerMetrics
from .settings import ServeSettings

logger = logging.getLogger(__name__)

ModelSource = Union[str, Path]


class RequestTooLargeError(InvalidRequestError):
    """A history, list, text or body beyond a `ServeSettings` limit (HTTP 413)."""


class UnauthorizedError(LlmRecError):
    """A missing or wrong bearer token (HTTP 401)."""


class NotReadyError(LlmRecError):
    """No model is loaded yet, or the first load failed (HTTP 503)."""


class WritesDisabledError(LlmRecError):
    """/items or /admin/* on a server that cannot honour them (HTTP 409)."""


def check_limit(count: int, maximum: int, what: str, setting: str) -> None:
    if count > maximum:
        raise RequestTooLargeError(
            f"The {what} has {count} entries, above this server's limit of {maximum}; send less, or start the "
            f"server with a larger ServeSettings.{setting}."
        )


class ServerContext:
    """The recommender in `self.recommender` is replaced by one assignment; a request reads it once, so an
    in-flight request finishes on the model it started with while new ones get the reloaded one."""

    def __init__(self, settings: ServeSettings, loader: Callable[[ModelSource], Any], source: Optional[ModelSource]) -> None:
        self.settings = settings
        self.loader = loader
        self.source = source
        self.recommender: Any = None
        self.load_error: Optional[str] = None
        self.in_flight = 0
        self.metrics = ServerMetrics(self._catalogue_size, lambda: self.in_flight)
        self.batcher = MicroBatcher(settings.batch_wait_ms / 1000, settings.max_batch_size, self.metrics.batch_size.observe)
        self._write_lock: Optional[asyncio.Lock] = None

    def _catalogue_size(self) -> float:
        recommender = self.recommender
        return float(recommender.num_items) if recommender is not None else 0.0

    def current(self) -> Any:
        recommender = self.recommender
        if recommender is None:
            raise NotReadyError(self.load_error or "The model is still loading; retry shortly (GET /ready says when).")
        return recommender

    @property
    def write_lock(self) -> asyncio.Lock:
        """Orders /items, reloads and saves, so an addition never lands on a model a reload is replacing."""
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        return self._write_lock

    def check_writes(self) -> None:
        if not self.settings.allow_writes:
            raise WritesDisabledError(
                "This server runs several worker processes, each with its own copy of the model, so a write would "
                "reach only one of them; /items and /admin/* are off. Serve with --workers 1 to change the model "
                "over HTTP, or send SIGHUP to the server to reload every worker from its folder."
            )

    async def load_initial(self, load: Callable[[], Any]) -> None:
        """The first load, in the background, so /health answers while a large model loads."""
        try:
            self.recommender = await asyncio.to_thread(load)
        except Exception as error:  # an llmrec error names the problem; anything else is logged in full
            self.load_error = f"Loading {self.source} failed: {error}"
            logger.error(self.load_error, exc_info=not isinstance(error, LlmRecError))

    async def reload(self, path: Optional[ModelSource]) -> Any:
        """Load `path` (default: the folder served now) aside and swap it in; on any error the old one stays."""
        target = path if path is not None else self.source
        if target is None:
            raise InvalidRequestError("This server was given an in-memory Recommender, so it has no folder to reload; pass \"path\".")
        async with self.write_lock:
            try:
                recommender = await asyncio.to_thread(self.loader, target)
            except LlmRecError:
                self.metrics.reloads.labels(outcome="refused").inc()
                raise
            self.recommender, self.source, self.load_error = recommender, target, None  # the swap
        self.metrics.reloads.labels(outcome="ok").inc()
        logger.info("Now serving %s (%d items).", target, recommender.num_items)
        return recommender
