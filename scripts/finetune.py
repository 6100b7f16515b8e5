#!/usr/bin/env python
"""Fine-tune llmrec end to end: data -> encoder -> FAISS -> reranker -> eval_results.json.

    accelerate launch scripts/finetune.py --config configs/ml100k.yaml --output_dir runs/ml100k
    python scripts/finetune.py --config configs/ml100k.yaml --training.retrieval_epochs 5

Any config value can be overridden as ``--section.field VALUE`` (or ``--section.field=VALUE``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from llmrec.config import load_config
from llmrec.errors import LlmRecError
from llmrec.training import run_finetune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (see configs/).")
    parser.add_argument("--output_dir", help="Where the model, index and eval_results.json go.")
    arguments, overrides = parser.parse_known_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        if arguments.output_dir:
            overrides += [f"--output_dir={arguments.output_dir}"]
        config = load_config(arguments.config, overrides)
        run_finetune(config)
    except LlmRecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
