"""Resuming fine-tuning after SIGKILL: same final metrics and weights as an uninterrupted run, and clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import tiny_overrides
from llmrec.config import load_config
from llmrec.errors import ConfigError
from llmrec.training.trainer import TRAINER_STATE_NAME, find_checkpoint, list_checkpoints

REPO = Path(__file__).resolve().parents[1]
# Few epochs, so that the metrics are far from 1.0 and any divergence of the resumed run shows. An epoch has
# 5 batches in stage 1 (80 windows of 16) and 11 in stage 2, so every checkpoint before a stage's end is mid-epoch.
RESUME_TRAINING = {"retrieval_epochs": 3, "rerank_epochs": 2, "checkpoint_every_steps": 4, "cpu_threads": 1}
# Same process layout, seed and thread count: the resumed run replays the same float operations.
TOLERANCE = 1e-6


def _write_config(tmp_path: Path, planted_data_dir: Path, tiny_encoder_dir: Path) -> Path:
    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "unused")
    overrides["training"].update(RESUME_TRAINING)
    config_file = tmp_path / "resume.yaml"
    config_file.write_text(yaml.safe_dump(overrides))
    return config_file


def _start(config_file: Path, output_dir: Path, log: Path, *arguments: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "scripts/finetune.py", "--config", str(config_file), "--output_dir", str(output_dir), *arguments]
    with open(log, "w") as handle:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)


def _kill_at_checkpoint(process: subprocess.Popen, output_dir: Path, prefix: str, log: Path) -> None:
    """SIGKILL `process` as soon as a checkpoint whose name starts with `prefix` is published."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        published = [path for path in list_checkpoints(output_dir / "checkpoints") if path.name.startswith(prefix)]
        if published:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return
        assert process.poll() is None, f"run ended before a {prefix}* checkpoint:\n{log.read_text()[-3000:]}"
        time.sleep(0.01)
    process.kill()
    pytest.fail(f"no {prefix}* checkpoint within 120 s:\n{log.read_text()[-3000:]}")


def _finish(process: subprocess.Popen, log: Path) -> str:
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    return log.read_text()


