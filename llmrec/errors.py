"""Exceptions llmrec raises for bad input, so callers can catch them without catching library internals."""


class LlmRecError(Exception):
    """Base class of every error llmrec raises on purpose."""


class ConfigError(LlmRecError, ValueError):
    """A configuration value is missing, misspelt or impossible."""


class DataError(LlmRecError, ValueError):
    """A data file is missing, malformed or inconsistent; the message names the file and the fix."""


class UnknownItemError(LlmRecError, KeyError):
    """Item ids that are not in the model's catalogue."""

    def __init__(self, item_ids):
        self.item_ids = list(item_ids)
        shown = ", ".join(repr(item_id) for item_id in self.item_ids[:10])
        more = f" and {len(self.item_ids) - 10} more" if len(self.item_ids) > 10 else ""
        super().__init__(
            f"Unknown item id(s): {shown}{more}. Item ids are the data set's raw ids as strings; "
            "add new items with add_items() or check the catalogue (Recommender.item_ids)."
        )

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


class ModelFolderError(LlmRecError, OSError):
    """A saved model folder is missing a file, is corrupt or was written by an incompatible version."""


class InvalidRequestError(LlmRecError, ValueError):
    """A serving call got arguments it cannot honour (wrong id types, duplicate candidates, k <= 0...)."""


class HubUploadError(LlmRecError, OSError):
    """Creating the Hub repo or uploading to it failed (no network, no token, no permission)."""


class OutputPathError(LlmRecError, OSError):
    """An output path llmrec will not replace: a device, FIFO or socket, or a symbolic link it was not asked to follow."""
