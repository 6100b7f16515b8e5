"""Cold start: held-out item and user splits, the ID-only / text-only / hybrid item paths, user profiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig

from conftest import ITEMS_PER_GENRE, NUM_GENRES, tiny_overrides
from llmrec import Recommender
from llmrec.config import DataConfig, load_config
from llmrec.data import build_split, load_interaction_data
from llmrec.errors import ConfigError, InvalidRequestError
from llmrec.evaluation import evaluate_ranking
from llmrec.modeling import LlmRecConfig, LlmRecModel
from llmrec.modeling.text_encoding import embed_item_texts
from llmrec.training import run_finetune
from llmrec.training.profiles import fit_user_profiles
from llmrec.training import trainer as trainer_module
from llmrec.training.trainer import retrieval_score_function


def _cold_config(planted_data_dir, tiny_encoder_dir, output_dir, **data):
    overrides = tiny_overrides(planted_data_dir, tiny_encoder_dir, output_dir)
    overrides["data"].update({"split": "cold_items", "cold_item_fraction": 0.2, **data})
    overrides["training"].update({"retrieval_epochs": 12, "rerank_epochs": 1, "cpu_threads": 1})
    return load_config(overrides=overrides)


def _genre(item_index: int) -> int:
    """Planted items are i0..i79 in catalogue order, ITEMS_PER_GENRE per genre."""
    return (item_index - 1) // ITEMS_PER_GENRE


@pytest.fixture(scope="module")
def cold_run(tmp_path_factory, planted_data_dir, tiny_encoder_dir):
    """A few-second fine-tune on the planted data with 20 % of the items held out.

    The stage-2 (rerank) training examples it mines are recorded in results["stage2_examples"].
    """
    config = _cold_config(planted_data_dir, tiny_encoder_dir, tmp_path_factory.mktemp("cold-run"))
    split = build_split(load_interaction_data(config.data), config.data)
    mined = []

    class RecordedRerankExample(trainer_module.RerankExample):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            mined.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "RerankExample", RecordedRerankExample)
        results = run_finetune(config)
    return config, split, {**results, "stage2_examples": mined}


# ----- splits ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("selection", ["random", "newest"])
def test_cold_item_split_never_leaks_a_held_out_item_into_training(planted_data_dir, tiny_encoder_dir, tmp_path, selection):
    config = _cold_config(planted_data_dir, tiny_encoder_dir, tmp_path, cold_item_selection=selection)
    data = load_interaction_data(config.data)
    split = build_split(data, config.data)
    cold = set(split.cold_item_indices)
    assert len(cold) == round(0.2 * NUM_GENRES * ITEMS_PER_GENRE)
    for sequence in split.train_sequences:
        assert cold.isdisjoint(sequence)
    for examples in (split.valid, split.test):
        assert cold.isdisjoint(examples.targets)
        assert all(cold.isdisjoint(history) for history in examples.histories)
    assert len(split.cold_test) > 0 and set(split.cold_test.targets) <= cold
    assert all(history and cold.isdisjoint(history) for history in split.cold_test.histories)
    assert split.item_popularity()[sorted(cold)].sum() == 0
    # The cold example is the user's first interaction on a cold item, after everything before it.
    frame = data.interactions.to_pandas().sort_values("timestamp", kind="stable")
    user = split.cold_test.user_indices[0]
    sequence = [split.item_index[item] for item in frame[frame.user_id == split.user_ids[user]].item_id]
    first_cold = next(position for position, item in enumerate(sequence) if item in cold)
    assert split.cold_test.histories[0] == sequence[:first_cold] and split.cold_test.targets[0] == sequence[first_cold]
    if selection == "newest":
        first_seen = frame.groupby("item_id").timestamp.min()
        cold_ids = {split.item_ids[index - 1] for index in cold}
        assert first_seen[list(cold_ids)].min() >= first_seen.drop(list(cold_ids)).max()
    else:  # seeded: the same seed holds out the same items, another seed others
        assert build_split(data, config.data).cold_item_indices == split.cold_item_indices
        config.data.seed = 7
        assert build_split(data, config.data).cold_item_indices != split.cold_item_indices


@pytest.mark.parametrize("history_length", [0, 2])
def test_cold_user_split_holds_users_out_of_training(planted_data_dir, tiny_encoder_dir, tmp_path, history_length):
    config = _cold_config(planted_data_dir, tiny_encoder_dir, tmp_path, split="cold_users", cold_user_fraction=0.25,
                          cold_user_history_length=history_length)
    split = build_split(load_interaction_data(config.data), config.data)
    cold_users = split.cold_user_indices
    assert len(cold_users) == 20 and split.cold_test.user_indices == cold_users
    assert all(split.train_sequences[user] == [] for user in cold_users)
    assert set(cold_users).isdisjoint(split.valid.user_indices + split.test.user_indices)
    assert all(len(history) == history_length for history in split.cold_test.histories)


def test_cold_split_settings_are_validated():
    with pytest.raises(ConfigError, match="cold_item_fraction"):
        DataConfig(split="cold_items", cold_item_fraction=1.5).validate()
    with pytest.raises(ConfigError, match="cold_item_selection"):
        DataConfig(split="cold_items", cold_item_selection="oldest").validate()
    with pytest.raises(ConfigError, match="both false"):
        load_config(overrides={"model": {"use_text_embeddings": False, "use_id_embeddings": False}})


# ----- item representations -------------------------------------------------------------------------


def _small_model(**kwargs) -> LlmRecModel:
    torch.manual_seed(0)
    encoder = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = LlmRecModel(LlmRecConfig(encoder_config=encoder.to_dict(), num_items=10, hidden_size=16,
                                     max_history_length=8, dropout=0.0, **kwargs))
    with torch.no_grad():
        model.item_text_embeddings[1:].normal_()
    model.warm_items[1:6] = True
    return model


def test_id_only_model_keeps_cold_items_random_and_untrained():
    model = _small_model(use_text_embeddings=False).train()
    assert model.text_projection is None
    initial = model.item_id_embeddings.weight.detach().clone()
    torch.testing.assert_close(model.item_embeddings()[1:], initial[1:])  # no ID dropout without a text path
    model.item_embeddings().sum().backward()
    gradient = model.item_id_embeddings.weight.grad
    assert gradient[6:].abs().sum() == 0 and gradient[1:6].abs().sum() > 0
    model.add_items(torch.randn(2, 16))
    assert model.item_embeddings()[-2:].norm(dim=-1).min() > 0  # a new item is a random vector, not zero


def test_default_model_state_dict_is_unchanged_and_old_configs_load(cold_run, tmp_path):
    names = set(_small_model().state_dict())
    assert "text_projection.weight" in names and not any(name.startswith("profile_projection") for name in names)
    # A folder whose config.json predates the new flags loads with their defaults.
    config, _, _ = cold_run
    folder = tmp_path / "old"
    Recommender.from_pretrained(config.output_dir).save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    for key in ("use_text_embeddings", "use_user_profiles"):
        saved.pop(key)
    (folder / "config.json").write_text(json.dumps(saved))
    loaded = Recommender.from_pretrained(folder)
    assert loaded.model.config.use_text_embeddings and loaded.model.profile_projection is None


# ----- cold items on a trained model -----------------------------------------------------------------


def test_held_out_items_stay_cold_and_rank_far_above_random(cold_run):
    config, split, results = cold_run
    recommender = Recommender.from_pretrained(config.output_dir)
    warm = recommender.model.warm_items
    assert not warm[split.cold_item_indices].any() and warm[1:].sum() == split.num_items - len(split.cold_item_indices)
    cold = split.cold_test
    metrics = evaluate_ranking(retrieval_score_function(recommender.pipeline, split.num_items), cold.histories,
                               cold.targets, split.num_items)
    random_hr10 = 10 / (split.num_items - np.mean([len(history) for history in cold.histories]))
    assert metrics["hr@10"] > 3 * random_hr10
    # run_finetune evaluates the cold examples itself, through the same evaluator, and the card shows them.
    assert results["cold_test"]["retrieval"]["num_users"] == len(cold.targets)
    assert results["cold_test"]["retrieval"]["hr@10"] == pytest.approx(metrics["hr@10"], abs=1e-6)
    assert "| cold_test |" in (Path(config.output_dir) / "README.md").read_text()


def test_stage2_never_shows_the_head_a_held_out_item(cold_run):
    """Never a target in training, a cold item in the head's candidate lists would only teach it to bury new items."""
    config, split, results = cold_run
    examples = results["stage2_examples"]
    assert examples, "stage 2 mined no examples"
    cold = np.asarray(split.cold_item_indices)
    assert not any(np.isin(np.asarray(example.candidates), cold).any() for example in examples)
    # The lists are still full: the warm catalogue has more than enough items for them.
    assert all(len(example.candidates) == config.retrieval.num_candidates for example in examples)


