#!/usr/bin/env python
"""Speed benchmark on MovieLens-100k: item encoding, FAISS retrieval, reranking, `recommend` and training.

Each llmrec figure stands next to the limit it chases, measured in the same run: a bare `transformers`
forward for item encoding, a bare `faiss` search for retrieval, a plain softmax(QK^T)V head for SDPA. The
two alternate call by call (in ABBA order, garbage collector paused), so machine noise hits both alike,
and the tables give their ratio. Every figure is a median, or p50 / p99 of single calls, after warm-up.

Uses the trained model in runs/ml100k and the test users' histories of its split (943 users). Writes
bench/results/speed.json (every sample statistic, machine, versions) and bench/results/speed.md (tables
with targets, met or missed).

    python bench/speed.py                                   # everything: the committed results
    python bench/speed.py --quick                           # few repeats, no training -> runs/bench-speed/
    python bench/speed.py --sections rerank,recommend --repeats 10

Each section is one function (`bench_<section>`) returning table rows, so variants (a cached reranker,
int8 / bf16 llmrec encoding) can be added as rows beside the ones here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # measure this checkout, whatever else is installed

from llmrec import Recommender  # noqa: E402
from llmrec.config import load_config  # noqa: E402
from llmrec.data import build_split, load_interaction_data  # noqa: E402
from llmrec.errors import LlmRecError  # noqa: E402
from common import cpu_model, files_modified, rounded_load_average, short_commit, write_json_and_markdown  # noqa: E402
from speed_common import (  # noqa: E402  (after the path insert: they import llmrec from this checkout)
    CREATE_MODEL_COMMAND, SECTIONS, BenchContext, _ms, _p50_p99, _rate, latency, row, time_interleaved,
)
from speed_items import bench_encode, bench_retrieval  # noqa: E402
from speed_training import bench_training  # noqa: E402


logger = logging.getLogger("bench.speed")


# ----- timing --------------------------------------------------------------------------------------


# ----- loading -------------------------------------------------------------------------------------


def load_context(args: argparse.Namespace) -> BenchContext:
    model_folder = Path(args.model)
    if not (model_folder / "config.json").is_file():
        sys.exit(f"error: no trained model in {model_folder}. Create it first (about 10 min on a 2-core CPU):\n"
                 f"    {CREATE_MODEL_COMMAND}")
    try:
        recommender = Recommender.from_pretrained(model_folder)
    except LlmRecError as error:
        sys.exit(f"error: could not load {model_folder}: {error}\nRecreate it with:\n    {CREATE_MODEL_COMMAND}")
    split = _test_split(model_folder, recommender)
    histories = [list(history) for history in split.test.histories]
    history_ids = [[recommender.item_ids[index - 1] for index in history] for history in histories]
    pipeline = recommender.pipeline
    user_embeddings = pipeline.user_embeddings(histories)
    _, candidates = pipeline.retrieve(histories, pipeline.num_candidates, user_embeddings)
    timed_users = np.random.default_rng(0).permutation(len(histories)).tolist()
    if args.quick:
        timed_users = timed_users[:100]
    repeats = args.repeats or (2 if args.quick else 5)
    return BenchContext(recommender, histories, history_ids, user_embeddings, candidates, timed_users, repeats,
                        args.threads, args.quick, args)


def _test_split(model_folder: Path, recommender: Recommender):
    """The split the model was trained on, rebuilt from its config.yaml (the test users' histories)."""
    config_file = model_folder / "config.yaml"
    if not config_file.is_file():
        sys.exit(f"error: {config_file} is missing, so the users' histories cannot be rebuilt. Recreate the model:\n"
                 f"    {CREATE_MODEL_COMMAND}")
    data_config = load_config(config_file).data
    split = build_split(load_interaction_data(data_config), data_config)
    if list(split.item_ids) != recommender.item_ids:
        sys.exit(f"error: the catalogue of {model_folder} does not match the data its config.yaml names; recreate it:\n"
                 f"    {CREATE_MODEL_COMMAND}")
    return split


# ----- item encoding -------------------------------------------------------------------------------


# ----- retrieval -----------------------------------------------------------------------------------


# ----- reranking -----------------------------------------------------------------------------------


def bench_rerank(context: BenchContext) -> dict[str, Any]:
    """The cross-attention head on 100 FAISS candidates: one user, all users; SDPA vs explicit softmax(QK^T)V."""
    pipeline = context.recommender.pipeline
    candidates, user_embeddings, all_histories = context.candidates, context.user_embeddings, context.histories

    def rerank(user, explicit: bool) -> torch.Tensor:
        if user is None:
            return pipeline.rerank(all_histories, candidates, output_attentions=explicit, user_embeddings=user_embeddings)[0]
        return pipeline.rerank([all_histories[user]], candidates[user : user + 1], output_attentions=explicit,
                               user_embeddings=user_embeddings[user : user + 1])[0]

    variants = {"SDPA": lambda user: rerank(user, False), "explicit softmax(QK^T)V": lambda user: rerank(user, True)}
    single = time_interleaved(variants, context.timed_users, context.repeats, warmup_calls=20)
    batch = time_interleaved(variants, [None], context.repeats)

    sdpa_scores, explicit_scores = rerank(None, False), rerank(None, True)
    finite = torch.isfinite(sdpa_scores)
    same_masking = bool(torch.equal(finite, torch.isfinite(explicit_scores)))
    max_difference = float((sdpa_scores[finite] - explicit_scores[finite]).abs().max())
    users, width = candidates.shape
    details: dict[str, Any] = {"candidates": width, "users": users, "same_padding": same_masking,
                               "max_abs_score_difference": max_difference, "single_user": {}, "batch": {}}
    for name in variants:
        details["single_user"][name] = latency(single[name])
        details["batch"][name] = {"median_ms": float(np.median(batch[name]) * 1e3), "users_per_second": users / float(np.median(batch[name]))}
    sdpa, explicit = details["single_user"]["SDPA"], details["single_user"]["explicit softmax(QK^T)V"]
    sdpa_batch, explicit_batch = details["batch"]["SDPA"], details["batch"]["explicit softmax(QK^T)V"]
    rows = [
        row(f"rerank {width} candidates, one user, SDPA (p50 / p99)", _p50_p99(sdpa), _p50_p99(explicit) + " (explicit)",
            f"{sdpa['p50_ms'] / explicit['p50_ms']:.2f} (p50, SDPA / explicit)", "p50 ≤ 5 ms", sdpa["p50_ms"] <= 5.0),
        row(f"rerank {width} candidates × {users} users in one call, SDPA",
            f"{_rate(sdpa_batch['users_per_second'], 'users/s')} ({sdpa_batch['median_ms']:.0f} ms)",
            f"{_rate(explicit_batch['users_per_second'], 'users/s')} (explicit)",
            f"{sdpa_batch['median_ms'] / explicit_batch['median_ms']:.2f} (time, SDPA / explicit)"),
    ]
    notes = [
        "`CandidatePipeline.rerank` on llmrec's own FAISS candidates (history excluded), user vectors given (as "
        "`recommend` passes them), so the figures are the head alone plus history padding and the embedding gathers.",
        "The explicit path is the model's own `output_attentions=True` branch of `MultiHeadAttention`: "
        "softmax(QK^T/sqrt(d)) computed and kept (it also returns the weights), everything else identical. "
        f"Scores agree to {max_difference:.1e} (max abs difference over all users' candidates); padding slots "
        f"{'match' if same_masking else 'DIFFER'}.",
    ]
    return {"rows": rows, "notes": notes, "details": details}


# ----- recommend, end to end -----------------------------------------------------------------------


def _recommend_in_steps(recommender: Recommender, history_ids: Sequence[str], k: int, clock: dict[str, list[float]]):
    """`Recommender.recommend` for one user, step by step through the same public pieces, each step timed."""
    pipeline = recommender.pipeline
    start = time.perf_counter()
    history = [recommender.item_index[str(item_id)] for item_id in history_ids]
    mapped = time.perf_counter()
    user_embeddings = pipeline.user_embeddings([history])
    encoded = time.perf_counter()
    _, candidates = pipeline.retrieve([history], max(k, pipeline.num_candidates), user_embeddings, exclude=[set(history)])
    retrieved = time.perf_counter()
    scores, _ = pipeline.rerank([history], candidates, user_embeddings=user_embeddings)
    reranked = time.perf_counter()
    scores = scores.float().cpu().numpy()[0]
    order = np.argsort(-scores, kind="stable")
    ranked = [(recommender.item_ids[index - 1], float(score)) for index, score in zip(candidates[0][order], scores[order])
              if index > 0 and np.isfinite(score)][:k]
    finished = time.perf_counter()
    for step, seconds in (("id mapping (ids → indices, ranked → ids)", (mapped - start) + (finished - reranked)),
                          ("user encoding", encoded - mapped), ("FAISS (`retrieve`, history excluded)", retrieved - encoded),
                          ("rerank", reranked - retrieved), ("sum of the steps", finished - start)):
        clock.setdefault(step, []).append(seconds)
    return ranked


def bench_recommend(context: BenchContext) -> dict[str, Any]:
    """`Recommender.recommend(history, k=10)` for one user, with a per-step breakdown, and for all users in a batch."""
    recommender, k = context.recommender, 10
    for user in context.timed_users[:20]:  # the breakdown must be what recommend does
        expected = recommender.recommend(context.history_ids[user], k=k)
        if _recommend_in_steps(recommender, context.history_ids[user], k, {}) != expected:
            raise RuntimeError("The step-by-step recommend no longer matches Recommender.recommend; update "
                               "_recommend_in_steps to follow recommend_batch.")
    steps: dict[str, list[float]] = {}
    variants = {
        "recommend": lambda user: recommender.recommend(context.history_ids[user], k=k),
        "steps": lambda user: _recommend_in_steps(recommender, context.history_ids[user], k, steps),
    }
    single = time_interleaved(variants, context.timed_users, context.repeats, warmup_calls=20)
    steps = {name: np.asarray(values[-len(single["steps"]):]) for name, values in steps.items()}  # warm-up calls out
    batch = time_interleaved({"recommend_batch": lambda _: recommender.recommend_batch(context.history_ids, k=k)},
                             [None], context.repeats)["recommend_batch"]

    end_to_end = latency(single["recommend"])
    users = len(context.history_ids)
    details: dict[str, Any] = {"k": k, "recommend": end_to_end, "steps": {name: latency(values) for name, values in steps.items()},
                               "recommend_batch": {"users": users, "median_ms": float(np.median(batch) * 1e3),
                                                   "users_per_second": users / float(np.median(batch))}}
    total_mean = details["steps"]["sum of the steps"]["mean_ms"]
    rows = [row(f"`recommend(history, k={k})`, one user (p50 / p99)", _p50_p99(end_to_end), target="p50 ≤ 20 ms",
                met=end_to_end["p50_ms"] <= 20.0)]
    for name, stats in details["steps"].items():
        share = "" if name == "sum of the steps" else f"; {stats['mean_ms'] / total_mean:.0%} of the summed mean"
        rows.append(row(f"… {name} (p50 / p99{share})", _p50_p99(stats)))
    rows.append(row(f"`recommend_batch`, all {users} users, k={k}",
                    f"{_rate(details['recommend_batch']['users_per_second'], 'users/s')} ({details['recommend_batch']['median_ms']:.0f} ms)"))
    notes = [
        "The breakdown runs the same steps as `recommend_batch` through the public pipeline (`user_embeddings`, "
        "`retrieve`, `rerank`) with a clock between them, interleaved with the real `recommend` calls; it returns "
        "identical recommendations (checked). `recommend` minus the sum of the steps is the request validation.",
        f"p99 against the 20 ms target: {_ms(end_to_end['p99_ms'])} ({'within' if end_to_end['p99_ms'] <= 20 else 'over'}).",
    ]
    return {"rows": rows, "notes": notes, "details": details}


# ----- training ------------------------------------------------------------------------------------


# ----- output --------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    return {
        "cpu_model": cpu_model() or platform.processor() or "unknown",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "threads": threads,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "faiss": faiss.__version__, "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": short_commit(ROOT) or None, "llmrec_modified_since_commit": files_modified(ROOT, "llmrec"),
        "load_average_at_start": rounded_load_average(),
    }


