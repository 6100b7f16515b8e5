"""Crash-safe file writes, so an interrupted save never leaves a half-written model or index behind."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_TEMP_MARKER = ".tmp-"
_ASIDE_MARKER = ".old-"


def _fsync_path(path: Path) -> None:
    """Flush one file or directory entry to disk; best effort where the OS cannot fsync directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. directories on Windows
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder of a freshly written tree before it is renamed into place."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            _fsync_path(Path(dirpath) / filename)
        _fsync_path(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        try:
            path.unlink()
        except OSError:
            logger.warning("Could not remove temporary %s", path)


def _replace_folder(new_folder: Path, target: Path) -> None:
    """Swap a folder in with two renames; a crash in between leaves the old one complete (see restore_interrupted_replace)."""
    _fsync_tree(new_folder)
    if not (target.exists() or target.is_symlink()):
        os.replace(new_folder, target)
        return
    aside = target.parent / f".{target.name}{_ASIDE_MARKER}{uuid.uuid4().hex[:12]}"
    os.replace(target, aside)
    try:
        os.replace(new_folder, target)
    except BaseException:
        os.replace(aside, target)
        raise
    _fsync_path(target.parent)
    _remove(aside)


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file or folder into; it replaces `path` only if the block succeeds.

    Readers therefore see either the old or the new complete artefact, never a partial one.
    The temporary lives in the same directory so the final rename stays on one filesystem (and so is atomic).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}{_TEMP_MARKER}{uuid.uuid4().hex[:12]}"
    try:
        yield temporary
        if temporary.is_dir() and not temporary.is_symlink():
            _replace_folder(temporary, target)
        elif temporary.exists():
            _fsync_path(temporary)
            os.replace(temporary, target)
        else:
            raise FileNotFoundError(f"Nothing was written to the temporary path {temporary} meant to replace {target}.")
        _fsync_path(target.parent)
    except BaseException:
        _remove(temporary)
        raise


def restore_interrupted_replace(path: str | Path) -> bool:
    """Put back the old folder if a process died between the two renames of a folder replace; True if it did."""
    target = Path(path)
    if target.exists():
        return False
    leftovers = sorted(target.parent.glob(f".{target.name}{_ASIDE_MARKER}*"), key=lambda p: p.stat().st_mtime)
    if not leftovers:
        return False
    os.replace(leftovers[-1], target)
    logger.warning("Restored %s from %s left by an interrupted save", target, leftovers[-1])
    return True


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write JSON so a crash mid-write cannot leave a truncated, unparsable file."""
    with atomic_write(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=indent, ensure_ascii=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
