"""Training-side scaling (issue 19, item 4): the sampled-softmax training path at 100k and 1M items.

For each catalogue size, in fresh processes so every peak RSS is that size's own:

1. A synthetic catalogue: templated titles from a vocabulary ("<adjective> <noun> of <topic> <number>"),
   48 topics. Users have a favourite topic: 80 % of their interactions are items of that topic, the rest
   of any topic, each drawn with a power-law popularity inside its topic, so the title's topic word carries
   the taste the towers must learn. Every size has the same users (`--steps` x `--batch-size` of them, one
   training window each), so every size trains the same number of steps on the same kind of batches.
2. Training (`train` child): the titles are tokenised to memory-mapped files in chunks
   (`tokenize_item_texts_to_disk`), encoded into the model's cache batch by batch, then stage 1 trains one
   epoch with sampled softmax through `LlmRecTrainer.train_retrieval` (with its validation before and after).
   Step time is the time between consecutive optimizer steps (collation, forward, backward and update,
   the first `--warmup-steps` left out); peak RSS is the process's high-water mark (VmHWM), so it covers
   catalogue building, tokenising, encoding and training.
3. Encoding throughput (`encode` children): the tokenised catalogue encoded by `encode_catalogue` with 1
   process and with 2 (`accelerate launch --config_file configs/accelerate/cpu_ddp.yaml`, DDP over gloo),
   one thread each; items/s counts the whole catalogue over the slowest process's encoding time.

Targets (issue 19): at 1M items peak RSS <= 8 GB and a median step <= 2 x the 100k one; 2-process
encoding >= 1.7 x 1-process. `--tiny-encoder` swaps the bundled MiniLM for a random 2-layer BERT
(hidden 64) with a word-level vocabulary of the titles, so encoding 1M items takes minutes on a CPU.

    python bench/scaling_train.py --tiny-encoder                 # full run: 100k and 1M items -> bench/results/
    python bench/scaling_train.py --tiny-encoder --sizes 10000,20000 --steps 20   # smoke run -> runs/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from bench.common import git_commit, machine, markdown_table, write_json_and_markdown, write_results  # noqa: E402

logger = logging.getLogger("bench.scaling_train")

FULL_SIZES = (100_000, 1_000_000)
RSS_TARGET_BYTES = 8 * 1024**3
STEP_RATIO_TARGET = 2.0
SPEEDUP_TARGET = 1.7
WORK = ROOT / "runs" / "bench-scaling-train"
TOPICS = ("jazz soccer cooking space history poetry garden robots ocean chess travel horror romance physics painting "
          "mountains cinema opera baking football islands dragons finance medicine trains castles coffee desert "
          "winter forests birds theatre comedy music tennis rivers volcanoes pirates wine cycling jungle planets "
          "knights cities sailing dance fashion magic").split()
ADJECTIVES = ("quiet golden hidden broken silver ancient little endless secret wild bright lost final second northern "
              "bitter gentle crimson frozen hollow").split()
NOUNS = ("story book guide song letter road house night dream voice journey garden river tale map window heart "
         "machine circle promise").split()
TOPIC_SHARE = 0.8  # of a user's interactions, from the favourite topic
POPULARITY_EXPONENT = 3.0  # rank = floor(size * u^3): a few items of each topic are popular, most rarely seen


def item_titles(num_items: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Titles of items 1..num_items and each one's topic (a random topic per item)."""
    rng = np.random.default_rng(seed)
    topics = rng.integers(len(TOPICS), size=num_items)
    adjectives = rng.integers(len(ADJECTIVES), size=num_items)
    nouns = rng.integers(len(NOUNS), size=num_items)
    numbers = rng.integers(1000, size=num_items)
    titles = [f"the {ADJECTIVES[a]} {NOUNS[n]} of {TOPICS[t]} {k}" for a, n, t, k in zip(adjectives, nouns, topics, numbers)]
    return titles, topics


def user_sequences(topics: np.ndarray, num_users: int, length: int, seed: int) -> list[list[int]]:
    """Item-index sequences (1-based) of users who mostly follow one topic, popular items more often."""
    rng = np.random.default_rng(seed + 1)
    members = [rng.permutation(np.flatnonzero(topics == topic)) + 1 for topic in range(len(TOPICS))]
    favourites = rng.integers(len(TOPICS), size=num_users)
    chosen = np.where(rng.random((num_users, length)) < TOPIC_SHARE, favourites[:, None],
                      rng.integers(len(TOPICS), size=(num_users, length)))
    sequences = np.zeros((num_users, length), dtype=np.int64)
    for topic, items in enumerate(members):
        where = chosen == topic
        if items.size:
            ranks = (items.size * rng.random(int(where.sum())) ** POPULARITY_EXPONENT).astype(np.int64)
            sequences[where] = items[ranks]
    return sequences.tolist()


