"""Crash-safe file writes, so an interrupted save never leaves a half-written model or index behind."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import OutputPathError

logger = logging.getLogger(__name__)

_TEMP_MARKER = ".tmp-"
_ASIDE_MARKER = ".old-"
# Written into a temporary folder before a user's entries are moved into it, so that the stale-temporary
# cleanup never deletes a folder that may hold them (a kill -9 between those moves and the swap).
CARRYING_MARKER = ".llmrec-carrying"
# A temporary whose writer cannot be checked (another host, or a name without a pid) is stale after this.
STALE_TEMPORARY_AGE_S = 6 * 3600
# Same-host temporaries are checked by pid; the grace covers a writer that has just started.
_DEAD_WRITER_GRACE_S = 60
_HOST_TAG = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


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


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _replace_folder(new_folder: Path, target: Path, carried: Iterable[str] = ()) -> None:
    """Swap a folder in with two renames; a crash in between leaves the old one complete (see restore_interrupted_replace).

    `carried` names entries of the old `target` (a user's files) that move into the new folder just before
    the swap; if the swap fails they move back, so they are never deleted with the temporary.
    """
    _fsync_tree(new_folder)  # before the carried entries join: they are already on disk
    if not _exists(target):
        os.replace(new_folder, target)
        return
    carried = [name for name in carried if _exists(target / name)]
    moved: list[str] = []
    try:
        if carried:
            (new_folder / CARRYING_MARKER).touch()
            _fsync_path(new_folder)
        for name in carried:
            os.replace(target / name, new_folder / name)
            moved.append(name)
        aside = target.parent / f".{target.name}{_ASIDE_MARKER}{uuid.uuid4().hex[:12]}"
        os.replace(target, aside)
        try:
            os.replace(new_folder, target)
        except BaseException:
            os.replace(aside, target)
            raise
    except BaseException:
        for name in moved:
            os.replace(new_folder / name, target / name)
        raise
    _fsync_path(target.parent)
    _remove(aside)
    _remove(target / CARRYING_MARKER)


def _checked_target(path: str | Path, follow_symlinks: bool) -> Path:
    """The path to replace: refuse devices, FIFOs and sockets, and links unless asked to write through them."""
    target = Path(path)
    if target.is_symlink():
        if not follow_symlinks:
            raise OutputPathError(
                f"{target} is a symbolic link (to {os.readlink(target)}); llmrec does not replace links. Write to "
                "the link's target directly, or pass follow_symlinks=True to write through it."
            )
        target = Path(os.path.realpath(target))
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as error:
        raise OutputPathError(f"Cannot inspect the output path {target}: {error}") from error
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = "a device"
        elif stat.S_ISFIFO(mode):
            kind = "a FIFO (named pipe)"
        else:
            kind = "a socket or other special file"
        raise OutputPathError(
            f"{target} is {kind}, not a regular file or folder; llmrec writes its outputs atomically by replacing "
            "the target, which would destroy it. Choose a regular file path."
        )
    return target


def temporary_name(target: Path) -> str:
    """`.NAME.tmp-HOST-PID-RANDOM`: the writer's host and pid let a later cleanup tell a live writer from a dead one."""
    return f".{target.name}{_TEMP_MARKER}{_HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


@contextmanager
def atomic_write(
    path: str | Path,
    follow_symlinks: bool = False,
    carry_over: Callable[[Path, Path], Iterable[str]] | None = None,
) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file or folder into; it replaces `path` only if the block succeeds.

    Readers therefore see either the old or the new complete artefact, never a partial one.
    The temporary lives in the same directory so the final rename stays on one filesystem (and so is atomic).
    A target that is a device, FIFO or socket raises `OutputPathError`, as does a symbolic link unless
    `follow_symlinks` (then the link's target is replaced, beside itself, and the link stays).
    For folders, `carry_over(target, temporary)` names entries of the old folder to keep in the new one;
    it may raise to refuse the save. Stale temporaries of earlier, killed writes are removed first.
    """
    target = _checked_target(path, follow_symlinks)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    temporary = target.parent / temporary_name(target)
    try:
        yield temporary
        if temporary.is_dir() and not temporary.is_symlink():
            carried = list(carry_over(target, temporary)) if carry_over is not None and target.is_dir() else []
            _replace_folder(temporary, target, carried)
        elif temporary.exists():
            _fsync_path(temporary)
            os.replace(temporary, target)
        else:
            raise FileNotFoundError(f"Nothing was written to the temporary path {temporary} meant to replace {target}.")
        _fsync_path(target.parent)
    except BaseException:
        _remove(temporary)
        raise


def _writer_is_gone(temporary: Path) -> bool:
    """True when the temporary was written on this host by a process that no longer runs."""
    parts = temporary.name.rsplit(_TEMP_MARKER, 1)[-1].split("-")
    if len(parts) != 3 or parts[0] != _HOST_TAG or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: the process exists, under another user
        return False
    return False


def remove_stale_temporaries(target: str | Path, max_age_s: float = STALE_TEMPORARY_AGE_S) -> list[Path]:
    """Delete `.NAME.tmp-*` leftovers of killed writes beside `target`; returns what was removed.

    A temporary is stale when its writer (same host, by pid) is gone, or when it is older than `max_age_s`
    (writers on other hosts, names without a pid); a live save's temporary is left alone. One that may
    hold a user's carried-over files is kept and logged instead.
    """
    target = Path(target)
    removed: list[Path] = []
    try:
        candidates = list(target.parent.glob(f".{target.name}{_TEMP_MARKER}*"))
    except OSError:
        return removed
    now = time.time()
    for temporary in candidates:
        try:
            age = now - temporary.lstat().st_mtime
        except OSError:
            continue
        if not ((age > _DEAD_WRITER_GRACE_S and _writer_is_gone(temporary)) or age > max_age_s):
            continue
        if (temporary / CARRYING_MARKER).exists():
            logger.warning("Not removing %s left by an interrupted save: it may hold files carried over from %s.", temporary, target)
            continue
        _remove(temporary)
        removed.append(temporary)
        logger.info("Removed %s left by an interrupted write", temporary)
    return removed


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


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2, follow_symlinks: bool = False) -> None:
    """Write JSON so a crash mid-write cannot leave a truncated, unparsable file (targets as in `atomic_write`)."""
    with atomic_write(path, follow_symlinks=follow_symlinks) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=indent, ensure_ascii=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
