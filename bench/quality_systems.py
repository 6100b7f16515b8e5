"""What bench/quality.py compares: the learned systems, the table's rows and metrics, and the data sets."""

from __future__ import annotations

import dataclasses


LEARNED_SYSTEMS = {  # system -> finetune.py overrides; retrieval-only systems never train the head
    "id-only": ["--model.use_text_embeddings", "false", "--model.rerank_text_similarity", "false",
                "--training.rerank_epochs", "0"],
    "text-only": ["--model.use_id_embeddings", "false", "--training.rerank_epochs", "0"],
    "hybrid": [],
    # The hybrid's stage 1 alone: where stage 2 does not fit the time budget (amazon-beauty on 2 cores).
    "hybrid-stage1": ["--training.rerank_epochs", "0"],
}


SYSTEMS = ["popularity", "itemknn", *LEARNED_SYSTEMS]


ROWS = [  # (row label, system, stage of eval_results.json)
    ("Most popular", "popularity", None),
    ("ItemKNN (co-occurrence cosine)", "itemknn", None),
    ("ID-only (SASRec-style) retrieval", "id-only", "retrieval"),
    ("text-only retrieval", "text-only", "retrieval"),
    ("hybrid retrieval", "hybrid", "retrieval"),
    ("hybrid retrieval (stage-1-only run)", "hybrid-stage1", "retrieval"),
    ("hybrid retrieval + rerank", "hybrid", "rerank"),
]


METRICS = ["hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20", "hr@100"]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A benchmark data set: its default config, the files' results suffix and the published figures."""

    config: str
    suffix: str
    description: str
    published: str


DATASETS = {
    "ml100k": Dataset(
        "configs/ml100k.yaml", "", "MovieLens-100k (RecBole copy), every interaction a positive",
        "Published, similar protocol (NDCG@10 / HR@10): SASRec 0.052 / 0.099, LRURec 0.071 / 0.143, LlamaRec "
        "(7B LLM reranker) 0.076 / 0.152 (LlamaRec paper, Table 1); BPR-MF (RecBole, measured here) 0.0673 / 0.1241."),
    "ml1m": Dataset(
        "configs/ml1m.yaml", "_ml1m", "MovieLens-1M, SASRec/BERT4Rec version (../shared/data/ml-1m), positions for time",
        "Published full-ranking figures on this exact version (HR@10 / NDCG@10, from ../shared/data/README.md): "
        "SASRec with full cross-entropy (Klenitskiy & Vasilev, RecSys 2023) HR@10 0.315; gSASRec HR@10 0.300; "
        "BERT4Rec 0.284 / 0.154; GRU4Rec 0.281 / 0.165. On a 3,706-item ML-1M: HSTU-large (ICML 2024) 0.329 / 0.189, "
        "eSASRec (RecSys 2025) 0.313 / 0.177. Same protocol as here (leave-one-out, full ranking, history removed)."),
    "amazon-beauty": Dataset(
        "configs/amazon_beauty.yaml", "_amazon_beauty",
        "Amazon Beauty 2014, LlamaRec preprocessing (../shared/data/amazon-beauty), positions for time",
        "Published full-ranking figures on this exact version (NDCG@10 / HR@10, from ../shared/data/README.md): "
        "LRURec 0.0533 / 0.0916, LlamaRec (LRURec + Llama-2-7B reranker over the top 20) 0.0554 / 0.0971 "
        "(LlamaRec paper, Table 1). On the P5/S3-Rec Beauty (22,363 users / 12,101 items): SASRec (sampled softmax) "
        "0.0531 / 0.0921, eSASRec 0.0523 / 0.0928, TIGER 0.0384 / 0.0648. Same protocol as here (leave-one-out, "
        "full ranking, history removed); LlamaRec's reranker sees only the top 20."),
}