def synthetic_split(num_items: int, num_users: int, length: int, valid_users: int, seed: int):
    """A `SequentialSplit`: each user's last item is the validation target of the first `valid_users`."""
    from llmrec.data import EvaluationExamples, SequentialSplit

    titles, topics = item_titles(num_items, seed)
    sequences = user_sequences(topics, num_users, length, seed)
    valid = EvaluationExamples()
    for user, sequence in enumerate(sequences[:valid_users]):
        valid.add(user, sequence[:-1], sequence[-1])
    return SequentialSplit(
        item_ids=[f"item{index}" for index in range(1, num_items + 1)], item_texts=titles,
        user_ids=[f"user{user}" for user in range(num_users)], train_sequences=[sequence[:-1] for sequence in sequences],
        valid=valid, test=EvaluationExamples(),
    )


def tiny_encoder(folder: Path) -> Path:
    """A random 2-layer BERT (hidden 64) whose word-level vocabulary covers the titles; built once."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    words = ["the", "of"] + list(TOPICS) + list(ADJECTIVES) + list(NOUNS) + [str(number) for number in range(1000)]
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    tokenizer = BertTokenizerFast(vocab={word: index for index, word in enumerate(vocabulary)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocabulary), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=32)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    BertModel(config).save_pretrained(folder)
    return folder


def encoder_folder(tiny: bool) -> Path:
    if tiny:
        return tiny_encoder(WORK / "tiny-encoder")
    from llmrec.training.pipeline import default_encoder_path

    return Path(default_encoder_path())


def experiment_config(args: argparse.Namespace, output_dir: Path):
    from llmrec.config import load_config

    return load_config(overrides={
        "output_dir": str(output_dir),
        "model": {"max_text_length": args.max_text_length},
        "training": {"loss": "sampled_softmax", "retrieval_epochs": 1, "rerank_epochs": 0, "seed": args.seed,
                     "retrieval_batch_size": args.batch_size, "num_sampled_negatives": args.negatives,
                     "early_stopping_patience": 0, "cpu_threads": args.threads, "encode_batch_size": args.encode_batch_size},
        "evaluation": {"batch_size": 64},
    })


def new_model(config, encoder: Path, split):
    from llmrec.modeling import LlmRecModel

    settings = {name: value for name, value in dataclasses.asdict(config.model).items() if name not in ("encoder", "use_user_profiles")}
    model = LlmRecModel.from_encoder(str(encoder), num_items=split.num_items, num_candidates=config.retrieval.num_candidates, **settings)
    model.warm_items.copy_(torch.as_tensor(split.item_popularity() > 0))
    return model


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepClock:
    """Seconds between consecutive AdamW steps: one training step from the next batch's collation to its update."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self._handle = register_optimizer_step_post_hook(self._record)

    def _record(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if isinstance(optimizer, torch.optim.AdamW):  # SparseAdam, when present, steps in the same training step
            self.ends.append(time.perf_counter())

    def close(self) -> list[float]:
        self._handle.remove()
        return [later - earlier for earlier, later in zip(self.ends, self.ends[1:])]


def size_folder(num_items: int) -> Path:
    return WORK / f"items-{num_items}"


def run_train_child(args: argparse.Namespace) -> dict[str, Any]:
    """One size: catalogue, tokenising to disk, 1-process encoding and one sampled-softmax epoch."""
    from accelerate import Accelerator

    from llmrec.modeling.text_encoding import encode_catalogue, tokenize_item_texts_to_disk
    from llmrec.training.trainer import LlmRecTrainer

    torch.set_num_threads(args.threads)
    num_items, folder = args.child_size, size_folder(args.child_size)
    timings, started = {}, time.perf_counter()
    split = synthetic_split(num_items, args.steps * args.batch_size + args.valid_users, args.history_length, args.valid_users, args.seed)
    timings["catalogue_seconds"] = time.perf_counter() - started
    config = experiment_config(args, folder / "run")
    encoder = encoder_folder(args.tiny_encoder)
    from transformers import AutoTokenizer

    started = time.perf_counter()
    tokenized = tokenize_item_texts_to_disk(AutoTokenizer.from_pretrained(str(encoder)), split.item_texts,
                                            config.model.max_text_length, folder / "tokens")
    timings["tokenize_seconds"] = time.perf_counter() - started
    model = new_model(config, encoder, split)
    started = time.perf_counter()
    encode_catalogue(model, tokenized, args.encode_batch_size, show_progress=False)
    timings["encode_seconds"] = time.perf_counter() - started
    rss_before_training = peak_rss_bytes()
    trainer = LlmRecTrainer(model, split, config, Accelerator(cpu=True), tokenized)
    clock = StepClock()
    started = time.perf_counter()
    valid = trainer.train_retrieval()
    timings["train_seconds"] = time.perf_counter() - started
    steps = clock.close()[args.warmup_steps:]
    return {
        "num_items": num_items, "num_users": len(split.user_ids), "steps_timed": len(steps),
        "warm_items": int(model.warm_items.sum()), "sparse_id_gradients": trainer.use_sparse_id_gradients,
        "step_seconds_median": statistics.median(steps) if steps else None,
        "step_seconds_p90": float(np.percentile(steps, 90)) if steps else None,
        "peak_rss_bytes": peak_rss_bytes(), "peak_rss_bytes_before_training": rss_before_training,
        "encode_items_per_second_in_training": num_items / timings["encode_seconds"],
        "valid": {key: value for key, value in valid.items() if key in ("ndcg@10", "recall@10", "epoch")},
        "timings": timings,
    }


def run_encode_child(args: argparse.Namespace) -> dict[str, Any]:
    """Encode the size's tokenised catalogue with this launch's processes; the slowest process's time counts."""
    from accelerate import Accelerator

    from llmrec.modeling.text_encoding import encode_catalogue, load_tokenized_items

    torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=distributed and not torch.cuda.is_available())
    folder = size_folder(args.child_size)
    split = synthetic_split(args.child_size, 1, 2, 0, args.seed)  # only the catalogue size matters here
    model = new_model(experiment_config(args, folder / "encode"), encoder_folder(args.tiny_encoder), split)
    tokenized = load_tokenized_items(folder / "tokens")
    accelerator.wait_for_everyone()
    started = time.perf_counter()
    encode_catalogue(model, tokenized, args.encode_batch_size, show_progress=False, accelerator=accelerator)
    seconds = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
    slowest = float(accelerator.gather(seconds).max()) if distributed else float(seconds)
    return {"processes": accelerator.num_processes, "threads_per_process": torch.get_num_threads(),
            "seconds": slowest, "items_per_second": args.child_size / slowest,
            "table_checksum": float(model.item_text_embeddings.double().sum()), "is_main": accelerator.is_main_process}


