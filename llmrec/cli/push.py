"""`llmrec push`: upload a model folder to the Hugging Face Hub (or, with `--dry-run`, list what would go)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ModelFolderError
from .output import print_json


def command_push(arguments: argparse.Namespace) -> int:
    """Lists the uploaded files; the Hub client is imported only here, so other commands work without it."""
    from ..hub import push_to_hub

    if not Path(arguments.model).is_dir():
        raise ModelFolderError(f"Model folder {arguments.model} does not exist; pass the output_dir of a finetune run.")
    files = push_to_hub(  # private=None leaves an existing repo's visibility alone
        arguments.model, arguments.repo_id, private=arguments.private or None, token=arguments.token,
        commit_message=arguments.commit_message, dry_run=arguments.dry_run,
    )
    if arguments.json:
        print_json({"repo_id": arguments.repo_id, "dry_run": arguments.dry_run, "files": list(files)})
        return 0
    verb = "Would upload" if arguments.dry_run else "Uploaded"
    print(f"{verb} {len(files)} file(s) to https://huggingface.co/{arguments.repo_id}:")
    for file in files:
        print(f"  {file}")
    return 0
