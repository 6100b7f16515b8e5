"""`main()`: parse the command line, run the chosen command, and turn every expected failure into one line.

People read these errors in a terminal and scripts test the exit code, so a mistake in what they passed never
ends in a traceback: usage errors, bad files and refused requests exit with EXIT_USAGE; bugs still raise.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Optional

import yaml

from ..errors import LlmRecError
from .common import ArgumentError, silence_progress_bars
from .parser import build_parser

EXIT_USAGE = 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; LlmRecError and argument mistakes become one `error:` line on stderr and exit code 2."""
    try:
        arguments = build_parser().parse_args(argv)
    except ArgumentError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit_request:  # --help
        return int(exit_request.code or 0)
    if arguments.command == "recommend" and arguments.output and not arguments.histories_file:
        print("error: --output goes with --histories-file (see `llmrec recommend --help`)", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if arguments.verbose else logging.WARNING)
    try:
        if not arguments.verbose:
            silence_progress_bars()
        return arguments.handler(arguments)
    except BrokenPipeError:  # `llmrec ... | head`: the reader left; say nothing more (as the Python docs advise)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (LlmRecError, ArgumentError, OSError) as error:  # OSError: an unwritable --output, a missing folder, ...
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, yaml.YAMLError) as error:
        # Unparsable text in a file the library reads without naming it (a model folder's eval_results.json or
        # config.yaml): still one line, never a traceback. Other ValueErrors are bugs and propagate.
        if not isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, yaml.YAMLError)):
            raise
        print(f"error: a file could not be parsed ({_one_line(error)}); check the model folder's JSON and YAML "
              "files (eval_results.json, config.yaml) and the files you passed.", file=sys.stderr)
        return EXIT_USAGE


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())