def _child_command(args: argparse.Namespace, mode: str, num_items: int, processes: int = 1) -> list[str]:
    forwarded = ["--child", mode, "--child-size", str(num_items), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                 "--negatives", str(args.negatives), "--history-length", str(args.history_length), "--threads", str(args.threads),
                 "--valid-users", str(args.valid_users), "--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed),
                 "--encode-batch-size", str(args.encode_batch_size), "--max-text-length", str(args.max_text_length)]
    forwarded += ["--tiny-encoder"] if args.tiny_encoder else []
    if processes == 1:
        return [sys.executable, str(Path(__file__).resolve()), *forwarded]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / "cpu_ddp.yaml"),
            "--num_processes", str(processes), str(Path(__file__).resolve()), *forwarded]


def run_child(command: list[str], result_file: Path) -> dict[str, Any]:
    """Run a child with one thread per process and read back the JSON it wrote."""
    result_file.unlink(missing_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   "LLMREC_BENCH_RESULT": str(result_file)}
    logger.info("Running %s", shlex.join(command))
    subprocess.run(command, check=True, env=environment)
    return json.loads(result_file.read_text())


def measure_size(args: argparse.Namespace, num_items: int) -> dict[str, Any]:
    folder = size_folder(num_items)
    folder.mkdir(parents=True, exist_ok=True)
    row = run_child(_child_command(args, "train", num_items), folder / "train.json")
    encodings = [run_child(_child_command(args, "encode", num_items, processes), folder / f"encode-{processes}.json")
                 for processes in (1, 2)]
    row["encoding"] = encodings
    row["encoding_speedup"] = encodings[1]["items_per_second"] / encodings[0]["items_per_second"]
    row["encoding_tables_equal"] = abs(encodings[0]["table_checksum"] - encodings[1]["table_checksum"]) <= 1e-6 * max(
        1.0, abs(encodings[0]["table_checksum"]))
    logger.info("%d items: %s", num_items, {key: value for key, value in row.items() if key != "encoding"})
    return row


