"""The catalogue bench/scaling.py times: the real model's items and users, and synthetic items clustered around them.

Children of real items keep the real neighbourhood structure, so an ANN index meets the same difficulty
at 1M items as it would on a real catalogue of that size (see the docstring of bench/scaling.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from llmrec import Recommender
from llmrec.config import load_config
from llmrec.data import build_split, load_interaction_data
from llmrec.retrieval import CandidatePipeline, ItemIndex

logger = logging.getLogger("bench.scaling")

TOP_K = 100

MIX_PROBABILITY = 0.5


MIX_NEIGHBOURS = 10


MAX_MIX_FRACTION = 0.5


NOISE_NEIGHBOURS = 20  # the neighbourhood whose shape local noise copies


NOISE_MODELS = ("local", "isotropic")


@dataclass
class RealModel:
    """The trained model, its real item vectors (row r = item index r + 1) and real user histories."""

    recommender: Recommender
    item_vectors: np.ndarray  # (num_real_items, hidden) float32
    histories: list[list[int]]  # model item indices, oldest first


def load_real_model(model_dir: Path) -> RealModel:
    """Model folder plus the test users' histories of its own split (the users it was evaluated on)."""
    recommender = Recommender.from_pretrained(model_dir)
    config = load_config(model_dir / "config.yaml")
    split = build_split(load_interaction_data(config.data), config.data)
    to_model = np.array([0] + [recommender.item_index[item_id] for item_id in split.item_ids], dtype=np.int64)
    histories = [to_model[history].tolist() for history in split.test.histories]
    item_vectors = recommender.pipeline.item_embeddings[1:].float().cpu().numpy()
    logger.info("Real model: %d items x %d, %d user histories", *item_vectors.shape, len(histories))
    return RealModel(recommender, item_vectors, histories)


def user_histories(real: RealModel, length: int, count: int, rng: np.random.Generator) -> tuple[list[list[int]], dict]:
    """`count` histories of exactly `length` items: the most recent items of users who have that many."""
    long_enough = [history[-length:] for history in real.histories if len(history) >= length]
    padded = not long_enough
    if padded:  # no real user is this long: pad the longest histories at the old end with random real items
        longest = sorted(real.histories, key=len, reverse=True)[:count]
        long_enough = [
            rng.integers(1, len(real.item_vectors) + 1, length - len(history)).tolist() + history for history in longest
        ]
    order = rng.permutation(len(long_enough))
    histories = [long_enough[order[position % len(order)]] for position in range(count)]
    return histories, {"history_length": length, "distinct_users": len(long_enough), "padded": padded}


