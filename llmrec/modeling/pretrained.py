"""Where a model's weights come from and go: `LlmRecPreTrainedModel` builds one around a pretrained encoder
(`from_encoder`) and saves and loads a model folder, strictly and without remote code.

A LoRA-tuned encoder is saved as a PEFT adapter beside the rest of the model; loading checks that the
weights match config.json before anything is built, and refuses a folder that would leave modules random.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torch import nn
from transformers import AutoModel, PreTrainedModel

from ..errors import ModelFolderError
from ..utils.quiet import quiet_library_progress
from ..utils.snapshots import download_snapshot, is_hub_repo_id
from .configuration_llmrec import LlmRecConfig
from .encoders import locate_encoder, portable_encoder_name

# A LoRA-tuned encoder is saved as a PEFT adapter in this subfolder, beside the rest of the model.
ENCODER_ADAPTER_FOLDER = "encoder_adapter"
_BACKBONE_PREFIX = "item_encoder.backbone."
# `from_pretrained` arguments that choose which snapshot of a Hub repo to read.
_SNAPSHOT_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")


def _raise_on_incomplete_load(
    folder: Path, missing: Sequence[str] = (), unexpected: Sequence[str] = (), mismatched: Sequence[str] = (), errors: Sequence[str] = ()
) -> None:
    """Strict loading: a module whose weights are not in the folder would silently start from random values."""
    problems = [
        f"{what} {sorted(names)[:8]}{' and more' if len(names) > 8 else ''}"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched), ("errors", errors))
        if names
    ]
    if problems:
        raise ModelFolderError(
            f"The weights in {folder} do not match its config: tensors {'; '.join(problems)}. The weights file is "
            "incomplete or config.json was edited; save the model again with save_pretrained, or copy the folder again."
        )


def _check_sizes_before_building(folder: Path, config: LlmRecConfig) -> None:
    """Compare the sizes config.json asks for with the weights file's header, before any tensor is allocated.

    transformers builds the model from the config first, so an edited `num_items` of 10^10 would ask
    for terabytes before the shape mismatch is noticed.
    """
    from safetensors import safe_open

    path = folder / "model.safetensors"
    if not path.is_file():
        return
    try:
        with safe_open(str(path), framework="pt") as weights:  # reads the header only
            shapes = {name: list(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except Exception as error:  # safetensors reports a corrupt header with its own error type
        raise ModelFolderError(f"{path} is corrupt ({type(error).__name__}: {str(error)[:200]}); copy or download it again.") from error
    layers = {name.split(".")[2] for name in shapes if name.startswith("user_encoder.blocks.")}
    found = {
        "num_items": shapes.get("warm_items", [None])[0],
        "max_history_length": shapes.get("user_encoder.position_embeddings.weight", [None])[0],
        "hidden_size": shapes.get("user_encoder.position_embeddings.weight", [None, None])[1],
        "user_num_layers": len(layers),
    }
    found["num_items"] = None if found["num_items"] is None else found["num_items"] - 1  # row 0 is padding
    wrong = [f"{name} is {getattr(config, name)} but the weights hold {value}" for name, value in found.items()
             if value is not None and value != getattr(config, name)]
    if wrong:
        raise ModelFolderError(
            f"{folder / 'config.json'} does not match {path}: {'; '.join(wrong)}. config.json was edited or belongs "
            "to another model; save the model again with save_pretrained, or copy the folder again."
        )


class LlmRecPreTrainedModel(PreTrainedModel):
    """Hugging Face plumbing of `LlmRecModel`: weight initialisation, `save_pretrained` and a strict `from_pretrained`."""

    config_class = LlmRecConfig
    base_model_prefix = "llmrec"
    main_input_name = "history_item_indices"
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    @quiet_library_progress()
    def from_encoder(cls, encoder_name_or_path: str, **config_kwargs) -> "LlmRecPreTrainedModel":
        """A new model around pretrained encoder weights (a local path or hub id, loaded by HF)."""
        encoder = AutoModel.from_pretrained(
            locate_encoder(str(encoder_name_or_path)), attn_implementation="sdpa", trust_remote_code=False
        )
        config = LlmRecConfig(
            encoder_name_or_path=portable_encoder_name(str(encoder_name_or_path)),
            encoder_config=encoder.config.to_dict(),
            **config_kwargs,
        )
        model = cls(config)
        model.item_encoder.backbone.load_state_dict(encoder.state_dict())
        return model

    @property
    def has_encoder_adapter(self) -> bool:
        """True when the encoder is wrapped in PEFT (LoRA) adapters."""
        return hasattr(self.item_encoder.backbone, "peft_config")

    @quiet_library_progress()
    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args: Any, **kwargs: Any) -> None:
        """Like `PreTrainedModel.save_pretrained`; a LoRA-tuned encoder is saved as a PEFT adapter.

        The adapter records its base model by portable name, and `model.safetensors` then holds everything
        but the frozen base encoder, so the folder stays small and the adapter can be reused or merged.
        """
        self.config.encoder_weights = "adapter" if self.has_encoder_adapter else "full"
        if self.has_encoder_adapter:
            backbone = self.item_encoder.backbone
            for adapter_config in backbone.peft_config.values():
                adapter_config.base_model_name_or_path = self.config.encoder_name_or_path
            backbone.save_pretrained(Path(save_directory) / ENCODER_ADAPTER_FOLDER)
            if kwargs.get("state_dict") is None:
                kwargs["state_dict"] = {
                    name: tensor for name, tensor in self.state_dict().items() if not name.startswith(_BACKBONE_PREFIX)
                }
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    @quiet_library_progress()
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], *args: Any, **kwargs: Any) -> "LlmRecPreTrainedModel":
        """Like `PreTrainedModel.from_pretrained`, but strict and without remote code.

        A Hub repo id is first resolved to its local snapshot (`snapshot_download`, honouring `revision`,
        `token`, `cache_dir` and `local_files_only`), so it loads exactly as a folder does. A folder holding
        an encoder adapter gets base model + adapter. Any tensor the weights lack, hold in excess or hold in
        another shape than `config.json` implies raises `ModelFolderError` naming it: transformers would
        start such modules from random values and only log a load report.
        """
        kwargs["trust_remote_code"] = False
        want_loading_info = kwargs.pop("output_loading_info", False)
        if is_hub_repo_id(pretrained_model_name_or_path):
            download_kwargs = {name: kwargs.pop(name) for name in _SNAPSHOT_KWARGS if name in kwargs}
            pretrained_model_name_or_path = download_snapshot(
                str(pretrained_model_name_or_path), walk=(ENCODER_ADAPTER_FOLDER,), **download_kwargs
            )
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir() and (folder / "config.json").is_file():
            config = LlmRecConfig.from_pretrained(folder, trust_remote_code=False)
            _check_sizes_before_building(folder, config)
            if config.encoder_weights == "adapter":
                model = cls._from_adapter_folder(folder, config, device=kwargs.get("device_map"))
                return (model, {}) if want_loading_info else model
        # Mismatched shapes are reported back rather than raised, so the error below can name the tensors.
        kwargs.setdefault("ignore_mismatched_sizes", True)
        model, loading_info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        _raise_on_incomplete_load(
            folder,
            missing=loading_info.get("missing_keys", ()),
            unexpected=loading_info.get("unexpected_keys", ()),
            mismatched=[str(entry[0]) if isinstance(entry, tuple) else str(entry) for entry in loading_info.get("mismatched_keys", ())],
            errors=loading_info.get("error_msgs", ()),
        )
        return (model, loading_info) if want_loading_info else model

    @classmethod
    def _from_adapter_folder(cls, folder: Path, config: LlmRecConfig, device: Optional[str] = None) -> "LlmRecPreTrainedModel":
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict, load_peft_weights
        from safetensors.torch import load_file

        adapter_folder = folder / ENCODER_ADAPTER_FOLDER
        if not (adapter_folder / "adapter_config.json").is_file():
            raise ModelFolderError(
                f"{folder / 'config.json'} says the encoder is a PEFT adapter, but {adapter_folder}/adapter_config.json "
                "is missing; copy the whole model folder, or save it again with save_pretrained."
            )
        model = cls(config)
        try:
            missing, unexpected = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
        except RuntimeError as error:  # shapes that do not match config.json
            raise ModelFolderError(
                f"{folder / 'model.safetensors'} does not match {folder / 'config.json'} ({str(error)[:300]}); save the "
                "model again with save_pretrained."
            ) from error
        _raise_on_incomplete_load(folder, [name for name in missing if not name.startswith(_BACKBONE_PREFIX)], unexpected)
        base_model = config.encoder_name_or_path
        try:
            base = AutoModel.from_pretrained(locate_encoder(base_model), attn_implementation="sdpa", trust_remote_code=False)
        except (OSError, ValueError) as error:
            raise ModelFolderError(
                f"The encoder adapter in {adapter_folder} needs its base model {base_model!r}, which could not be "
                f"loaded ({error}); install it or download it, then load again."
            ) from error
        try:
            backbone = PeftModel.from_pretrained(base, adapter_folder)
            stored = set(load_peft_weights(str(adapter_folder), device="cpu"))
        except Exception as error:  # peft reports unreadable or mismatched adapters with assorted types
            raise ModelFolderError(f"Could not load the encoder adapter in {adapter_folder} ({type(error).__name__}: {str(error)[:300]}).") from error
        expected = set(get_peft_model_state_dict(backbone))
        _raise_on_incomplete_load(adapter_folder, sorted(expected - stored), sorted(stored - expected))
        model.item_encoder.backbone = backbone
        return model.to(device or "cpu").eval()
