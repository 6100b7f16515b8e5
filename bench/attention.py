"""Attention-optimisation benchmark: each of llmrec's serving and precision optimisations against the
unoptimised path, in the same run, with its effect on the ranking.

Sections (`--sections`, default all), on the trained MovieLens-100k model in `runs/ml100k`:

- cache: reranking 100 FAISS candidates for one user with (a) no serving cache: the candidate and history
  item texts re-encoded by BERT per request, as a recommender without a catalogue cache would; (b) item
  representations cached, the head's query/key/value projections computed per request; (c) the full
  cache (`CandidatePipeline`: projections gathered). Scores of (b) and (c) must agree.
- kernels: user encoding + reranking of all 943 test users (batches of 256) and of one user, through
  `scaled_dot_product_attention` vs the plain softmax(QK^T)V reference (`config._attn_implementation`).
- history: cost of encoding one user and reranking 100 candidates at history lengths 10..1000 for the
  long-history strategy (window of 200 + one summary token of the older items) vs attention over the
  whole history (a model whose window is the full length, so self-attention is quadratic).
- precision: catalogue encoding (1,682 MovieLens texts) in fp32, bf16 (autocast, and weights cast to
  bf16), PyTorch dynamic int8 (per tensor, per channel) and, with the onnx extra installed, the encoder
  exported to ONNX and run by ONNX Runtime in fp32 and dynamic int8: texts/s, cosine of the pooled
  embeddings to fp32, and test NDCG@10 of the model with its catalogue re-encoded that way; plus serving
  with `Recommender.from_pretrained(quantize="int8")`.

Every timing is a median (and p99) over repetitions after warm-up, the variants interleaved so that machine
noise hits them alike. Writes `bench/results/attention.json` and `bench/results/attention.md`.

    python bench/attention.py                 # full run (~10 min on 2 cores)
    python bench/attention.py --quick         # few repetitions, to check it runs
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from attention_report import markdown
from common import cpu_model
from llmrec import Recommender
from llmrec.cli import evaluate_saved_model
from llmrec.config import load_config
from llmrec.data import build_split, load_interaction_data
from llmrec.modeling import LlmRecConfig, LlmRecModel, OnnxItemEncoder, export_item_encoder_onnx, split_histories
from llmrec.modeling.precision import cast_encoder_bf16, cpu_has_bf16, quantize_int8
from llmrec.modeling.text_encoding import embed_tokenized_items, tokenize_item_texts
from llmrec.retrieval import build_item_index

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("cache", "kernels", "history", "precision")
HISTORY_LENGTHS = (10, 50, 100, 200, 500, 1000)

logger = logging.getLogger("bench.attention")


# ----- timing ---------------------------------------------------------------------------------------


def interleaved_timings(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    """p50 / p99 / mean milliseconds of each variant, run in turn so that noise hits them alike."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - start) * 1000)
    return {
        name: {"p50_ms": float(np.median(values)), "p99_ms": float(np.percentile(values, 99)), "mean_ms": float(np.mean(values))}
        for name, values in samples.items()
    }


