"""Hostile input to the command line, the config and the training entry point (issue 13): one `error:` line and
exit 2 instead of a traceback, nothing of the user's overwritten, preflight before any data, resume that survives
a broken checkpoint and refuses lost random states."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_overrides
from llmrec.cli import main
from llmrec.config import ExperimentConfig, load_config
from llmrec.errors import ConfigError, InvalidRequestError
from llmrec.training import run_finetune
from llmrec.training.trainer import find_checkpoint, list_checkpoints

REPO = Path(__file__).resolve().parents[1]
# Two short stages with a checkpoint every 4 steps: the run ends with two checkpoints of stage 2.
CHECKPOINTED_TRAINING = {"retrieval_epochs": 3, "rerank_epochs": 2, "checkpoint_every_steps": 4, "cpu_threads": 1}


def _overrides(planted_data_dir: Path, tiny_encoder_dir: Path, output_dir: Path) -> dict:
    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, output_dir)
    overrides["training"].update(CHECKPOINTED_TRAINING)
    return overrides


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, planted_data_dir, tiny_encoder_dir) -> Path:
    """The one training run of this module: a model folder with its checkpoints, copied and broken by the tests."""
    output_dir = tmp_path_factory.mktemp("checkpointed") / "run"
    run_finetune(load_config(overrides=_overrides(planted_data_dir, tiny_encoder_dir, output_dir)))
    assert len(list_checkpoints(output_dir / "checkpoints")) == 2
    return output_dir


@pytest.fixture(scope="module")
def model_dir(checkpointed_run, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "model"
    shutil.copytree(checkpointed_run, folder, ignore=shutil.ignore_patterns("checkpoints"))
    return folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(argument) for argument in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "[(" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# ----- config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("training:\n  seed: 1\n  loss: auto\n  seed: 2\n", "'seed'", "line 2 and line 4"),
        ("output_dir: a\ntraining: {}\noutput_dir: b\n", "'output_dir'", "line 1 and line 3"),
        ("training: {seed: 1, seed: 2}\n", "'seed'", "line 1 and line 1"),
    ],
)
def test_duplicate_yaml_keys_are_refused_naming_key_and_lines(tmp_path, text, key, lines):
    config_file = tmp_path / "dup.yaml"
    config_file.write_text(text)
    with pytest.raises(ConfigError, match="appears twice") as raised:
        load_config(config_file)
    assert key in str(raised.value) and lines in str(raised.value) and str(config_file) in str(raised.value)


def test_yaml_merge_keys_may_still_override(tmp_path):
    config_file = tmp_path / "merge.yaml"
    config_file.write_text("training:\n  <<: {retrieval_epochs: 3, rerank_epochs: 2}\n  rerank_epochs: 1\n")
    assert load_config(config_file).training.rerank_epochs == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--training.seed", "-1"], r"training\.seed must be an integer in 0\.\.4294967295"),
        (["--training.seed", str(2**32)], r"training\.seed must be an integer in 0\.\.4294967295"),
        (["--data.seed", "-5"], r"data\.seed must be an integer in 0\.\.4294967295"),
        (["--retrieval.num_candidates", "10001"], "at most 10000"),
        (["--retrieval.num_candidates", str(10**12)], "at most 10000"),
        (["--output_dir="], "output_dir is empty"),
        (["--output_dir", "  "], "output_dir is empty"),
    ],
)
def test_impossible_values_are_refused_at_parse_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_largest_valid_seed_and_candidate_count_are_accepted():
    config = load_config(overrides=["--training.seed", str(2**32 - 1), "--retrieval.num_candidates", "10000"])
    assert (config.training.seed, config.retrieval.num_candidates) == (2**32 - 1, 10000)


def test_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    config_file = tmp_path / "latin1.yaml"
    config_file.write_bytes("output_dir: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(config_file)


def _finetune_script():
    spec = importlib.util.spec_from_file_location("finetune_script", REPO / "scripts" / "finetune.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("argv", [["--output_dir="], ["--output_dir", ""], ["--resume-ignore-rng"]])
def test_finetune_script_refuses_empty_output_dir_and_stray_flags(monkeypatch, capsys, argv):
    script = _finetune_script()
    started = []
    monkeypatch.setattr(script, "run_finetune", lambda config, **kwargs: started.append(config))
    assert script.main(argv) == 2
    assert not started  # before: an empty --output_dir was dropped and the run trained into runs/llmrec
    assert_one_error_line(2, capsys.readouterr().err)


# ----- preflight ----------------------------------------------------------------------------------------


@pytest.fixture
def no_data_loading(monkeypatch):
    """Any preflight failure must come before the data is read: reading it fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the preflight check failed")

    monkeypatch.setattr("llmrec.training.pipeline.load_interaction_data", refuse)


