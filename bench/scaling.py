"""Scaling benchmark: retrieval and rerank latency and memory from 10k to 1M items, and FAISS flat vs HNSW vs IVF.

Catalogues this large do not exist for the trained MovieLens-100k model, and uniform random unit vectors
are the worst case for approximate search (HNSW recall@100 0.02-0.03 at 1M random 384-d vectors), so the
synthetic items are made to look like the real model's item embeddings:

1. Real items: the trained model's item representations (`runs/ml100k`, 1,682 x 64, `pipeline.item_embeddings`)
   are the first 1,682 items of every synthetic catalogue, under their own item indices, so real
   MovieLens-100k histories stay valid in it.
2. Every other item is a child of a real item (the parent, drawn uniformly): with probability 0.5 it is first
   moved towards one of the parent's 10 nearest real neighbours by a fraction drawn from U(0, 0.5) (a mix of
   two items), then Gaussian noise is added with the shape of the parent's real neighbourhood: a random
   Gaussian combination of the offsets from the parent to its 20 nearest real neighbours, so its covariance
   is theirs (times `noise_scale`^2) and its expected norm `noise_scale` x their RMS distance. Real item
   neighbourhoods are low-dimensional (the offsets to the 20 nearest neighbours have a participation ratio
   of ~3.7 of 64 dimensions), and isotropic noise (`--noise isotropic`: expected norm `noise_scale` x the
   parent's nearest-neighbour distance, in all 64 directions) turns every cluster into a 64-dimensional
   random cloud, the worst case for graph search (HNSW recall@100 0.62 at efSearch 128 on 1M items).
3. `noise_scale` is calibrated (bisection) so that a random sample of 1,682 synthetic children has the same
   median nearest-neighbour cosine as the real items: a real-sized sample of the synthetic catalogue is as
   spread out as the real catalogue. Both the calibration and the local dimension of the catalogue built
   (participation ratio of the offsets to each sampled item's 20 nearest neighbours) are recorded.

Queries are real users: the model's user tower on real MovieLens-100k histories (the test users' histories
of the leave-one-out split, item indices of the real items). For history length L, users with at least L
interactions contribute their most recent L items (cycled when fewer users than wanted qualify; histories
are padded with random real items, and flagged, only when no user has L items). Latency uses the real
model's user encoder and reranking head (hidden 64) with the synthetic table in place of the model's item
embeddings (the model's `item_embeddings()` is swapped for the table on the instance while the pipeline
builds its caches, so nothing goes through BERT).

Every timing is warm-up calls, then the median (p50) and p99 of `--repeats` calls, one user per call, each
call a different user (cycling through the pool); batched throughput is `--batch-size` users in one call.
Threads are the machine defaults (recorded). Writes `bench/results/scaling.json` and `scaling.md`;
built HNSW/IVF indexes are cached under `runs/bench-scaling/` (keyed by the exact vectors and parameters).

    python bench/scaling.py                              # full run: 10k, 100k, 1M items
    python bench/scaling.py --sizes 10000 --repeats 20   # quick check, under a minute
    python bench/scaling.py --train --tiny-encoder       # training at 100k and 1M items: bench/scaling_train.py
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("llmrec") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from common import commit_and_dirty, cpu_model, rounded_load_average  # noqa: E402
from llmrec.retrieval import ItemIndex  # noqa: E402
from scaling_measure import (  # noqa: E402  (after the path insert: they import llmrec)
    best_settings, build_index, measure_ann_sweep, measure_memory, measure_rerank, measure_retrieval, measure_user_encoding,
)
from scaling_report import render_markdown, target_verdict  # noqa: E402
from scaling_synthetic import (  # noqa: E402
    MAX_MIX_FRACTION, MIX_NEIGHBOURS, MIX_PROBABILITY, NOISE_MODELS, NOISE_NEIGHBOURS, TOP_K, RealModel,
    calibrate_noise_scale, load_real_model, local_dimension, synthetic_catalogue, synthetic_pipeline, user_histories,
)

logger = logging.getLogger("bench.scaling")


# ----- the run -----------------------------------------------------------------------------------------


def machine_info() -> dict:
    """What the timings depend on: CPU, cores, threads, library versions, code revision, date."""
    commit, dirty = commit_and_dirty(ROOT)
    return {
        "cpu": cpu_model() or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": rounded_load_average(),
    }


def _relative(path: Path) -> str:
    """A path inside the repository as written from its root, so results do not carry one machine's folders."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def index_params(index_type: str, args: argparse.Namespace) -> dict:
    if index_type == "hnsw":
        return {"M": args.hnsw_m, "efConstruction": args.hnsw_ef_construction}
    if index_type == "ivf":
        return {"nlist": args.ivf_nlist} if args.ivf_nlist else {}
    return {}