def nearest_neighbours(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item: Euclidean distance to its nearest neighbour, cosine with it, and its k nearest neighbours."""
    squared = (vectors**2).sum(axis=1)
    distances = squared[:, None] + squared[None, :] - 2.0 * vectors @ vectors.T
    np.fill_diagonal(distances, np.inf)
    neighbours = np.argsort(distances, axis=1)[:, :k]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosines = unit @ unit.T
    np.fill_diagonal(cosines, -np.inf)
    return np.sqrt(np.maximum(distances[np.arange(len(vectors)), neighbours[:, 0]], 0.0)), cosines.max(axis=1), neighbours


def synthesize_children(
    real_vectors: np.ndarray, count: int, noise_scale: float, rng: np.random.Generator, noise: str = "local"
) -> np.ndarray:
    """`count` items clustered around random real items (see the module docstring); float32 (count, hidden)."""
    nn_distance, _, neighbours = nearest_neighbours(real_vectors, max(MIX_NEIGHBOURS, NOISE_NEIGHBOURS))
    dim = real_vectors.shape[1]
    children = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 32_768):  # bounded temporaries (chunk x 20 x 64 offsets) at 1M items
        size = min(32_768, count - start)
        parents = rng.integers(0, len(real_vectors), size)
        partners = neighbours[parents, rng.integers(0, MIX_NEIGHBOURS, size)]
        mix = np.where(rng.random(size) < MIX_PROBABILITY, rng.uniform(0.0, MAX_MIX_FRACTION, size), 0.0)[:, None]
        if noise == "local":
            offsets = real_vectors[neighbours[parents, :NOISE_NEIGHBOURS]] - real_vectors[parents][:, None, :]
            weights = rng.standard_normal((size, 1, NOISE_NEIGHBOURS)) * (noise_scale / np.sqrt(NOISE_NEIGHBOURS))
            offset = (weights @ offsets)[:, 0]
        else:
            offset = rng.standard_normal((size, dim)) * (noise_scale * nn_distance[parents] / np.sqrt(dim))[:, None]
        children[start : start + size] = real_vectors[parents] + mix * (real_vectors[partners] - real_vectors[parents]) + offset
    return children


def participation_ratio(offsets: np.ndarray) -> float:
    """Effective number of dimensions a set of offset vectors spans: (sum of PCA variances)^2 / sum of squares."""
    variances = np.linalg.svd(offsets, compute_uv=False) ** 2
    return float(variances.sum() ** 2 / (variances**2).sum())


def local_dimension(vectors: np.ndarray, sample: int, seed: int) -> float:
    """Median participation ratio of the offsets from `sample` random items to their 20 nearest neighbours."""
    rows = np.random.default_rng(seed).choice(len(vectors), min(sample, len(vectors)), replace=False)
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    _, found = index.search(np.ascontiguousarray(vectors[rows], dtype=np.float32), NOISE_NEIGHBOURS + 1)
    return round(float(np.median([participation_ratio(vectors[near[1:]] - vectors[row]) for row, near in zip(rows, found)])), 2)


def calibrate_noise_scale(real_vectors: np.ndarray, seed: int, noise: str, iterations: int = 14) -> dict:
    """Bisect the noise scale until a real-sized sample of children matches the real median nearest-neighbour cosine."""
    _, real_cosines, _ = nearest_neighbours(real_vectors, 1)
    target = float(np.median(real_cosines))
    low, high = 0.0, 3.0
    for _ in range(iterations):
        middle = (low + high) / 2
        sample = synthesize_children(real_vectors, len(real_vectors), middle, np.random.default_rng(seed), noise)
        median = float(np.median(nearest_neighbours(sample, 1)[1]))
        low, high = (middle, high) if median > target else (low, middle)  # more noise, lower cosine
    scale = (low + high) / 2
    sample = synthesize_children(real_vectors, len(real_vectors), scale, np.random.default_rng(seed + 1), noise)
    sample_cosines = nearest_neighbours(sample, 1)[1]
    result = {
        "noise": noise,
        "noise_scale": round(scale, 4),
        "real_nn_cosine_percentiles_5_50_95": np.percentile(real_cosines, [5, 50, 95]).round(4).tolist(),
        "synthetic_sample_nn_cosine_percentiles_5_50_95": np.percentile(sample_cosines, [5, 50, 95]).round(4).tolist(),
        "real_local_dimension": local_dimension(real_vectors, len(real_vectors), seed),
    }
    logger.info("Calibrated noise scale %.3f: %s", scale, result)
    return result


def synthetic_catalogue(real_vectors: np.ndarray, num_items: int, noise_scale: float, seed: int, noise: str = "local") -> np.ndarray:
    """The real items first (their indices unchanged), then clustered children up to `num_items`."""
    if num_items < len(real_vectors):
        raise ValueError(f"Catalogue sizes must be at least the {len(real_vectors)} real items; got {num_items}.")
    children = synthesize_children(real_vectors, num_items - len(real_vectors), noise_scale, np.random.default_rng(seed), noise)
    return np.concatenate([real_vectors.astype(np.float32), children])


def synthetic_pipeline(real: RealModel, item_vectors: np.ndarray, index: ItemIndex) -> CandidatePipeline:
    """The real model's serving pipeline over a synthetic catalogue.

    The model's `item_embeddings()` is replaced on this instance by the synthetic table while the pipeline
    builds its caches, so whatever this llmrec version caches per item is built from the table (no BERT).
    """
    model = real.recommender.model
    table = torch.cat([torch.zeros(1, item_vectors.shape[1]), torch.from_numpy(item_vectors)])

    def synthetic_item_embeddings(*_args: Any, rows: torch.Tensor | None = None, **_kwargs: Any) -> torch.Tensor:
        return table if rows is None else table[rows]

    model.item_embeddings = synthetic_item_embeddings
    try:
        return CandidatePipeline(model, index, num_candidates=TOP_K)
    finally:
        del model.item_embeddings
