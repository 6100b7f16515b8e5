"""Issue 13, serving and saving: bounded k, one immutable serving state, saves consistent with add_items,
saves that keep a user's files, atomic writes that refuse special files, stale temporaries, bad inputs."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from llmrec import ModelFolderError, Recommender
from llmrec.errors import InvalidRequestError, LlmRecError, OutputPathError
from llmrec.modeling import LlmRecModel
from llmrec.modeling.text_encoding import encode_catalogue, tokenize_item_texts
from llmrec.retrieval import CandidatePipeline
from llmrec.utils.io import atomic_write, remove_stale_temporaries, temporary_name, write_json_atomic

NUM_ITEMS = 30
NUM_CANDIDATES = 8


def build_recommender(encoder_dir: Path, num_items: int = NUM_ITEMS) -> Recommender:
    """An untrained tiny recommender: enough to serve, add items and save, in well under a second."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    model = LlmRecModel.from_encoder(
        encoder_dir, num_items=num_items, num_candidates=NUM_CANDIDATES, hidden_size=16, max_history_length=8,
        max_text_length=16, user_num_heads=2, rerank_num_heads=2, dropout=0.0,
    )
    texts = [f"movie number {n} genre g{n % 4}" for n in range(num_items)]
    encode_catalogue(model, tokenize_item_texts(tokenizer, texts, 16), show_progress=False)
    model.warm_items[1:] = True
    ids = [f"i{n}" for n in range(num_items)]
    return Recommender(model.eval(), tokenizer, ids, texts, np.arange(num_items, 0, -1, dtype=float))


@pytest.fixture(scope="module")
def recommender(tiny_encoder_dir) -> Recommender:
    return build_recommender(tiny_encoder_dir)


@pytest.fixture()
def fresh_recommender(tiny_encoder_dir) -> Recommender:
    return build_recommender(tiny_encoder_dir)


# ----- defect 2: bounded k -------------------------------------------------------------------------------


def test_a_huge_k_returns_the_catalogue_quickly(recommender):
    started = time.perf_counter()
    ranked = recommender.recommend(["i1", "i2"], k=10**4)  # the default cap; at most catalogue-many come back
    assert len(ranked) == NUM_ITEMS - 2 and len({item for item, _ in ranked}) == NUM_ITEMS - 2
    recommender.max_k = 10**6
    try:
        ranked = recommender.recommend(["i1", "i2"], k=10**6)
        batch = recommender.recommend_batch([["i1"], [], ["i3", "i4", "i5"]], k=10**6)
    finally:
        recommender.max_k = 10_000
    assert time.perf_counter() - started < 5  # it used to take 8 s and 2.5 GB at this k
    assert len(ranked) == NUM_ITEMS - 2
    assert [len(row) for row in batch] == [NUM_ITEMS - 1, NUM_ITEMS, NUM_ITEMS - 3]


def test_k_above_the_cap_is_a_named_error(recommender):
    with pytest.raises(InvalidRequestError, match=r"k=10000001 is above .* cap of 10000 .*max_k"):
        recommender.recommend(["i1"], k=10**7 + 1)
    with pytest.raises(InvalidRequestError, match="max_k must be a positive integer"):
        recommender.max_k = 0


def test_the_head_reranks_num_candidates_and_the_rest_keep_retrieval_order(recommender):
    history = ["i1", "i2", "i3"]
    ranked = recommender.recommend(history, k=20)
    head = recommender.recommend(history, k=NUM_CANDIDATES)
    assert ranked[:NUM_CANDIDATES] == head  # a longer answer does not reorder the reranked top
    pipeline = recommender.pipeline
    indices = [recommender.item_index[item] for item in history]
    retrieval_scores, candidates = pipeline.retrieve([indices], 20)
    expected_tail = [recommender.item_ids[index - 1] for index in candidates[0, NUM_CANDIDATES:]]
    assert [item for item, _ in ranked[NUM_CANDIDATES:]] == expected_tail
    np.testing.assert_allclose([score for _, score in ranked[NUM_CANDIDATES:]], retrieval_scores[0, NUM_CANDIDATES:], rtol=1e-6)


# ----- defect 5: one serving state ---------------------------------------------------------------------