def merge_earlier_sections(results: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """Sections of `earlier` that `results` did not re-run, each stamped with the run it came from, in SECTIONS order."""
    provenance = {"command": earlier["command"], "date": earlier["machine"]["date"], "threads": earlier["machine"]["threads"],
                  "git_commit": earlier["machine"]["git_commit"],
                  "load_average_at_start": earlier["machine"]["load_average_at_start"]}
    merged = {}
    for name in SECTIONS:
        if name in results["sections"]:
            merged[name] = results["sections"][name]
        elif name in earlier["sections"]:
            merged[name] = {"earlier_run": provenance, **earlier["sections"][name]}
    return {**results, "sections": merged}


def render_markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        "# llmrec speed on MovieLens-100k",
        "",
        f"{machine['cpu_model']} ({machine['cpu_capability']}), {machine['logical_cores']} cores, {machine['threads']} "
        f"thread(s); torch {machine['torch']}, transformers {machine['transformers']}, faiss {machine['faiss']}; "
        f"{machine['date']}, llmrec {machine['git_commit']}{' (modified)' if machine['llmrec_modified_since_commit'] else ''}; "
        f"load average {machine['load_average_at_start'][0]} at start, {results['load_average_at_end'][0]} at end; "
        f"wall time {results['wall_seconds'] / 60:.1f} min.",
        "",
        f"`{results['command']}`" + (" — **quick run: few repeats, not for reporting**" if results["quick"] else ""),
        "",
        f"Medians of {results['repeats']} timed repetitions after warm-up; one-user figures are p50 / p99 over "
        f"{results['timed_users']} users × {results['repeats']} passes. llmrec and its reference alternate call by call.",
    ]
    titles = {"encode": "Item encoding", "retrieval": "Retrieval (FAISS)", "rerank": "Reranking",
              "recommend": "End to end", "training": "Training"}
    for name, section in results["sections"].items():
        lines += ["", f"## {titles[name]}", "", "| measurement | llmrec | limit (same run) | ratio | target | met |",
                  "| --- | --- | --- | --- | --- | --- |"]
        if "earlier_run" in section:
            run = section.get("earlier_run")
            lines[-2:-2] = [f"From an earlier run ({run['date']}, llmrec {run['git_commit']}, {run['threads']} thread(s), load "
                            f"average {run['load_average_at_start'][0]} at its start): `{run['command']}`.", ""]
        for entry in section["rows"]:
            met = {True: "met", False: "**missed**", None: "–"}[entry["met"]]
            lines.append(f"| {entry['measurement']} | {entry['llmrec']} | {entry['reference']} | {entry['ratio']} | "
                         f"{entry['target']} | {met} |")
        lines += [""] + [f"- {note}" for note in section["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 repeats, 100 timed users, 512 texts, no training; "
                        "writes runs/bench-speed/speed-quick.{json,md} unless --output is given.")
    parser.add_argument("--sections", default=None, help=f"Comma-separated subset of {','.join(SECTIONS)} (default: all; "
                        "--quick drops training).")
    parser.add_argument("--repeats", type=int, default=None, help="Timed repetitions (passes over the users for one-user "
                        "latencies); default 5, 2 with --quick.")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and FAISS threads (default: all cores).")
    parser.add_argument("--model", default=str(ROOT / "runs" / "ml100k"), help="Trained model folder.")
    parser.add_argument("--encode-batch-size", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-budget-minutes", type=float, default=15.0,
                        help="A LoRA stage-1 epoch projected longer than this is stopped and extrapolated.")
    parser.add_argument("--lora-probe-steps", type=int, default=3, help="Stage-1 LoRA steps timed before projecting.")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-speed"), help="Training runs' folders (not committed).")
    parser.add_argument("--merge", action="store_true", help="Keep the sections of an existing output that this run does "
                        "not re-run (each keeps the machine state and command it ran with).")
    parser.add_argument("--output", default=None, help="Path of the JSON (the .md goes beside it); default "
                        "bench/results/speed.json.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    sections = args.sections.split(",") if args.sections else [s for s in SECTIONS if not (args.quick and s == "training")]
    unknown = [section for section in sections if section not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    output = Path(args.output or (Path(args.work_dir) / "speed-quick.json" if args.quick else ROOT / "bench" / "results" / "speed.json"))
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    started = time.perf_counter()
    machine = machine_info(args.threads)
    context = load_context(args)
    functions = {"encode": bench_encode, "retrieval": bench_retrieval, "rerank": bench_rerank,
                 "recommend": bench_recommend, "training": bench_training}
    results: dict[str, Any] = {
        "command": " ".join(["python bench/speed.py", *sys.argv[1:]]), "quick": args.quick, "machine": machine,
        "repeats": context.repeats, "timed_users": len(context.timed_users), "sections": {},
    }
    for name in sections:
        logger.info("section %s", name)
        section_start = time.perf_counter()
        results["sections"][name] = functions[name](context)
        results["sections"][name]["seconds"] = round(time.perf_counter() - section_start, 1)
        results["sections"][name]["load_average_after"] = rounded_load_average()
    results["load_average_at_end"] = rounded_load_average()
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    if args.merge and output.is_file():
        results = merge_earlier_sections(results, json.loads(output.read_text()))
    markdown = render_markdown(results)
    write_json_and_markdown(output, results, markdown)
    print(markdown)
    logger.info("wrote %s and %s", output, output.with_suffix(".md"))


if __name__ == "__main__":
    main()