def run_stamp(load_before: float) -> dict[str, Any]:
    """When and under what load a section ran: sections of one results file can come from different runs."""
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "torch_threads": torch.get_num_threads(),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def machine_info() -> dict[str, Any]:
    import faiss
    import transformers

    return {
        "cpu": cpu_model() or platform.processor(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu_bf16": cpu_has_bf16(),
        "torch": torch.__version__, "transformers": transformers.__version__, "faiss": faiss.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_1min_at_start": os.getloadavg()[0],
    }


# ----- sections -------------------------------------------------------------------------------------


def bench_cache(recommender: Recommender, histories: list[list[int]], tokenized: dict, repeats: int) -> dict[str, Any]:
    model, pipeline = recommender.model, recommender.pipeline
    history = histories[0][-model.config.max_history_length :]
    _, candidates = pipeline.retrieve([history], 100)
    window, _ = split_histories([history], model.config.max_history_length)
    candidate_tensor = torch.as_tensor(candidates)

    @torch.inference_mode()
    def no_cache() -> torch.Tensor:
        rows = torch.unique(torch.cat([torch.zeros(1, dtype=torch.long), window.flatten(), candidate_tensor.flatten()]))
        width = int(tokenized["attention_mask"][rows].sum(dim=1).max())
        texts = model.encode_item_texts(tokenized["input_ids"][rows, :width], tokenized["attention_mask"][rows, :width])
        texts[0] = 0.0
        table = model.item_embeddings(texts, rows=rows)
        row_of_item = torch.zeros(model.config.num_items + 1, dtype=torch.long)
        row_of_item[rows] = torch.arange(len(rows))
        return model.score_candidates(row_of_item[window], row_of_item[candidate_tensor], table)[0]

    variants = {
        "no cache (BERT per request)": no_cache,
        "item cache, head projections per request": lambda: pipeline.rerank([history], candidates, use_cache=False)[0],
        "full cache": lambda: pipeline.rerank([history], candidates)[0],
    }
    cached, uncached, encoded = variants["full cache"](), variants["item cache, head projections per request"](), no_cache()
    timings = interleaved_timings(variants, repeats)
    full = timings["full cache"]["p50_ms"]
    return {
        "history_length": len(history),
        "num_candidates": int(candidates.shape[1]),
        "timings": timings,
        "speedup_vs_no_cache": timings["no cache (BERT per request)"]["p50_ms"] / full,
        "speedup_vs_item_cache": timings["item cache, head projections per request"]["p50_ms"] / full,
        "max_score_difference_cached_vs_projected": float((cached - uncached).abs().max()),
        "max_score_difference_cached_vs_reencoded": float((cached - encoded).abs().max()),
    }


def bench_kernels(recommender: Recommender, histories: list[list[int]], repeats: int) -> dict[str, Any]:
    model, pipeline = recommender.model, recommender.pipeline
    _, all_candidates = pipeline.retrieve(histories, 100)
    batches = [(histories[start : start + 256], all_candidates[start : start + 256]) for start in range(0, len(histories), 256)]

    def run_all() -> torch.Tensor:
        return torch.cat([pipeline.rerank(batch, candidates)[0] for batch, candidates in batches])

    def with_implementation(name: str, run: Callable[[], Any]) -> Callable[[], Any]:
        def wrapped() -> Any:
            model.config._attn_implementation = name
            try:
                return run()
            finally:
                model.config._attn_implementation = "sdpa"
        return wrapped

    one_user = lambda: pipeline.rerank(histories[:1], all_candidates[:1])[0]  # noqa: E731
    sdpa_scores, plain_scores = with_implementation("sdpa", run_all)(), with_implementation("eager", run_all)()
    finite = torch.isfinite(sdpa_scores)
    results = {
        "all_users": interleaved_timings(
            {"sdpa": with_implementation("sdpa", run_all), "plain softmax(QK^T)V": with_implementation("eager", run_all)},
            max(3, repeats // 10),
        ),
        "one_user": interleaved_timings(
            {"sdpa": with_implementation("sdpa", one_user), "plain softmax(QK^T)V": with_implementation("eager", one_user)},
            repeats,
        ),
        "max_score_difference": float((sdpa_scores[finite] - plain_scores[finite]).abs().max()),
        "num_users": len(histories),
    }
    for scope in ("all_users", "one_user"):
        results[scope]["speedup"] = results[scope]["plain softmax(QK^T)V"]["p50_ms"] / results[scope]["sdpa"]["p50_ms"]
    results["all_users"]["users_per_second_sdpa"] = len(histories) / (results["all_users"]["sdpa"]["p50_ms"] / 1000)
    return results


def _model_like(model: LlmRecModel, **overrides: Any) -> LlmRecModel:
    """The trained model's weights in a model with other window settings (random where shapes differ)."""
    settings = {**model.config.to_dict(), **overrides}
    for key in ("model_type", "transformers_version", "architectures"):
        settings.pop(key, None)
    other = LlmRecModel(LlmRecConfig(**settings)).eval()
    state = {name: value for name, value in model.state_dict().items() if "position_embeddings" not in name and "recency" not in name}
    other.load_state_dict(state, strict=False)
    return other


@torch.inference_mode()
def bench_history(recommender: Recommender, repeats: int) -> dict[str, Any]:
    """Rerank cost (user encoding + 100 candidates) against history length, window + summary vs full attention."""
    base = recommender.model
    window = base.config.max_history_length
    summary_model = _model_like(base, history_summary=True)
    full_model = _model_like(base, max_history_length=max(HISTORY_LENGTHS))
    generator = np.random.default_rng(0)
    candidates = torch.as_tensor(generator.integers(1, base.config.num_items + 1, size=(1, 100)))
    rows = []
    for length in HISTORY_LENGTHS:
        history = generator.integers(1, base.config.num_items + 1, size=length).tolist()

        def run(model: LlmRecModel, history: list[int] = history) -> torch.Tensor:
            item_embeddings, cache = caches[id(model)]
            recent, older = split_histories([history], model.config.max_history_length)
            return model.score_candidates(recent, candidates, item_embeddings, rerank_cache=cache, older_item_indices=older)[0]

        caches = {}
        for model in (summary_model, full_model):
            table = model.item_embeddings()
            caches[id(model)] = (table, model.reranker.project_items(table))
        timings = interleaved_timings(
            {"window + summary": lambda: run(summary_model), "full attention": lambda: run(full_model)}, repeats
        )
        rows.append({"history_length": length, **{name: value["p50_ms"] for name, value in timings.items()}})
    by_length = {row["history_length"]: row for row in rows}
    return {
        "window": window,
        "rows": rows,
        "cost_ratio_1000_vs_100": {
            name: by_length[1000][name] / by_length[100][name] for name in ("window + summary", "full attention")
        },
    }


def _evaluate_with_catalogue(recommender: Recommender, config: Any, text_embeddings: torch.Tensor) -> dict[str, float]:
    model = recommender.model
    original = model.item_text_embeddings.clone()
    try:
        model.item_text_embeddings.copy_(text_embeddings)
        recommender.pipeline.refresh()
        recommender.pipeline.index = build_item_index(model)
        results = evaluate_saved_model(recommender, config, splits=("test",))["test"]
    finally:
        model.item_text_embeddings.copy_(original)
        recommender.pipeline.refresh()
        recommender.pipeline.index = build_item_index(model)
    return {system: results[system]["ndcg@10"] for system in ("retrieval", "rerank")}


def onnx_encoders(model: Any) -> dict[str, Any]:
    """The item encoder exported to ONNX and run by ONNX Runtime, fp32 and int8; none without the onnx extra."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        logger.warning('onnxruntime is not installed (pip install "llmrec[onnx]"): no ONNX rows.')
        return {}
    with tempfile.TemporaryDirectory(prefix="llmrec-onnx-") as scratch:  # sessions hold the graphs in memory
        folder = Path(scratch)
        return {
            "ONNX Runtime fp32": OnnxItemEncoder(export_item_encoder_onnx(model, folder / "encoder.onnx")),
            "ONNX Runtime int8 per-channel": OnnxItemEncoder(
                export_item_encoder_onnx(model, folder / "encoder_int8.onnx", quantize="int8")
            ),
        }


def bench_precision(recommender: Recommender, config: Any, tokenized: dict, repeats: int) -> dict[str, Any]:
    model = recommender.model
    per_tensor = copy.deepcopy(model)
    quantize_int8(per_tensor.item_encoder, per_channel=False)
    per_channel = copy.deepcopy(model)
    quantize_int8(per_channel.item_encoder, per_channel=True)
    bf16_weights = copy.deepcopy(model)
    cast_encoder_bf16(bf16_weights.item_encoder)
    encoders = {
        "fp32": lambda: embed_tokenized_items(model, tokenized, show_progress=False),
        "bf16 autocast (training's catalogue encoding)": lambda: embed_tokenized_items(
            model, tokenized, show_progress=False, precision="bf16"
        ),
        "bf16 weights (Recommender precision='bf16')": lambda: embed_tokenized_items(bf16_weights, tokenized, show_progress=False),
        "int8 per-tensor": lambda: embed_tokenized_items(per_tensor, tokenized, show_progress=False),
        "int8 per-channel": lambda: embed_tokenized_items(per_channel, tokenized, show_progress=False),
    }
    onnx_folder = onnx_encoders(model)
    for name, onnx_encoder in onnx_folder.items():
        encoders[name] = lambda onnx_encoder=onnx_encoder: embed_tokenized_items(
            model, tokenized, show_progress=False, item_encoder=onnx_encoder
        )
    embeddings = {name: encode() for name, encode in encoders.items()}
    timings = interleaved_timings(encoders, repeats, warmup=1)
    num_texts = len(tokenized["input_ids"]) - 1
    variants: dict[str, Any] = {}
    reference = embeddings["fp32"][1:]
    for name, table in embeddings.items():
        cosine = F.cosine_similarity(reference, table[1:], dim=-1)
        variants[name] = {
            "texts_per_second": num_texts / (timings[name]["p50_ms"] / 1000),
            "seconds": timings[name]["p50_ms"] / 1000,
            "cosine_to_fp32_mean": float(cosine.mean()),
            "cosine_to_fp32_min": float(cosine.min()),
            "test_ndcg@10": _evaluate_with_catalogue(recommender, config, table),
        }
    fp32 = variants["fp32"]
    for values in variants.values():
        values["speedup"] = values["texts_per_second"] / fp32["texts_per_second"]
        values["ndcg_relative_change"] = {
            system: values["test_ndcg@10"][system] / fp32["test_ndcg@10"][system] - 1 for system in ("retrieval", "rerank")
        }
    return {"num_texts": num_texts, "batch_size": 256, "catalogue_encoding": variants}


def bench_int8_serving(folder: Path, config: Any, histories: list[list[str]], repeats: int) -> dict[str, Any]:
    fp32 = Recommender.from_pretrained(folder)
    int8 = Recommender.from_pretrained(folder, quantize="int8")
    history = histories[0]
    timings = interleaved_timings(
        {"fp32": lambda: fp32.recommend(history, k=10), "int8": lambda: int8.recommend(history, k=10)}, repeats
    )
    ndcg = {
        name: {system: metrics["ndcg@10"] for system, metrics in evaluate_saved_model(rec, config, splits=("test",))["test"].items()}
        for name, rec in (("fp32", fp32), ("int8", int8))
    }
    return {"recommend_one_user": timings, "test_ndcg@10": ndcg}


def parse_arguments() -> tuple[argparse.Namespace, list[str]]:
    """The options and the sections to run; exits with a usage error for an unknown section or a missing model."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "runs" / "ml100k"), help="A trained MovieLens-100k model folder.")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"Comma-separated subset of {','.join(SECTIONS)}.")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="Few repetitions; results are not written.")
    parser.add_argument("--output-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    sections = [section.strip() for section in args.sections.split(",") if section.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if not (Path(args.model) / "config.json").is_file():
        parser.error(
            f"{Path(args.model)} holds no trained model; create it with "
            "`accelerate launch scripts/finetune.py --config configs/ml100k.yaml --output_dir runs/ml100k`."
        )
    return args, sections


def run_sections(sections: list[str], folder: Path, repeats: int, quick: bool) -> dict[str, Any]:
    """Each requested section on the model in `folder`, stamped with the load it ran under."""
    recommender = Recommender.from_pretrained(folder)
    config = load_config(folder / "config.yaml")
    split = build_split(load_interaction_data(config.data), config.data)
    to_model = np.array([0] + [recommender.item_index[item_id] for item_id in split.item_ids])
    histories = [to_model[history].tolist() for history in split.test.histories]
    tokenized = tokenize_item_texts(recommender.tokenizer, recommender.item_texts, recommender.model.config.max_text_length)

    results: dict[str, Any] = {"machine": machine_info(), "model": str(folder), "repeats": repeats}
    if "cache" in sections:
        logger.info("Serving cache...")
        load_before = os.getloadavg()[0]
        results["cache"] = {**bench_cache(recommender, histories, tokenized, repeats), "run": run_stamp(load_before)}
    if "kernels" in sections:
        logger.info("SDPA vs plain attention...")
        load_before = os.getloadavg()[0]
        results["kernels"] = {**bench_kernels(recommender, histories, repeats), "run": run_stamp(load_before)}
    if "history" in sections:
        logger.info("History length...")
        load_before = os.getloadavg()[0]
        results["history"] = {**bench_history(recommender, max(10, repeats // 4)), "run": run_stamp(load_before)}
    if "precision" in sections:
        logger.info("Precision (catalogue encoding and NDCG)...")
        load_before = os.getloadavg()[0]
        results["precision"] = {**bench_precision(recommender, config, tokenized, 2 if quick else 5), "run": run_stamp(load_before)}
        raw_histories = [[split.item_ids[index - 1] for index in history] for history in split.test.histories]
        load_before = os.getloadavg()[0]
        results["int8_serving"] = {**bench_int8_serving(folder, config, raw_histories, repeats), "run": run_stamp(load_before)}
    results["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    return results


def save_results(results: dict[str, Any], sections: list[str], output_dir: Path) -> None:
    """attention.json and attention.md; a partial re-run keeps the sections it did not run from the previous file."""
    report = markdown(results)
    previous = output_dir / "attention.json"
    if previous.is_file() and set(sections) != set(SECTIONS):
        # A partial re-run replaces its own sections and keeps the others (each records its machine state).
        kept = json.loads(previous.read_text())
        for name in set(SECTIONS) - set(sections):
            for key in (name, "int8_serving") if name == "precision" else (name,):
                if key in kept:
                    results[key] = kept[key]
        report = markdown(results)
    (output_dir / "attention.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / "attention.md").write_text(report + "\n")
    logger.info("Wrote %s and %s.", output_dir / "attention.json", output_dir / "attention.md")


def main() -> None:
    args, sections = parse_arguments()
    repeats = 10 if args.quick else args.repeats
    started = time.perf_counter()
    results = run_sections(sections, Path(args.model), repeats, args.quick)
    results["wall_seconds"] = time.perf_counter() - started
    print(markdown(results))  # the table is this script's output
    if not args.quick:
        save_results(results, sections, Path(args.output_dir))


if __name__ == "__main__":
    main()
