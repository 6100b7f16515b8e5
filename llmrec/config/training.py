"""`training:` — both training stages and the profile fit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from .checks import check_choice, check_seed
from .fields import setting


@dataclass
class TrainingSettings:
    seed: int = setting(42, "Seed of initialisation, batch order, dropout and sampling.")
    cpu_threads: Optional[int] = setting(
        None, "PyTorch CPU threads per process; None = CPU cores / local processes "
              "(accelerate launch would otherwise pin 1).", resumable=True,
    )
    mixed_precision: str = setting(
        "no", "no | bf16 | fp16, passed to Accelerate (autocast in training); bf16 also encodes the "
              "catalogue under bf16 autocast. bf16 suits GPUs and CPUs with AVX512-BF16/AMX.",
    )
    gradient_checkpointing: bool = setting(
        False, "Recompute activations of the user encoder (and of a LoRA-tuned BERT) in the backward "
               "pass: less memory for longer histories or bigger batches, ~30 % more compute.",
    )
    init_from: Optional[str] = setting(
        None, "Continue training this saved llmrec model folder (an earlier run's output_dir) on the "
              "configured data instead of starting from the bare encoder: its items keep their ids and vectors, "
              "items new in the data get text vectors and new ID rows, new users need nothing. model.* must "
              "match the folder's (id_dropout, exclude_unseen_items_from_loss and similarity_temperature may "
              "change). finetune.py --init_from FOLDER sets it. None = a new model.",
    )
    gradient_accumulation_steps: int = setting(
        1, "Batches whose gradients are summed before each optimiser step (Accelerate).",
    )
    checkpoint_every_steps: int = setting(0, "Save Accelerate state every N steps; 0 = off.", resumable=True)
    eval_every_epochs: int = setting(1, "Epochs between validation passes (early stopping counts these passes).")
    early_stopping_patience: int = setting(5, "Evaluations without a better valid NDCG@10 before stopping.")
    group_by_length: bool = setting(
        False, "Batch training examples of similar history length together (transformers' length "
               "grouping), each batch padded to its own longest, so short histories cost what they hold. "
               "Pays on short-history data (Amazon Beauty); on MovieLens-100k it cost ~0.01 test NDCG@10 "
               "(batches of one length skew the updates), so it is off by default. Off, every batch is still "
               "padded only to its longest history.",
    )
    # Stage 1: user and item towers.
    loss: str = setting(
        "auto", "full_softmax | sampled_softmax | auto (full when the encoder is frozen and the logits fit).",
    )
    retrieval_epochs: int = setting(60, "Most stage-1 epochs (early stopping may end sooner).")
    retrieval_batch_size: int = setting(64, "Users' histories per stage-1 batch.")
    retrieval_learning_rate: float = setting(1e-3, "AdamW learning rate of stage 1.")
    num_sampled_negatives: int = setting(1024, "Negatives for sampled_softmax.")
    sparse_id_gradients: Optional[bool] = setting(
        None, "Sparse gradients for the item ID table under sampled_softmax, updated by SparseAdam (lazy "
              "Adam: rows a step does not touch are not moved), so a step costs the same at 1M items as at "
              "100k; AdamW over the dense table touches every row every step. None = on for sampled_softmax "
              "with >= 100k items in one process (gloo DDP handles sparse gradients, NCCL does not).",
    )
    # Stage 2: reranking head.
    rerank_epochs: int = setting(20, "Most stage-2 epochs; 0 = no head (retrieval order).")
    rerank_batch_size: int = setting(64, "Candidate lists per stage-2 batch.")
    rerank_learning_rate: float = setting(1e-3, "AdamW learning rate of stage 2.")
    rerank_positions_per_user: int = setting(8, "Most recent training positions per user that become rerank examples.")
    rerank_holdout: bool = setting(
        False, "Hold each user's last rerank_positions_per_user training positions out of stage 1 (every "
               "user keeps its first) and train stage 2 on exactly those, so the head learns on candidate lists "
               "like serving's (from targets the towers did not fit) at the price of those stage-1 targets.",
    )
    # User profiles (model.use_user_profiles): a third stage after the head, towers and head frozen.
    profile_epochs: int = setting(20, "Most epochs of the profile fit (early stopping on valid may end sooner).")
    profile_learning_rate: float = setting(1e-2, "AdamW learning rate of the profile fit.")
    weight_decay: float = setting(0.0, "AdamW weight decay of every stage.")
    report_to: str = setting(
        "none", "none | tensorboard | wandb | mlflow | trackio: Accelerate's tracker that receives the config "
                "and each epoch's loss and validation metrics (TensorBoard writes to output_dir/logs).", resumable=True,
    )
    encode_batch_size: int = setting(256, "Item texts per encoder forward when encoding the catalogue.", resumable=True)

    def validate(self) -> None:
        check_seed("training.seed", self.seed)
        check_choice("training.mixed_precision", self.mixed_precision, ["no", "bf16", "fp16"])
        check_choice("training.loss", self.loss, ["auto", "full_softmax", "sampled_softmax"])
        check_choice("training.report_to", self.report_to, ["none", "tensorboard", "wandb", "mlflow", "trackio"])
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

