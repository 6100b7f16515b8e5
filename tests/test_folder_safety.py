"""Loading a model folder safely (issue 13): no code from the folder, no half-random weights, the exact
tokenizer, typed settings, recorded checksums and no links out of the folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from llmrec import LlmRecError, ModelFolderError, Recommender
from llmrec.errors import ConfigError
from llmrec.modeling import MAX_NUM_CANDIDATES, LlmRecConfig, LlmRecModel
from llmrec.modeling.text_encoding import encode_catalogue, tokenize_item_texts
from llmrec.utils.integrity import CHECKSUMS_KEY, record_checksums

REPO = Path(__file__).resolve().parents[1]
ITEM_IDS = [f"i{index}" for index in range(8)]
ITEM_TEXTS = [f"movie number {index} genre g{index % 4}" for index in range(8)]
HISTORY = ["i0", "i1"]


def _tiny_recommender(encoder_dir: Path, **config_kwargs) -> Recommender:
    torch.manual_seed(0)
    model = LlmRecModel.from_encoder(
        str(encoder_dir), num_items=len(ITEM_IDS), hidden_size=16, user_num_heads=2, rerank_num_heads=2,
        max_text_length=16, max_history_length=8, num_candidates=5, **config_kwargs,
    )
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    encode_catalogue(model, tokenize_item_texts(tokenizer, ITEM_TEXTS, 16), show_progress=False)
    model.warm_items[1:] = True
    return Recommender(model, tokenizer, ITEM_IDS, ITEM_TEXTS, list(range(len(ITEM_IDS), 0, -1)),
                       eval_results={"test": {"retrieval": {"ndcg@10": 0.5}}}, training_config={"seed": 1})


@pytest.fixture(scope="module")
def saved(tiny_encoder_dir, tmp_path_factory) -> Path:
    """A saved tiny model folder (untrained: loading, not ranking quality, is under test)."""
    folder = tmp_path_factory.mktemp("safety") / "model"
    _tiny_recommender(tiny_encoder_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def expected(saved) -> list:
    return Recommender.from_pretrained(saved).recommend(HISTORY, k=5)


def _copy(folder: Path, tmp_path: Path, checksums: bool = True) -> Path:
    """A private copy; without `checksums` it is a folder as saved before they were recorded."""
    copy = tmp_path / "model"
    shutil.copytree(folder, copy, symlinks=True)
    if not checksums:
        _edit_config(copy, **{CHECKSUMS_KEY: None})
    return copy


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    config = {key: value for key, value in config.items() if value is not None}
    (folder / "config.json").write_text(json.dumps(config))


def _edit_json(path: Path, **changes) -> None:
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))


# ----- defect 1: a folder never runs its own code ------------------------------------------------------

_EVIL_CODE = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


def _plant_custom_code(folder: Path, marker: Path, where: str) -> None:
    """What makes transformers offer to run a folder's code: an auto_map naming a class in a .py beside it."""
    (folder / "evil_tokenizer.py").write_text(_EVIL_CODE.format(marker=str(marker)) + "class EvilTokenizer: pass\n")
    auto_map = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None], "AutoConfig": "evil_tokenizer.EvilTokenizer"}
    if where == "tokenizer_config.json":
        tokenizer_config = json.loads((folder / where).read_text())
        tokenizer_config.pop("tokenizer_class", None)  # no local class: transformers asks "run custom code?"
        tokenizer_config["auto_map"] = auto_map
        (folder / where).write_text(json.dumps(tokenizer_config))
    elif where == "config.json":
        _edit_config(folder, auto_map=auto_map)
    elif where == "encoder_config":
        config = json.loads((folder / "config.json").read_text())
        config["encoder_config"]["auto_map"] = auto_map
        (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("where", ["tokenizer_config.json", "config.json", "encoder_config", "only a .py file"])
def test_a_folder_with_custom_code_is_refused_and_runs_nothing(saved, tmp_path, where):
    folder, marker = _copy(saved, tmp_path), tmp_path / "marker"
    _plant_custom_code(folder, marker, where)
    for verify in (True, False):
        with pytest.raises(ModelFolderError, match="carries code"):
            Recommender.from_pretrained(folder, verify=verify)
    assert not marker.exists()


def test_custom_code_is_refused_by_the_cli_even_when_stdin_says_yes(saved, tmp_path):
    """transformers asks "run custom code? [y/N]" on stdin; a `y` piped into `llmrec recommend` ran it."""
    folder, marker = _copy(saved, tmp_path, checksums=False), tmp_path / "marker"
    _plant_custom_code(folder, marker, "tokenizer_config.json")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", "import sys; from llmrec.cli import main; sys.exit(main())", "recommend", str(folder),
         "--history", *HISTORY],
        input="y\n", capture_output=True, text=True, timeout=60, env=env,
    )
    assert not marker.exists(), "the folder's code ran"
    assert completed.returncode == 2 and "error:" in completed.stderr and "carries code" in completed.stderr


