"""HTTP serving for a `Recommender`: `llmrec serve` (FastAPI + uvicorn, the optional extra `llmrec[serve]`).

`llmrec.serving` (the module) holds what one `Recommender` serves from; this package puts it behind
HTTP: request limits, micro-batching, load shedding, bearer-token auth for writes, hot reload and
Prometheus metrics. Import `create_app` from `llmrec.server.app`; importing this package alone needs
none of the extra's dependencies.
"""

from .settings import ServeSettings

__all__ = ["ServeSettings"]
