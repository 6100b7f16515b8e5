"""`retrieval:` and `evaluation:` — the FAISS candidates and the metrics on valid and test users."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError
from ..limits import MAX_NUM_CANDIDATES
from .checks import check_choice
from .fields import setting


@dataclass
class RetrievalSettings:
    num_candidates: int = setting(100, "Candidates FAISS hands to the reranker.")
    exclude_history: bool = setting(True, "Never retrieve items already in the history.")
    index_type: str = setting(
        "flat", "FAISS index of the model: flat (exact) | hnsw | ivf (approximate; they pay off from "
                "~100k items, see bench/README.md) | factory (retrieval.index_factory, for catalogues beyond memory).",
    )
    index_factory: Optional[str] = setting(
        None, "FAISS factory string for index_type factory, e.g. 'IVF4096,PQ16' or 'OPQ16,IVF4096,PQ16' "
              "(16 bytes per item; PQ/OPQ sub-quantizers must divide the embedding size). Trained on a sample "
              "of up to 262,144 items and filled in chunks; ivf_nprobe sets its lists scanned per query.",
    )
    index_shards: int = setting(
        1, "Split a flat or factory index into this many shards of consecutive items; FAISS merges "
           "their top-k exactly (the saved folder holds them merged).",
    )
    # null = ItemIndex's defaults (llmrec/retrieval/index.py, chosen on the benchmark's 1M-item catalogue).
    hnsw_m: Optional[int] = setting(None, "HNSW links per item (index_type hnsw).")
    hnsw_ef_construction: Optional[int] = setting(None, "HNSW build beam (index_type hnsw).")
    hnsw_ef_search: Optional[int] = setting(None, "HNSW search beam; at least k is used (index_type hnsw).")
    ivf_nlist: Optional[int] = setting(None, "IVF lists; null = 4 * sqrt(num_items) (index_type ivf).")
    ivf_nprobe: Optional[int] = setting(None, "IVF lists scanned per query (index_type ivf).")
    refine_k_factor: Optional[int] = setting(
        None, "Candidates per result a refine stage re-scores, for factory strings ending in "
              "',Refine(...)' (index_type factory; null = 4).",
    )

    def validate(self) -> None:
        if self.num_candidates <= 0:
            raise ConfigError(f"retrieval.num_candidates must be positive, got {self.num_candidates}.")
        if self.num_candidates > MAX_NUM_CANDIDATES:
            raise ConfigError(f"retrieval.num_candidates must be at most {MAX_NUM_CANDIDATES}, got {self.num_candidates}.")
        check_choice("retrieval.index_type", self.index_type, ["flat", "hnsw", "ivf", "factory"])
        if (self.index_type == "factory") != (self.index_factory is not None):
            raise ConfigError(
                "retrieval.index_factory and retrieval.index_type: factory go together; set both (e.g. index_type: factory, "
                f"index_factory: 'IVF4096,PQ16') or neither (got index_type {self.index_type!r}, index_factory {self.index_factory!r})."
            )
        if self.index_factory is not None and (not isinstance(self.index_factory, str) or not self.index_factory.strip()):
            raise ConfigError(f"retrieval.index_factory must be a FAISS factory string such as 'IVF4096,PQ16'; got {self.index_factory!r}.")
        if isinstance(self.index_shards, bool) or not isinstance(self.index_shards, int) or self.index_shards < 1:
            raise ConfigError(f"retrieval.index_shards must be a positive integer, got {self.index_shards!r}.")
        if self.index_shards > 1 and self.index_type not in ("flat", "factory"):
            raise ConfigError(f"retrieval.index_shards > 1 needs index_type flat or factory, got {self.index_type!r}.")
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nlist", "ivf_nprobe", "refine_k_factor"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"retrieval.{name} must be positive or null, got {getattr(self, name)}.")

    def index_params(self) -> dict[str, Any]:
        """The FAISS parameters set for `index_type`, named as `ItemIndex.build` takes them (unset ones left out)."""
        names = {
            "hnsw": {"M": self.hnsw_m, "efConstruction": self.hnsw_ef_construction, "efSearch": self.hnsw_ef_search},
            "ivf": {"nlist": self.ivf_nlist, "nprobe": self.ivf_nprobe},
            "factory": {"factory": self.index_factory, "nprobe": self.ivf_nprobe, "k_factor": self.refine_k_factor},
        }.get(self.index_type, {})
        if self.index_shards > 1:
            names["num_shards"] = self.index_shards
        return {name: value for name, value in names.items() if value is not None}


@dataclass
class EvaluationSettings:
    ks: list[int] = setting(default_factory=lambda: [10, 20], help="Cut-offs of HR/NDCG/MRR@k.")
    batch_size: int = setting(256, "Users scored per evaluation batch.", resumable=True)

    def validate(self) -> None:
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ConfigError(f"evaluation.ks must be positive cut-offs, got {self.ks}.")
        if self.batch_size <= 0:
            raise ConfigError(f"evaluation.batch_size must be positive, got {self.batch_size}.")

