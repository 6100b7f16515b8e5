"""`llmrec serve`: its command-line options (made from `ServeSettings`, one home per setting) and the
uvicorn run. Only `command_serve` imports FastAPI and uvicorn, so the rest of the CLI works without them."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
from dataclasses import asdict, fields
from typing import Any

from ..errors import ConfigError
from .settings import TOKEN_ENVIRONMENT_VARIABLE, ServeSettings

logger = logging.getLogger(__name__)

MODEL_ENVIRONMENT_VARIABLE = "LLMREC_SERVE_MODEL"
SETTINGS_ENVIRONMENT_VARIABLE = "LLMREC_SERVE_SETTINGS"
_NOT_OPTIONS = frozenset({"allow_writes", "token"})  # decided by --workers; --token is added by hand


def add_serve_command(subcommands: Any) -> argparse.ArgumentParser:
    """The `serve` subcommand; every ServeSettings field becomes an option with the field's help text."""
    parser = subcommands.add_parser(
        "serve", help="Serve a model over HTTP (FastAPI + uvicorn; needs `pip install llmrec[serve]`).",
        description="Serve a model over HTTP: /recommend, /recommend/batch, /rerank, /explain, /items, /admin/reload, "
        "/admin/save, /health, /ready, /metrics; OpenAPI docs at /docs. SIGHUP reloads the model folder.\n\nexample:\n"
        "  LLMREC_SERVE_TOKEN=secret llmrec serve runs/ml100k --port 8000\n"
        "  curl -s localhost:8000/recommend -H 'content-type: application/json' -d '{\"history\": [\"50\", \"172\"], \"k\": 5}'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="Model folder (a finetune output_dir) or Hub repo id.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1, this machine only).")
    parser.add_argument("--port", type=int, default=8000, help="Port (default 8000).")
    parser.add_argument("--workers", type=int, default=1, help="Worker processes, each with its own model copy "
                        "(default 1; with more, /items and /admin/* are off).")
    parser.add_argument("--token", help=f"Bearer token for /items and /admin/* (prefer ${TOKEN_ENVIRONMENT_VARIABLE}: "
                        "a command line is visible to other users of the machine).")
    for spec in fields(ServeSettings):
        if spec.name in _NOT_OPTIONS:
            continue
        option = "--" + spec.name.replace("_", "-")
        if spec.type == "bool":
            parser.add_argument(option, dest=spec.name, action="store_true", help=spec.metadata["help"])
        else:
            number = float if spec.type == "float" else int
            parser.add_argument(option, dest=spec.name, type=number, default=spec.default,
                                help=f"{spec.metadata['help']} (default {spec.default})")
    parser.set_defaults(handler=command_serve)
    return parser


def command_serve(arguments: argparse.Namespace) -> int:
    try:  # here, so the other commands work without the serve extra
        import uvicorn

        from .app import create_app
    except ImportError as error:
        raise ConfigError(f"`llmrec serve` needs the serve extra ({error}): pip install 'llmrec[serve]'.") from error
    from ..recommender import Recommender

    if arguments.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {arguments.workers}.")
    options = {spec.name: getattr(arguments, spec.name) for spec in fields(ServeSettings) if spec.name not in _NOT_OPTIONS}
    settings = ServeSettings.from_environment(token=arguments.token, allow_writes=arguments.workers == 1, **options)
    if settings.token is None and not _is_loopback(arguments.host):
        logger.warning("Serving on %s without a token: anyone who reaches it can add items and reload the model. "
                       "Set %s.", arguments.host, TOKEN_ENVIRONMENT_VARIABLE)
    log_level = "info" if logging.getLogger().isEnabledFor(logging.INFO) else "warning"
    if arguments.workers == 1:
        recommender = Recommender.from_pretrained(arguments.model)  # a broken folder fails here, before listening
        app = create_app(recommender, settings, source=arguments.model, handle_sighup=True)
        uvicorn.run(app, host=arguments.host, port=arguments.port, log_level=log_level)
        return 0
    if os.path.isdir(arguments.model):
        Recommender.check_folder(arguments.model)  # fail before forking workers that would each fail
    # Worker processes rebuild the app from the environment; the token travels there, not on a command line.
    os.environ[MODEL_ENVIRONMENT_VARIABLE] = arguments.model
    os.environ[SETTINGS_ENVIRONMENT_VARIABLE] = json.dumps({k: v for k, v in asdict(settings).items() if k != "token"})
    if settings.token is not None:
        os.environ[TOKEN_ENVIRONMENT_VARIABLE] = settings.token
    uvicorn.run("llmrec.server.run:app_from_environment", factory=True, host=arguments.host, port=arguments.port,
                workers=arguments.workers, log_level=log_level)
    return 0


def app_from_environment() -> Any:
    """The app of one `llmrec serve --workers N` worker process (uvicorn calls this factory in each)."""
    from .app import create_app

    settings = ServeSettings.from_environment(**json.loads(os.environ[SETTINGS_ENVIRONMENT_VARIABLE]))
    return create_app(os.environ[MODEL_ENVIRONMENT_VARIABLE], settings)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
