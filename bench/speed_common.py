"""What every section of bench/speed.py shares: the loaded inputs, the interleaved clock and the table rows.

A module of its own so each section module (speed_items.py, speed_training.py) can import it without
importing the script that runs them.
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from llmrec import Recommender

ROOT = Path(__file__).resolve().parent.parent


SECTIONS = ("encode", "retrieval", "rerank", "recommend", "training")


CREATE_MODEL_COMMAND = "accelerate launch scripts/finetune.py --config configs/ml100k.yaml --output_dir runs/ml100k"


TRAINING_CONFIG = "configs/ml100k.yaml"


@dataclass
class BenchContext:
    """The loaded model and the inputs every section shares."""

    recommender: Recommender
    histories: list[list[int]]  # item indices of each test user's whole known history, oldest first
    history_ids: list[list[str]]  # the same histories as raw item ids
    user_embeddings: torch.Tensor  # (users, hidden) from the user tower
    candidates: np.ndarray  # (users, num_candidates) llmrec's FAISS candidates, history excluded
    timed_users: list[int]  # users timed one request at a time, in a fixed shuffled order
    repeats: int
    threads: int
    quick: bool
    args: argparse.Namespace


def time_interleaved(
    variants: dict[str, Callable[[Any], Any]], arguments: Sequence[Any], passes: int, warmup_calls: int = 1
) -> dict[str, np.ndarray]:
    """Seconds per call of each variant on each argument, the variants alternating call by call.

    The order flips at every argument (A B, B A, ...), so neither variant always runs on caches the other
    warmed; the garbage collector is paused, so its pauses do not land on one variant.
    """
    names = list(variants)
    for argument in list(arguments)[:warmup_calls]:
        for name in names:
            variants[name](argument)
    samples: dict[str, list[float]] = {name: [] for name in names}
    flip = False
    gc.collect()
    gc.disable()
    try:
        for _ in range(passes):
            for argument in arguments:
                for name in reversed(names) if flip else names:
                    start = time.perf_counter()
                    variants[name](argument)
                    samples[name].append(time.perf_counter() - start)
                flip = not flip
    finally:
        gc.enable()
    return {name: np.asarray(values) for name, values in samples.items()}


def latency(samples: np.ndarray) -> dict[str, float]:
    return {
        "calls": int(len(samples)),
        "p50_ms": float(np.percentile(samples, 50) * 1e3),
        "p99_ms": float(np.percentile(samples, 99) * 1e3),
        "mean_ms": float(samples.mean() * 1e3),
    }


def _ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


def _p50_p99(stats: dict[str, float]) -> str:
    return f"{_ms(stats['p50_ms'])} / {_ms(stats['p99_ms'])}"


def _rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}"


def _seconds(value: Optional[float], digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} s"


def row(measurement: str, llmrec: str, reference: str = "–", ratio: str = "–", target: str = "–",
        met: Optional[bool] = None) -> dict[str, Any]:
    """One table row: an llmrec figure, the limit it chases (same run), their ratio and the target."""
    return {"measurement": measurement, "llmrec": llmrec, "reference": reference, "ratio": ratio, "target": target, "met": met}