def _assert_same_run(resumed_dir: Path, reference_dir: Path) -> None:
    resumed = json.loads((resumed_dir / "eval_results.json").read_text())
    reference = json.loads((reference_dir / "eval_results.json").read_text())
    assert resumed["best_valid_epochs"] == reference["best_valid_epochs"]
    for split in ("valid", "test"):
        for system, metrics in reference[split].items():
            for name, value in metrics.items():
                assert resumed[split][system][name] == pytest.approx(value, abs=TOLERANCE), (split, system, name)
    # Metrics are coarse (80 users); the weights show any divergence of the trajectory.
    resumed_weights, reference_weights = load_file(resumed_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    assert resumed_weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        difference = (resumed_weights[name].double() - tensor.double()).abs().max().item() if tensor.numel() else 0.0
        assert difference <= TOLERANCE, f"{name} differs by {difference}"


@pytest.mark.slow
def test_resume_after_sigkill_in_each_stage_matches_uninterrupted_run(tmp_path, planted_data_dir, tiny_encoder_dir):
    config_file = _write_config(tmp_path, planted_data_dir, tiny_encoder_dir)
    output_dir = tmp_path / "resumed"
    # The uninterrupted run saves no checkpoints at all, so it also shows that saving them changes nothing.
    reference = _start(config_file, tmp_path / "reference", tmp_path / "reference.log", "--training.checkpoint_every_steps=0")

    first = _start(config_file, output_dir, tmp_path / "first.log")
    _kill_at_checkpoint(first, output_dir, "retrieval-step-", tmp_path / "first.log")
    assert first.returncode == -signal.SIGKILL

    second = _start(config_file, output_dir, tmp_path / "second.log", "--resume")
    _kill_at_checkpoint(second, output_dir, "rerank-step-", tmp_path / "second.log")
    second_log = (tmp_path / "second.log").read_text()
    assert re.search(r"Resuming from \S+: stage retrieval at epoch \d, batch [1-4]\.", second_log), second_log[-3000:]
    assert "retrieval before training" not in second_log  # continued, not restarted

    latest = find_checkpoint(load_config(config_file, [f"--output_dir={output_dir}"]), "latest")
    assert latest.name.startswith("rerank-")
    third_log = _finish(_start(config_file, output_dir, tmp_path / "third.log", "--resume", str(latest)), tmp_path / "third.log")
    assert "retrieval: finished in checkpoint" in third_log, third_log[-3000:]
    assert "retrieval epoch" not in third_log  # a kill in stage 2 does not train stage 1 again

    _finish(reference, tmp_path / "reference.log")
    _assert_same_run(output_dir, tmp_path / "reference")
    checkpoints = list_checkpoints(output_dir / "checkpoints")
    assert [path.name for path in checkpoints][-1] == "rerank-done" and len(checkpoints) == 2

    # A half-written checkpoint (a save killed before its folder was published) is never picked.
    config = load_config(config_file, [f"--output_dir={output_dir}"])
    shutil.copytree(checkpoints[-1], output_dir / "checkpoints" / ".staging-rerank-step-999")
    broken = output_dir / "checkpoints" / "rerank-step-999"
    shutil.copytree(checkpoints[-1], broken)
    (broken / TRAINER_STATE_NAME).unlink()
    assert find_checkpoint(config, "latest") == checkpoints[-1]

    # A config that does not match the checkpoint's is refused, naming the difference.
    changed = load_config(config_file, [f"--output_dir={output_dir}", "--model.hidden_size=64", "--training.seed=7"])
    with pytest.raises(ConfigError, match=r"model\.hidden_size: 32 in the checkpoint, 64 now.*training\.seed: 42"):
        find_checkpoint(changed, "latest")
    unimportant = load_config(config_file, [f"--output_dir={tmp_path / 'elsewhere'}", "--training.cpu_threads=2"])
    assert find_checkpoint(unimportant, checkpoints[-1]) == checkpoints[-1]


@pytest.mark.slow
def test_resume_after_sigkill_in_the_profile_fit_matches_uninterrupted_run(tmp_path, planted_data_dir, tiny_encoder_dir):
    """The profile fit is the loop's third stage: checkpointed, resumed mid-epoch, earlier stages not trained again."""
    from test_user_profiles import _write_planted_users

    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "unused")
    # 3 steps: mid-epoch in every stage (5, 11 and 4 batches an epoch).
    overrides["training"].update({**RESUME_TRAINING, "checkpoint_every_steps": 3, "profile_epochs": 3})
    overrides["data"].update({"users_file": str(_write_planted_users(tmp_path)), "user_profile_template": "movie about genre {likes}"})
    overrides["model"]["use_user_profiles"] = True
    config_file = tmp_path / "profiles.yaml"
    config_file.write_text(yaml.safe_dump(overrides))
    output_dir = tmp_path / "resumed"
    reference = _start(config_file, tmp_path / "reference", tmp_path / "reference.log", "--training.checkpoint_every_steps=0")

    first = _start(config_file, output_dir, tmp_path / "first.log")
    _kill_at_checkpoint(first, output_dir, "profiles-step-", tmp_path / "first.log")
    second_log = _finish(_start(config_file, output_dir, tmp_path / "second.log", "--resume"), tmp_path / "second.log")
    assert re.search(r"Resuming from \S+: stage profiles at epoch \d, batch \d\.", second_log), second_log[-3000:]
    assert "retrieval: finished in checkpoint" in second_log and "rerank: finished in checkpoint" in second_log
    assert "profiles before training" not in second_log  # continued, not restarted

    _finish(reference, tmp_path / "reference.log")
    _assert_same_run(output_dir, tmp_path / "reference")
    resumed = json.loads((output_dir / "eval_results.json").read_text())
    reference_results = json.loads((tmp_path / "reference" / "eval_results.json").read_text())
    assert resumed["profile_training_losses"] == pytest.approx(reference_results["profile_training_losses"], abs=TOLERANCE)
    assert [path.name for path in list_checkpoints(output_dir / "checkpoints")][-1] == "profiles-done"


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, planted_data_dir, tiny_encoder_dir):
    config_file = _write_config(tmp_path, planted_data_dir, tiny_encoder_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    missing = tmp_path / "no-such-checkpoint"
    cases = {
        "latest, none saved": (["--resume"], f"Nothing to resume from: no intact checkpoint in {tmp_path / 'empty' / 'checkpoints'}"),
        "a folder that is no checkpoint": (["--resume", str(missing)], f"{missing} is not a checkpoint folder"),
    }
    for extra, message in cases.values():
        completed = subprocess.run(
            [sys.executable, "scripts/finetune.py", "--config", str(config_file), "--output_dir", str(tmp_path / "empty"), *extra],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )
        assert completed.returncode == 2, completed.stderr[-3000:]
        assert completed.stderr.startswith("error: "), completed.stderr[-3000:]
        assert message in completed.stderr, completed.stderr[-3000:]
        assert "Traceback" not in completed.stderr
        assert not (tmp_path / "empty" / "eval_results.json").exists()


def test_a_checkpoint_of_an_earlier_release_is_refused_with_a_clear_error(tmp_path):
    """Before the task models, a checkpoint held the bare model's weights; this release cannot load them mid-stage."""
    import torch
    from safetensors.torch import save_file

    from llmrec.training.checkpoints import check_task_model_weights

    save_file({"llmrec.reranker.retrieval_weight": torch.ones(())}, tmp_path / "model.safetensors")
    check_task_model_weights(tmp_path, "llmrec.")  # this release's layout
    save_file({"module.llmrec.reranker.retrieval_weight": torch.ones(())}, tmp_path / "model.safetensors")
    check_task_model_weights(tmp_path, "llmrec.")  # saved from the DDP-wrapped task model
    save_file({"reranker.retrieval_weight": torch.ones(())}, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="written by an earlier llmrec release.*without --resume"):
        check_task_model_weights(tmp_path, "llmrec.")
