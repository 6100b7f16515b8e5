"""One ASGI layer in front of the app: metrics for every request, the body-size limit and load shedding.

Shedding counts requests in flight rather than queueing them: past `max_in_flight` a client gets 503 and
Retry-After at once, so latency stays bounded and memory does not grow with the backlog.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .context import ServerContext

# Probes, metrics and docs are never shed nor counted as load: an orchestrator must see a busy server alive.
UNGATED_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect"})


async def send_error(send: Any, status: int, error: str, detail: str, headers: tuple = ()) -> None:
    body = json.dumps({"error": error, "detail": detail}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class RequestGate:
    def __init__(self, app: Any, context: ServerContext) -> None:
        self.app = app
        self.context = context

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def send_recording(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._gated(scope, receive, send_recording)
        finally:
            self.context.metrics.observe(scope["path"], status[0], started)

    async def _gated(self, scope: dict, receive: Any, send: Any) -> None:
        context, settings = self.context, self.context.settings
        if scope["path"] in UNGATED_PATHS:
            await self.app(scope, receive, send)
            return
        if context.in_flight >= settings.max_in_flight:
            context.metrics.shed.inc()
            await send_error(
                send, 503, "Overloaded", f"The server is serving its limit of {settings.max_in_flight} requests; retry shortly.",
                ((b"retry-after", str(settings.retry_after_seconds).encode()),),
            )
            return
        context.in_flight += 1
        try:
            body = await _read_body(receive, settings.max_body_bytes, _declared_length(scope))
            if body is None:
                await send_error(
                    send, 413, "RequestTooLargeError",
                    f"The request body is larger than this server's limit of {settings.max_body_bytes} bytes; send less, "
                    "or start the server with a larger ServeSettings.max_body_bytes.",
                )
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            context.in_flight -= 1


def _declared_length(scope: dict) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # let the server's own parser refuse it
    return 0


async def _read_body(receive: Any, limit: int, declared: int) -> Any:
    """The whole body, or None once it passes `limit` (a declared length says so before anything is read)."""
    if declared > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the real channel, which reports a disconnect

    return replayed
