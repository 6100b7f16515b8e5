"""Load test of `llmrec serve` (issue 18): loopback only, bounded in requests and time.

Starts `llmrec serve` itself on a free 127.0.0.1 port, then an httpx/asyncio client runs 1, 8 and 64
concurrent clients of POST /recommend (k=10) and reports p50/p99 latency, requests/s and error rate; the
same histories go through the in-process API in the same run (`recommend` one by one, `recommend_batch`
of all users and in chunks of 64). Then a reload by SIGHUP under 64-client load (dropped requests are
counted) and a soak at 8 clients with the server's RSS at its start and end.

    python bench/serve_load.py --model runs/ml100k              # the default MovieLens-100k model
    python bench/serve_load.py --soak-seconds 60                # no folder: an untrained model of ML-100k's shape
    python bench/serve_load.py --url http://127.0.0.1:8000 --model runs/tiny --output bench/results/ray_serve_load
        # a server already running (e.g. examples/ray_serve.py): only the concurrency levels, no reload or soak

With --url the script cannot signal or watch the server, so the SIGHUP reload and the RSS soak are skipped,
and /metrics is not read (behind several replicas it answers for one of them); --model names the folder the
server serves, for its item ids.

Without --model the script builds an untrained model with MovieLens-100k's serving shape (1,682 items,
hidden 64, 100 candidates, histories read up to 200 items) around a tiny random BERT: serving reads cached
item vectors, so BERT's size does not enter these figures, but the answers are not meaningful ones.
The client runs on the same machine as the server and competes with it for the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from common import loadavg_text, table_header, write_json_and_markdown

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
LEVELS = (1, 8, 64)
SERVER_LATENCY, LABEL = "llmrec_request_latency_seconds", '{endpoint="/recommend"}'


def build_synthetic_model(folder: Path, num_items: int = 1682) -> Path:
    """An untrained recommender of MovieLens-100k's serving shape, saved to `folder`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from llmrec import Recommender
    from llmrec.modeling import LlmRecModel
    from llmrec.modeling.text_encoding import encode_catalogue, tokenize_item_texts

    encoder = folder / "tiny-bert"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "movie", "genre", *[str(n) for n in range(100)]]
    BertTokenizerFast(vocab={word: index for index, word in enumerate(vocab)}).save_pretrained(encoder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(encoder)
    model = LlmRecModel.from_encoder(encoder, num_items=num_items, num_candidates=100, hidden_size=64, max_history_length=200,
                                     max_text_length=16, user_num_heads=2, rerank_num_heads=2, dropout=0.0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder)
    texts = [f"movie {n % 100} genre {n % 19}" for n in range(num_items)]
    encode_catalogue(model, tokenize_item_texts(tokenizer, texts, 16), show_progress=False)
    model.warm_items[1:] = True
    ids = [str(n + 1) for n in range(num_items)]
    recommender = Recommender(model.eval(), tokenizer, ids, texts, np.arange(num_items, 0, -1, dtype=float))
    recommender.save_pretrained(folder / "model")
    return folder / "model"


def user_histories(item_ids: tuple[str, ...], count: int, seed: int = 0) -> list[list[str]]:
    """`count` histories of 20-200 distinct catalogue items (MovieLens-100k users rate 20 to ~700)."""
    rng = np.random.default_rng(seed)
    return [list(rng.choice(item_ids, size=int(rng.integers(20, 201)), replace=False)) for _ in range(count)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def in_process_figures(folder: Path, histories: list[list[str]], k: int) -> dict:
    from llmrec import Recommender

    recommender = Recommender.from_pretrained(folder)
    recommender.recommend_batch(histories[:64], k)  # warm-up
    one_by_one = []
    for history in histories:
        started = time.perf_counter()
        recommender.recommend(history, k)
        one_by_one.append(time.perf_counter() - started)
    started = time.perf_counter()
    recommender.recommend_batch(histories, k)
    whole = time.perf_counter() - started
    started = time.perf_counter()
    for start in range(0, len(histories), 64):
        recommender.recommend_batch(histories[start:start + 64], k)
    chunked = time.perf_counter() - started
    return {
        "users": len(histories),
        "recommend_one_by_one": {"users_per_s": len(histories) / sum(one_by_one), "p50_ms": 1e3 * percentile(one_by_one, 50),
                                 "p99_ms": 1e3 * percentile(one_by_one, 99)},
        "recommend_batch_all": {"users_per_s": len(histories) / whole, "seconds": whole},
        "recommend_batch_chunks_of_64": {"users_per_s": len(histories) / chunked, "seconds": chunked},
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder: Path, port: int, log: Path) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    environment.pop("LLMREC_SERVE_TOKEN", None)
    command = [sys.executable, "-m", "llmrec.cli", "serve", str(folder), "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, env=environment, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"llmrec serve exited with {server.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    server.kill()
    raise SystemExit(f"llmrec serve was not ready within 180 s; see {log}")


def rss_mib(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def scrape(base: str) -> dict[str, float]:
    """The unlabelled or simply-labelled samples of /metrics, by series name."""
    samples = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def run_level(base: str, histories: list[list[str]], clients: int, k: int, max_requests: int, max_seconds: float,
                    during=None) -> dict:
    """`clients` concurrent loops posting /recommend until `max_requests` or `max_seconds`."""
    latencies: list[float] = []
    errors: Counter = Counter()
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        deadline = time.perf_counter() + max_seconds

        async def one_client() -> None:
            nonlocal sent
            while sent < max_requests and time.perf_counter() < deadline:
                body = {"history": histories[sent % len(histories)], "k": k}
                sent += 1
                started = time.perf_counter()
                try:
                    response = await client.post("/recommend", json=body)
                    if response.status_code != 200:
                        errors[str(response.status_code)] += 1
                except httpx.HTTPError as error:
                    errors[type(error).__name__] += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        tasks = [asyncio.create_task(one_client()) for _ in range(clients)]
        if during is not None:
            tasks.append(asyncio.create_task(during()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return {
        "clients": clients, "requests": len(latencies), "seconds": elapsed, "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1e3 * percentile(latencies, 50), "p99_ms": 1e3 * percentile(latencies, 99),
        "error_rate": sum(errors.values()) / max(1, len(latencies)), "errors": dict(errors),
    }


async def reload_midway(server: subprocess.Popen, after_seconds: float) -> None:
    await asyncio.sleep(after_seconds)
    server.send_signal(signal.SIGHUP)


def remote_figures(base: str, histories: list[list[str]], arguments: argparse.Namespace) -> dict:
    """The concurrency levels against a server this script did not start (no /metrics, reload or soak)."""
    if httpx.get(f"{base}/ready", timeout=10).status_code != 200:
        raise SystemExit(f"{base}/ready does not answer 200; start the server first and wait until it is ready.")
    levels = [asyncio.run(run_level(base, histories, clients, arguments.k, arguments.max_requests, arguments.level_seconds))
              for clients in arguments.levels]
    return {"levels": levels}


def load_figures(base: str, server: subprocess.Popen, histories: list[list[str]], arguments: argparse.Namespace) -> dict:
    levels = []
    for clients in arguments.levels:
        before = scrape(base)
        level = asyncio.run(run_level(base, histories, clients, arguments.k, arguments.max_requests, arguments.level_seconds))
        after = scrape(base)
        batches = after["llmrec_batch_size_count"] - before.get("llmrec_batch_size_count", 0)
        level["mean_batch_size"] = (after["llmrec_batch_size_sum"] - before.get("llmrec_batch_size_sum", 0)) / max(1, batches)
        # Inside the app (after uvicorn parsed the request): far below the client's latency, the time went to
        # queues outside the app (the client's own CPU, the event loop, the kernel), not to scoring.
        served = [after.get(SERVER_LATENCY + part, 0) - before.get(SERVER_LATENCY + part, 0) for part in ("_sum" + LABEL, "_count" + LABEL)]
        level["server_mean_ms"] = 1e3 * served[0] / max(1, served[1])
        levels.append(level)
    reload_run = asyncio.run(run_level(base, histories, 64, arguments.k, 10**9, arguments.level_seconds,
                                       during=lambda: reload_midway(server, arguments.level_seconds / 3)))
    time.sleep(1)
    reload_run["reloads_ok"] = scrape(base).get('llmrec_reloads_total{outcome="ok"}', 0.0)
    rss_start = rss_mib(server.pid)
    samples = [rss_start]
    soak = asyncio.run(run_level(base, histories, 8, arguments.k, 10**9, arguments.soak_seconds))
    samples.append(rss_mib(server.pid))
    soak.update(rss_start_mib=rss_start, rss_end_mib=samples[-1], rss_growth=samples[-1] / rss_start - 1)
    return {"levels": levels, "reload_under_load": reload_run, "soak": soak}


def render_markdown(results: dict) -> str:
    """OUTPUT.md: the HTTP levels against in-process serving, the reload and the soak; a --url run has only the levels."""
    if results["in_process"] is None:
        return render_remote_markdown(results)
    inproc = results["in_process"]
    lines = [
        "# `llmrec serve` load test (`bench/serve_load.py`)", "",
        f"Model: {results['model']}. POST /recommend, k={results['k']}, {inproc['users']} users' histories (20-200 items). "
        f"Machine: {results['machine']['cpus']} CPUs, load average {results['machine']['loadavg_start']} at the start and "
        f"{results['machine']['loadavg_end']} at the end; the httpx client runs on the same cores as the server, and "
        "other work shared the machine, so every figure is pessimistic.", "",
        *table_header(["clients", "requests", "requests/s", "p50 ms", "p99 ms", "error rate", "mean micro-batch",
                       "mean ms inside the app"]),
    ]
    for level in results["http"]["levels"]:
        lines.append(f"| {level['clients']} | {level['requests']} | {level['requests_per_s']:.0f} | {level['p50_ms']:.1f} | "
                     f"{level['p99_ms']:.1f} | {level['error_rate']:.3%} | {level['mean_batch_size']:.1f} | {level['server_mean_ms']:.1f} |")
    reload_run, soak = results["http"]["reload_under_load"], results["http"]["soak"]
    lines += [
        "", *table_header(["in-process, same histories", "users/s", "p50 ms", "p99 ms"]),
        f"| `recommend` one by one | {inproc['recommend_one_by_one']['users_per_s']:.0f} | "
        f"{inproc['recommend_one_by_one']['p50_ms']:.2f} | {inproc['recommend_one_by_one']['p99_ms']:.2f} |",
        f"| `recommend_batch`, all users in one call | {inproc['recommend_batch_all']['users_per_s']:.0f} | | |",
        f"| `recommend_batch`, chunks of 64 | {inproc['recommend_batch_chunks_of_64']['users_per_s']:.0f} | | |",
        "", f"HTTP cost per request at 64 clients over in-process `recommend_batch` (all users): "
        f"{results['http_over_in_process_at_64']:.1f}x.", "",
        f"Reload by SIGHUP under 64-client load: {reload_run['requests']} requests, errors {reload_run['errors'] or 'none'}, "
        f"reloads completed {reload_run['reloads_ok']:.0f}; p99 {reload_run['p99_ms']:.1f} ms.", "",
        f"Soak, 8 clients for {soak['seconds']:.0f} s ({soak['requests']} requests, {soak['requests_per_s']:.0f}/s, errors "
        f"{soak['errors'] or 'none'}): server RSS {soak['rss_start_mib']:.1f} MiB at the start, {soak['rss_end_mib']:.1f} MiB "
        f"at the end ({soak['rss_growth']:+.1%}).", "", f"Command: `{results['command']}`", "",
    ]
    return "\n".join(lines)


def render_remote_markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"# Load test of {results['url']} (`bench/serve_load.py --url`)", "",
        f"Model: {results['model']}. POST /recommend, k={results['k']}, {results['users']} users' histories (20-200 items). "
        f"Machine: {machine['cpus']} CPUs, load average {machine['loadavg_start']} at the start and {machine['loadavg_end']} "
        "at the end; the httpx client runs on the same cores as the server.", "",
        *table_header(["clients", "requests", "requests/s", "p50 ms", "p99 ms", "error rate"]),
    ]
    for level in results["http"]["levels"]:
        lines.append(f"| {level['clients']} | {level['requests']} | {level['requests_per_s']:.0f} | {level['p50_ms']:.1f} | "
                     f"{level['p99_ms']:.1f} | {level['error_rate']:.3%} |")
    if results.get("note"):
        lines += ["", f"Setup: {results['note']}."]
    lines += ["", f"Command: `{results['command']}`", ""]
    return "\n".join(lines)


def machine_info(loadavg_start: list[str]) -> dict:
    """CPUs, platform and the load averages (as /proc/loadavg writes them) when the run started and now."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_start": " ".join(loadavg_start), "loadavg_end": " ".join(loadavg_text().split()[:3])}


def write_and_print(results: dict, output: Path) -> None:
    """OUTPUT.json and OUTPUT.md, and the markdown on stdout."""
    markdown = render_markdown(results)
    write_json_and_markdown(output.with_suffix(".json"), results, markdown)
    print(markdown)


def run_remote(arguments: argparse.Namespace, loadavg_start: list[str]) -> dict:
    from llmrec import Recommender

    if not arguments.model:
        raise SystemExit("--url needs --model: the folder the server serves, for its item ids.")
    histories = user_histories(Recommender.from_pretrained(arguments.model).item_ids, arguments.users)
    http = remote_figures(arguments.url.rstrip("/"), histories, arguments)
    return {
        "url": arguments.url, "model": arguments.model, "k": arguments.k, "users": len(histories), "in_process": None,
        "http": http, "note": arguments.note,
        "machine": machine_info(loadavg_start),
        "command": " ".join(["python", *sys.argv]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Model folder to serve (default: an untrained model of ML-100k's shape).")
    parser.add_argument("--users", type=int, default=943, help="Distinct histories (default 943, ML-100k's users).")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--max-requests", type=int, default=3000, help="Requests per concurrency level at most.")
    parser.add_argument("--level-seconds", type=float, default=30.0, help="Seconds per concurrency level at most.")
    parser.add_argument("--soak-seconds", type=float, default=300.0, help="Soak length (default 300, the issue's 5 minutes).")
    parser.add_argument("--output", default=str(RESULTS / "serve_load"), help="Writes OUTPUT.json and OUTPUT.md.")
    parser.add_argument("--url", help="Load a server already running at this base URL instead of starting one (needs --model).")
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="Concurrent clients per level (default 1 8 64).")
    parser.add_argument("--note", help="Free text stored with the results (what else ran, how the server was started).")
    arguments = parser.parse_args()
    loadavg_start = loadavg_text().split()[:3]
    if arguments.url:
        results = run_remote(arguments, loadavg_start)
        write_and_print(results, Path(arguments.output))
        return
    with tempfile.TemporaryDirectory(prefix="llmrec-serve-load-") as scratch:
        folder = Path(arguments.model) if arguments.model else build_synthetic_model(Path(scratch))
        from llmrec import Recommender

        histories = user_histories(Recommender.from_pretrained(folder).item_ids, arguments.users)
        in_process = in_process_figures(folder, histories, arguments.k)
        port = free_port()
        server = start_server(folder, port, Path(scratch) / "server.log")
        try:
            http = load_figures(f"http://127.0.0.1:{port}", server, histories, arguments)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(30)
    results = {
        "model": arguments.model or "untrained, MovieLens-100k shape (1,682 items, hidden 64, 100 candidates)",
        "k": arguments.k, "in_process": in_process, "http": http,
        "http_over_in_process_at_64": (1 / http["levels"][-1]["requests_per_s"]) / (1 / in_process["recommend_batch_all"]["users_per_s"]),
        "machine": machine_info(loadavg_start),
        "command": " ".join(["python", *sys.argv]),
    }
    write_and_print(results, Path(arguments.output))


if __name__ == "__main__":
    main()
