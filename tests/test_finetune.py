"""End-to-end fine-tuning on planted data: outputs, their format, and that the model learns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("popularity", "retrieval", "rerank")
METRICS = ("ndcg@10", "hr@10", "mrr@10", "ndcg@20", "hr@20", "mrr@20")


def assert_run_outputs(output_dir: Path) -> dict:
    """The folder is complete and consistent, and its metrics are those its own saved model reproduces.

    Every @k metric obeys MRR <= NDCG <= HR and grows with k, and HR@k is a whole number of hits; the
    model card, `config.yaml` and `eval_results.json` agree; and re-evaluating the saved folder on the
    run's test and validation users (data split again from `config.yaml`) gives the recorded numbers.
    """
    for name in ("config.json", "model.safetensors", "catalogue.parquet", "item_index.faiss", "tokenizer.json", "eval_results.json", "config.yaml", "README.md"):
        assert (output_dir / name).is_file(), f"{name} missing from {output_dir}"
    results = json.loads((output_dir / "eval_results.json").read_text())
    for split in ("valid", "test"):
        assert set(results[split]) == set(SYSTEMS)
        assert len({results[split][system]["num_users"] for system in SYSTEMS}) == 1, "systems saw different users"
        for system in SYSTEMS:
            assert_metrics_are_consistent(results[split][system], f"{split} {system}")
    for key in ("retrieval_training_seconds", "rerank_training_seconds", "evaluation_seconds", "total_seconds"):
        assert results["timings"][key] > 0
    assert results["config"]["output_dir"] == str(output_dir)
    assert yaml.safe_load((output_dir / "config.yaml").read_text()) == results["config"]
    card = yaml.safe_load((output_dir / "README.md").read_text().split("---\n")[1])
    card_metrics = {metric["type"]: metric["value"] for metric in card["model-index"][0]["results"][0]["metrics"]}
    assert card_metrics == pytest.approx({m.replace("@", "_at_"): results["test"]["rerank"][m] for m in METRICS}, abs=1e-6)
    assert_saved_model_reproduces(output_dir, results)
    return results


def assert_metrics_are_consistent(metrics: dict, label: str) -> None:
    users = metrics["num_users"]
    assert isinstance(users, int) and users > 0, label
    for k in (10, 20):
        mrr, ndcg, hr = metrics[f"mrr@{k}"], metrics[f"ndcg@{k}"], metrics[f"hr@{k}"]
        assert 0.0 <= mrr <= ndcg + 1e-9 and ndcg <= hr + 1e-9 and hr <= 1.0, (label, k, metrics)
        assert abs(hr * users - round(hr * users)) < 1e-6, f"{label}: hr@{k} {hr} is not a count of hits over {users} users"
    for name in ("mrr", "ndcg", "hr"):
        assert metrics[f"{name}@10"] <= metrics[f"{name}@20"] + 1e-9, (label, name, metrics)
    # Diversity of the same top-k lists: a longer list reaches at least as much of the catalogue.
    assert 0.0 < metrics["coverage@10"] <= metrics["coverage@20"] <= 1.0, (label, metrics)
    for k in (10, 20):
        assert 0.0 < metrics[f"ild@{k}"] <= 2.0 and 0.0 < metrics[f"popularity_percentile@{k}"] <= 1.0, (label, k, metrics)


def assert_saved_model_reproduces(output_dir: Path, results: dict) -> None:
    """Evaluate the saved folder again, in this process, on users split again from the run's own config: the
    ranking metrics and the diversity of the same pass's top-k lists."""
    import numpy as np
    import torch

    from llmrec import Recommender
    from llmrec.config import load_config
    from llmrec.data import build_split, load_interaction_data
    from llmrec.evaluation import diversity_metrics, evaluate_ranking, popularity_scores
    from llmrec.training.trainer import rerank_score_function, retrieval_score_function

    config = load_config(overrides=results["config"])
    split = build_split(load_interaction_data(config.data), config.data)
    recommender = Recommender.from_pretrained(output_dir)
    assert list(recommender.item_ids) == list(split.item_ids)
    popularity = np.concatenate([[0.0], np.asarray(recommender.item_popularity, dtype=float)])
    np.testing.assert_allclose(popularity, split.item_popularity())
    systems = {
        "popularity": popularity_scores(popularity),
        "retrieval": retrieval_score_function(recommender.pipeline, split.num_items),
        "rerank": rerank_score_function(recommender.pipeline, split.num_items),
    }
    ks = config.evaluation.ks
    for split_name, examples in (("valid", split.valid), ("test", split.test)):
        for system, score_fn in systems.items():
            top_items = torch.zeros((len(examples.histories), max(ks)), dtype=torch.long)
            again = evaluate_ranking(score_fn, examples.histories, examples.targets, split.num_items, ks=ks,
                                     top_items_out=top_items)
            again.update(diversity_metrics(top_items, split.num_items, ks, recommender.model.item_text_embeddings, popularity))
            assert again == pytest.approx(results[split_name][system], abs=1e-6), (split_name, system)


def test_finetune_writes_model_index_and_results(trained_run):
    output_dir, _ = trained_run
    assert_run_outputs(output_dir)
    assert not list(output_dir.glob(".staging-*")), "staging folders must not be left behind"


