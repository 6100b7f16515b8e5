"""`llmrec serve`'s FastAPI app as a Ray Serve deployment: several replicas, on one machine or a Ray cluster.

Each replica holds one `Recommender` (user tower, FAISS retriever and cross-attention reranker together, so a
request never crosses processes between retrieval and reranking) and serves the same app as `llmrec serve`
(`llmrec.server.app.create_app`): /recommend, /recommend/batch, /rerank, /explain, /health, /ready, /metrics.
Ray's HTTP proxy spreads requests over the replicas; /items and /admin/* are off when there is more than one
replica (as with `llmrec serve --workers N`), because each replica has its own copy of the model.

    pip install "llmrec[serve,ray]"            # or: pip install "ray[serve]"
    python examples/ray_serve.py runs/ml100k --replicas 2 --port 8000
    python examples/ray_serve.py runs/ml100k --replicas 2 --max-replicas 6   # autoscale between 2 and 6
    # or with Ray's CLI (arguments by name):
    serve run examples.ray_serve:app_builder model=runs/ml100k replicas=2

Written for Ray 2.60's API (`@serve.ingress()` with `__serve_build_asgi_app__`, so the app is built inside
each replica after its constructor has loaded the model, and a replica counts as ready only once it can answer).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from llmrec.errors import ConfigError  # noqa: E402
from llmrec.server.settings import ServeSettings  # noqa: E402

logger = logging.getLogger("llmrec.examples.ray_serve")


@serve.deployment(name="llmrec", health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress()
class LlmRecDeployment:
    """One replica: a loaded `Recommender` and the FastAPI app around it."""

    def __init__(self, model: str, settings: dict[str, Any], threads_per_replica: int = 1) -> None:
        import torch

        from llmrec.recommender import Recommender

        # Replicas share the machine's cores: without a cap every replica's torch starts one thread per core.
        torch.set_num_threads(threads_per_replica)
        self.model = model
        self.settings = ServeSettings(**settings)
        self.recommender = Recommender.from_pretrained(model)  # a broken folder fails the replica here, visibly

    def __serve_build_asgi_app__(self) -> Any:
        from llmrec.server.app import create_app

        return create_app(self.recommender, self.settings, source=self.model)

    def check_health(self) -> None:
        """Ray restarts a replica whose check raises; one without a model must not take traffic."""
        if self.recommender is None:
            raise RuntimeError(f"no model loaded from {self.model}")


def build_app(
    model: str,
    replicas: int = 1,
    max_replicas: Optional[int] = None,
    threads_per_replica: int = 1,
    settings: Optional[ServeSettings] = None,
) -> serve.Application:
    """The bound application: `replicas` copies of the model, or autoscaling from `replicas` to `max_replicas`."""
    if replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {replicas}.")
    if max_replicas is not None and max_replicas < replicas:
        raise ConfigError(f"--max-replicas ({max_replicas}) must be at least --replicas ({replicas}).")
    if threads_per_replica < 1:
        raise ConfigError(f"--threads-per-replica must be at least 1, got {threads_per_replica}.")
    if not model:
        raise ConfigError("Give the model folder (a finetune output_dir) or Hub repo id to serve.")
    if os.path.isdir(model):
        from llmrec.recommender import Recommender

        Recommender.check_folder(model)  # fail here, before Ray starts replicas that would each fail
    several = replicas > 1 or (max_replicas or 1) > 1
    settings = (settings or ServeSettings.from_environment()).updated(allow_writes=not several)
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": threads_per_replica}}
    if max_replicas is not None and max_replicas > replicas:
        options["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": 2 * settings.max_batch_size}
    else:
        options["num_replicas"] = replicas
    # The token (if any) travels inside the bound settings, not on a command line.
    return LlmRecDeployment.options(**options).bind(str(model), asdict(settings), threads_per_replica)


def app_builder(arguments: dict[str, str]) -> serve.Application:
    """For `serve run examples.ray_serve:app_builder model=DIR replicas=N [max_replicas=M threads_per_replica=T]`."""
    known = {"model", "replicas", "max_replicas", "threads_per_replica"}
    unknown = sorted(set(arguments) - known)
    if unknown or "model" not in arguments:
        raise ConfigError(f"app_builder takes {', '.join(sorted(known))} (model required); got {sorted(arguments)}.")
    numbers = {name: int(value) for name, value in arguments.items() if name != "model"}
    return build_app(arguments["model"], **numbers)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Model folder (a finetune output_dir) or Hub repo id.")
    parser.add_argument("--replicas", type=int, default=2, help="Replicas, each with its own model copy (default 2).")
    parser.add_argument("--max-replicas", type=int, help="Autoscale between --replicas and this many.")
    parser.add_argument("--threads-per-replica", type=int, default=1, help="CPUs Ray reserves and torch threads per replica.")
    parser.add_argument("--host", default="127.0.0.1", help="Address of Ray's HTTP proxy (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", help="Ray cluster to join (e.g. auto, or ray://head:10001); default: start one here.")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all).")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    application = build_app(arguments.model, arguments.replicas, arguments.max_replicas, arguments.threads_per_replica)
    ray.init(address=arguments.address, num_cpus=arguments.num_cpus if arguments.address is None else None)
    serve.start(http_options={"host": arguments.host, "port": arguments.port})
    serve.run(application, name="llmrec", route_prefix="/")
    logger.info("Serving %s with %d replica(s) on http://%s:%d (Ctrl-C stops)", arguments.model, arguments.replicas,
                arguments.host, arguments.port)
    signal.signal(signal.SIGTERM, _interrupt)  # a background job ignores SIGINT; stop on SIGTERM just as cleanly
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
