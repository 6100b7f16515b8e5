"""What both cold-start runs of bench/coldstart.py share: the learned systems, the random baseline, the run's
machine line, and the README block each run rewrites."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import numpy as np
import torch

SYSTEMS = {  # model overrides of each learned system
    # No item text, so no text-similarity feature for the head either (the shipped configs switch it on).
    "ID-only": {"use_text_embeddings": False, "use_id_embeddings": True, "rerank_text_similarity": False},
    "text-only": {"use_text_embeddings": True, "use_id_embeddings": False},
    "hybrid": {"use_text_embeddings": True, "use_id_embeddings": True},
}


def machine_line(threads: int) -> str:
    """The machine a run trained on, as one sentence under its README table."""
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.processor() or 'unknown model'}), "
            f"torch {torch.__version__}, {threads} thread(s)")


def _random_expectation(examples, num_items: int, among_cold: bool = False) -> dict:
    """NDCG@10 / HR@10 of a uniformly random ranking, averaged over the examples' candidate counts.

    Cold histories hold no cold item, so among the cold items every one of them is a candidate.
    """
    ndcg, hr = [], []
    for history in examples.histories:
        candidates = num_items if among_cold else num_items - len(set(history))
        hr.append(min(10, candidates) / candidates)
        ndcg.append(sum(1.0 / np.log2(rank + 2) for rank in range(min(10, candidates))) / candidates)
    return {"ndcg@10": float(np.mean(ndcg)), "hr@10": float(np.mean(hr))}


def _replace_block(readme: Path, start: str, end: str, block: str) -> None:
    """Replace the text between two markers (the rest of the README is written by hand)."""
    text = readme.read_text() if readme.is_file() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    readme.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{block}\n{end}", text,
                             flags=re.S))