def test_item_added_after_training_ranks_above_random_for_its_genre(cold_run):
    config, split, _ = cold_run
    recommender = Recommender.from_pretrained(config.output_dir)
    recommender.add_items(["new-g1"], ["movie number 50 genre g1"])  # a title no training item has
    ranks = {True: [], False: []}
    for user, sequence in enumerate(split.train_sequences):
        history = [split.item_ids[index - 1] for index in sequence]
        ranked = [item for item, _ in recommender.recommend(history, k=recommender.num_items)]
        ranks[_genre(sequence[0]) == 1].append(ranked.index("new-g1") / len(ranked))
    assert np.mean(ranks[True]) < 0.25  # random would put it in the middle (0.5)
    assert np.mean(ranks[True]) < np.mean(ranks[False])


# ----- user profiles ---------------------------------------------------------------------------------


def _assert_same_ranking(ranked, expected) -> None:
    assert [item for item, _ in ranked] == [item for item, _ in expected]
    np.testing.assert_allclose([score for _, score in ranked], [score for _, score in expected], rtol=1e-4, atol=1e-5)


def _profile_text(genre: int) -> str:
    return f"movie about genre g{genre}"


def test_profile_only_user_gets_the_planted_preference(cold_run, tmp_path):
    config, split, _ = cold_run
    recommender = Recommender.from_pretrained(config.output_dir)
    history = [split.item_ids[index - 1] for index in split.train_sequences[0]]
    before = recommender.recommend(history, k=10)
    with pytest.raises(InvalidRequestError, match="no user-profile path"):
        recommender.recommend([], k=10, profile=_profile_text(0))

    model = recommender.model
    model.enable_user_profiles()
    texts = [_profile_text(_genre(sequence[0])) for sequence in split.train_sequences]
    losses = fit_user_profiles(model, split.train_sequences, embed_item_texts(model, recommender.tokenizer, texts),
                               epochs=30, learning_rate=0.01, batch_size=16)
    assert losses[-1] < losses[0]
    _assert_same_ranking(recommender.recommend(history, k=10), before)  # no profile: served as before

    for genre in range(NUM_GENRES):
        recommended = recommender.recommend([], k=10, profile=_profile_text(genre))
        assert len(recommended) == 10
        in_genre = sum(_genre(recommender.item_index[item]) == genre for item, _ in recommended)
        assert in_genre >= 8, (genre, recommended)
    # A profile also steers a user with a short history, and the batch form takes one profile per history.
    batch = recommender.recommend_batch([[], history[:1]], k=5, profiles=[_profile_text(2), None])
    _assert_same_ranking(batch[0], recommender.recommend([], k=5, profile=_profile_text(2)))

    recommender.save_pretrained(tmp_path / "with-profiles")
    reloaded = Recommender.from_pretrained(tmp_path / "with-profiles")
    _assert_same_ranking(reloaded.recommend([], k=10, profile=_profile_text(3)),
                         recommender.recommend([], k=10, profile=_profile_text(3)))
    with pytest.raises(InvalidRequestError, match="one .*per history"):
        reloaded.recommend_batch([[]], k=5, profiles=["a", "b"])
