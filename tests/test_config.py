"""YAML + command-line configuration: precedence, types and errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmrec.config import ConfigError, ExperimentConfig, LoraSettings, load_config, parse_overrides, save_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_with_defaults_filled():
    config = load_config(REPO / "configs" / "ml100k.yaml")
    assert isinstance(config, ExperimentConfig)
    assert config.data.path is None and config.model.encoder is None
    assert config.retrieval.num_candidates == 100
    assert config.lora is None


def test_overrides_beat_yaml_and_are_typed(tmp_path):
    (tmp_path / "c.yaml").write_text("training:\n  retrieval_epochs: 7\n  seed: 1\nmodel:\n  dropout: 0.2\n")
    config = load_config(
        tmp_path / "c.yaml",
        ["--training.retrieval_epochs", "3", "--model.use_id_embeddings=false", "--evaluation.ks", "[5, 10]"],
    )
    assert config.training.retrieval_epochs == 3 and isinstance(config.training.retrieval_epochs, int)
    assert config.training.seed == 1
    assert config.model.dropout == 0.2
    assert config.model.use_id_embeddings is False
    assert config.evaluation.ks == [5, 10]


def test_text_fields_on_the_command_line_stay_text():
    """'{title}' and ',' are not YAML a user means; text fields keep them as typed."""
    config = load_config(overrides=["--data.item_text_template", "{title} genre {genre}", "--data.delimiter", ",",
                                    "--data.items_file={title}.csv", "--data.path", "null"])
    assert config.data.item_text_template == "{title} genre {genre}"
    assert config.data.delimiter == ","
    assert config.data.items_file == "{title}.csv"
    assert config.data.path is None


def test_lora_section_switches_on_with_defaults():
    assert load_config(overrides={"lora": True}).lora == LoraSettings()
    assert load_config(overrides=["--lora.r", "4"]).lora.r == 4


def test_saved_config_reloads_identically(tmp_path):
    config = load_config(overrides=["--lora.r", "4", "--training.seed", "9"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_parse_overrides_nests_keys():
    assert parse_overrides(["--a.b", "1", "--a.c=x", "--d", "null"]) == {"a": {"b": 1, "c": "x"}, "d": None}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--training.retrieval_epoch", "1"], "Did you mean 'retrieval_epochs'"),
        (["--trainig.seed", "1"], "Did you mean 'training'"),
        (["--training.seed", "abc"], "training.seed must be an integer"),
        (["--training.retrieval_learning_rate", "-0.1"], "retrieval_learning_rate must be positive"),
        (["--lora.r", "0"], "lora.r must be a positive integer"),
        (["--retrieval.num_candidates", "0"], "num_candidates must be positive"),
        (["--evaluation.ks", "[10, 200]"], "go beyond retrieval.num_candidates"),
        (["--model.pooling", "max"], "model.pooling must be one of"),
        (["--model.dropout", "1.5"], r"model.dropout must be in \[0, 1\)"),
        (["--model.id_dropout", "-0.1"], r"model.id_dropout must be in \[0, 1\)"),
        (["--model.use_id_embeddings", "maybe"], "must be true or false"),
        (["--training.seed"], "has no value"),
        (["training.seed=1"], "overrides look like"),
    ],
)
def test_bad_values_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_missing_or_invalid_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_encoder_path_that_does_not_exist_is_named(tmp_path):
    from llmrec.training.pipeline import default_encoder_path, resolve_encoder

    config = load_config(overrides={"model": {"encoder": str(tmp_path / "no-such-model")}})
    with pytest.raises(ConfigError, match="no-such-model"):
        resolve_encoder(config)
    assert resolve_encoder(load_config()) == default_encoder_path()


def test_auto_loss_is_full_softmax_only_where_it_fits():
    from llmrec.training.trainer import choose_retrieval_loss

    assert choose_retrieval_loss(load_config(), num_items=1682) == "full_softmax"
    assert choose_retrieval_loss(load_config(), num_items=1_000_000) == "sampled_softmax"
    assert choose_retrieval_loss(load_config(overrides={"lora": True}), num_items=1682) == "sampled_softmax"
    assert choose_retrieval_loss(load_config(overrides=["--training.loss", "full_softmax"]), num_items=10**6) == "full_softmax"


@pytest.mark.parametrize(
    "retrieval, message",
    [
        ({"index_type": "annoy"}, "retrieval.index_type"),
        ({"index_type": "hnsw", "hnsw_ef_search": 0}, "retrieval.hnsw_ef_search must be positive or null"),
        ({"index_type": "ivf", "ivf_nlist": -4}, "retrieval.ivf_nlist must be positive or null"),
    ],
)
def test_bad_index_settings_are_refused(retrieval, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"retrieval": retrieval})


def test_index_params_are_those_of_the_chosen_type():
    settings = {"index_type": "hnsw", "hnsw_m": 16, "ivf_nprobe": 8}
    assert load_config(overrides={"retrieval": settings}).retrieval.index_params() == {"M": 16}
    assert load_config(overrides={"retrieval": {"index_type": "ivf", "ivf_nprobe": 8}}).retrieval.index_params() == {"nprobe": 8}
    assert load_config(overrides={"retrieval": {"hnsw_m": 16}}).retrieval.index_params() == {}


def _all_fields(cls, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for setting in dataclasses.fields(cls):
        yield prefix + setting.name, setting
        section = hints[setting.name]
        section = next((arg for arg in typing.get_args(section) if dataclasses.is_dataclass(arg)), section)
        if dataclasses.is_dataclass(section):
            yield from _all_fields(section, f"{prefix}{setting.name}.")


def test_every_config_field_carries_help_text():
    missing = [name for name, setting in _all_fields(ExperimentConfig) if not setting.metadata.get("help")]
    assert missing == []
    assert any(name.startswith("lora.") for name, _ in _all_fields(ExperimentConfig))


def test_the_settings_a_resume_may_change_are_declared_on_the_fields():
    from llmrec.config import resumable_settings

    assert resumable_settings() == {
        "output_dir", "training.checkpoint_every_steps", "training.cpu_threads", "training.encode_batch_size",
        "training.report_to", "evaluation.batch_size",
    }
    flagged = {name for name, setting in _all_fields(ExperimentConfig) if setting.metadata.get("resumable")}
    assert flagged == resumable_settings()


def test_model_settings_are_the_one_home_of_the_saved_model_settings(tmp_path):
    """LlmRecConfig takes its `model:` fields, defaults and checks from ModelSettings instead of repeating them."""
    import inspect

    from llmrec.config import ModelSettings
    from llmrec.modeling import LlmRecConfig

    stored = ModelSettings().stored_settings()
    assert "encoder" not in stored and "hidden_size" in stored
    assert not set(inspect.signature(LlmRecConfig.__init__).parameters) & set(stored)  # no second list of them
    assert {name: getattr(LlmRecConfig(), name) for name in stored} == stored
    custom = ModelSettings(hidden_size=32, user_num_heads=4, pooling="cls", id_residual_max_ratio=0.5)
    custom.validate()
    LlmRecConfig(num_items=3, **custom.stored_settings()).save_pretrained(tmp_path)
    reloaded = LlmRecConfig.from_pretrained(tmp_path)
    assert {name: getattr(reloaded, name) for name in stored} == custom.stored_settings()
    assert reloaded.num_items == 3
    with pytest.raises(ConfigError, match=r"pooling must be one of \['mean', 'cls'\], got 'max'"):
        LlmRecConfig(pooling="max")
    with pytest.raises(ConfigError, match=r"model.pooling must be one of"):
        load_config(overrides=["--model.pooling", "max"])


def test_per_step_settings_are_declared_on_the_fields():
    from llmrec.training.continuation import FIXED_MODEL_SETTINGS, RUNTIME_MODEL_SETTINGS

    assert set(RUNTIME_MODEL_SETTINGS) == {"id_dropout", "exclude_unseen_items_from_loss", "similarity_temperature"}
    assert "id_residual_max_ratio" in FIXED_MODEL_SETTINGS and "hidden_size" in FIXED_MODEL_SETTINGS
    assert not set(RUNTIME_MODEL_SETTINGS) & set(FIXED_MODEL_SETTINGS)