def _config(planted_data_dir, tiny_encoder_dir, output_dir, **sections) -> ExperimentConfig:
    overrides = _overrides(planted_data_dir, tiny_encoder_dir, output_dir)
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return load_config(overrides=overrides)


def test_output_dir_that_is_a_file_fails_before_data(no_data_loading, tmp_path, planted_data_dir, tiny_encoder_dir):
    output = tmp_path / "taken"
    output.write_text("a user's file")
    with pytest.raises(ConfigError, match="is a file"):
        run_finetune(_config(planted_data_dir, tiny_encoder_dir, output))
    assert output.read_text() == "a user's file"
    with pytest.raises(ConfigError, match="cannot be created"):
        run_finetune(_config(planted_data_dir, tiny_encoder_dir, output / "sub" / "run"))


def test_unwritable_output_dir_fails_before_data(no_data_loading, monkeypatch, tmp_path, planted_data_dir, tiny_encoder_dir):
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # As root a read-only folder is still writable, so the failing write is simulated here.
    monkeypatch.setattr("llmrec.training.preflight.tempfile.NamedTemporaryFile", read_only)
    with pytest.raises(ConfigError, match="not writable.*Permission denied"):
        run_finetune(_config(planted_data_dir, tiny_encoder_dir, tmp_path / "parent" / "run"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_fails_before_data(no_data_loading, tmp_path, planted_data_dir, tiny_encoder_dir):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            run_finetune(_config(planted_data_dir, tiny_encoder_dir, parent / "run"))
    finally:
        parent.chmod(0o755)


def test_unknown_lora_target_module_fails_before_data(no_data_loading, tmp_path, planted_data_dir, tiny_encoder_dir):
    config = _config(planted_data_dir, tiny_encoder_dir, tmp_path / "run", lora={"target_modules": ["query", "vaule"]})
    with pytest.raises(ConfigError, match=r"'vaule' \(did you mean 'value'\?\)") as raised:
        run_finetune(config)
    assert "'query'" not in str(raised.value).split("name no module")[0]  # only the missing one is named
    assert not (tmp_path / "run").exists()


def test_existing_lora_targets_pass_the_check(tiny_encoder_dir):
    from transformers import AutoConfig

    from llmrec.training.preflight import check_lora_targets

    encoder_config = AutoConfig.from_pretrained(tiny_encoder_dir)
    for targets in (["query", "value"], ["attention.self.key", "dense"], ["all-linear"]):
        check_lora_targets(targets, encoder_config, str(tiny_encoder_dir))


def test_invalid_seed_in_a_python_config_fails_before_data(no_data_loading, tmp_path, planted_data_dir, tiny_encoder_dir):
    config = _config(planted_data_dir, tiny_encoder_dir, tmp_path / "run")
    config.training.seed = -1  # built in Python, never through load_config
    with pytest.raises(ConfigError, match="training.seed"):
        run_finetune(config)


def test_text_length_beyond_the_encoder_fails_before_data(no_data_loading, tmp_path, planted_data_dir, tiny_encoder_dir):
    config = _config(planted_data_dir, tiny_encoder_dir, tmp_path / "run", model={"max_text_length": 10**9})
    with pytest.raises(ConfigError, match="max_position_embeddings 64"):
        run_finetune(config)


def test_valid_config_passes_preflight_without_leaving_files(tmp_path, planted_data_dir, tiny_encoder_dir):
    from llmrec.training.preflight import preflight

    config = _config(planted_data_dir, tiny_encoder_dir, tmp_path / "run", lora={"target_modules": ["query"]})
    preflight(config, str(tiny_encoder_dir))
    assert list(tmp_path.iterdir()) == []  # the probe file is gone, and output_dir is not created early


def test_finetune_script_reports_preflight_failure_as_one_line(tmp_path, planted_data_dir, tiny_encoder_dir):
    overrides = _overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "run")
    overrides["lora"] = {"target_modules": ["nonexistent"]}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(overrides))
    completed = subprocess.run(
        [sys.executable, "scripts/finetune.py", "--config", str(config_file), "--training.seed", "-1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1].startswith("error: training.seed")
    completed = subprocess.run(
        [sys.executable, "scripts/finetune.py", "--config", str(config_file)], cwd=REPO, capture_output=True,
        text=True, timeout=120,
    )
    assert completed.returncode == 2 and "Traceback" not in completed.stderr, completed.stderr[-2000:]
    assert completed.stderr.strip().splitlines()[-1].startswith("error: lora.target_modules 'nonexistent'")
    assert "Data:" not in completed.stderr  # nothing was loaded


# ----- resume -------------------------------------------------------------------------------------------


def _copied_run(checkpointed_run: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    output_dir = tmp_path / "run"
    shutil.copytree(checkpointed_run / "checkpoints", output_dir / "checkpoints")
    return output_dir, list_checkpoints(output_dir / "checkpoints")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BREAKAGES = {
    "truncated weights": lambda checkpoint: _truncate(checkpoint / "model.safetensors"),
    "truncated best weights": lambda checkpoint: _truncate(checkpoint / "best_state.safetensors"),
    "missing optimizer": lambda checkpoint: (checkpoint / "optimizer.bin").unlink(),
    "truncated optimizer": lambda checkpoint: _truncate(checkpoint / "optimizer.bin"),
    "garbled trainer state": lambda checkpoint: (checkpoint / "trainer_state.json").write_text('{"progress": '),
    "missing random states": lambda checkpoint: (checkpoint / "random_states_0.pkl").unlink(),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_resume_falls_back_to_the_newest_intact_checkpoint(caplog, checkpointed_run, tmp_path, planted_data_dir,
                                                           tiny_encoder_dir, breakage):
    output_dir, (older, latest) = _copied_run(checkpointed_run, tmp_path)
    BREAKAGES[breakage](latest)
    config = _config(planted_data_dir, tiny_encoder_dir, output_dir)
    with caplog.at_level(logging.WARNING, logger="llmrec.training.checkpoints"):
        assert find_checkpoint(config, "latest") == older
    assert any(str(latest) in record.getMessage() and "broken" in record.getMessage() for record in caplog.records)
    with pytest.raises(ConfigError, match="it is broken"):  # asked for by name: refused, not swapped
        find_checkpoint(config, latest)


def test_no_intact_checkpoint_is_a_config_error(checkpointed_run, tmp_path, planted_data_dir, tiny_encoder_dir):
    output_dir, checkpoints = _copied_run(checkpointed_run, tmp_path)
    for checkpoint in checkpoints:
        _truncate(checkpoint / "model.safetensors")
    with pytest.raises(ConfigError, match=r"no intact checkpoint.*2 broken"):
        find_checkpoint(_config(planted_data_dir, tiny_encoder_dir, output_dir), "latest")


def test_unreadable_random_states_are_an_error_unless_ignored(caplog, checkpointed_run, tmp_path, planted_data_dir,
                                                              tiny_encoder_dir):
    output_dir, (_, latest) = _copied_run(checkpointed_run, tmp_path)
    (latest / "random_states_0.pkl").write_bytes(b"not a torch archive")
    config = _config(planted_data_dir, tiny_encoder_dir, output_dir)
    with pytest.raises(ConfigError, match=r"random states .*random_states_0\.pkl.*--resume-ignore-rng"):
        find_checkpoint(config, "latest")
    with caplog.at_level(logging.WARNING, logger="llmrec.training.checkpoints"):
        assert find_checkpoint(config, "latest", ignore_rng_state=True) == latest
    assert any("--resume-ignore-rng" in record.getMessage() for record in caplog.records)


def test_resume_past_a_broken_checkpoint_and_random_states_accelerate_cannot_restore(
    caplog, checkpointed_run, tmp_path, planted_data_dir, tiny_encoder_dir
):
    """The whole run: the latest checkpoint is broken, and the older one's random states are a readable file that
    `Accelerator.load_state` fails to apply (it only logs that); resuming is refused, then allowed when asked."""
    output_dir, (older, latest) = _copied_run(checkpointed_run, tmp_path)
    _truncate(latest / "model.safetensors")
    states_file = older / "random_states_0.pkl"
    states = torch.load(states_file, weights_only=False)  # this test's own checkpoint
    states["torch_manual_seed"] = torch.zeros(3, dtype=torch.uint8)  # torch.set_rng_state rejects this size
    torch.save(states, states_file)
    config = _config(planted_data_dir, tiny_encoder_dir, output_dir)
    with pytest.raises(ConfigError, match="could not be restored"):
        run_finetune(config, resume_from="latest")
    with caplog.at_level(logging.WARNING):
        results = run_finetune(config, resume_from="latest", resume_ignore_rng=True)
    messages = [record.getMessage() for record in caplog.records]
    assert any(str(latest) in message and "broken" in message for message in messages)
    assert any("could not be restored" in message for message in messages)
    assert results["test"]["rerank"]["ndcg@10"] > 0 and (output_dir / "eval_results.json").is_file()


# ----- command line -------------------------------------------------------------------------------------


def test_rebuild_refuses_a_non_empty_target_without_overwrite(capsys, model_dir, tmp_path):
    target = tmp_path / "other-model"
    target.mkdir()
    (target / "config.json").write_text('{"mine": true}')
    (target / "notes.txt").write_text("keep me")
    before = _snapshot(target)
    code, out, err = run_cli(capsys, "index", model_dir, "--rebuild", "--output", target)
    assert_one_error_line(code, err, "--overwrite", str(target))
    assert out == "" and _snapshot(target) == before

    code, out, err = run_cli(capsys, "index", model_dir, "--rebuild", "--output", target, "--overwrite")
    assert code == 0, err
    assert _snapshot(target).keys() == _snapshot(model_dir).keys()  # the rebuilt model, whole, and nothing else
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging folders left


def test_rebuild_into_an_empty_or_new_folder_needs_no_overwrite(capsys, model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "new" / "model"):
        code, _, err = run_cli(capsys, "index", model_dir, "--rebuild", "--output", target)
        assert code == 0 and (target / "item_index.faiss").is_file(), err


def test_rebuild_copy_failure_leaves_the_target_intact(monkeypatch, capsys, model_dir, tmp_path):
    target = tmp_path / "other-model"
    shutil.copytree(model_dir, target)
    (target / "notes.txt").write_text("keep me")
    before = _snapshot(target)
    copied = []

    def copy_until_the_disk_is_full(source, destination, **kwargs):
        if len(copied) == 2:
            raise OSError(28, "No space left on device")
        copied.append(source)
        return shutil.copy2(source, destination, **kwargs)

    real_copytree = shutil.copytree

    def copytree(source, destination, symlinks=False, ignore=None, copy_function=None, *rest, **kwargs):
        # Subfolders recurse through shutil.copytree with positional arguments.
        return real_copytree(source, destination, symlinks, ignore, copy_until_the_disk_is_full, *rest, **kwargs)

    monkeypatch.setattr(shutil, "copytree", copytree)
    code, _, err = run_cli(capsys, "index", model_dir, "--rebuild", "--output", target, "--overwrite")
    assert_one_error_line(code, err, "No space left on device", "left as it was")
    assert _snapshot(target) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other-model"]  # the staging copy is removed


def test_rebuild_refuses_a_target_inside_the_model(capsys, model_dir):
    code, _, err = run_cli(capsys, "index", model_dir, "--rebuild", "--output", model_dir / "sub")
    assert_one_error_line(code, err, "inside")
    assert not (model_dir / "sub").exists()


def test_histories_file_errors_come_before_any_result(capsys, model_dir, tmp_path):
    lines = [json.dumps({"user_id": f"u{number}", "history": ["i1", "i2"]}) for number in range(9)]
    lines.append(json.dumps({"user_id": "bad", "history": ["i1", "ghost"]}))
    histories_file = tmp_path / "users.jsonl"
    histories_file.write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(capsys, "recommend", model_dir, "--histories-file", histories_file, "--batch-size", "2")
    assert out == ""  # before: 8 users' results were printed ahead of the error
    assert_one_error_line(code, err, "line 10", "'ghost'")


def test_latin1_histories_file_names_the_line(capsys, model_dir, tmp_path):
    histories_file = tmp_path / "users.jsonl"
    histories_file.write_bytes(b'{"user_id": "a", "history": ["i1"]}\n' + '{"user_id": "café", "history": ["i1"]}\n'.encode("latin-1"))
    code, out, err = run_cli(capsys, "recommend", model_dir, "--histories-file", histories_file)
    assert out == ""
    assert_one_error_line(code, err, "line 2", "not UTF-8")


@pytest.mark.parametrize(
    "name, content",
    [("eval_results.json", b"{not json"), ("config.yaml", b"training: [1, 2\n"), ("config.yaml", "caf\xe9: 1\n".encode("latin-1"))],
)
def test_unparsable_files_of_the_model_folder_are_one_line(capsys, model_dir, tmp_path, name, content):
    folder = Path(shutil.copytree(model_dir, tmp_path / "model"))
    (folder / name).write_bytes(content)
    code, out, err = run_cli(capsys, "recommend", folder, "--history", "i1", "-k", "2")
    assert out == ""
    assert_one_error_line(code, err)


@pytest.mark.parametrize(
    "content",
    ["training:\n  seed: 1\n  seed: 2\n".encode(), "output_dir: caf\xe9\n".encode("latin-1"), b"training: [1, 2\n"],
)
def test_evaluate_with_a_bad_config_file_is_one_line(capsys, model_dir, tmp_path, content):
    config_file = tmp_path / "config.yaml"
    config_file.write_bytes(content)
    code, _, err = run_cli(capsys, "evaluate", model_dir, "--config", config_file)
    assert_one_error_line(code, err, str(config_file))


def test_k_bounds_are_documented_and_a_refused_k_is_one_line(monkeypatch, capsys, model_dir):
    from llmrec import Recommender

    code, out, _ = run_cli(capsys, "recommend", "--help")
    assert code == 0 and "positive" in out and "hard cap" in out

    def refuse(self, history, k=10, **options):
        raise InvalidRequestError(f"k={k} is above the hard cap")

    monkeypatch.setattr(Recommender, "recommend", refuse)
    code, out, err = run_cli(capsys, "recommend", model_dir, "--history", "i1", "-k", str(10**7))
    assert out == ""
    assert_one_error_line(code, err, "hard cap")
    code, _, err = run_cli(capsys, "recommend", model_dir, "--history", "i1", "-k", "-3")
    assert_one_error_line(code, err, "positive")
