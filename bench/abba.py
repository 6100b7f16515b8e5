"""Latency of several serving calls timed against each other in ABBA order, so machine noise hits each alike."""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Sequence

import numpy as np


def timed(call: Callable[[], Any]) -> float:
    """Milliseconds one call takes."""
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def alternating_timings(calls: dict[str, Callable[[int], Any]], count: int, repeats: int) -> dict[str, dict]:
    """p50 / p99 milliseconds of each `calls[name](position)`, for positions 0..count-1, `repeats` times over.

    At every position the calls run in the order A B ... B A (reversed on odd repeats), with the garbage
    collector paused, so a slow spell of the machine falls on every call alike.
    """
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.disable()
    try:
        for repeat in range(repeats):
            order = names if repeat % 2 == 0 else names[::-1]
            for position in range(count):
                for name in order + order[::-1]:
                    samples[name].append(timed(lambda: calls[name](position)))
    finally:
        gc.enable()
    return {name: summary(values) for name, values in samples.items()}


def summary(milliseconds: Sequence[float]) -> dict:
    return {"p50_ms": float(np.percentile(milliseconds, 50)), "p99_ms": float(np.percentile(milliseconds, 99)),
            "calls": len(milliseconds)}
