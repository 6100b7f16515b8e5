#!/usr/bin/env bash
# Install llmrec for development on a CPU machine.
# The CPU build of PyTorch goes in first: an unpinned `torch` would pull gigabytes of CUDA packages.
# MovieLens-100k comes from the RecBole wheel, installed without its dependencies (only its data files are used).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps "recbole==1.2.1"