def run_size(real: RealModel, num_items: int, args: argparse.Namespace, pools: dict[int, list[list[int]]], results: dict) -> dict[str, ItemIndex]:
    """Every measurement at one catalogue size; returns its indexes (kept for the sweep at the largest size)."""
    item_vectors = synthetic_catalogue(real.item_vectors, num_items, results["vectors"]["noise_scale"], args.seed + num_items, args.noise)
    results["vectors"].setdefault("local_dimension_by_size", {})[str(num_items)] = local_dimension(item_vectors, 500, args.seed)
    indexes: dict[str, ItemIndex] = {}
    pipeline = None
    for index_type in args.index_types:
        index, build_seconds = build_index(item_vectors, index_type, index_params(index_type, args), args.cache_dir)
        indexes[index_type] = index
        if pipeline is None:
            pipeline = synthetic_pipeline(real, item_vectors, index)
            for length, histories in pools.items():
                user_vectors = pipeline.user_embeddings(histories).float().numpy()
                results["rerank"].append({"num_items": num_items, "history_length": length,
                                          **measure_rerank(pipeline, histories, user_vectors, args.repeats, args.warmup, args.batch_size)})
                logger.info("rerank %s", results["rerank"][-1])
        pipeline.index = index
        entry = {"num_items": num_items, "index_type": index_type, "params": dict(index.params), "build_seconds": build_seconds,
                 "memory": measure_memory(real, pipeline, index), "retrieval": []}
        for length, histories in pools.items():
            user_vectors = pipeline.user_embeddings(histories).float().numpy()
            entry["retrieval"].append({"history_length": length,
                                       **measure_retrieval(pipeline, histories, user_vectors, args.repeats, args.warmup, args.batch_size)})
            logger.info("%d items, %s, history %d: %s", num_items, index_type, length, entry["retrieval"][-1])
        results["scaling"].append(entry)
    if num_items == max(args.sizes) and "flat" in indexes and not args.skip_sweep:
        sweep_histories = real.histories[: args.sweep_users]
        sweep_vectors = pipeline.user_embeddings(sweep_histories).float().numpy()
        rows = measure_ann_sweep(indexes, sweep_vectors, sweep_histories, args.sweep_repeats, args.warmup)
        results["ann_sweep"] = {"num_items": num_items, "queries": len(sweep_histories),
                                "history_lengths_p50": int(np.median([len(history) for history in sweep_histories])),
                                "rows": rows, "best": best_settings(rows)}
    return indexes


