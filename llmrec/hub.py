"""The Hugging Face Hub side of a saved model: the upload of its folder (and, re-exported, its model card).

The card itself is rendered in `llmrec.model_card`; the folder's file names and metadata reading live in
`llmrec.model_folder`. Both are importable from here as before.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import HfApi

from .errors import HubUploadError, ModelFolderError
# Re-exported: these were defined here before the card and the folder's files got modules of their own.
from .model_card import MODEL_CARD_TEMPLATE, model_card_template_path, render_model_card  # noqa: F401
from .model_folder import EVAL_RESULTS_FILE, TRAINING_CONFIG_FILE, read_run_metadata  # noqa: F401
from .model_folder import MODEL_CARD_FILE, REQUIRED_FILES, check_folder
from .modeling.modeling_llmrec import ENCODER_ADAPTER_FOLDER
from .utils.integrity import check_links_stay_inside

logger = logging.getLogger(__name__)

# Left out of uploads: resumable training state is not part of the model.
_NOT_UPLOADED = ("checkpoints",)


def files_to_upload(folder: Union[str, Path]) -> list[str]:
    """Every file of a model folder that belongs on the Hub, as sorted POSIX paths relative to the folder.

    Hidden entries (temporary files of an interrupted save) and training checkpoints are left out.
    """
    folder = Path(folder)
    files = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts) and relative.parts[0] not in _NOT_UPLOADED:
            files.append(relative.as_posix())
    return sorted(files)


def push_to_hub(
    folder: Union[str, Path],
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload llmrec model",
    dry_run: bool = False,
) -> list[str]:
    """Upload a saved model folder to a Hub model repo in one commit; returns the files (uploaded, or that would be).

    The folder must pass the checks `Recommender.from_pretrained` starts with (`check_folder`, every file's
    checksum included), so a broken model is never published. With `dry_run` nothing touches the network.
    """
    folder = Path(folder)
    missing = [name for name in (*REQUIRED_FILES, MODEL_CARD_FILE) if not (folder / name).is_file()]
    if missing:
        raise ModelFolderError(
            f"{folder} is missing {', '.join(missing)}; push the output_dir of a finetune run or a folder written "
            "by Recommender.save_pretrained."
        )
    check_links_stay_inside(folder, walk=(ENCODER_ADAPTER_FOLDER,))  # a link could upload files from outside it
    check_folder(folder, verify=True)
    files = files_to_upload(folder)
    if dry_run:
        return files
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type="model", allow_patterns=files, commit_message=commit_message
        )
    except Exception as error:  # HTTP, auth and connection errors from huggingface_hub/requests
        raise HubUploadError(
            f"Uploading {folder} to {repo_id} failed ({type(error).__name__}: {error}); check the network, "
            "log in with `hf auth login` (or pass a token), and that you may write to that repo."
        ) from error
    logger.info("Uploaded %d files from %s to https://huggingface.co/%s", len(files), folder, repo_id)
    return files
