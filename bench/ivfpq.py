"""IVF-PQ through `ItemIndex` (retrieval.index_factory) against exact search on synthetic clustered vectors.

For each size: build time (train on a sample + chunked fill), bytes per vector of the saved index,
recall@100 against the flat index's top 100, and p50 latency of one query per call (after warm-up), for
a sweep of nprobe. Vectors: `--clusters` Gaussian clusters on the unit sphere in 64-d (a random centre plus
noise of norm ~0.5), queries drawn the same way. The load average is recorded before and after.

    python bench/ivfpq.py --sizes 1000000 5000000 --factory IVF4096,PQ32
    python bench/ivfpq.py --sizes 100000 --factory IVF1024,PQ32 --queries 200   # minutes on 2 loaded cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from llmrec.retrieval import ItemIndex  # noqa: E402
from llmrec.retrieval.factory import bytes_per_vector  # noqa: E402

DIM, TOP_K = 64, 100


def clustered(rng: np.random.Generator, count: int, centres: np.ndarray) -> np.ndarray:
    vectors = centres[rng.integers(len(centres), size=count)] + rng.standard_normal((count, DIM)).astype(np.float32) * (0.5 / np.sqrt(DIM))
    return vectors.astype(np.float32)


def measure(size: int, factory: str, nprobes: list[int], num_queries: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(16, size // 500), DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    items, queries = clustered(rng, size, centres), clustered(rng, num_queries, centres)
    truth = ItemIndex.build(items).search(queries, TOP_K)[1]
    started = time.perf_counter()
    index = ItemIndex.build(items, index_type="factory", factory=factory)
    build_seconds = time.perf_counter() - started
    rows = []
    for nprobe in nprobes:
        index.set_search_params(nprobe=nprobe)
        found = index.search(queries, TOP_K)[1]
        recall = float(np.mean([len(set(a) & set(b)) / TOP_K for a, b in zip(truth, found)]))
        for query in queries[:10]:
            index.search(query[None], TOP_K)
        times = []
        for query in queries:
            start = time.perf_counter()
            index.search(query[None], TOP_K)
            times.append(time.perf_counter() - start)
        rows.append({"nprobe": nprobe, "recall@100": recall, "p50_ms": 1000 * float(np.median(times))})
    return {"items": size, "factory": factory, "build_seconds": build_seconds,
            "bytes_per_vector": bytes_per_vector(index.faiss_index), "flat_bytes_per_vector": 4 * DIM, "sweep": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--factory", default="IVF4096,PQ32")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ivfpq.json"))
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = [measure(size, args.factory, args.nprobe, args.queries, seed=0) for size in args.sizes]
    report = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "cpu_count": os.cpu_count(), "faiss_threads": args.threads, "faiss": faiss.__version__,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2))
    for result in results:
        print(f"{result['items']:,} items {result['factory']}: build {result['build_seconds']:.1f} s, "
              f"{result['bytes_per_vector']:.1f} B/vector (flat {result['flat_bytes_per_vector']})")
        for row in result["sweep"]:
            print(f"  nprobe {row['nprobe']:4d}: recall@100 {row['recall@100']:.4f}, p50 {row['p50_ms']:.3f} ms")


if __name__ == "__main__":
    main()
