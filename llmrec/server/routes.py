"""The endpoints. Each reads the served recommender once, checks the server's limits (413), then calls the
Python API in a worker thread (or through the micro-batcher), so errors carry llmrec's own messages."""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, Depends, Request, Response

from ..errors import InvalidRequestError
from ..ranking import check_diversity
from .batching import RecommendOptions
from .context import ServerContext, UnauthorizedError, check_limit
from .schemas import (
    AddItemsRequest, CatalogueResponse, ErrorResponse, ExplainRequest, ExplainResponse, ModelResponse, RecommendBatchRequest,
    RecommendRequest, RecommendResponse, RecommendBatchResponse, ReloadRequest, RerankRequest, SaveRequest,
)

ERRORS = {status: {"model": ErrorResponse} for status in (401, 404, 409, 413, 422, 503)}


def _context(request: Request) -> ServerContext:
    return request.app.state.llmrec


def _check_token(request: Request, context: ServerContext) -> None:
    expected = context.settings.token
    if expected is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not tell an attacker how much of a guess was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise UnauthorizedError("This endpoint needs the header `Authorization: Bearer <token>` with the server's token.")


def reader(request: Request) -> ServerContext:
    context = _context(request)
    if context.settings.token_for_reads:
        _check_token(request, context)
    return context


def writer(request: Request) -> ServerContext:
    context = _context(request)
    _check_token(request, context)
    context.check_writes()
    return context


