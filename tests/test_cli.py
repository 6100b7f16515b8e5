"""The `llmrec` command line on the trained planted-data model: each command in-process, one installed-script check."""

from __future__ import annotations

import csv
import importlib.util
import inspect
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from llmrec import Recommender
from llmrec.cli import main

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _supports(method: str, parameter: str) -> bool:
    return parameter in inspect.signature(getattr(Recommender, method, lambda: None)).parameters


needs_filters = pytest.mark.skipif(
    not _supports("recommend", "exclude"), reason="Recommender.recommend has no exclude/filter yet"
)
needs_add_items = pytest.mark.skipif(not hasattr(Recommender, "add_items"), reason="Recommender.add_items not there yet")


@pytest.fixture(scope="module")
def model_dir(trained_run) -> str:
    return str(trained_run[0])


@pytest.fixture(scope="module")
def recommender(model_dir) -> Recommender:
    return Recommender.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def user_history(planted_data_dir) -> list[str]:
    with open(planted_data_dir / "interactions.csv") as handle:
        return [row["item_id"] for row in csv.DictReader(handle) if row["user_id"] == "u1"][:-1]


@pytest.fixture
def model_copy(model_dir, tmp_path) -> Path:
    """Commands that write into MODEL get their own copy: the trained folder is shared by the session."""
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(argument) for argument in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _records(ranked: list[tuple[str, float]]) -> list[dict]:
    return [{"item_id": item_id, "score": score} for item_id, score in ranked]


def assert_ranked_equal(records: list[dict], expected: list[tuple[str, float]]) -> None:
    assert [record["item_id"] for record in records] == [item_id for item_id, _ in expected]
    np.testing.assert_allclose([record["score"] for record in records], [score for _, score in expected], rtol=1e-6)


# ----- recommend / rerank -------------------------------------------------------------------------------


def test_recommend_matches_the_python_api(capsys, model_dir, recommender, user_history):
    code, out, _ = run_cli(capsys, "recommend", model_dir, "--history", *user_history, "-k", "5", "--json")
    assert code == 0
    assert_ranked_equal(json.loads(out), recommender.recommend(user_history, k=5))

    code, out, _ = run_cli(capsys, "recommend", model_dir, "--history", *user_history, "-k", "3")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["rank", "item_id", "score", "text"] and len(lines) == 4
    top_item, top_score = recommender.recommend(user_history, k=1)[0]
    assert lines[1].split()[:3] == ["1", top_item, f"{top_score:.4f}"]
    assert "genre" in lines[1]  # the item's text is shown for people


@needs_filters
def test_recommend_exclude_and_only(capsys, model_dir, recommender, user_history):
    top = [item_id for item_id, _ in recommender.recommend(user_history, k=3)]
    code, out, _ = run_cli(capsys, "recommend", model_dir, "--history", *user_history, "-k", "3", "--exclude", top[0], "--json")
    assert code == 0 and top[0] not in [record["item_id"] for record in json.loads(out)]
    allowed = ["i0", "i41", "i77"]
    code, out, _ = run_cli(capsys, "recommend", model_dir, "--history", *user_history, "--only", *allowed, "--json")
    assert code == 0
    records = json.loads(out)
    assert records and {record["item_id"] for record in records} <= set(allowed)
    assert_ranked_equal(records, recommender.recommend(user_history, k=10, filter=allowed))


def test_recommend_batch_file_writes_jsonl(capsys, model_dir, recommender, user_history, tmp_path):
    histories = {"u1": user_history, "cold": [], "short": user_history[:2]}
    histories_file = tmp_path / "users.jsonl"
    histories_file.write_text("".join(json.dumps({"user_id": user, "history": history}) + "\n" for user, history in histories.items()))
    output = tmp_path / "out" / "recs.jsonl"
    code, out, _ = run_cli(capsys, "recommend", model_dir, "--histories-file", histories_file, "-k", "4",
                           "--batch-size", "2", "--output", output)
    assert code == 0 and out == ""
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["user_id"] for line in lines] == list(histories)
    for line, expected in zip(lines, recommender.recommend_batch(list(histories.values()), k=4)):
        assert_ranked_equal(line["recommendations"], expected)

    code, out, _ = run_cli(capsys, "recommend", model_dir, "--histories-file", histories_file, "-k", "4")
    assert code == 0
    for line, saved in zip([json.loads(line) for line in out.splitlines()], lines, strict=True):
        assert line["user_id"] == saved["user_id"]
        assert_ranked_equal(line["recommendations"], [(item["item_id"], item["score"]) for item in saved["recommendations"]])


