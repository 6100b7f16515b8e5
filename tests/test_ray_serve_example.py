"""examples/ray_serve.py: the Ray Serve deployment of `llmrec serve`'s app builds, with its replicas and settings.

Skipped without Ray (CI does not install it): `pip install "ray[serve]"` or `pip install "llmrec[ray]"`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")

from llmrec.errors import ConfigError, ModelFolderError  # noqa: E402
from test_serving_safety import build_recommender  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ray_serve.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("llmrec_ray_serve_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Ray pickles the deployment class by reference to its module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_encoder_dir) -> Path:
    folder = tmp_path_factory.mktemp("ray-served") / "model"
    build_recommender(tiny_encoder_dir).save_pretrained(folder)
    return folder


def test_replicas_and_settings_reach_the_deployment(example, model_folder):
    deployment = example.build_app(str(model_folder), replicas=3, threads_per_replica=2)._bound_deployment
    assert deployment.num_replicas == 3
    assert deployment.ray_actor_options["num_cpus"] == 2
    model, settings, threads = deployment.init_args
    assert (model, threads) == (str(model_folder), 2)
    assert settings["allow_writes"] is False  # each replica has its own model copy: no /items or /admin/*
    single = example.build_app(str(model_folder), replicas=1)._bound_deployment
    assert single.num_replicas == 1 and single.init_args[1]["allow_writes"] is True


def test_max_replicas_turns_on_autoscaling(example, model_folder):
    deployment = example.build_app(str(model_folder), replicas=1, max_replicas=4)._bound_deployment
    config = deployment._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas) == (1, 4)
    assert deployment.init_args[1]["allow_writes"] is False


@pytest.mark.parametrize("options,message", [
    ({"replicas": 0}, "--replicas must be at least 1"),
    ({"replicas": 3, "max_replicas": 2}, "--max-replicas"),
    ({"threads_per_replica": 0}, "--threads-per-replica"),
])
def test_bad_options_are_refused_by_name(example, model_folder, options, message):
    with pytest.raises(ConfigError, match=message):
        example.build_app(str(model_folder), **options)


def test_broken_folder_fails_before_ray_starts(example, tmp_path):
    with pytest.raises(ModelFolderError):
        example.build_app(str(tmp_path))


def test_serve_run_builder_takes_named_arguments(example, model_folder):
    deployment = example.app_builder({"model": str(model_folder), "replicas": "2"})._bound_deployment
    assert deployment.num_replicas == 2
    with pytest.raises(ConfigError, match="model required"):
        example.app_builder({"replica": "2"})


def test_a_replica_loads_the_model_and_reports_healthy(example, model_folder):
    from ray import serve

    handle = serve.run(example.build_app(str(model_folder), replicas=1), _local_testing_mode=True)
    assert handle.check_health.remote().result() is None