def _scored(ranked: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """Items as records; `reserved` only on answers with slots held for new items (`new_items` > 0)."""
    return [{"item_id": item[0], "score": item[1], **({"reserved": item.reserved} if hasattr(item, "reserved") else {})}
            for item in ranked]


def _options(body: Any, context: ServerContext) -> RecommendOptions:
    limit = context.settings.max_id_list_items
    for name in ("exclude", "filter"):
        values = getattr(body, name)
        if values is not None:
            check_limit(len(values), limit, f"{name} list", "max_id_list_items")
    # Checked here, not first in the batcher: a bad value is the caller's 422 alone, never a failed micro-batch.
    diversity = check_diversity(body.diversity)
    return RecommendOptions(body.k, _hashable(body.exclude), _hashable(body.filter), body.exclude_history, body.new_items,
                            diversity)


def _hashable(item_ids: Optional[list]) -> Optional[tuple]:
    """Id lists as tuples, so requests with equal options fall into one micro-batch group."""
    return None if item_ids is None else tuple(item_ids)


def _check_text(text: Optional[str], what: str, context: ServerContext) -> None:
    if text is not None:
        check_limit(len(text), context.settings.max_item_text_chars, f"{what} (characters)", "max_item_text_chars")


router = APIRouter(responses=ERRORS)


@router.post("/recommend", response_model=RecommendResponse, response_model_exclude_none=True, tags=["serving"])
async def recommend(body: RecommendRequest, context: ServerContext = Depends(reader)) -> dict:
    """The `k` best items for one history (micro-batched with concurrent requests of the same options)."""
    check_limit(len(body.history), context.settings.max_history_items, "history", "max_history_items")
    _check_text(body.profile, "profile", context)
    options = _options(body, context)
    recommender = context.current()
    if body.profile is None and context.settings.batch_wait_ms > 0:
        ranked = await context.batcher.recommend(recommender, body.history, options)
    else:  # a profile runs BERT; scored alone, so padding beside other profiles cannot change its answer
        context.metrics.batch_size.observe(1)
        ranked = await asyncio.to_thread(recommender.recommend, body.history, options.k, profile=body.profile, **options.keywords())
    return {"items": _scored(ranked)}


@router.post("/recommend/batch", response_model=RecommendBatchResponse, response_model_exclude_none=True, tags=["serving"])
async def recommend_batch(body: RecommendBatchRequest, context: ServerContext = Depends(reader)) -> dict:
    """`/recommend` for many users with shared options, in one call."""
    settings = context.settings
    check_limit(len(body.histories), settings.max_batch_rows, "list of histories", "max_batch_rows")
    for history in body.histories:
        check_limit(len(history), settings.max_history_items, "history", "max_history_items")
    for profile in body.profiles or ():
        _check_text(profile, "profile", context)
    options = _options(body, context)
    recommender = context.current()
    context.metrics.batch_size.observe(len(body.histories))
    results = await asyncio.to_thread(
        recommender.recommend_batch, body.histories, options.k, profiles=body.profiles, **options.keywords()
    )
    return {"results": [_scored(ranked) for ranked in results]}


@router.post("/rerank", response_model=RecommendResponse, tags=["serving"])
async def rerank(body: RerankRequest, context: ServerContext = Depends(reader)) -> dict:
    """Score the given candidates for one history with the cross-attention head, best first."""
    check_limit(len(body.history), context.settings.max_history_items, "history", "max_history_items")
    check_limit(len(body.candidates), context.settings.max_candidates, "candidate list", "max_candidates")
    recommender = context.current()
    return {"items": _scored(await asyncio.to_thread(recommender.rerank, body.history, body.candidates))}


@router.post("/explain", response_model=ExplainResponse, tags=["serving"])
async def explain(body: ExplainRequest, context: ServerContext = Depends(reader)) -> dict:
    """How much each history item weighed in `item_id`'s reranking score (attention weights, oldest first)."""
    check_limit(len(body.history), context.settings.max_history_items, "history", "max_history_items")
    recommender = context.current()
    weights = await asyncio.to_thread(recommender.explain, body.history, body.item_id, body.per_head)
    return {"weights": [{"item_id": item_id, "weight": weight} for item_id, weight in weights]}


@router.post("/items", response_model=CatalogueResponse, tags=["catalogue"])
async def add_items(body: AddItemsRequest, context: ServerContext = Depends(writer)) -> dict:
    """Add items by their text: recommendable when this returns, no retraining. POST /admin/save keeps them."""
    check_limit(len(body.items), context.settings.max_new_items, "list of new items", "max_new_items")
    for item in body.items:
        _check_text(item.text, f"text of item {item.item_id!r}", context)
    async with context.write_lock:
        recommender = context.current()
        await asyncio.to_thread(recommender.add_items, [item.item_id for item in body.items], [item.text for item in body.items])
    return {"num_items": recommender.num_items, "added": len(body.items)}


@router.post("/admin/reload", response_model=ModelResponse, tags=["admin"])
async def reload(body: Optional[ReloadRequest] = None, context: ServerContext = Depends(writer)) -> dict:
    """Load a model folder aside and swap it in; in-flight requests finish on the old model. A broken folder
    is refused (409, its ModelFolderError) and the old model keeps serving."""
    recommender = await context.reload(body.path if body is not None else None)
    return {"path": str(context.source), "num_items": recommender.num_items}


@router.post("/admin/save", response_model=ModelResponse, tags=["admin"])
async def save(body: Optional[SaveRequest] = None, context: ServerContext = Depends(writer)) -> dict:
    """Persist the served model, items added over /items included, with `save_pretrained`."""
    target = body.path if body is not None and body.path is not None else None
    if target is None:  # back into the served folder, when it is one (not a Hub id, not an in-memory model)
        target = context.source
        if target is None or not Path(target).is_dir():
            raise InvalidRequestError(f"The served model has no local folder to save into ({target!r}); pass \"path\".")
    async with context.write_lock:
        recommender = context.current()
        await asyncio.to_thread(recommender.save_pretrained, target)
    return {"path": str(target), "num_items": recommender.num_items}


@router.get("/health", tags=["probes"])
async def health() -> dict:
    """Liveness: the process answers (the model may still be loading)."""
    return {"status": "ok"}


@router.get("/ready", tags=["probes"], responses={503: {"model": ErrorResponse}})
async def ready(request: Request) -> dict:
    """Readiness: a model is loaded and serving."""
    recommender = _context(request).current()
    return {"status": "ready", "num_items": recommender.num_items}


@router.get("/metrics", tags=["probes"])
async def metrics(context: ServerContext = Depends(reader)) -> Response:
    """Prometheus text format: requests and latencies by endpoint, batch sizes, catalogue size."""
    return Response(context.metrics.render(), media_type=context.metrics.content_type)
