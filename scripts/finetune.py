#!/usr/bin/env python
"""Fine-tune llmrec end to end: data -> encoder -> FAISS -> reranker -> eval_results.json.

    accelerate launch scripts/finetune.py --config configs/ml100k.yaml --output_dir runs/ml100k
    python scripts/finetune.py --config configs/ml100k.yaml --training.retrieval_epochs 5

Any config value can be overridden as ``--section.field VALUE`` (or ``--section.field=VALUE``).

Keeping a model current: ``--init_from FOLDER`` (``training.init_from``) continues training a saved model
(an earlier run's output_dir) on the configured data, e.g. all interactions up to today:

    python scripts/finetune.py --config configs/ml100k.yaml --init_from runs/ml100k --output_dir runs/ml100k-new

Its items keep their ids and learned vectors; items new in the data get their text vectors and new ID
embedding rows; new users need nothing. The model settings must be the folder's. The output is an ordinary
model folder, so a server started on the old one can swap it in (``kill -HUP`` or ``POST /admin/reload``).

Resuming: with ``--training.checkpoint_every_steps N`` the run saves a checkpoint every N optimizer steps
and at the end of each stage into ``<output_dir>/checkpoints`` (the two most advanced are kept; a fresh run
removes an earlier run's). After a crash or kill, run the same command again with

    --resume              continue from the most advanced intact checkpoint in <output_dir>/checkpoints
                          (a broken one, e.g. truncated by a full disk, is skipped with a warning naming it)
    --resume CHECKPOINT   continue from that checkpoint folder

Random states that cannot be restored stop the resume (the run would not match an uninterrupted one);
--resume-ignore-rng resumes anyway.

It goes on from the next batch of the interrupted epoch (a stage the checkpoint had finished is not trained
again) and, with the same seed and hardware, ends with the same metrics as an uninterrupted run. The config
must match the checkpoint's except for output_dir, training.checkpoint_every_steps, training.cpu_threads,
training.encode_batch_size and evaluation.batch_size, and the number of processes must be the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import yaml

from llmrec.config import load_config
from llmrec.errors import ConfigError, LlmRecError
from llmrec.finetune import run_finetune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (see configs/).")
    parser.add_argument("--output_dir", help="Where the model, index and eval_results.json go.")
    parser.add_argument(
        "--init_from", metavar="FOLDER",
        help="Continue training this saved model folder on the configured data (sets training.init_from).",
    )
    parser.add_argument(
        "--resume", nargs="?", const="latest", metavar="CHECKPOINT",
        help="Continue an interrupted run: from CHECKPOINT, or without it from the latest in <output_dir>/checkpoints.",
    )
    parser.add_argument(
        "--resume-ignore-rng", action="store_true",
        help="With --resume: go on even if the checkpoint's random states cannot be restored (not reproducible).",
    )
    arguments, overrides = parser.parse_known_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        if arguments.resume_ignore_rng and arguments.resume is None:
            raise ConfigError("--resume-ignore-rng goes with --resume.")
        if arguments.output_dir is not None:  # `--output_dir=` too, which the config then refuses as empty
            overrides += [f"--output_dir={arguments.output_dir}"]
        if arguments.init_from is not None:
            overrides += [f"--training.init_from={arguments.init_from}"]
        config = load_config(arguments.config, overrides)
        run_finetune(config, resume_from=arguments.resume, resume_ignore_rng=arguments.resume_ignore_rng)
    except (LlmRecError, OSError) as error:  # OSError: e.g. a disk that fills up while the model is saved
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ValueError, yaml.YAMLError) as error:
        # Unparsable text in a file read without naming it: still one line. Other ValueErrors are bugs.
        if not isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, yaml.YAMLError)):
            raise
        print(f"error: a file could not be parsed ({' '.join(f'{type(error).__name__}: {error}'.split())}).", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