def test_rerank_matches_the_python_api(capsys, model_dir, recommender, user_history):
    candidates = ["i1", "i5", "i30", "i62"]
    code, out, _ = run_cli(capsys, "rerank", model_dir, "--history", *user_history, "--candidates", *candidates, "--json")
    assert code == 0
    assert_ranked_equal(json.loads(out), recommender.rerank(user_history, candidates))


# ----- evaluate -----------------------------------------------------------------------------------------


def test_evaluate_reproduces_eval_results(capsys, model_dir, tmp_path):
    saved = json.loads((Path(model_dir) / "eval_results.json").read_text())
    output = tmp_path / "results.json"
    code, out, _ = run_cli(capsys, "evaluate", model_dir, "--config", Path(model_dir) / "config.yaml", "--output", output)
    assert code == 0
    results = json.loads(output.read_text())
    assert set(results) == {"valid", "test"}
    for split_name in ("valid", "test"):
        assert set(results[split_name]) == {"popularity", "retrieval", "rerank"}
        for system, metrics in results[split_name].items():
            assert metrics.keys() == saved[split_name][system].keys()
            for name, value in metrics.items():
                assert value == pytest.approx(saved[split_name][system][name], abs=1e-6), (split_name, system, name)
    header, *rows = out.splitlines()
    assert header.split()[:2] == ["split", "system"] and "ndcg@10" in header.split() and len(rows) == 6
    assert rows[0].split()[:2] == ["valid", "popularity"]

    code, out, _ = run_cli(capsys, "evaluate", model_dir, "--config", Path(model_dir) / "config.yaml", "--split", "test", "--json")
    assert code == 0 and json.loads(out) == {"test": results["test"]}