def test_a_top_level_adapter_config_cannot_redirect_loading(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "someone/else", "peft_type": "LORA"}))
    with pytest.raises(ModelFolderError, match="adapter_config.json"):
        Recommender.from_pretrained(folder)


# ----- defect 3: no weights load as random values ------------------------------------------------------


def _rewrite_weights(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


STRICT_CASES = {
    "tensor deleted": (lambda f: _rewrite_weights(f, lambda t: t.pop("text_projection.weight")), "missing.*text_projection.weight"),
    "tensor added": (lambda f: _rewrite_weights(f, lambda t: t.update(extra=torch.zeros(2))), "unexpected.*extra"),
    "profiles switched on": (lambda f: _edit_config(f, use_user_profiles=True), "missing.*profile_projection"),
    "one more user layer": (lambda f: _edit_config(f, user_num_layers=3), "user_num_layers is 3 but the weights hold 2"),
    "one user layer fewer": (lambda f: _edit_config(f, user_num_layers=1), "user_num_layers is 1 but the weights hold 2"),
    "ID embeddings switched off": (lambda f: _edit_config(f, use_id_embeddings=False), "unexpected.*item_id_embeddings"),
    "history summary switched on": (lambda f: _edit_config(f, history_summary=True), "missing.*summary_projection"),
    "other shape": (lambda f: _edit_config(f, hidden_size=8, user_num_heads=2, rerank_num_heads=2), "hidden_size is 8 but the weights hold 16"),
    "longer history window": (lambda f: _edit_config(f, max_history_length=9), "max_history_length is 9 but the weights hold 8"),
    # Checked from the weights file's header before building: the model itself would ask for ~1 TB.
    "num_items 10^10": (lambda f: _edit_config(f, num_items=10**10), "num_items is 10000000000 but the weights hold 8"),
    "tensor renamed": (lambda f: _rewrite_weights(f, lambda t: t.update(text_projection_weight=t.pop("text_projection.weight"))),
                      "missing.*text_projection.weight.*unexpected.*text_projection_weight"),
}


@pytest.mark.parametrize("case", sorted(STRICT_CASES))
def test_weights_that_do_not_match_the_config_are_refused_naming_the_tensors(saved, tmp_path, case):
    """A folder without recorded checksums (as saved before them): strict loading alone must catch it."""
    folder = _copy(saved, tmp_path, checksums=False)
    breakage, message = STRICT_CASES[case]
    breakage(folder)
    with pytest.raises(ModelFolderError, match=message):
        Recommender.from_pretrained(folder)


@pytest.fixture(scope="module")
def lora_saved(tiny_encoder_dir, tmp_path_factory) -> Path:
    from llmrec.config import load_config
    from llmrec.training.pipeline import add_lora

    recommender = _tiny_recommender(tiny_encoder_dir)
    add_lora(recommender.model, load_config(overrides={"lora": {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]}}))
    folder = tmp_path_factory.mktemp("lora") / "model"
    recommender.save_pretrained(folder)
    return folder


def test_an_adapter_folder_records_and_loads_strictly(lora_saved, tmp_path):
    recorded = json.loads((lora_saved / "config.json").read_text())[CHECKSUMS_KEY]
    assert {"encoder_adapter/adapter_config.json", "encoder_adapter/adapter_model.safetensors"} <= set(recorded)
    assert Recommender.from_pretrained(lora_saved).recommend(HISTORY, k=3)
    folder = _copy(lora_saved, tmp_path, checksums=False)
    adapter_file = folder / "encoder_adapter" / "adapter_model.safetensors"
    tensors = load_file(adapter_file)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, adapter_file, metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match="missing"):
        Recommender.from_pretrained(folder)
    folder_b = tmp_path / "b"
    shutil.copytree(lora_saved, folder_b)
    _edit_config(folder_b, **{CHECKSUMS_KEY: None})
    _rewrite_weights(folder_b, lambda t: t.pop("reranker.retrieval_weight"))
    with pytest.raises(ModelFolderError, match="missing.*reranker.retrieval_weight"):
        Recommender.from_pretrained(folder_b)


