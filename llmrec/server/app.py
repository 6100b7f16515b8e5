"""`create_app`: a FastAPI app serving one `Recommender` (OpenAPI docs at /docs).

    from llmrec.server.app import create_app
    app = create_app("runs/ml100k")          # or a Recommender, or a callable returning one
    # uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Callable, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..errors import LlmRecError, ModelFolderError, OutputPathError, UnknownItemError
from ..recommender import Recommender
from .context import ModelSource, NotReadyError, RequestTooLargeError, ServerContext, UnauthorizedError, WritesDisabledError
from .middleware import RequestGate
from .routes import router
from .settings import ServeSettings

logger = logging.getLogger(__name__)

# Most specific first: RequestTooLargeError is an InvalidRequestError, UnknownItemError a KeyError.
_STATUS_OF_ERROR = (
    (RequestTooLargeError, 413), (UnknownItemError, 404), (UnauthorizedError, 401), (NotReadyError, 503),
    (ModelFolderError, 409), (OutputPathError, 409), (WritesDisabledError, 409), (LlmRecError, 422),
)


def create_app(
    model: Union[Recommender, ModelSource, Callable[[], Recommender]],
    settings: Optional[ServeSettings] = None,
    *,
    source: Optional[ModelSource] = None,
    loader: Callable[[ModelSource], Recommender] = Recommender.from_pretrained,
    handle_sighup: bool = False,
) -> FastAPI:
    """An app serving `model`: a `Recommender`, a model folder / Hub id (loaded in the background at startup,
    /ready says when), or a callable returning a Recommender. `source` is the folder /admin/reload and
    /admin/save default to (a path given as `model` is its own source); `loader` loads folders for reloads.
    `handle_sighup` reloads from `source` on SIGHUP (for `llmrec serve`; it needs the main thread's loop)."""
    settings = settings if settings is not None else ServeSettings.from_environment()
    context = ServerContext(settings, loader, model if isinstance(model, (str, Path)) else source)
    initial: Optional[Callable[[], Recommender]] = None
    if isinstance(model, (str, Path)):
        initial = functools.partial(loader, model)
    elif callable(model) and not isinstance(model, Recommender):
        initial = model
    else:  # a Recommender, or anything with its serving methods
        context.recommender = model

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = None
        if initial is not None and context.recommender is None:
            loading = asyncio.create_task(context.load_initial(initial))
        if handle_sighup:
            reloads: set[asyncio.Task] = set()  # held, so a running reload is not garbage-collected

            def reload_on_signal() -> None:
                task = asyncio.ensure_future(_reload_on_signal(context))
                reloads.add(task)
                task.add_done_callback(reloads.discard)

            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_on_signal)
        try:
            yield
        finally:
            if loading is not None:
                loading.cancel()
            await context.batcher.close()

    app = FastAPI(
        title="llmrec", summary="Recommend, rerank and explain with a llmrec model over HTTP.", lifespan=lifespan,
    )
    app.state.llmrec = context
    app.include_router(router)
    _add_error_handlers(app)
    app.add_middleware(RequestGate, context=context)
    return app


async def _reload_on_signal(context: ServerContext) -> None:
    try:
        await context.reload(None)
    except LlmRecError as error:
        logger.error("SIGHUP reload refused, still serving the previous model: %s", error)


def _error_response(status: int, error: str, detail: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    settings: ServeSettings = app.state.llmrec.settings

    @app.exception_handler(LlmRecError)
    async def llmrec_error(request: Request, error: LlmRecError) -> JSONResponse:
        status = next(code for kind, code in _STATUS_OF_ERROR if isinstance(error, kind))
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if status == 503:
            headers = {"Retry-After": str(settings.retry_after_seconds)}
        return _error_response(status, type(error).__name__, str(error), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for problem in error.errors()[:10]:
            where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {problem.get('msg', 'invalid')}")
        detail = "The request body does not match this endpoint's schema (see /docs): " + "; ".join(problems)
        return _error_response(422, "InvalidRequestError", detail[:2000])

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        # The traceback goes to the log, never to the client: it can reveal paths, data and versions.
        logger.error("Unexpected error on %s %s", request.method, request.url.path, exc_info=error)
        return _error_response(500, "InternalServerError", "The server failed on this request; the details are in its log.")
