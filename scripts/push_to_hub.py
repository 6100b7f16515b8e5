#!/usr/bin/env python
"""Upload a trained llmrec model folder (model card included) to the Hugging Face Hub in one commit.

    python scripts/push_to_hub.py runs/ml100k user/llmrec-ml100k --dry-run   # list the files, no network
    python scripts/push_to_hub.py runs/ml100k user/llmrec-ml100k --private

The folder is loaded first, so a broken model is never published; training checkpoints stay local.
Authenticate with `hf auth login` or pass --token (or set HF_TOKEN).
"""

from __future__ import annotations

import argparse
import logging
import sys

from llmrec.errors import LlmRecError
from llmrec.hub import push_to_hub


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="A model folder: the output_dir of a finetune run, or a save_pretrained folder.")
    parser.add_argument("repo_id", help="Hub model repo to create or update, e.g. user/llmrec-ml100k.")
    parser.add_argument("--private", action="store_true", help="Create the repo as private (if it does not exist).")
    parser.add_argument("--token", help="Hub token; defaults to the logged-in token or HF_TOKEN.")
    parser.add_argument("--commit-message", default="Upload llmrec model")
    parser.add_argument("--dry-run", action="store_true", help="Only list the files that would be uploaded.")
    arguments = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        files = push_to_hub(
            arguments.folder,
            arguments.repo_id,
            private=arguments.private or None,
            token=arguments.token,
            commit_message=arguments.commit_message,
            dry_run=arguments.dry_run,
        )
    except LlmRecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    heading = "Would upload" if arguments.dry_run else "Uploaded"
    print(f"{heading} {len(files)} files to {arguments.repo_id}:")
    for name in files:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