# ----- defect 9: the tokenizer is loaded exactly or not at all -------------------------------------------


def _shrink_vocabulary(folder: Path) -> None:
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"] = dict(list(tokenizer["model"]["vocab"].items())[:7])
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))


def _shift_ids(folder: Path) -> None:
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"] = {word: index + 1000 for word, index in tokenizer["model"]["vocab"].items()}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))


TOKENIZER_CASES = {
    "deleted": (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "garbled bytes": (lambda f: (f / "tokenizer.json").write_bytes(b"\x00{garbled"), "tokenizer.json"),
    "empty object": (lambda f: (f / "tokenizer.json").write_text("{}"), "tokenizer.json"),
    "null": (lambda f: (f / "tokenizer.json").write_text("null"), "tokenizer.json"),
    "vocabulary of another model": (_shrink_vocabulary, "7 tokens for an encoder of"),
    "ids beyond the encoder": (_shift_ids, "token ids up to"),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_CASES))
def test_a_tokenizer_that_cannot_be_loaded_exactly_is_refused(saved, tmp_path, case):
    folder = _copy(saved, tmp_path, checksums=False)
    breakage, message = TOKENIZER_CASES[case]
    breakage(folder)
    with pytest.raises(ModelFolderError, match=message):
        Recommender.from_pretrained(folder)


# ----- weak cases: every bad file is a ModelFolderError naming it ----------------------------------------

WEAK_CASES = {
    "config is a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json holds a JSON list"),
    "config is null": (lambda f: (f / "config.json").write_text("null"), "config.json holds a JSON null"),
    "eval results not JSON": (lambda f: (f / "eval_results.json").write_text("{"), "eval_results.json is not valid JSON"),
    "eval results not UTF-8": (lambda f: (f / "eval_results.json").write_bytes(b'{"a": "\xff"}'), "eval_results.json"),
    "eval results a list": (lambda f: (f / "eval_results.json").write_text("[]"), "eval_results.json holds a list"),
    "config.yaml not YAML": (lambda f: (f / "config.yaml").write_text("a: [\n"), "config.yaml is not valid YAML"),
    "config.yaml not UTF-8": (lambda f: (f / "config.yaml").write_bytes(b"\xff\xfe: 1"), "config.yaml"),
    "config.yaml a string": (lambda f: (f / "config.yaml").write_text("just text"), "config.yaml holds a str"),
    "sidecar normalize is a string": (lambda f: _edit_json(f / "item_index.faiss.json", normalize="false"), "'normalize' is 'false'"),
    "sidecar dim is a string": (lambda f: _edit_json(f / "item_index.faiss.json", dim="16"), "'dim' is '16'"),
    "sidecar version is true": (lambda f: _edit_json(f / "item_index.faiss.json", format_version=True), "'format_version'"),
    "sidecar params not a mapping": (lambda f: _edit_json(f / "item_index.faiss.json", params=[1]), "'params'"),
    "sidecar is a list": (lambda f: (f / "item_index.faiss.json").write_text("[]"), "item_index.faiss.json is corrupt"),
    "max_text_length 10^9": (lambda f: _edit_config(f, max_text_length=10**9), "max_text_length"),
    "max_text_length a string": (lambda f: _edit_config(f, max_text_length="16"), "max_text_length"),
    "num_candidates 0": (lambda f: _edit_config(f, num_candidates=0), f"num_candidates must be an integer from 1 to {MAX_NUM_CANDIDATES}"),
    "num_candidates -5": (lambda f: _edit_config(f, num_candidates=-5), "num_candidates must be an integer from 1 to"),
    "num_candidates 10^12": (lambda f: _edit_config(f, num_candidates=10**12), "num_candidates must be an integer from 1 to"),
    "flag as a string": (lambda f: _edit_config(f, use_user_profiles="false"), "use_user_profiles must be true or false"),
    "dropout 2": (lambda f: _edit_config(f, dropout=2), "dropout"),
    "encoder_config a list": (lambda f: _edit_config(f, encoder_config=[1]), "encoder_config"),
    "checksums malformed": (lambda f: _edit_config(f, **{CHECKSUMS_KEY: ["x"]}), "malformed file_checksums"),
    "checksum path outside": (lambda f: _edit_config(f, **{CHECKSUMS_KEY: {"../x": "0" * 64}}), "not a path inside"),
}


