"""Integrity of a saved folder: SHA-256 of every file llmrec wrote, links that must not leave the folder, no code.

A model folder is often copied, synced or downloaded, and a flipped byte inside the weights still loads:
safetensors checks shapes, not values. `record_checksums` writes a digest of each file into the folder's
`config.json` when it is saved; `verify_checksums` recomputes them on load and names the file that changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from ..errors import ModelFolderError
from .io import write_json_atomic

logger = logging.getLogger(__name__)

CHECKSUMS_KEY = "file_checksums"
_CHUNK_BYTES = 1 << 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of one file, read in 1 MiB chunks so a multi-GB weights file never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_checksums(folder: str | Path, exclude: Iterable[str] = ()) -> dict[str, str]:
    """{relative posix path: sha256} of every regular file under `folder`, except the relative paths in `exclude`."""
    folder = Path(folder)
    excluded = set(exclude)
    checksums = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and not path.is_symlink() and relative not in excluded:
            checksums[relative] = sha256_of(path)
    return checksums


def record_checksums(
    folder: str | Path, config_name: str = "config.json", exclude: Iterable[str] = (), only: Optional[Iterable[str]] = None
) -> dict[str, str]:
    """Store the digests of the folder's files in its `config_name` (under `file_checksums`); returns them.

    Call it once every file is written and before anything not written by llmrec joins the folder.
    `config_name` itself cannot hold its own digest and is left out. With `only`, just those entries are
    (re)computed and the others kept, e.g. after rebuilding the index of a saved folder; a folder
    without recorded checksums is then left as it is.
    """
    folder = Path(folder)
    config_path = folder / config_name
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if only is None:
        checksums = folder_checksums(folder, exclude={config_name, *exclude})
    elif isinstance(config.get(CHECKSUMS_KEY), dict):
        checksums = dict(config[CHECKSUMS_KEY])
        checksums.update({name: sha256_of(folder / name) for name in only if name != config_name})
    else:  # a folder saved before checksums existed stays unverified rather than half-verified
        return {}
    config[CHECKSUMS_KEY] = checksums
    write_json_atomic(config_path, config)  # in place (an index rebuild) a crash must not truncate config.json
    return checksums


def _checked_relative(folder: Path, name: Any, config_path: Path) -> Path:
    """A recorded name as a path inside `folder`; a tampered map must not make the check read elsewhere."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise ModelFolderError(
            f"{config_path} lists {name!r} in {CHECKSUMS_KEY}, which is not a path inside the folder; the folder "
            "was edited by hand or tampered with. Copy or download it again."
        )
    return folder.joinpath(*parts)


def verify_checksums(
    folder: str | Path, config: Mapping[str, Any], config_name: str = "config.json", hints: Optional[Mapping[str, str]] = None
) -> None:
    """Recompute the digests recorded in `config` and raise `ModelFolderError` naming any file that changed.

    Folders saved before digests were recorded have none and pass (logged at debug level). `hints`
    maps a file name to an extra fix for it (e.g. how to rebuild a derived file).
    """
    folder = Path(folder)
    config_path = folder / config_name
    recorded = config.get(CHECKSUMS_KEY)
    if recorded is None:
        logger.debug("%s records no file checksums (saved by an older llmrec); not verifying.", config_path)
        return
    if not isinstance(recorded, dict) or not all(isinstance(value, str) and _SHA256_HEX.fullmatch(value) for value in recorded.values()):
        raise ModelFolderError(
            f"{config_path} has a malformed {CHECKSUMS_KEY} (expected {{file: sha256 hex}}); copy or download the folder again."
        )
    for name, expected in recorded.items():
        path = _checked_relative(folder, name, config_path)
        hint = (hints or {}).get(name, "Copy or download the folder again.")
        if not path.is_file():
            raise ModelFolderError(f"{path} is missing, but {config_path} records it as part of the model. {hint}")
        if sha256_of(path) != expected:
            raise ModelFolderError(
                f"{path} changed since the model was saved: its SHA-256 differs from the one in {config_path} "
                f"(the file is corrupt or was edited). {hint} To load it anyway, pass verify=False "
                "(`--no-verify` on the command line)."
            )


def check_links_stay_inside(folder: str | Path, root: Optional[str | Path] = None, walk: Iterable[str] = ()) -> None:
    """Refuse links in `folder` that resolve outside `root` (default: the folder itself), before anything is read.

    Every top-level entry is checked, and every entry below the subfolders named in `walk`; other
    subfolders (e.g. training checkpoints) are never read on load. A Hub snapshot's files link into the
    cache's blob store, so its caller passes the cache folder of that repo as `root`.
    """
    folder = Path(folder).resolve()
    root = Path(root).resolve() if root is not None else folder
    entries = list(folder.iterdir())
    for name in walk:
        subfolder = folder / name
        if subfolder.is_dir() and not subfolder.is_symlink():
            for dirpath, dirnames, filenames in os.walk(subfolder):
                entries += [Path(dirpath) / entry for entry in (*dirnames, *filenames)]
    for entry in entries:
        if not entry.is_symlink():
            continue
        try:
            target = entry.resolve()
        except (OSError, RuntimeError) as error:  # a link loop
            raise ModelFolderError(f"{entry} is a broken link ({error}); remove it from the model folder.") from error
        if target != root and root not in target.parents:
            raise ModelFolderError(
                f"{entry} is a link to {target}, outside the model folder {folder}; a model folder must hold its own "
                "files. Replace the link with a copy of the file, or remove it."
            )


def _has_key(value: Any, key: str) -> bool:
    if isinstance(value, dict):
        return key in value or any(_has_key(item, key) for item in value.values())
    if isinstance(value, list):
        return any(_has_key(item, key) for item in value)
    return False


def find_custom_code(folder: str | Path, walk: Iterable[str] = ()) -> list[Path]:
    """Files that would make transformers offer to run code from the folder: `*.py`, and JSON with an `auto_map`.

    Transformers runs a folder's own `*.py` classes when a config names them in `auto_map` and the user
    answers "y" (or passes trust_remote_code=True). llmrec's own classes are the code of a model folder,
    so any such file is refused. The top level and the subfolders in `walk` are searched, as
    `check_links_stay_inside` does; JSON that does not parse is left to the reader of that file.
    """
    folder = Path(folder)
    files = [path for path in folder.iterdir() if path.is_file()]
    for name in walk:
        if (folder / name).is_dir():
            files += [path for path in (folder / name).rglob("*") if path.is_file()]
    found = []
    for path in sorted(files):
        if path.suffix == ".py":
            found.append(path)
        elif path.suffix == ".json":
            try:
                if _has_key(json.loads(path.read_text(encoding="utf-8")), "auto_map"):
                    found.append(path)
            except (OSError, ValueError, RecursionError):
                continue
    return found