def test_finetune_beats_popularity_on_planted_preferences(trained_run):
    _, results = trained_run
    test = results["test"]
    # Popularity is nearly flat here by construction; the genre cycle is only learnable from histories.
    assert test["popularity"]["hr@10"] < 0.5
    assert test["retrieval"]["ndcg@10"] > test["popularity"]["ndcg@10"] + 0.2
    assert test["rerank"]["ndcg@10"] > test["popularity"]["ndcg@10"] + 0.2
    assert test["rerank"]["hr@10"] > 0.8


def _run_script(command: list[str], tmp_path: Path, overrides: dict) -> subprocess.CompletedProcess:
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(overrides))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        command + ["--config", str(config_file)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_script_with_cli_overrides(tmp_path, planted_data_dir, tiny_encoder_dir):
    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "unused")
    completed = _run_script(
        [sys.executable, "scripts/finetune.py", "--output_dir", str(tmp_path / "out"),
         "--training.retrieval_epochs", "2", "--training.rerank_epochs=1"],
        tmp_path,
        overrides,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = assert_run_outputs(tmp_path / "out")
    assert results["config"]["training"]["retrieval_epochs"] == 2
    assert results["config"]["training"]["rerank_epochs"] == 1


def _launch_two_processes(launch_config: str, launch_flags: list[str], tmp_path: Path, overrides: dict) -> dict:
    """`accelerate launch` a shipped launch config on CPU; the run must finish, complete and consistent, with 2
    processes, which Accelerate runs as DDP over gloo (MULTI_CPU) when no GPU is present."""
    completed = _run_script(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate" / launch_config),
         *launch_flags, "scripts/finetune.py"],
        tmp_path,
        overrides,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = assert_run_outputs(Path(overrides["output_dir"]))
    assert results["num_processes"] == 2
    assert "2 process(es), MULTI_CPU." in completed.stderr
    return results


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path, planted_data_dir, tiny_encoder_dir):
    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "ddp")
    overrides["training"].update({"retrieval_epochs": 3, "rerank_epochs": 2})
    two = _launch_two_processes("cpu_ddp.yaml", [], tmp_path, overrides)
    # One process with the same global batch (DDP's per-process batches side by side): the evaluation sees the
    # same users and gives popularity the same numbers, and training reaches the same quality, not the same
    # weights (the two runs order and split the batches differently).
    from llmrec.config import load_config
    from llmrec.training import run_finetune

    overrides["output_dir"] = str(tmp_path / "one")
    for name in ("retrieval_batch_size", "rerank_batch_size"):
        overrides["training"][name] *= 2
    one = run_finetune(load_config(overrides=overrides))
    for split in ("valid", "test"):
        assert two[split]["popularity"] == pytest.approx(one[split]["popularity"], abs=1e-9), split
        for system in ("retrieval", "rerank"):
            assert two[split][system]["num_users"] == one[split][system]["num_users"]
            assert two[split][system]["ndcg@10"] == pytest.approx(one[split][system]["ndcg@10"], abs=0.15), (split, system)


@pytest.mark.slow
def test_fsdp_config_runs_lora_on_cpu_as_ddp(tmp_path, planted_data_dir, tiny_encoder_dir):
    """The shipped FSDP config (LoRA, BertLayer wrapping) runs on CPU with the three overrides torch needs
    there (no rank-0 sync, no rank-0-only loading, no bf16). Accelerate turns FSDP on only for GPUs and other
    accelerators, so on CPU it trains as DDP over gloo: this checks the config and the LoRA path under 2
    processes, not FSDP's sharding, which needs a GPU."""
    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "fsdp")
    overrides["training"].update({"retrieval_epochs": 2, "rerank_epochs": 1, "num_sampled_negatives": 16})
    overrides["lora"] = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}
    _launch_two_processes(
        "fsdp.yaml",
        ["--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false", "--mixed_precision", "no"],
        tmp_path,
        overrides,
    )
    assert (tmp_path / "fsdp" / "encoder_adapter" / "adapter_model.safetensors").is_file()


def test_script_reports_config_errors_without_traceback(tmp_path):
    completed = subprocess.run(
        [sys.executable, "scripts/finetune.py", "--training.retrieval_epoch", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2
    assert "Unknown config key 'retrieval_epoch'" in completed.stderr
    assert "Did you mean 'retrieval_epochs'" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.slow
def test_bf16_mixed_precision_and_step_checkpoints(tmp_path, planted_data_dir, tiny_encoder_dir):
    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, tmp_path / "bf16")
    overrides["training"].update(
        {"retrieval_epochs": 2, "rerank_epochs": 1, "mixed_precision": "bf16", "checkpoint_every_steps": 2,
         "gradient_accumulation_steps": 2}
    )
    completed = _run_script([sys.executable, "scripts/finetune.py"], tmp_path, overrides)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = assert_run_outputs(tmp_path / "bf16")
    assert results["config"]["training"]["mixed_precision"] == "bf16"
    checkpoints = sorted(path.name for path in (tmp_path / "bf16" / "checkpoints").iterdir())
    assert 1 <= len(checkpoints) <= 2, checkpoints  # only the most recent two are kept
    assert all((tmp_path / "bf16" / "checkpoints" / name / "model.safetensors").is_file() for name in checkpoints)
