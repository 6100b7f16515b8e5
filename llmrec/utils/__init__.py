"""Small helpers shared by the rest of llmrec."""

from llmrec.utils.io import atomic_write, restore_interrupted_replace, write_json_atomic

__all__ = ["atomic_write", "restore_interrupted_replace", "write_json_atomic"]