def test_evaluate_names_items_the_model_lacks(capsys, model_dir, planted_data_dir, tmp_path):
    data_dir = Path(shutil.copytree(planted_data_dir, tmp_path / "data"))
    with open(data_dir / "items.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["brand-new", "movie number 3", "g1"])
    config = yaml.safe_load((Path(model_dir) / "config.yaml").read_text())
    config["data"]["path"] = str(data_dir)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    code, _, err = run_cli(capsys, "evaluate", model_dir, "--config", config_file)
    assert code == 2 and err.startswith("error: ") and "'brand-new'" in err and "Traceback" not in err


# ----- index --------------------------------------------------------------------------------------------


@needs_add_items
def test_index_add_items_then_recommend_them(capsys, model_copy, user_history, tmp_path):
    items_file = tmp_path / "new.jsonl"
    items_file.write_text(json.dumps({"sku": "new-1", "title": "movie number 7 genre g1"}) + "\n")
    code, out, _ = run_cli(capsys, "index", model_copy, "--add-items", items_file, "--id-column", "sku",
                           "--text-column", "title", "--json")
    assert code == 0 and json.loads(out)["added"] == 1
    reloaded = Recommender.from_pretrained(model_copy)
    assert reloaded.item_ids[-1] == "new-1" and reloaded.item_texts[-1] == "movie number 7 genre g1"
    everything = reloaded.recommend(user_history, k=len(reloaded.item_ids))
    assert "new-1" in [item_id for item_id, _ in everything]
    code, out, _ = run_cli(capsys, "recommend", model_copy, "--history", *user_history, "-k", len(reloaded.item_ids), "--json")
    assert code == 0 and "new-1" in [record["item_id"] for record in json.loads(out)]


def test_index_rebuild_saves_an_equivalent_model_elsewhere(capsys, model_dir, recommender, user_history, tmp_path):
    output = tmp_path / "rebuilt"
    code, out, _ = run_cli(capsys, "index", model_dir, "--rebuild", "--output", output)
    assert code == 0 and "Rebuilt" in out
    rebuilt = Recommender.from_pretrained(output)
    assert_ranked_equal(_records(rebuilt.recommend(user_history, k=5)), recommender.recommend(user_history, k=5))
    assert (output / "eval_results.json").is_file()  # the run's metadata travels with the model


def test_index_rebuild_repairs_a_stale_index(capsys, model_copy, recommender, user_history):
    from llmrec.errors import ModelFolderError
    from llmrec.recommender import INDEX_FILE
    from llmrec.retrieval import ItemIndex

    stale = ItemIndex.build(np.random.default_rng(0).normal(size=(3, recommender.model.config.hidden_size)))
    stale.save(model_copy / INDEX_FILE)
    with pytest.raises(ModelFolderError, match="--rebuild"):
        Recommender.from_pretrained(model_copy)
    code, out, _ = run_cli(capsys, "index", model_copy, "--rebuild", "--json")
    assert code == 0 and json.loads(out) == {"rebuilt": True, "num_items": 80, "saved_to": str(model_copy)}
    repaired = Recommender.from_pretrained(model_copy)
    assert_ranked_equal(_records(repaired.recommend(user_history, k=5)), recommender.recommend(user_history, k=5))


def test_index_rebuild_keeps_an_approximate_index_type(capsys, model_copy, recommender):
    from llmrec.recommender import INDEX_FILE
    from llmrec.retrieval import ItemIndex

    vectors = recommender.pipeline.item_embeddings[1:].float().numpy()
    ItemIndex.build(vectors, index_type="hnsw", M=8, efSearch=50).save(model_copy / INDEX_FILE)
    code, _, _ = run_cli(capsys, "index", model_copy, "--rebuild")
    assert code == 0
    rebuilt = ItemIndex.load(model_copy / INDEX_FILE)
    assert rebuilt.index_type == "hnsw" and rebuilt.params["M"] == 8 and rebuilt.params["efSearch"] == 50


def test_index_reports_missing_columns(capsys, model_copy, tmp_path):
    items_file = tmp_path / "new.csv"
    items_file.write_text("id,title\nnew-1,something\n")
    code, _, err = run_cli(capsys, "index", model_copy, "--add-items", items_file)
    assert code == 2 and "'item_id'" in err and "--id-column" in err


# ----- explain and heatmaps -----------------------------------------------------------------------------


def assert_valid_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, channels = imread(path).shape
    assert height > 50 and width > 50 and channels in (3, 4)
    assert not [leftover for leftover in path.parent.iterdir() if leftover.name.startswith(".")]  # no temporaries


def test_explain_weights_sum_to_one_and_draw(capsys, model_dir, recommender, user_history, tmp_path):
    history = user_history[-6:]
    item = recommender.recommend(history, k=1)[0][0]
    png = tmp_path / "attention.png"
    code, out, _ = run_cli(capsys, "explain", model_dir, "--history", *history, "--item", item, "--json", "--png", png)
    assert code == 0
    explained = json.loads(out)
    assert [row["item_id"] for row in explained["history"]] == history
    assert sum(row["weight"] for row in explained["history"]) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose([row["weight"] for row in explained["history"]],
                               [weight for _, weight in recommender.explain(history, item)], rtol=1e-6)
    assert_valid_png(png)

    code, out, _ = run_cli(capsys, "explain", model_dir, "--history", *history, "--item", item, "--per-head")
    assert code == 0
    header, *rows = out.splitlines()[1:]
    assert header.split() == ["history_item", "head1", "head2", "mean", "text"] and len(rows) == len(history)
    assert sum(float(row.split()[3]) for row in rows) == pytest.approx(1.0, abs=1e-3)


def test_per_head_heatmap_and_missing_matplotlib(monkeypatch, capsys, model_dir, recommender, user_history, tmp_path):
    from llmrec.visualization import attention_matrix, plot_attention_heatmap

    items = [item_id for item_id, _ in recommender.recommend(user_history, k=3)]
    rows, weights = attention_matrix(recommender, user_history, items, per_head=True)
    assert weights.shape == (2, len(rows), 3)
    np.testing.assert_allclose(weights.mean(axis=0).sum(axis=0), 1.0, atol=1e-5)
    assert_valid_png(plot_attention_heatmap(recommender, user_history, items, tmp_path / "heads.png", per_head=True))
    with pytest.raises(ValueError, match=".png"):
        plot_attention_heatmap(recommender, user_history, items, tmp_path / "heads.docx")

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"llmrec\[plot\]"):
        plot_attention_heatmap(recommender, user_history, items, tmp_path / "none.png")
    code, _, err = run_cli(capsys, "explain", model_dir, "--history", *user_history, "--item", items[0], "--png", tmp_path / "x.png")
    assert code == 2 and "llmrec[plot]" in err