@pytest.mark.parametrize("case", sorted(WEAK_CASES))
def test_every_bad_file_is_a_model_folder_error_naming_it(saved, tmp_path, case):
    breakage, message = WEAK_CASES[case]
    folder = _copy(saved, tmp_path, checksums=False)
    breakage(folder)
    with pytest.raises(ModelFolderError, match=message):
        Recommender.from_pretrained(folder)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_candidates": 0}, "num_candidates"),
        ({"num_candidates": MAX_NUM_CANDIDATES + 1}, "num_candidates"),
        ({"num_items": -1}, "num_items"),
        ({"use_id_embeddings": "no"}, "use_id_embeddings"),
        ({"similarity_temperature": float("inf")}, "similarity_temperature"),
        ({"max_text_length": 65, "encoder_config": {"model_type": "bert", "max_position_embeddings": 64}}, "max_position_embeddings 64"),
        ({"hidden_size": 1.5}, "hidden_size"),
    ],
)
def test_config_values_are_type_and_range_checked(settings, message):
    with pytest.raises(ConfigError, match=message):
        LlmRecConfig(**settings)
    assert LlmRecConfig(num_candidates=MAX_NUM_CANDIDATES).num_candidates == MAX_NUM_CANDIDATES


# ----- integrity: checksums and links ----------------------------------------------------------------------


def test_saved_folder_records_a_checksum_of_every_file_llmrec_wrote(saved, tmp_path, tiny_encoder_dir):
    recorded = json.loads((saved / "config.json").read_text())[CHECKSUMS_KEY]
    written = {path.relative_to(saved).as_posix() for path in saved.rglob("*") if path.is_file()}
    assert set(recorded) == written - {"config.json", "README.md"}
    assert {"model.safetensors", "tokenizer.json", "catalogue.parquet", "item_index.faiss", "eval_results.json"} <= set(recorded)
    # A user's own file, carried over by a later save, is not the model's: not recorded, and no obstacle.
    target = tmp_path / "run"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    Recommender.from_pretrained(saved).save_pretrained(target)
    assert "notes.txt" not in json.loads((target / "config.json").read_text())[CHECKSUMS_KEY]
    (target / "notes.txt").write_text("edited")
    assert Recommender.from_pretrained(target).num_items == len(ITEM_IDS)


@pytest.mark.parametrize("name", ["model.safetensors", "catalogue.parquet", "tokenizer_config.json", "item_index.faiss"])
def test_a_changed_byte_is_named_and_verify_false_skips_the_check(saved, tmp_path, expected, name):
    folder = _copy(saved, tmp_path)
    data = bytearray((folder / name).read_bytes())
    position = len(data) - 1 if name == "model.safetensors" else len(data) // 2  # inside the tensor data
    data[position] ^= 0x01
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match=f"{name} changed since the model was saved"):
        Recommender.from_pretrained(folder)
    if name == "model.safetensors":  # a flipped low bit in a float: loads silently without the check
        assert Recommender.from_pretrained(folder, verify=False).num_items == len(ITEM_IDS)


def test_a_folder_saved_before_checksums_still_loads(saved, tmp_path, expected, caplog):
    folder = _copy(saved, tmp_path, checksums=False)
    with caplog.at_level(logging.DEBUG, logger="llmrec.utils.integrity"):
        loaded = Recommender.from_pretrained(folder)
    assert loaded.recommend(HISTORY, k=5) == expected
    assert "records no file checksums" in caplog.text
    record_checksums(folder, only=["item_index.faiss"])  # no map to update: stays unverified, not half-verified
    assert CHECKSUMS_KEY not in json.loads((folder / "config.json").read_text())


def test_a_missing_recorded_file_is_named(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "eval_results.json").unlink()
    with pytest.raises(ModelFolderError, match="eval_results.json is missing"):
        Recommender.from_pretrained(folder)


