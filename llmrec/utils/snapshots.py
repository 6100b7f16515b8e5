"""Names that mean a Hub repo, and their local snapshots: a model named by repo id is then read by the same
code as a local folder, so nothing (a LoRA adapter, the strict weight checks) is handled for folders only."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Optional, Union

from ..errors import ModelFolderError
from .integrity import check_links_stay_inside


def is_hub_repo_id(name: Union[str, Path]) -> bool:
    """True when `name` can only mean a Hub repo ("user/name"): one slash, not path-like, and no such path here.

    The one test llmrec uses for "folder or repo id" (loading a model, naming an encoder, a card's base model).
    """
    name = str(name)
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists()


def download_snapshot(
    repo_id: str, revision: Optional[str] = None, token: Optional[str] = None, walk: Iterable[str] = (), **download_kwargs
) -> Path:
    """The local snapshot folder of a Hub model repo (downloaded or from the cache), after refusing links out of it.

    `walk` names subfolders whose links are checked too; `download_kwargs` go to `snapshot_download`
    (e.g. `cache_dir`, `local_files_only`). Any failure raises `ModelFolderError` naming the repo.
    """
    from huggingface_hub import snapshot_download  # looked up at call time, so tests can serve a fake snapshot

    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, token=token, **download_kwargs))
    except Exception as error:  # offline, unknown repo, no permission: one clear message
        raise ModelFolderError(
            f"{repo_id} is neither a local model folder nor a Hub repo that could be downloaded "
            f"({type(error).__name__}: {error})."
        ) from error
    # The cache keeps a repo as <repo>/snapshots/<revision>/ of links into <repo>/blobs/.
    check_links_stay_inside(snapshot, root=snapshot.resolve().parents[1], walk=walk)
    return snapshot
