#!/usr/bin/env python
"""Upload a trained llmrec model folder (model card included) to the Hugging Face Hub in one commit.

    python scripts/push_to_hub.py runs/ml100k user/llmrec-ml100k --dry-run   # list the files, no network
    python scripts/push_to_hub.py runs/ml100k user/llmrec-ml100k --private

The same as `llmrec push MODEL REPO_ID [--private] [--token T] [--commit-message M] [--dry-run]`. The folder
is loaded first, so a broken model is never published; training checkpoints stay local. Authenticate with
`hf auth login` or pass --token (or set HF_TOKEN).
"""

from __future__ import annotations

import sys

from llmrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))
