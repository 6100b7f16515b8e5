"""Loading and saving a model prints nothing: the progress bars transformers, datasets and huggingface_hub
draw for sub-second steps ("Loading weights", "Writing model shards", "Generating train split") are switched
off for the call only, through each library's own switch, and the user's settings come back afterwards.

llmrec's own bars (catalogue encoding, training) use tqdm directly and are not affected.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

_lock = threading.RLock()
_depth = 0  # nested or concurrent quiet calls: the first one in switches off, the last one out restores
_restore: list = []


def _switch_off() -> list:
    """Turn every library's bars off; returns the calls that put the user's settings back, in order."""
    import datasets
    import huggingface_hub.constants
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    restore = []
    hub_was_off = hub_utils.are_progress_bars_disabled()
    with warnings.catch_warnings():  # an env var that forces bars on wins; its warning is not ours to show
        warnings.filterwarnings("ignore", message="Cannot (dis|en)able progress bars")
        if transformers_logging.is_progress_bar_enabled():
            transformers_logging.disable_progress_bar()  # also switches huggingface_hub's bars off globally
            restore.append(transformers_logging.enable_progress_bar)  # ... and back on
        if not hub_was_off and huggingface_hub.constants.HF_HUB_DISABLE_PROGRESS_BARS is not False:
            hub_utils.disable_progress_bars()
            restore.append(hub_utils.enable_progress_bars)
        elif hub_was_off:
            restore.append(hub_utils.disable_progress_bars)  # transformers' enable above turned it on
        if not datasets.are_progress_bars_disabled():
            datasets.disable_progress_bars()
            restore.append(datasets.enable_progress_bars)
    return restore


@contextlib.contextmanager
def quiet_library_progress() -> Iterator[None]:
    """Within the block (or the decorated function), transformers, datasets and huggingface_hub draw no bars."""
    global _depth, _restore
    with _lock:
        if _depth == 0:
            _restore = _switch_off()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Cannot (dis|en)able progress bars")
                    for call in _restore:
                        call()
                _restore = []
