"""The training section of bench/speed.py: finetune runs on a terminal, their stages and steps read as they print."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any, Callable, Optional

from speed_common import ROOT, TRAINING_CONFIG, BenchContext, _seconds, row

logger = logging.getLogger("bench.speed")


class TrainingLog:
    """Reads a finetune run's output as it arrives: stage markers from log lines, steps from tqdm bars.

    `stop_if_epoch_over` (seconds): once `probe_steps` stage-1 steps are done, stop the run if the stage-1
    epoch is projected to take longer, so it can be extrapolated instead.
    """

    MARKERS = {
        "retrieval_start": "Stage 1:", "retrieval_ready": "retrieval before training", "retrieval_epoch": "retrieval epoch 1: loss",
        "rerank_start": "Stage 2:", "rerank_ready": "rerank before training", "rerank_epoch": "rerank epoch 1: loss",
    }
    BAR = re.compile(r"(retrieval|rerank) epoch 1/\d+:\s*\d+%.*?\|\s*(\d+)/(\d+) \[")

    def __init__(self, stop_if_epoch_over: Optional[float] = None, probe_steps: int = 3) -> None:
        self.marks: dict[str, float] = {}
        self.steps: dict[str, dict[int, float]] = {}  # stage -> {steps done: seconds since start}
        self.total_steps: dict[str, int] = {}
        self.stop_if_epoch_over = stop_if_epoch_over
        self.probe_steps = probe_steps
        self.stopped_early = False

    def __call__(self, line: str, seconds: float) -> bool:
        """Record the line; True asks for the run to be stopped."""
        for mark, text in self.MARKERS.items():
            if text in line and mark not in self.marks:
                self.marks[mark] = seconds
        bar = self.BAR.search(line)
        if bar:
            stage, done, total = bar.group(1), int(bar.group(2)), int(bar.group(3))
            self.steps.setdefault(stage, {}).setdefault(done, seconds)
            self.total_steps[stage] = total
            if (self.stop_if_epoch_over is not None and stage == "retrieval" and done >= self.probe_steps
                    and self.projected_epoch("retrieval") > self.stop_if_epoch_over):
                self.stopped_early = True
                return True
        return False

    def seconds_per_step(self, stage: str) -> Optional[float]:
        steps = self.steps.get(stage, {})
        done = max((count for count in steps if count > 0), default=0)
        if 0 not in steps or not done:
            return None
        return (steps[done] - steps[0]) / done

    def projected_epoch(self, stage: str) -> float:
        return (self.seconds_per_step(stage) or 0.0) * self.total_steps.get(stage, 0)

    def between(self, first: str, second: str) -> Optional[float]:
        if first in self.marks and second in self.marks:
            return self.marks[second] - self.marks[first]
        return None


def run_on_terminal(command: list[str], log_path: Path, on_output: Callable[[str, float], bool], env: dict[str, str]) -> dict[str, Any]:
    """Run a command on a pseudo-terminal (so tqdm draws its bars), feeding each line to `on_output`.

    Returns its exit status, wall seconds and peak resident memory (from its own rusage, via wait4). When
    `on_output` returns True the command's process group is sent SIGTERM.
    """
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
                               start_new_session=True)
    os.close(terminal)
    pending, stopped = b"", False
    with open(log_path, "wb") as log:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            log.write(chunk)
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            # tqdm writes "\r" before a bar, not after it: the unterminated tail is the bar just drawn, so it is
            # read now too (on_output only keeps the first sighting of anything, so reading it again is harmless).
            for line in [*lines, pending]:
                if line.strip() and not stopped and on_output(line.decode(errors="replace"), time.perf_counter() - started):
                    os.killpg(process.pid, signal.SIGTERM)
                    stopped = True
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    os.close(master)
    return {"exit_status": process.returncode, "wall_seconds": time.perf_counter() - started,
            "peak_rss_mib": usage.ru_maxrss / 1024, "stopped": stopped}


def _train(name: str, extra_arguments: list[str], context: BenchContext, log: TrainingLog) -> dict[str, Any]:
    output_dir = Path(context.args.work_dir) / name
    output_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "scripts/finetune.py", "--config", TRAINING_CONFIG, "--output_dir", str(output_dir),
               "--training.cpu_threads", str(context.threads), *extra_arguments]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    logger.info("training run %s: %s", name, " ".join(command))
    log_path = output_dir.with_name(f"{name}.log")  # beside the run folder, which saving swaps out whole
    outcome = run_on_terminal(command, log_path, log, env)
    if outcome["exit_status"] != 0 and not outcome["stopped"]:
        raise RuntimeError(f"Training run {name} failed (exit status {outcome['exit_status']}); see {log_path}.")
    results_file = output_dir / "eval_results.json"
    timings = json.loads(results_file.read_text())["timings"] if not outcome["stopped"] and results_file.is_file() else None
    stages = {}
    for stage in ("retrieval", "rerank"):
        per_step = log.seconds_per_step(stage)
        stages[stage] = {
            "steps": log.total_steps.get(stage), "seconds_per_step": per_step,
            "train_steps_seconds": per_step * log.total_steps[stage] if per_step is not None else None,
            "validation_seconds": log.between(f"{stage}_start", f"{stage}_ready"),
            "epoch_with_validation_seconds": log.between(f"{stage}_ready", f"{stage}_epoch"),
        }
    stages["rerank"]["candidate_mining_seconds"] = log.between("retrieval_epoch", "rerank_start")
    return {"command": " ".join(command[1:]), "log": str(log_path), **outcome, "stages": stages, "timings": timings,
            "stopped_after_steps": max(log.steps.get("retrieval", {0: 0})) if log.stopped_early else None}


def _ratio(value: Optional[float], frozen_value: Optional[float], run: dict, lora_run: dict, what: str = "") -> str:
    if run is not lora_run or value is None or not frozen_value:
        return "–"
    return f"{value / frozen_value:.1f} × frozen" + (f" ({what})" if what else "")


def bench_training(context: BenchContext) -> dict[str, Any]:
    """Seconds per epoch of both stages, frozen encoder vs LoRA, through the real entry point in a subprocess."""
    one_epoch = ["--training.retrieval_epochs", "1", "--training.rerank_epochs", "1"]
    lora = ["--lora.r", str(context.args.lora_r)]
    budget = context.args.lora_budget_minutes * 60
    runs = {"frozen encoder": _train("frozen", one_epoch, context, TrainingLog())}
    lora_log = TrainingLog(stop_if_epoch_over=budget, probe_steps=context.args.lora_probe_steps)
    runs[f"LoRA r={context.args.lora_r}"] = lora_run = _train("lora", lora + one_epoch, context, lora_log)
    if lora_run["stopped"]:
        # Stage 2 trains the head alone (the encoder is frozen again), so one epoch of it can be timed
        # after a stage 1 of zero epochs.
        stage2 = _train("lora-stage2", lora + ["--training.retrieval_epochs", "0", "--training.rerank_epochs", "1"],
                        context, TrainingLog())
        lora_run["stages"]["rerank"] = stage2["stages"]["rerank"]
        lora_run["stage2_run"] = stage2

    frozen = runs["frozen encoder"]["stages"]
    rows = []
    for name, run in runs.items():
        retrieval, rerank = run["stages"]["retrieval"], run["stages"]["rerank"]
        extrapolated = run["stopped_after_steps"] is not None
        steps = (f"extrapolated from {run['stopped_after_steps']} of {retrieval['steps']} steps" if extrapolated
                 else f"{retrieval['steps']} steps")
        with_validation = "" if extrapolated else f"; {_seconds(retrieval['epoch_with_validation_seconds'])} with validation" + (
            " and catalogue re-encoding" if run is lora_run else "")
        rerank_steps = f"{rerank['steps']} steps" + (" after a 0-epoch stage 1, see notes" if "stage2_run" in run else "")
        rows.append(row(f"{name}: stage 1 (towers), one epoch ({steps}, {_seconds(retrieval['seconds_per_step'], 2)}/step)",
                        f"{_seconds(retrieval['train_steps_seconds'])}{with_validation}",
                        ratio=_ratio(retrieval["train_steps_seconds"], frozen["retrieval"]["train_steps_seconds"], run, lora_run)))
        rows.append(row(f"{name}: stage 2 (rerank head), one epoch ({rerank_steps}, {_seconds(rerank['seconds_per_step'], 2)}/step)",
                        f"{_seconds(rerank['train_steps_seconds'])}; {_seconds(rerank['epoch_with_validation_seconds'])} with validation",
                        ratio="–" if "stage2_run" in run else
                        _ratio(rerank["seconds_per_step"], frozen["rerank"]["seconds_per_step"], run, lora_run, "per step")))
        memory = f"{run['peak_rss_mib']:,.0f} MiB"
        if "stage2_run" in run:
            memory += f" (stage-2 run: {run['stage2_run']['peak_rss_mib']:,.0f} MiB)"
        rows.append(row(f"{name}: peak RSS of the process; wall time of the run", f"{memory}; {run['wall_seconds']:.0f} s"
                        + (" until stopped" if run["stopped"] else "")))
    notes = [
        f"Each run is `python3 scripts/finetune.py --config {TRAINING_CONFIG} --training.retrieval_epochs 1 "
        f"--training.rerank_epochs 1 --training.cpu_threads {context.threads}` (+ `--lora.r {context.args.lora_r}`) in a "
        "subprocess on a pseudo-terminal; step times come from its tqdm bars, validation times from its log lines, "
        "peak RSS from its own rusage (`os.wait4`). Wall time includes data loading, catalogue encoding, "
        "stage-2 candidate mining, the final evaluation and saving.",
        "\"with validation\" is the marginal cost of one epoch in a real run: training steps plus the validation "
        "pass after it (and, with LoRA, re-encoding the catalogue before validating).",
    ]
    if lora_run["stopped"]:
        notes.append(
            f"The LoRA stage-1 epoch was projected at {lora_run['stages']['retrieval']['train_steps_seconds'] / 60:.0f} min, over the "
            f"{context.args.lora_budget_minutes:g} min budget, so the run was stopped after {lora_run['stopped_after_steps']} "
            "steps and the epoch extrapolated (steps × mean seconds per step, the first step's start-up included); its "
            "stage 2 comes from a second run with `--training.retrieval_epochs 0`. Stage 2 trains the head alone over "
            "cached item vectors (the encoder is frozen again), the same kind of step as without LoRA; but its examples "
            "come from an untrained retriever (fewer training positions have their next item among the candidates, and "
            "they are other ones), so neither its steps per epoch nor its seconds per step compare with the frozen run's."
        )
    return {"rows": rows, "notes": notes, "details": runs}