def test_requests_during_add_items_never_fail_and_answer_from_one_catalogue(fresh_recommender):
    recommender = fresh_recommender
    errors: list[BaseException] = []
    stop = threading.Event()
    histories = [[f"i{(start + step) % NUM_ITEMS}" for step in range(1 + start % 5)] for start in range(NUM_ITEMS)]

    def serve() -> None:
        calls = 0
        while not stop.is_set() and calls < 2000:
            calls += 1
            try:
                known = set(recommender.item_ids)  # a catalogue this request may see, or an older one
                ranked = recommender.recommend(histories[calls % len(histories)], k=NUM_ITEMS + 40)
                after = set(recommender.item_ids)
                assert {item for item, _ in ranked} <= after and len(ranked) <= len(after)
                assert len(known) <= len(after)
            except BaseException as error:  # noqa: BLE001 - the test reports any failure
                errors.append(error)
                return

    readers = [threading.Thread(target=serve) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        for batch in range(20):
            recommender.add_items([f"new{batch}-{n}" for n in range(2)], [f"movie number {batch} genre g1"] * 2)
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert not errors, errors[:3]
    assert recommender.num_items == NUM_ITEMS + 40 == recommender.pipeline.index.num_items
    assert recommender.pipeline.item_embeddings.shape[0] == NUM_ITEMS + 41


def test_a_request_reads_one_state_even_if_a_new_one_is_published_meanwhile(fresh_recommender, monkeypatch):
    """The IndexError of issue 13 (ids published after the index): a request must never re-read the catalogue."""
    recommender = fresh_recommender
    original = CandidatePipeline.retrieve
    added = []

    def retrieve_while_items_are_added(self, *args, **kwargs):
        if not added:
            added.append(True)
            recommender.add_items(["late"], ["movie number 3 genre g2"])  # publishes a new catalogue mid-request
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CandidatePipeline, "retrieve", retrieve_while_items_are_added)
    ranked = recommender.recommend(["i1"], k=50)
    assert added and "late" not in dict(ranked) and len(ranked) == NUM_ITEMS - 1
    assert "late" in dict(recommender.recommend(["i1"], k=50))


def test_a_failed_add_items_leaves_model_and_catalogue_as_they_were(fresh_recommender, monkeypatch, tmp_path):
    recommender = fresh_recommender
    before = (recommender.model.config.num_items, recommender.model.item_text_embeddings.shape, recommender.num_items)

    def broken(self, count):
        raise MemoryError("no room")

    monkeypatch.setattr(type(recommender.pipeline), "extended", broken)
    with pytest.raises(MemoryError):
        recommender.add_items(["x1"], ["movie number 1 genre g1"])
    monkeypatch.undo()
    assert (recommender.model.config.num_items, recommender.model.item_text_embeddings.shape, recommender.num_items) == before
    recommender.save_pretrained(tmp_path / "model")
    assert Recommender.from_pretrained(tmp_path / "model").num_items == NUM_ITEMS


def test_the_serving_state_cannot_be_changed_in_place(recommender):
    with pytest.raises(TypeError):
        recommender.item_index["x"] = 1
    with pytest.raises(ValueError):
        recommender.item_popularity[0] = 5.0
    with pytest.raises(AttributeError):
        recommender._state.item_ids = ()


# ----- defect 4: saves during add_items ----------------------------------------------------------------


def test_saves_while_items_are_added_always_load_and_agree(fresh_recommender, tmp_path):
    recommender = fresh_recommender
    errors: list[BaseException] = []

    def add() -> None:
        try:
            for batch in range(12):
                recommender.add_items([f"a{batch}-{n}" for n in range(3)], [f"movie number {batch} genre g3"] * 3)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    adder = threading.Thread(target=add)
    adder.start()
    sizes = []
    for save in range(6):
        folder = tmp_path / f"save{save % 2}"
        recommender.save_pretrained(folder)
        loaded = Recommender.from_pretrained(folder)  # raised "catalogue has ... ids, model was built for ..." before
        sizes.append(loaded.num_items)
        assert loaded.num_items == loaded.model.config.num_items == loaded.pipeline.index.num_items
        assert loaded.item_ids == recommender.item_ids[: loaded.num_items]
    adder.join()
    assert not errors, errors
    assert sizes == sorted(sizes)


