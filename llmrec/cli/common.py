"""What every `llmrec` command shares: the error for a command-line mistake, and loading the model quietly.

Kept apart from the commands so that each command module depends only on this and on `output`, never on another
command.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..recommender import Recommender

# The name the single-module CLI logged under; kept so that `llmrec -v` prints the same logger names.
logger = logging.getLogger("llmrec.cli")


class ArgumentError(Exception):
    """A command-line mistake; main() prints it as one `error:` line instead of argparse's usage dump."""


def silence_progress_bars() -> None:
    """Weight-loading and dataset bars would bury the one-line answers and errors people read."""
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def load_recommender(model: str, verify: bool = True) -> "Recommender":
    """The saved model a command works on; imported here so `llmrec --help` does not pay for torch."""
    from ..recommender import Recommender

    logger.info("Loading %s", model)
    return Recommender.from_pretrained(model, verify=verify)
