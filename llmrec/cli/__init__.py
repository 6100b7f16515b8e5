"""The `llmrec` command (`llmrec = "llmrec.cli:main"`): recommend, rerank, evaluate, index, explain, push, serve.

Where things live, in the order a call runs through them:

    runner.py     main(): parse, run the command, turn failures into one `error:` line (exit code 2)
    parser.py     the argument parser, one small function per command
    recommend.py  `recommend` and `rerank`; histories.py reads `recommend --histories-file`
    evaluate.py   `evaluate` (evaluate_saved_model: run_finetune's metrics on a saved model)
    index.py      `index --add-items`; rebuild.py `index --rebuild` (rebuild_index)
    explain.py    `explain`;  push.py `push`;  `serve` lives in llmrec/server/run.py
    output.py     tables and JSON;  common.py  ArgumentError and model loading

Everything callers imported from the single-module `llmrec/cli.py` is still importable from here.
"""

from __future__ import annotations

from .common import ArgumentError, silence_progress_bars
from .evaluate import SPLITS, command_evaluate, evaluate_saved_model
from .explain import command_explain
from .index import command_index
from .output import TEXT_WIDTH, print_table
from .parser import build_parser
from .push import command_push
from .rebuild import rebuild_index
from .recommend import command_recommend, command_rerank
from .runner import EXIT_USAGE, main

__all__ = [
    "EXIT_USAGE",
    "SPLITS",
    "TEXT_WIDTH",
    "ArgumentError",
    "build_parser",
    "command_evaluate",
    "command_explain",
    "command_index",
    "command_push",
    "command_recommend",
    "command_rerank",
    "evaluate_saved_model",
    "main",
    "print_table",
    "rebuild_index",
    "silence_progress_bars",
]