def test_an_add_items_during_a_save_waits_for_it(fresh_recommender, tmp_path, monkeypatch):
    """Deterministic form of the race: items added after the weights are written, before the catalogue."""
    recommender = fresh_recommender
    original = LlmRecModel.save_pretrained
    adders = []

    def save_then_add(self, *args, **kwargs):
        original(self, *args, **kwargs)
        adder = threading.Thread(target=recommender.add_items, args=(["mid"], ["movie number 2 genre g1"]))
        adder.start()
        adders.append(adder)
        adder.join(timeout=0.5)  # without the lock it finishes here, between weights and catalogue

    monkeypatch.setattr(LlmRecModel, "save_pretrained", save_then_add)
    recommender.save_pretrained(tmp_path / "model")
    adders[0].join()
    monkeypatch.undo()
    loaded = Recommender.from_pretrained(tmp_path / "model")  # raised "catalogue has 31 ids ... built for 30" before
    assert loaded.num_items == NUM_ITEMS and "mid" not in loaded.item_ids
    assert recommender.num_items == NUM_ITEMS + 1


# ----- defect 6: a save keeps what llmrec did not write ------------------------------------------------


def test_saving_into_an_llmrec_folder_keeps_dot_entries_and_user_files(recommender, tmp_path):
    target = tmp_path / "model"
    recommender.save_pretrained(target)
    (target / ".git").mkdir()
    (target / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (target / ".env").write_text("SECRET=1\n")
    (target / "notes.md").write_text("mine")
    recommender.save_pretrained(target)
    assert (target / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (target / ".env").read_text() == "SECRET=1\n"
    assert (target / "notes.md").read_text() == "mine"
    assert not (target / ".llmrec-carrying").exists()
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")], "temporaries left behind"
    Recommender.from_pretrained(target)


@pytest.mark.parametrize("user_file", ["README.md", "config.yaml", "eval_results.json", "config.json"])
def test_a_save_refuses_to_overwrite_a_users_file_with_an_llmrec_name(recommender, tmp_path, user_file):
    target = tmp_path / "home"
    target.mkdir()
    (target / user_file).write_text("the user's own")
    (target / ".bashrc").write_text("alias ll='ls -l'\n")
    with pytest.raises(ModelFolderError, match=user_file.replace(".", r"\.")):
        recommender.save_pretrained(target)
    assert (target / user_file).read_text() == "the user's own"
    assert (target / ".bashrc").read_text() == "alias ll='ls -l'\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["home"]


def test_a_manifest_names_what_llmrec_wrote(recommender, tmp_path):
    """With `file_checksums` in config.json, only the files it lists (and the card) are llmrec's; another tokenizer.json is the user's."""
    target = tmp_path / "model"
    recommender.save_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    config["file_checksums"] = {"model.safetensors": "0" * 64, "catalogue.parquet": "0" * 64}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="tokenizer.json"):
        recommender.save_pretrained(target)
    (target / "item_index.faiss").unlink()
    (target / "item_index.faiss.json").unlink()
    (target / "tokenizer.json").unlink()
    (target / "tokenizer_config.json").unlink()
    recommender.save_pretrained(target)
    Recommender.from_pretrained(target)


def test_a_failed_swap_puts_the_users_files_back(recommender, tmp_path, monkeypatch):
    target = tmp_path / "model"
    recommender.save_pretrained(target)
    (target / "notes.md").write_text("mine")
    real_replace = os.replace

    def replace(source, destination):
        if Path(destination) == target and ".tmp-" in Path(source).name:
            raise OSError(28, "No space left on device")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ModelFolderError, match="previous folder"):
        recommender.save_pretrained(target)
    monkeypatch.undo()
    assert (target / "notes.md").read_text() == "mine"
    Recommender.from_pretrained(target)