def test_explain_script_draws_history_by_recommendations(capsys, model_dir, user_history, tmp_path):
    spec = importlib.util.spec_from_file_location("explain_script", REPO / "scripts" / "explain.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    output = tmp_path / "attention.png"
    assert script.main([model_dir, "--history", *user_history[-5:], "-k", "4", "--output", str(output)]) == 0
    assert_valid_png(output)
    assert script.main([model_dir, "--history", "nope", "--output", str(output)]) == 2
    assert "'nope'" in capsys.readouterr().err


# ----- push ---------------------------------------------------------------------------------------------


def test_push_passes_its_options_to_the_hub_module(monkeypatch, capsys, model_dir):
    calls = []

    def fake_push_to_hub(folder, repo_id, *, private=None, token=None, commit_message="", dry_run=False):
        calls.append((folder, repo_id, private, token, dry_run, commit_message))
        return ["config.json", "model.safetensors"]

    monkeypatch.setitem(sys.modules, "llmrec.hub", types.SimpleNamespace(push_to_hub=fake_push_to_hub))
    code, out, _ = run_cli(
        capsys, "push", model_dir, "me/tiny", "--private", "--token", "hf_x", "--dry-run", "--commit-message", "v2"
    )
    assert code == 0 and calls == [(model_dir, "me/tiny", True, "hf_x", True, "v2")]
    assert "Would upload 2 file(s)" in out and "model.safetensors" in out
    code, out, _ = run_cli(capsys, "push", model_dir, "me/tiny", "--json")
    assert code == 0 and calls[-1][2:] == (None, None, False, "Upload llmrec model") and json.loads(out)["files"] == ["config.json", "model.safetensors"]


def test_push_dry_run_lists_the_model_files(capsys, model_dir):
    code, out, _ = run_cli(capsys, "push", model_dir, "me/tiny", "--dry-run", "--json")
    assert code == 0
    files = json.loads(out)["files"]
    assert {"config.json", "model.safetensors", "catalogue.parquet", "item_index.faiss", "README.md"} <= set(files)


# ----- errors -------------------------------------------------------------------------------------------


def test_errors_are_one_line_with_exit_code_2(capsys, model_dir, tmp_path):
    code, out, err = run_cli(capsys, "recommend", model_dir, "--history", "i1", "nope", "i2")
    assert (code, out) == (2, "") and err.startswith("error: ") and "'nope'" in err and len(err.splitlines()) == 1
    code, _, err = run_cli(capsys, "rerank", model_dir, "--history", "i1", "--candidates", "i2", "ghost")
    assert code == 2 and "'ghost'" in err
    code, _, err = run_cli(capsys, "recommend", tmp_path / "no-such-model", "--history", "i1")
    assert code == 2 and err.startswith("error: ") and "no-such-model" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "recommend", model_dir, "-k", "0", "--history", "i1")
    assert code == 2 and err.startswith("error: ") and "positive" in err and len(err.splitlines()) == 1
    code, _, err = run_cli(capsys, "explain", model_dir, "--history", "i1")
    assert code == 2 and "--item" in err and "llmrec explain --help" in err
    bad_file = tmp_path / "users.jsonl"
    bad_file.write_text('{"user_id": "a", "history": ["i1"]}\n{"user_id": "b", "history": ["i2", "zzz"]}\n')
    code, _, err = run_cli(capsys, "recommend", model_dir, "--histories-file", bad_file)
    assert code == 2 and "line 2" in err and "'zzz'" in err


def test_installed_console_script_prints_help():
    executable = shutil.which("llmrec")
    assert executable, "the llmrec console script is not installed; run `pip install -e .`"
    completed = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    for command in ("recommend", "rerank", "evaluate", "index", "explain", "push"):
        assert command in completed.stdout


def test_no_verify_skips_the_checksums_of_a_changed_file(capsys, model_copy, user_history):
    results = model_copy / "eval_results.json"
    edited = {**json.loads(results.read_text()), "note": "edited by hand"}  # still valid, but not what was saved
    results.write_text(json.dumps(edited))
    code, _, err = run_cli(capsys, "recommend", str(model_copy), "--history", *user_history, "-k", "3")
    assert code == 2 and "eval_results.json" in err and "--no-verify" in err
    code, out, _ = run_cli(capsys, "recommend", str(model_copy), "--history", *user_history, "-k", "3", "--no-verify", "--json")
    assert code == 0 and len(json.loads(out)) == 3
