"""`Recommender`: a trained model, its catalogue and its FAISS index, behind raw item ids."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import yaml
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .errors import InvalidRequestError, LlmRecError, ModelFolderError, UnknownItemError
from .hub import EVAL_RESULTS_FILE, MODEL_CARD_FILE, TRAINING_CONFIG_FILE, push_to_hub, read_run_metadata, render_model_card
from .modeling import MODEL_FORMAT_VERSION, LlmRecConfig, LlmRecModel, split_histories
from .modeling.modeling_llmrec import ENCODER_ADAPTER_FOLDER
from .modeling.precision import cast_encoder_bf16, check_precision, check_quantize, quantize_int8
from .modeling.text_encoding import embed_item_texts, load_tokenizer
from .retrieval import CandidatePipeline, ItemIndex, build_item_index
from .retrieval.index import sidecar_path
from .utils.integrity import check_links_stay_inside, find_custom_code, record_checksums, verify_checksums
from .utils.io import atomic_write, restore_interrupted_replace, write_json_atomic

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CATALOGUE_FILE = "catalogue.parquet"
INDEX_FILE = "item_index.faiss"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, CATALOGUE_FILE, INDEX_FILE)
# Written only for some models; an old copy must not outlive a save that no longer writes it.
_OPTIONAL_OUTPUTS = frozenset({ENCODER_ADAPTER_FOLDER, EVAL_RESULTS_FILE, TRAINING_CONFIG_FILE})

RankedItems = list[tuple[str, float]]
ItemFilter = Union[Callable[[str], bool], Iterable[str]]


class Recommender:
    """Recommend, rerank and explain with raw item ids (strings), best first.

    Serving reads cached item representations and reranker projections (`CandidatePipeline`); BERT runs
    only for text: items added with `add_items` and user profiles. `precision="bf16"` keeps the text
    encoder's weights in bf16 (GPU, or a CPU with bf16 instructions); `quantize="int8"` (CPU) makes the
    encoder and the reranking head's MLPs dynamic int8 (`llmrec.modeling.precision`).

    Thread safety: `recommend`, `rerank`, `explain` and their batch forms only read, under
    `torch.inference_mode`, so one instance can serve many threads. `add_items` builds the grown index
    and caches aside and swaps them in, so it may run while other threads read; two `add_items` calls
    are serialised by a lock.
    """

    def __init__(
        self,
        model: LlmRecModel,
        tokenizer: PreTrainedTokenizerBase,
        item_ids: Sequence[str],
        item_texts: Sequence[str],
        item_popularity: Sequence[float],
        index: Optional[ItemIndex] = None,
        eval_results: Optional[dict[str, Any]] = None,
        training_config: Optional[dict[str, Any]] = None,
        precision: str = "fp32",
        quantize: Optional[str] = None,
    ) -> None:
        if not (len(item_ids) == len(item_texts) == len(item_popularity) == model.config.num_items):
            raise ModelFolderError(
                f"The catalogue has {len(item_ids)} ids, {len(item_texts)} texts and {len(item_popularity)} "
                f"popularity values, but the model was built for {model.config.num_items} items."
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.item_ids = [str(item_id) for item_id in item_ids]
        self.item_texts = [str(text) for text in item_texts]
        self.item_popularity = np.asarray(item_popularity, dtype=np.float64)
        self.item_index = {item_id: position + 1 for position, item_id in enumerate(self.item_ids)}
        if len(self.item_index) != len(self.item_ids):
            raise ModelFolderError("The catalogue lists some item ids more than once; item ids must be unique.")
        index = index if index is not None else build_item_index(model)
        if index.num_items != len(self.item_ids):
            raise ModelFolderError(
                f"The FAISS index holds {index.num_items} items but the catalogue has {len(self.item_ids)}; "
                "rebuild the index from this model (`llmrec index MODEL --rebuild`)."
            )
        if index.dim != model.config.hidden_size:
            raise ModelFolderError(
                f"The FAISS index stores {index.dim}-dimensional vectors but the model's item embeddings have "
                f"{model.config.hidden_size}; rebuild the index from this model (`llmrec index MODEL --rebuild`)."
            )
        self.eval_results = eval_results
        self.training_config = training_config
        self.precision = check_precision(precision)
        self.quantize = check_quantize(quantize, self.model.item_text_embeddings.device)
        if self.quantize is not None and self.precision != "fp32":
            raise ValueError("Choose one of precision='bf16' and quantize='int8'; int8 quantises fp32 weights.")
        self.pipeline = CandidatePipeline(model, index, num_candidates=model.config.num_candidates)
        if self.precision == "bf16":
            cast_encoder_bf16(self.model.item_encoder)
        if self.quantize == "int8":
            # After the serving cache is built, so cached catalogue rows stay exact; the head's attention
            # projections are cached, so only its per-request MLPs are worth quantising.
            quantize_int8(self.model.item_encoder)
            quantize_int8(self.model.reranker.feed_forward)
            quantize_int8(self.model.reranker.scorer)
        self._write_lock = threading.Lock()

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    # ----- loading and saving -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: Union[str, Path],
        device: Union[str, torch.device] = "cpu",
        revision: Optional[str] = None,
        token: Optional[str] = None,
        precision: str = "fp32",
        quantize: Optional[str] = None,
        verify: bool = True,
    ) -> "Recommender":
        """Load a folder written by `save_pretrained`, or a Hub model repo holding one.

        `precision` ("fp32" or "bf16") and `quantize` (None or "int8", CPU only) trade accuracy for
        speed in serving; see the class docstring. A quantised recommender cannot be saved again.

        Only safetensors, Parquet, JSON and FAISS files are read: no pickle, and never code from the folder
        (one that carries `*.py` files or an `auto_map` is refused). Every file llmrec wrote is checked
        against the SHA-256 recorded in `config.json` (`verify=False` skips that, e.g. for a quick start
        of a large model), weights must match the config exactly, and links may not leave the folder.
        Every problem with the folder raises `ModelFolderError` naming the file and what to do.
        """
        folder = cls._resolve_folder(path_or_repo_id, revision, token)
        cls.check_folder(folder, verify=verify)
        try:
            model = LlmRecModel.from_pretrained(folder, use_safetensors=True, trust_remote_code=False)
        except LlmRecError:
            raise
        except Exception as error:  # truncated or corrupt safetensors, shapes that do not match config.json
            raise ModelFolderError(
                f"Could not load the model weights {folder / WEIGHTS_FILE} ({type(error).__name__}: "
                f"{str(error)[:300]}); the file is corrupt or does not match {folder / CONFIG_FILE}. Copy or "
                "download the folder again."
            ) from error
        try:
            vocab_size = model.item_encoder.backbone.get_input_embeddings().num_embeddings
        except (AttributeError, NotImplementedError):  # an encoder without a token embedding table
            vocab_size = None
        tokenizer = load_tokenizer(folder, vocab_size)
        try:
            catalogue = Dataset.from_parquet(str(folder / CATALOGUE_FILE))
            item_ids, item_texts, popularity = catalogue["item_id"], catalogue["text"], catalogue["popularity"]
        except Exception as error:
            raise ModelFolderError(
                f"Could not read the catalogue {folder / CATALOGUE_FILE} ({type(error).__name__}: {error}); it "
                "must be Parquet with columns item_id, text, popularity. Copy or download the folder again."
            ) from error
        eval_results, training_config = read_run_metadata(folder)
        return cls(
            model.to(device),
            tokenizer,
            item_ids,
            item_texts,
            popularity,
            index=ItemIndex.load(folder / INDEX_FILE),
            eval_results=eval_results,
            training_config=training_config,
            precision=precision,
            quantize=quantize,
        )

    @staticmethod
    def _resolve_folder(path_or_repo_id: Union[str, Path], revision: Optional[str], token: Optional[str]) -> Path:
        """The local folder to load, after refusing links out of it (a Hub snapshot's may point into its cache)."""
        folder = Path(path_or_repo_id).expanduser()
        if folder.is_dir() or restore_interrupted_replace(folder):
            check_links_stay_inside(folder, walk=(ENCODER_ADAPTER_FOLDER,))
            return folder
        name = str(path_or_repo_id)
        if name.count("/") != 1 or name.startswith((".", "/", "~")):
            raise ModelFolderError(
                f"Model folder {folder} does not exist; pass the output_dir of a finetune run, a folder written by "
                "Recommender.save_pretrained, or a Hub repo id (user/name)."
            )
        from huggingface_hub import snapshot_download

        try:
            snapshot = Path(snapshot_download(name, revision=revision, token=token))
        except Exception as error:  # offline, unknown repo, no permission: one clear message
            raise ModelFolderError(
                f"{name} is neither a local model folder nor a Hub repo that could be downloaded "
                f"({type(error).__name__}: {error})."
            ) from error
        # The cache keeps a repo as <repo>/snapshots/<revision>/ of links into <repo>/blobs/.
        check_links_stay_inside(snapshot, root=snapshot.resolve().parents[1], walk=(ENCODER_ADAPTER_FOLDER,))
        return snapshot

    @staticmethod
    def check_folder(folder: Union[str, Path], verify: bool = False) -> None:
        """Fail early, naming the file, when a model folder is incomplete, from an incompatible llmrec, carries
        code, or (with `verify`) holds a file whose bytes differ from the checksum recorded when it was saved."""
        folder = Path(folder)
        missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
        if missing:
            raise ModelFolderError(
                f"Model folder {folder} is missing {', '.join(missing)}; copy the whole folder, or save it again "
                "with save_pretrained."
            )
        code = find_custom_code(folder, walk=(ENCODER_ADAPTER_FOLDER,))
        if code or (folder / "adapter_config.json").exists():
            named = ", ".join(str(path) for path in code) or str(folder / "adapter_config.json")
            raise ModelFolderError(
                f"Model folder {folder} carries code or a redirect to another model ({named}): `*.py` files, an "
                "`auto_map` entry, or a top-level adapter_config.json. An llmrec folder never needs them and they are "
                "never run; remove them, or load a folder written by save_pretrained."
            )
        try:
            config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as error:
            raise ModelFolderError(f"{folder / CONFIG_FILE} is not valid JSON ({error}); copy or download the folder again.") from error
        if not isinstance(config, dict):
            raise ModelFolderError(
                f"{folder / CONFIG_FILE} holds a JSON {type(config).__name__ if config is not None else 'null'}, not the model's settings; copy or download "
                "the folder again."
            )
        if config.get("model_type") != "llmrec":
            raise ModelFolderError(
                f"{folder / CONFIG_FILE} has model_type {config.get('model_type')!r}, not 'llmrec'; this folder holds "
                "some other model."
            )
        version = config.get("format_version")
        if version != MODEL_FORMAT_VERSION:
            written_by = config.get("llmrec_version", "an unknown llmrec version")
            raise ModelFolderError(
                f"{folder / CONFIG_FILE} has format_version {version} (written by llmrec {written_by}); this llmrec "
                f"reads format_version {MODEL_FORMAT_VERSION}. Load it with the llmrec version that wrote it, or retrain."
            )
        if verify:
            rebuild = "Rebuild the index with `llmrec index MODEL --rebuild`, or copy or download the folder again."
            verify_checksums(folder, config, CONFIG_FILE, hints={INDEX_FILE: rebuild, sidecar_path(INDEX_FILE).name: rebuild})
        try:
            LlmRecConfig.from_dict(config)
        except Exception as error:  # our ConfigError for impossible values, or transformers' own checks
            raise ModelFolderError(
                f"{folder / CONFIG_FILE} holds an impossible setting ({type(error).__name__}: {str(error)[:300]}); copy "
                "or download the folder again."
            ) from error

    def save_pretrained(self, save_directory: Union[str, Path]) -> None:
        """Write one self-contained folder: config, safetensors weights (or a LoRA adapter), tokenizer,
        catalogue, FAISS index, training metadata and the model card (`README.md`).

        The folder is written beside the target and swapped in as a whole, so a crash at any moment
        leaves either the old complete folder or the new one. Files in the target that llmrec does not
        write (e.g. training `checkpoints/`) are carried over.
        """
        from . import __version__

        if self.quantize is not None or self.precision != "fp32":
            raise InvalidRequestError(
                f"This recommender was loaded for serving with reduced precision (precision={self.precision!r}, "
                f"quantize={self.quantize!r}); its weights are not saved. Load the folder without those options "
                "to save or push it."
            )
        save_directory = Path(save_directory).expanduser().resolve()
        if save_directory.exists() and not save_directory.is_dir():
            raise ModelFolderError(f"{save_directory} is a file; save the model to a folder (new or existing).")
        if save_directory == Path.cwd().resolve() or save_directory in Path.cwd().resolve().parents:
            raise ModelFolderError(
                f"Not saving into {save_directory}: it is the working directory (or holds it), which a save swaps "
                "out as a whole. Save to a dedicated folder such as runs/my-model."
            )
        with atomic_write(save_directory) as staging:
            staging.mkdir()
            self.model.config.llmrec_version = __version__
            self.model.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            Dataset.from_dict(
                {"item_id": self.item_ids, "text": self.item_texts, "popularity": self.item_popularity.tolist()}
            ).to_parquet(str(staging / CATALOGUE_FILE))
            self.pipeline.index.save(staging / INDEX_FILE)
            if self.eval_results is not None:
                write_json_atomic(staging / EVAL_RESULTS_FILE, self.eval_results)
            if self.training_config is not None:
                (staging / TRAINING_CONFIG_FILE).write_text(yaml.safe_dump(self.training_config, sort_keys=False))
            self.model_card().save(staging / MODEL_CARD_FILE)
            # Before any user file joins: only what llmrec wrote is checked on load. The card is left
            # out, since it is never read to load and the Hub lets people edit it.
            record_checksums(staging, CONFIG_FILE, exclude=(MODEL_CARD_FILE,))
            if save_directory.is_dir():
                # Carried over by rename just before the swap: training checkpoints and anything else the
                # user keeps there. Files llmrec writes only sometimes are dropped rather than left stale.
                for entry in save_directory.iterdir():
                    if entry.name.startswith(".") or entry.name in _OPTIONAL_OUTPUTS or (staging / entry.name).exists():
                        continue
                    os.replace(entry, staging / entry.name)
        logger.info("Saved model, tokenizer, catalogue, index and model card to %s", save_directory)

    def model_card(self, repo_id: Optional[str] = None) -> Any:
        """The `huggingface_hub.ModelCard` of this model, with its evaluation results when it has them."""
        return render_model_card(
            self.model.config, self.item_ids, self.eval_results, self.training_config, repo_id=repo_id
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        commit_message: str = "Upload llmrec model",
        dry_run: bool = False,
    ) -> list[str]:
        """Save to a temporary folder and upload it as one commit; returns the uploaded files."""
        with tempfile.TemporaryDirectory() as temporary:
            folder = Path(temporary) / "model"
            self.save_pretrained(folder)
            self.model_card(repo_id).save(folder / MODEL_CARD_FILE)
            return push_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message, dry_run=dry_run)

    # ----- catalogue -----------------------------------------------------------------------------------

    def add_items(self, item_ids: Sequence[str], item_texts: Sequence[str], batch_size: int = 256) -> None:
        """Embed new items from their text and add them to the index: recommendable at once, no retraining.

        New items have no learned ID embedding, so they are represented by their text alone, the same
        path ID dropout calibrated in training.
        """
        if isinstance(item_ids, str) or isinstance(item_texts, str):
            raise InvalidRequestError("add_items takes a list of ids and a list of texts, not single strings.")
        item_ids, item_texts = list(item_ids), list(item_texts)
        if len(item_ids) != len(item_texts):
            raise InvalidRequestError(f"add_items got {len(item_ids)} ids but {len(item_texts)} texts; pass one text per id.")
        bad_ids = [item_id for item_id in item_ids if not isinstance(item_id, (str, int, np.integer)) or isinstance(item_id, bool)]
        if bad_ids:
            raise InvalidRequestError(f"Item ids must be strings (or integers); got {bad_ids[:5]!r}.")
        item_ids = [str(item_id) for item_id in item_ids]
        duplicates = sorted({item_id for item_id in item_ids if item_id in self.item_index or item_ids.count(item_id) > 1})
        if duplicates:
            raise InvalidRequestError(
                f"Item id(s) {duplicates[:10]} are already in the catalogue or repeated; each item id can be added once."
            )
        empty = [item_id for item_id, text in zip(item_ids, item_texts) if not isinstance(text, str) or not text.strip()]
        if empty:
            raise InvalidRequestError(f"Item(s) {empty[:10]} have no text; a new item is only known by its text.")
        if not item_ids:
            return
        with self._write_lock:
            text_embeddings = embed_item_texts(self.model, self.tokenizer, item_texts, batch_size)
            start = self.num_items + 1
            # Readers see the new ids only once everything they point to exists.
            self.model.add_items(text_embeddings)
            new_vectors = self.pipeline.add_items(len(item_ids))
            self.pipeline.index = self.pipeline.index.extended(new_vectors)
            self.item_texts = self.item_texts + item_texts
            self.item_popularity = np.concatenate([self.item_popularity, np.zeros(len(item_ids))])
            self.item_ids = self.item_ids + item_ids
            self.item_index = {**self.item_index, **{item_id: start + offset for offset, item_id in enumerate(item_ids)}}
        logger.info("Added %d items; the catalogue now has %d.", len(item_ids), self.num_items)

    # ----- serving -----------------------------------------------------------------------------------

    def _indices(self, item_ids: Iterable[str], what: str = "history") -> list[int]:
        if isinstance(item_ids, (str, bytes)):
            raise InvalidRequestError(f"The {what} must be a list of item ids, not the single string {item_ids!r}.")
        item_ids = list(item_ids)
        bad_types = [item_id for item_id in item_ids if not isinstance(item_id, (str, int, np.integer)) or isinstance(item_id, bool)]
        if bad_types:
            raise InvalidRequestError(
                f"The {what} holds values that are not item ids: {bad_types[:5]!r}; item ids are strings (or integers)."
            )
        unknown = [item_id for item_id in item_ids if str(item_id) not in self.item_index]
        if unknown:
            raise UnknownItemError(unknown)
        return [self.item_index[str(item_id)] for item_id in item_ids]

    def _allowed_indices(self, filter: Optional[ItemFilter]) -> Optional[np.ndarray]:
        """Item indices a filter admits: a callable on item ids, or a collection of allowed ids."""
        if filter is None:
            return None
        if callable(filter):
            return np.array([index for index, item_id in enumerate(self.item_ids, start=1) if filter(item_id)], dtype=np.int64)
        return np.array(sorted(set(self._indices(filter, what="filter"))), dtype=np.int64)

    def _ranked(self, indices: np.ndarray, scores: np.ndarray, k: int) -> RankedItems:
        ranked = [(self.item_ids[index - 1], float(score)) for index, score in zip(indices, scores) if index > 0 and np.isfinite(score)]
        return ranked[:k]

    def _popular(self, exclude: set[int], allowed: Optional[np.ndarray], k: int) -> RankedItems:
        """Users with no history get the most popular items: a documented fallback, not a crash."""
        order = np.argsort(-self.item_popularity, kind="stable") + 1
        if allowed is not None:
            order = order[np.isin(order, allowed)]
        return [(self.item_ids[index - 1], float(self.item_popularity[index - 1])) for index in order if index not in exclude][:k]

    def recommend(
        self,
        history: Sequence[str],
        k: int = 10,
        *,
        exclude: Optional[Iterable[str]] = None,
        filter: Optional[ItemFilter] = None,
        exclude_history: bool = True,
        profile: Optional[str] = None,
    ) -> RankedItems:
        """The `k` best items for one history (item ids, oldest first) as (item_id, score), best first.

        `exclude` lists items never to return, `filter` keeps only the items it admits (a callable on
        item ids, or a collection of allowed ids), and items of the history are left out unless
        `exclude_history=False`. Fewer than `k` items come back when fewer are eligible.

        `profile` is a free-text description of the user ("likes 90s sci-fi and dark comedies"), read by
        the same BERT as the items, for models with a profile path (`use_user_profiles`). A user with a
        profile is recommended for by the model even with an empty history (a cold user); an empty history
        without a profile gets the most popular eligible items, scored by their training popularity.
        """
        return self.recommend_batch(
            [history], k, exclude=exclude, filter=filter, exclude_history=exclude_history,
            profiles=None if profile is None else [profile],
        )[0]

    def recommend_batch(
        self,
        histories: Sequence[Sequence[str]],
        k: int = 10,
        *,
        exclude: Optional[Iterable[str]] = None,
        filter: Optional[ItemFilter] = None,
        exclude_history: bool = True,
        profiles: Optional[Sequence[Optional[str]]] = None,
    ) -> list[RankedItems]:
        """`recommend` for many histories at once: one FAISS search and one reranker call per batch.

        `profiles`, if given, holds one profile text (or None) per history.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise InvalidRequestError(f"k must be a positive integer, got {k!r}.")
        if isinstance(histories, (str, bytes)):
            raise InvalidRequestError("recommend_batch takes a list of histories (each a list of item ids).")
        profiles = self._check_profiles(profiles, len(histories))
        index_histories = [self._indices(history) for history in histories]
        excluded = set(self._indices(exclude, what="exclude list")) if exclude is not None else set()
        allowed = self._allowed_indices(filter)
        results: list[Optional[RankedItems]] = [None] * len(histories)
        warm = []
        for row, history in enumerate(index_histories):
            if history or profiles[row] is not None:
                warm.append(row)
            else:
                results[row] = self._popular(excluded, allowed, k)
        if warm:
            warm_histories = [index_histories[row] for row in warm]
            never = [(set(history) if exclude_history else set()) | excluded for history in warm_histories]
            user_embeddings = self._user_embeddings(warm_histories, [profiles[row] for row in warm])
            _, candidates = self.pipeline.retrieve(
                warm_histories, max(k, self.pipeline.num_candidates), user_embeddings, exclude=never, allowed=allowed
            )
            scores, _ = self.pipeline.rerank(warm_histories, candidates, user_embeddings=user_embeddings)
            scores = scores.float().cpu().numpy()
            for position, row in enumerate(warm):
                order = np.argsort(-scores[position], kind="stable")
                results[row] = self._ranked(candidates[position][order], scores[position][order], k)
        return results

    def _check_profiles(self, profiles: Optional[Sequence[Optional[str]]], count: int) -> list[Optional[str]]:
        if profiles is None:
            return [None] * count
        if isinstance(profiles, (str, bytes)):
            raise InvalidRequestError("profiles must be a list with one profile text (or None) per history, not one string.")
        profiles = list(profiles)
        if len(profiles) != count:
            raise InvalidRequestError(f"Got {count} histories but {len(profiles)} profiles; pass one (or None) per history.")
        bad = [profile for profile in profiles if profile is not None and (not isinstance(profile, str) or not profile.strip())]
        if bad:
            raise InvalidRequestError(f"A profile must be a non-empty text (or None); got {bad[:3]!r}.")
        if self.model.profile_projection is None and any(profile is not None for profile in profiles):
            raise InvalidRequestError(
                "This model has no user-profile path (trained without use_user_profiles); recommend from a history, "
                "or fit profiles with llmrec.training.profiles.fit_user_profiles."
            )
        return profiles

    @torch.inference_mode()
    def _user_embeddings(self, histories: list[list[int]], profiles: list[Optional[str]]) -> torch.Tensor:
        """User vectors from histories and, where given, profile texts (encoded by the item BERT)."""
        if all(profile is None for profile in profiles):
            return self.pipeline.user_embeddings(histories)
        texts = [profile if profile is not None else "" for profile in profiles]
        profile_embeddings = embed_item_texts(self.model, self.tokenizer, texts)
        has_profile = torch.tensor([profile is not None for profile in profiles], device=profile_embeddings.device)
        window, older = split_histories(histories, self.model.config.max_history_length, self.pipeline.device)
        return self.model.encode_users(window, self.pipeline.item_embeddings, profile_embeddings, has_profile, older)[:, -1]

    def rerank(self, history: Sequence[str], candidates: Sequence[str]) -> RankedItems:
        """Score the given candidates for one history with the cross-attention head, best first."""
        return self.rerank_batch([history], [candidates])[0]

    def rerank_batch(self, histories: Sequence[Sequence[str]], candidates: Sequence[Sequence[str]]) -> list[RankedItems]:
        """`rerank` for many (history, candidates) pairs in one batched call.

        Every candidate is scored, history items included; each candidate list must not repeat an id.
        With an empty history the head sees no history, and scores fall back to what it learned without one.
        """
        if len(histories) != len(candidates):
            raise InvalidRequestError(f"Got {len(histories)} histories but {len(candidates)} candidate lists; pass one list per history.")
        index_histories = [self._indices(history) for history in histories]
        index_candidates = [self._indices(row, what="candidate list") for row in candidates]
        for row in candidates:
            repeated = sorted(item_id for item_id, count in Counter(map(str, row)).items() if count > 1)
            if repeated:
                raise InvalidRequestError(f"Candidate id(s) {repeated[:10]} appear more than once; pass each candidate once.")
        width = max((len(row) for row in index_candidates), default=0)
        if width == 0:
            return [[] for _ in histories]
        padded = np.zeros((len(candidates), width), dtype=np.int64)
        for row, items in enumerate(index_candidates):
            padded[row, : len(items)] = items
        scores, _ = self.pipeline.rerank(index_histories, padded)
        scores = scores.float().cpu().numpy()
        ranked = []
        for row, items in enumerate(index_candidates):
            order = np.argsort(-scores[row, : len(items)], kind="stable")
            ranked.append(self._ranked(padded[row][order], scores[row][order], len(items)))
        return ranked

    def explain(
        self, history: Sequence[str], item_id: str, per_head: bool = False
    ) -> Union[list[tuple[str, float]], list[tuple[str, list[float]]]]:
        """How much each history item weighed in `item_id`'s reranking score, oldest first.

        The weights are the cross-attention of the candidate over the history (the last
        `max_history_length` items), averaged over heads (or one list per item with `per_head`); they are
        non-negative and sum to 1 over the history.
        """
        history_indices = self._indices(history)
        if not history_indices:
            raise InvalidRequestError("explain() needs a non-empty history: attention weights are over history items.")
        (candidate,) = self._indices([item_id], what="item to explain")
        _, attentions = self.pipeline.rerank([history_indices], np.array([[candidate]]), output_attentions=True)
        weights = attentions[0, :, 0].float().cpu()  # (heads, L) over the left-padded history
        recent = list(history)[-weights.shape[-1] :]
        weights = weights[:, weights.shape[-1] - len(recent) :]
        if per_head:
            return [(str(item), weights[:, column].tolist()) for column, item in enumerate(recent)]
        mean = weights.mean(dim=0)
        return [(str(item), float(mean[column])) for column, item in enumerate(recent)]