def test_a_full_disk_during_save_is_a_model_folder_error_and_the_old_folder_stays(recommender, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    target = tmp_path / "model"
    recommender.save_pretrained(target)

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(type(recommender.model), "save_pretrained", full_disk)
    with pytest.raises(ModelFolderError, match="SafetensorError"):
        recommender.save_pretrained(target)
    monkeypatch.undo()
    Recommender.from_pretrained(target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


# ----- defect 7: atomic writes and special files -------------------------------------------------------


def test_atomic_writes_refuse_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputPathError, match="FIFO"):
        write_json_atomic(fifo, {"a": 1})
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pipe"]


def _device_node(tmp_path: Path) -> Path:
    """A private character device (a copy of /dev/null) when we may make one, else /dev/null itself.

    As root a regression would replace the real /dev/null for the whole machine (it happened once); a
    private node tests the same path safely. Without root, /dev is not writable, so /dev/null is safe.
    """
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        return node
    except (PermissionError, AttributeError, OSError):
        if os.access("/dev", os.W_OK):
            pytest.skip("cannot make a private device node, and /dev is writable: not risking /dev/null")
        return Path("/dev/null")


def test_atomic_writes_refuse_a_device_and_leave_it_a_device(tmp_path):
    device = _device_node(tmp_path)
    with pytest.raises(OutputPathError, match="device"):
        write_json_atomic(device, {"a": 1})
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    assert not list(device.parent.glob(f".{device.name}.tmp-*"))


def test_atomic_writes_refuse_links_unless_asked_and_then_write_through_them(tmp_path):
    real = tmp_path / "real" / "out.json"
    real.parent.mkdir()
    real.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    with pytest.raises(OutputPathError, match="symbolic link"):
        write_json_atomic(link, {"a": 1})
    assert link.is_symlink() and real.read_text() == "{}"
    write_json_atomic(link, {"a": 2}, follow_symlinks=True)
    assert link.is_symlink() and json.loads(real.read_text()) == {"a": 2}
    assert sorted(path.name for path in real.parent.iterdir()) == ["out.json"]


def test_a_model_folder_symlink_is_refused(recommender, tmp_path):
    """save_pretrained resolves its own path; a link given to the lower-level writer is refused."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputPathError):
        with atomic_write(tmp_path / "link") as staging:
            staging.mkdir()


# ----- cleanup of stale temporaries --------------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_are_removed_and_live_ones_kept(recommender, tmp_path):
    target = tmp_path / "model"
    live = tmp_path / temporary_name(target)  # this process: a save in progress
    dead = tmp_path / temporary_name(target).replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")
    legacy_fresh, legacy_old = tmp_path / ".model.tmp-0123456789ab", tmp_path / ".model.tmp-ba9876543210"
    other = tmp_path / ".other.tmp-0123456789ab"
    for folder in (live, dead, legacy_fresh, legacy_old, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 100)
    long_ago = time.time() - 7 * 3600
    for folder in (dead, live, legacy_old, other):
        os.utime(folder, (long_ago, long_ago)) if folder is not live else os.utime(folder, (time.time() - 120,) * 2)
    carrying = tmp_path / temporary_name(target).replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")
    carrying.mkdir()
    (carrying / ".llmrec-carrying").touch()
    (carrying / ".git").mkdir()
    os.utime(carrying, (long_ago, long_ago))
    removed = remove_stale_temporaries(target)
    assert sorted(removed) == sorted([dead, legacy_old])
    assert live.exists() and legacy_fresh.exists() and other.exists() and carrying.exists()
    recommender.save_pretrained(target)  # a save cleans up beside its target too
    assert not legacy_old.exists() and live.exists()


def test_loading_a_folder_removes_what_a_killed_save_left_beside_it(recommender, tmp_path):
    target = tmp_path / "model"
    recommender.save_pretrained(target)
    dead = tmp_path / temporary_name(target).replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 100)
    minutes_ago = time.time() - 120
    os.utime(dead, (minutes_ago, minutes_ago))
    Recommender.from_pretrained(target)
    assert not dead.exists()


# ----- weak API inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda r: r.recommend(None), "missing"),
        (lambda r: r.recommend({"i1", "i2"}), "ordered"),
        (lambda r: r.recommend(["i1"], exclude_history="no"), "exclude_history must be True or False"),
        (lambda r: r.recommend([""]), "empty item id"),
        (lambda r: r.recommend(["i1"], k=2.0), "k must be a positive integer"),
        (lambda r: r.recommend(["i1"], k=float("nan")), "k must be a positive integer"),
        (lambda r: r.recommend_batch(None), "one entry per user"),
        (lambda r: r.recommend_batch([["i1"]], profiles={"x"}), "one entry per user"),
        (lambda r: r.rerank(["i1"], None), "missing"),
        (lambda r: r.rerank(None, ["i1"]), "missing"),
        (lambda r: r.rerank_batch(None, None), "one entry per user"),
        (lambda r: r.explain(["i1"], "i2", per_head="yes"), "per_head must be True or False"),
        (lambda r: r.explain(["i1"], None), "not item ids"),
        (lambda r: r.add_items(None, None), "missing"),
        (lambda r: r.add_items([""], ["text"]), "empty item id"),
        (lambda r: r.add_items(["  "], ["text"]), "empty item id"),
        (lambda r: r.add_items(["x"], ["text"], batch_size=0), "batch_size"),
    ],
)
def test_weak_inputs_are_llmrec_errors(recommender, call, message):
    with pytest.raises(InvalidRequestError, match=message):
        call(recommender)
    assert recommender.num_items == NUM_ITEMS


def test_sets_are_fine_where_order_does_not_matter(recommender):
    assert recommender.recommend(["i1"], k=3, exclude={"i2"}, filter={"i3", "i4", "i5"})
    assert recommender.recommend(["i1"], exclude_history=np.bool_(False))


# ----- property test over the public API ---------------------------------------------------------------

KNOWN = [f"i{n}" for n in range(NUM_ITEMS)]
SCALARS = st.one_of(
    st.sampled_from(KNOWN), st.sampled_from(["nope", "", " ", "i999"]), st.none(), st.integers(-5, 10**12),
    st.floats(allow_nan=True), st.booleans(), st.binary(max_size=4),
)
ANY_VALUE = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.tuples(inner), st.frozensets(st.sampled_from(KNOWN), max_size=4),
        st.dictionaries(st.sampled_from(KNOWN), inner, max_size=3),
    ),
    max_leaves=8,
)
HISTORIES = st.one_of(st.lists(st.sampled_from(KNOWN), max_size=10), ANY_VALUE)
KS = st.one_of(st.integers(-3, 40), st.sampled_from([10**4, 10**6, 10**12, -(10**9)]), st.floats(allow_nan=True), st.none(), st.booleans())
FLAGS = st.one_of(st.booleans(), ANY_VALUE)
PROFILE_SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _assert_well_formed(ranked, state_ids) -> None:
    assert isinstance(ranked, list)
    for item, score in ranked:
        assert item in state_ids and isinstance(score, float) and not math.isnan(score)
    assert len({item for item, _ in ranked}) == len(ranked)


def _call(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except LlmRecError:
        return None


@PROFILE_SETTINGS
@given(history=HISTORIES, k=KS, exclude=st.one_of(st.none(), ANY_VALUE), filter=st.one_of(st.none(), ANY_VALUE),
       exclude_history=FLAGS, profile=st.one_of(st.none(), ANY_VALUE))
def test_recommend_takes_any_arguments(recommender, history, k, exclude, filter, exclude_history, profile):
    ranked = _call(recommender.recommend, history, k, exclude=exclude, filter=filter, exclude_history=exclude_history, profile=profile)
    if ranked is not None:
        _assert_well_formed(ranked, set(recommender.item_ids))
        assert len(ranked) <= min(k, NUM_ITEMS)


@PROFILE_SETTINGS
@given(histories=st.one_of(st.lists(HISTORIES, max_size=3), ANY_VALUE), k=KS, profiles=st.one_of(st.none(), ANY_VALUE))
def test_recommend_batch_takes_any_arguments(recommender, histories, k, profiles):
    batch = _call(recommender.recommend_batch, histories, k, profiles=profiles)
    if batch is not None:
        for ranked in batch:
            _assert_well_formed(ranked, set(recommender.item_ids))


@PROFILE_SETTINGS
@given(history=HISTORIES, candidates=st.one_of(st.lists(st.sampled_from(KNOWN), max_size=8), ANY_VALUE))
def test_rerank_takes_any_arguments(recommender, history, candidates):
    ranked = _call(recommender.rerank, history, candidates)
    if ranked is not None:
        _assert_well_formed(ranked, set(recommender.item_ids))
    batch = _call(recommender.rerank_batch, [history, history], candidates)
    if batch is not None:
        for ranked in batch:
            _assert_well_formed(ranked, set(recommender.item_ids))


@PROFILE_SETTINGS
@given(history=HISTORIES, item=ANY_VALUE, per_head=FLAGS)
def test_explain_takes_any_arguments(recommender, history, item, per_head):
    weights = _call(recommender.explain, history, item, per_head=per_head)
    if weights is not None:
        assert len(weights) == min(len(list(history)), 8)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(item_ids=ANY_VALUE, item_texts=ANY_VALUE)
def test_add_items_takes_any_arguments(tiny_encoder_dir, item_ids, item_texts):
    recommender = _add_items_recommender(tiny_encoder_dir)
    before = recommender.num_items
    try:
        recommender.add_items(item_ids, item_texts)
    except LlmRecError:
        assert recommender.num_items == before
    else:
        assert recommender.num_items == before + len(list(item_ids))
    assert recommender.num_items == recommender.pipeline.index.num_items == recommender.model.config.num_items


_ADD_ITEMS_RECOMMENDER: dict[str, Recommender] = {}


def _add_items_recommender(encoder_dir: Path) -> Recommender:
    if "shared" not in _ADD_ITEMS_RECOMMENDER:
        _ADD_ITEMS_RECOMMENDER["shared"] = build_recommender(encoder_dir)
    return _ADD_ITEMS_RECOMMENDER["shared"]
