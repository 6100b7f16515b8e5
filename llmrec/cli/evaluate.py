"""`llmrec evaluate`: the metrics of a saved model on the split an experiment config builds."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import DataError
from .common import load_recommender
from .output import print_json, print_table

if TYPE_CHECKING:
    from ..config import ExperimentConfig
    from ..recommender import Recommender

SPLITS = ("valid", "test")  # the order run_finetune writes them in eval_results.json


def evaluate_saved_model(recommender: "Recommender", config: "ExperimentConfig", splits: Sequence[str] = SPLITS) -> dict[str, Any]:
    """Popularity / retrieval / rerank metrics (ranking and diversity) of a saved model on the split `config` builds.

    The same data loading, split, systems and `evaluate_systems` as `run_finetune`, so on the training config
    this reproduces eval_results.json. The split's items are mapped onto the model's catalogue by raw id,
    so a model whose catalogue grew (add_items) still ranks over all of its items.
    """
    import numpy as np

    from ..data import EvaluationExamples, build_split, load_interaction_data
    from ..evaluation import candidate_systems, evaluate_systems
    from ..retrieval import CandidatePipeline

    split = build_split(load_interaction_data(config.data), config.data)
    model_index = {item_id: position + 1 for position, item_id in enumerate(recommender.item_ids)}
    unknown = [item_id for item_id in split.item_ids if item_id not in model_index]
    if unknown:
        shown = ", ".join(repr(item_id) for item_id in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise DataError(
            f"The data set has {len(unknown)} item id(s) the model's catalogue lacks: {shown}{more}. Evaluate on the "
            "data the model was trained on, or add the items first with `llmrec index MODEL --add-items FILE`."
        )
    to_model = np.array([0] + [model_index[item_id] for item_id in split.item_ids], dtype=np.int64)
    num_items = len(recommender.item_ids)
    popularity = np.zeros(num_items + 1, dtype=np.float64)
    popularity[to_model] = split.item_popularity()  # training counts, as run_finetune's baseline uses

    # The saved index and the config's retrieval protocol, as run_finetune's candidate pipeline.
    pipeline = CandidatePipeline(
        recommender.model, recommender.pipeline.index, config.retrieval.num_candidates, config.retrieval.exclude_history
    )
    systems = candidate_systems(pipeline, popularity, num_items)
    evaluations = []
    for split_name in splits:
        examples = getattr(split, split_name)
        mapped = EvaluationExamples(list(examples.user_indices), [to_model[history].tolist() for history in examples.histories],
                                    to_model[examples.targets].tolist())
        evaluations.append((split_name, mapped, systems))
    return evaluate_systems(evaluations, num_items, ks=config.evaluation.ks, batch_size=config.evaluation.batch_size,
                            item_text_embeddings=pipeline.item_text_embeddings, item_popularity=popularity)


def command_evaluate(arguments: argparse.Namespace) -> int:
    """A table of metrics per split and system (or `--json`); `--output` also saves them to a JSON file."""
    from ..config import load_config

    config = load_config(arguments.config)
    recommender = load_recommender(arguments.model, verify=not arguments.no_verify)
    splits = SPLITS if arguments.split == "both" else (arguments.split,)
    results = evaluate_saved_model(recommender, config, splits)
    if arguments.output:
        from ..utils.io import write_json_atomic

        write_json_atomic(arguments.output, results)
    if arguments.json:
        print_json(results)
        return 0
    metric_names = list(next(iter(next(iter(results.values())).values())))
    rows = [
        (split_name, system, *(metrics[name] for name in metric_names))
        for split_name, systems in results.items()
        for system, metrics in systems.items()
    ]
    print_table(["split", "system", *metric_names], rows)
    return 0