def parse_arguments() -> argparse.Namespace:
    """The options of a catalogue run (those of a training run, after --train, are bench/scaling_train.py's)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / "ml100k", help="Trained model folder (its vectors seed the catalogue).")
    parser.add_argument("--sizes", type=lambda text: [int(size) for size in text.split(",")], default=[10_000, 100_000, 1_000_000],
                        help="Catalogue sizes, comma-separated (default 10000,100000,1000000).")
    parser.add_argument("--history-lengths", type=lambda text: [int(length) for length in text.split(",")], default=[10, 50, 200],
                        help="History lengths of the latency curves, comma-separated (default 10,50,200).")
    parser.add_argument("--index-types", type=lambda text: text.split(","), default=["flat", "hnsw", "ivf"])
    parser.add_argument("--repeats", type=int, default=200, help="Timed calls per latency (after --warmup calls).")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256, help="Users per batched call (throughput).")
    parser.add_argument("--users", type=int, default=128, help="Distinct histories per history length that single-user calls cycle through.")
    parser.add_argument("--sweep-users", type=int, default=943, help="Real users (full histories) the ANN sweep is measured on.")
    parser.add_argument("--sweep-repeats", type=int, default=None, help="Timed calls per sweep setting (default: --repeats).")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--hnsw-ef-construction", type=int, default=100)
    parser.add_argument("--ivf-nlist", type=int, default=None, help="Default: ItemIndex's 4 * sqrt(items).")
    parser.add_argument("--noise", choices=NOISE_MODELS, default="local",
                        help="Children's noise: shaped like the parent's real neighbourhood (default) or isotropic (worst case).")
    parser.add_argument("--noise-scale", type=float, default=None, help="Fix the children's noise scale instead of calibrating it.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and FAISS threads (default: the machine default); 1 gives steadier timings on a busy machine.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "bench-scaling", help="Built HNSW/IVF indexes (not committed).")
    parser.add_argument("--no-cache", dest="cache_dir", action="store_const", const=None)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "scaling.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "bench" / "results" / "scaling.md")
    args = parser.parse_args()
    args.sweep_repeats = args.sweep_repeats or args.repeats
    return args


def main() -> None:
    if "--train" in sys.argv[1:]:  # the training-side bench lives in its own module; its options follow --train
        sys.path.insert(0, str(ROOT))
        from bench.scaling_train import main as train_main

        return train_main([argument for argument in sys.argv[1:] if argument != "--train"])
    args = parse_arguments()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    started = time.perf_counter()

    real = load_real_model(args.model)
    if args.noise_scale is None:
        vectors = calibrate_noise_scale(real.item_vectors, args.seed, args.noise)
    else:
        vectors = {"noise": args.noise, "noise_scale": args.noise_scale}
    vectors.update({"real_items": len(real.item_vectors), "dim": int(real.item_vectors.shape[1]), "mix_probability": MIX_PROBABILITY,
                    "mix_neighbours": MIX_NEIGHBOURS, "max_mix_fraction": MAX_MIX_FRACTION, "noise_neighbours": NOISE_NEIGHBOURS,
                    "model": _relative(args.model)})
    model_config = real.recommender.model.config
    results: dict[str, Any] = {
        "machine": machine_info(),
        "model": {"hidden_size": model_config.hidden_size, "max_history_length": model_config.max_history_length},
        "vectors": vectors, "user_encoding": [], "rerank": [], "scaling": [],
    }
    rng = np.random.default_rng(args.seed)
    pools, pool_info = {}, []
    for length in args.history_lengths:
        pools[length], info = user_histories(real, length, args.users, rng)
        pool_info.append(info)
    results["histories"] = pool_info

    for length, histories in pools.items():
        timing = measure_user_encoding(real.recommender.pipeline, histories, args.repeats, args.warmup)
        results["user_encoding"].append({"history_length": length, **timing})
        logger.info("user tower, history %d: %s", length, timing)
    for num_items in sorted(args.sizes):
        run_size(real, num_items, args, pools, results)
        gc.collect()

    results["machine"]["load_average_at_end"] = rounded_load_average()
    results["target"] = target_verdict(results)
    results["run"] = {"command": "python bench/scaling.py " + " ".join(shlex.quote(argument) for argument in sys.argv[1:]),
                      "wall_seconds": round(time.perf_counter() - started, 1), "top_k": TOP_K,
                      "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    args.markdown.write_text(render_markdown(results))
    logger.info("Wrote %s and %s in %.0f s", args.output, args.markdown, results["run"]["wall_seconds"])


if __name__ == "__main__":
    main()