def target_verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, read on the largest size against the smallest."""
    small, large = rows[0], rows[-1]
    ratio = large["step_seconds_median"] / small["step_seconds_median"] if len(rows) > 1 else None
    return {
        "largest_items": large["num_items"], "smallest_items": small["num_items"],
        "peak_rss_gb": large["peak_rss_bytes"] / 1024**3, "rss_met": large["peak_rss_bytes"] <= RSS_TARGET_BYTES,
        "step_time_ratio": ratio, "step_time_met": ratio is not None and ratio <= STEP_RATIO_TARGET,
        "encoding_speedup": large["encoding_speedup"], "encoding_met": large["encoding_speedup"] >= SPEEDUP_TARGET,
    }


def render_markdown(results: dict[str, Any]) -> str:
    header = ["items", "users", "steps timed", "step median (ms)", "step p90 (ms)", "peak RSS (GB)", "tokenise (s)",
              "encode 1 proc (items/s)", "encode 2 procs (items/s)", "speed-up", "valid NDCG@10"]
    rows = [[f"{row['num_items']:,}", f"{row['num_users']:,}", row["steps_timed"], f"{1000 * row['step_seconds_median']:.1f}",
             f"{1000 * row['step_seconds_p90']:.1f}", f"{row['peak_rss_bytes'] / 1024**3:.2f}", f"{row['timings']['tokenize_seconds']:.1f}",
             f"{row['encoding'][0]['items_per_second']:,.0f}", f"{row['encoding'][1]['items_per_second']:,.0f}",
             f"{row['encoding_speedup']:.2f}x", f"{row['valid'].get('ndcg@10', float('nan')):.4f}"] for row in results["sizes"]]
    verdict, run = results["target"], results["run"]
    ratio = "n/a (one size)" if verdict["step_time_ratio"] is None else f"{verdict['step_time_ratio']:.2f}x"
    lines = [
        "# Training at scale: sampled softmax on synthetic catalogues (issue 19, item 4)", "",
        f"Command: `{run['command']}` ({run['wall_seconds']:.0f} s, commit {run['commit']}, encoder {run['encoder']}, "
        f"{run['threads']} thread(s) per process, batch {run['batch_size']} windows of {run['history_length'] - 1} items, "
        f"{run['negatives']} sampled negatives).", "",
        markdown_table(header, rows), "",
        "Targets, at {largest:,} items against {smallest:,}:".format(largest=verdict["largest_items"], smallest=verdict["smallest_items"]), "",
        f"- peak RSS {verdict['peak_rss_gb']:.2f} GB (target <= 8 GB): {'met' if verdict['rss_met'] else 'MISSED'}",
        f"- median step {ratio} the smallest size's (target <= 2x): {'met' if verdict['step_time_met'] else 'MISSED'}",
        f"- 2-process encoding {verdict['encoding_speedup']:.2f}x 1-process (target >= 1.7x): "
        f"{'met' if verdict['encoding_met'] else 'MISSED'}", "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, load at start "
        f"{results['machine']['load_average_at_start']}.", "",
    ]
    return "\n".join(lines)


def parse_arguments(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=lambda text: [int(size) for size in text.split(",")], default=list(FULL_SIZES))
    parser.add_argument("--steps", type=int, default=300, help="Training steps per size (users = steps x batch size).")
    parser.add_argument("--batch-size", type=int, default=64, help="Training windows per step.")
    parser.add_argument("--negatives", type=int, default=1024, help="Sampled negatives per step.")
    parser.add_argument("--history-length", type=int, default=21, help="Interactions per user (the last is the valid target).")
    parser.add_argument("--valid-users", type=int, default=256)
    parser.add_argument("--warmup-steps", type=int, default=5, help="First steps left out of the step-time statistics.")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per process (the targets assume 1).")
    parser.add_argument("--encode-batch-size", type=int, default=256)
    parser.add_argument("--max-text-length", type=int, default=16, help="Token budget per title (titles need ~9).")
    parser.add_argument("--tiny-encoder", action="store_true", help="A random 2-layer BERT instead of the bundled MiniLM.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-name", default=None,
                        help="Results name under bench/results (default scaling_train, only for the full sizes and >= 200 "
                             "steps); smaller runs write runs/bench-scaling-train/results.{json,md}.")
    parser.add_argument("--child", choices=["train", "encode"], help=argparse.SUPPRESS)
    parser.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.child:
        result = run_train_child(args) if args.child == "train" else run_encode_child(args)
        if result.pop("is_main", True):
            Path(os.environ["LLMREC_BENCH_RESULT"]).write_text(json.dumps(result, indent=2))
        return
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(), "sizes": [measure_size(args, size) for size in sorted(args.sizes)]}
    results["target"] = target_verdict(results["sizes"])
    results["run"] = {"command": "python bench/scaling_train.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                      "wall_seconds": time.perf_counter() - started, "commit": git_commit(),
                      "encoder": "tiny random BERT (2 layers, hidden 64)" if args.tiny_encoder else "all-MiniLM-L6-v2",
                      **{key: getattr(args, key) for key in ("steps", "batch_size", "negatives", "history_length", "threads")}}
    markdown = render_markdown(results)
    full_size = tuple(sorted(args.sizes)) == FULL_SIZES and args.steps >= 200
    if args.output_name or full_size:
        paths = write_results(args.output_name or "scaling_train", results, markdown)
    else:
        paths = (WORK / "results.json", write_json_and_markdown(WORK / "results.json", results, markdown))
    logger.info("Wrote %s and %s.\n%s", paths[0], paths[1], markdown)


if __name__ == "__main__":
    main()