def test_links_out_of_the_folder_are_refused_before_anything_is_read(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    outside = tmp_path / "outside.json"
    shutil.move(folder / "tokenizer.json", outside)
    (folder / "tokenizer.json").symlink_to(outside)
    with pytest.raises(ModelFolderError, match="outside the model folder"):
        Recommender.from_pretrained(folder, verify=False)
    (folder / "tokenizer.json").unlink()
    shutil.move(outside, folder / "tokenizer.json")
    (folder / "loop").symlink_to(folder / "loop")
    with pytest.raises(ModelFolderError, match="broken link"):
        Recommender.from_pretrained(folder)
    (folder / "loop").unlink()
    (folder / "alias.txt").symlink_to(folder / "README.md")  # a link that stays inside is fine
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "data").symlink_to(tmp_path)  # never read on load
    assert Recommender.from_pretrained(folder).num_items == len(ITEM_IDS)


def test_a_hub_snapshot_of_links_into_its_blob_store_loads(saved, tmp_path, expected, monkeypatch):
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    for path in saved.rglob("*"):
        if path.is_file():
            relative = path.relative_to(saved)
            blob = repo / "blobs" / relative.as_posix().replace("/", "--")
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, blob)
            (snapshot / relative).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / relative).symlink_to(os.path.relpath(blob, (snapshot / relative).parent))
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id, revision=None, token=None, **kw: str(snapshot))
    assert Recommender.from_pretrained("someone/tiny").recommend(HISTORY, k=5) == expected
    (snapshot / "tokenizer.json").unlink()
    (snapshot / "tokenizer.json").symlink_to(saved / "tokenizer.json")  # out of the repo's cache folder
    with pytest.raises(ModelFolderError, match="outside the model folder"):
        Recommender.from_pretrained("someone/tiny")


# ----- property: any corruption of any file loads identically or is an llmrec error ----------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
CORRUPTIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.integers(0, 2**31), min_size=1, max_size=4)),
    st.tuples(st.just("random bytes"), st.binary(max_size=64)),
    st.tuples(st.just("delete"), st.none()),
    st.tuples(st.just("random JSON"), JSON_VALUES),
    st.tuples(st.just("edit a JSON field"), st.tuples(st.text(max_size=3), JSON_VALUES)),
    st.tuples(st.just("directory"), st.none()),
    st.tuples(st.just("link out"), st.none()),
)


def _corrupt(path: Path, kind: str, argument, outside: Path) -> None:
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: int(len(data) * argument)])
    elif kind == "flip":
        flipped = bytearray(data)
        for position in argument:
            if flipped:
                flipped[position % len(flipped)] ^= 0xFF
        path.write_bytes(bytes(flipped))
    elif kind == "random bytes":
        path.write_bytes(argument)
    elif kind == "random JSON":
        path.write_text(json.dumps(argument))
    elif kind == "edit a JSON field":
        try:
            content = json.loads(data)
        except ValueError:
            return
        if isinstance(content, dict):
            key = argument[0] if argument[0] or not content else sorted(content)[len(data) % len(content)]
            content[key] = argument[1]
            path.write_text(json.dumps(content))
    else:
        path.unlink()
        if kind == "directory":
            path.mkdir()
        elif kind == "link out":
            outside.write_bytes(data)
            path.symlink_to(outside)


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file_index=st.integers(0, 100), corruption=CORRUPTIONS, verify=st.booleans())
def test_any_corrupted_file_loads_unchanged_or_raises_an_llmrec_error(saved, expected, tmp_path_factory, file_index, corruption, verify):
    work = tmp_path_factory.mktemp("fuzz")
    folder = _copy(saved, work)
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    target = files[file_index % len(files)]
    kind, argument = corruption
    if not verify and target.name == "item_index.faiss" and kind in ("flip", "random bytes", "truncate"):
        verify = True  # FAISS trusts its file's header sizes; without the checksum a garbled index is FAISS's to read
    before = target.read_bytes()
    _corrupt(target, kind, argument, work / "outside")
    unchanged = target.is_file() and not target.is_symlink() and target.read_bytes() == before
    try:
        loaded = Recommender.from_pretrained(folder, verify=verify)
    except LlmRecError:
        return
    # It loaded. With verify on, only a no-op or a file no checksum covers (the card, config.json itself)
    # may get here; with verify off, bytes inside the data (a float's low bit) load silently by design.
    if unchanged:
        assert loaded.recommend(HISTORY, k=5) == expected
    elif verify:
        assert target.name in ("README.md", "config.json"), f"{kind} of {target.name} loaded despite its checksum"
