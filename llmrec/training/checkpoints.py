"""Checkpoint folders: writing one, keeping the latest few, finding the one to resume from, checking it is intact.

A checkpoint is `Accelerator.save_state` (model, optimizer, scaler, RNG states) plus `trainer_state.json`
(where the loop stands, the run's config) and `best_state.safetensors` (the best weights so far). It is
written into a hidden staging folder and published by one rename, so a kill mid-save never leaves a
folder that looks published; hidden folders are ignored when listing and cleared by the next run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from accelerate import Accelerator
from accelerate.utils import OPTIMIZER_NAME, RNG_STATE_NAME, SAFE_WEIGHTS_NAME
from accelerate.utils import load as load_torch_file
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ExperimentConfig
from ..errors import ConfigError
from ..utils.io import atomic_write, write_json_atomic
from .progress import TrainingProgress
from .resume_checks import check_resumable

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
BEST_STATE_NAME = "best_state.safetensors"
CHECKPOINTS_KEPT = 2


def checkpoint_root(config: ExperimentConfig) -> Path:
    return Path(config.output_dir) / "checkpoints"


def read_trainer_state(checkpoint: Union[str, Path]) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))


def list_checkpoints(folder: Union[str, Path]) -> list[Path]:
    """Published checkpoints in `folder`, least advanced first; hidden staging folders of interrupted saves are not."""
    found = []
    for candidate in Path(folder).glob("[!.]*"):
        try:
            progress = TrainingProgress(**read_trainer_state(candidate)["progress"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append((progress.order, candidate))
    return [path for _, path in sorted(found)]


def save_checkpoint(
    accelerator: Accelerator, checkpoint_dir: Path, name: str, best_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
) -> None:
    """Accelerate state, best weights and trainer state as `checkpoint_dir / name`, published by one rename once complete.

    Every process calls this (`save_state` is collective); the main process writes the rest and prunes.
    """
    staging = checkpoint_dir / f".staging-{name}"  # the same path on every process
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file({key: value.detach().cpu().contiguous() for key, value in best_state.items()}, staging / BEST_STATE_NAME)
        write_json_atomic(staging / TRAINER_STATE_NAME, trainer_state)
        with atomic_write(checkpoint_dir / name) as temporary:
            os.replace(staging, temporary)
        # Keep the most advanced checkpoints: enough to resume, bounded on disk.
        for old in list_checkpoints(checkpoint_dir)[:-CHECKPOINTS_KEPT]:
            remove_folder(old)
    accelerator.wait_for_everyone()


def check_task_model_weights(checkpoint: Path, prefix: str) -> None:
    """A mid-stage checkpoint holds the stage's task model, whose weights are named `prefix` + the model's.

    Checkpoints of releases before the task models (llmrec.modeling.task_models) hold the bare model; Accelerate
    would fail to load them into a task model with a long list of missing keys, so say what happened instead.
    """
    with safe_open(checkpoint / SAFE_WEIGHTS_NAME, framework="pt") as handle:
        names = list(handle.keys())
    if names and not any(name.startswith((prefix, f"module.{prefix}")) for name in names):
        raise ConfigError(
            f"Checkpoint {checkpoint} was written by an earlier llmrec release (its weights are not those of a task "
            "model), so this release cannot continue its stage. Finish the run with the release that started it, "
            "or start again without --resume."
        )


def clear_stale_checkpoints(checkpoint_dir: Path, remove_earlier_run: bool) -> None:
    """Remove staging folders of interrupted saves and, if `remove_earlier_run`, an earlier run's checkpoints.

    Those would otherwise be mixed up with this run's when picking the latest or pruning. Main process only.
    """
    if not checkpoint_dir.is_dir():
        return
    for leftover in checkpoint_dir.glob(".*"):
        remove_folder(leftover)
    if remove_earlier_run:
        earlier = list_checkpoints(checkpoint_dir)
        if earlier:
            logger.warning(
                "Not resuming: removing %d checkpoint(s) of an earlier run from %s (resume to continue from them).",
                len(earlier), checkpoint_dir,
            )
        for checkpoint in earlier:
            remove_folder(checkpoint)


def find_checkpoint(config: ExperimentConfig, resume_from: Union[str, Path], ignore_rng_state: bool = False) -> Path:
    """The checkpoint to resume from, checked against `config`.

    "latest" is the most advanced intact checkpoint in `<output_dir>/checkpoints`; broken ones (see
    `checkpoint_problem`) are skipped with a warning that names them. A checkpoint given by path must be intact.
    Random states that cannot be read are a ConfigError unless `ignore_rng_state`.
    """
    if str(resume_from) == "latest":
        checkpoint = _latest_intact_checkpoint(checkpoint_root(config))
    else:
        checkpoint = Path(resume_from).expanduser()
        if not (checkpoint / TRAINER_STATE_NAME).is_file():
            raise ConfigError(
                f"{checkpoint} is not a checkpoint folder (no {TRAINER_STATE_NAME}); give one of the folders in "
                "<output_dir>/checkpoints, or resume from the latest one."
            )
        problem = checkpoint_problem(checkpoint)
        if problem:
            raise ConfigError(f"Cannot resume from {checkpoint}: it is broken ({problem}). Resume from another "
                              "checkpoint of <output_dir>/checkpoints, or from the latest intact one with --resume.")
    trainer_state = read_trainer_state(checkpoint)
    check_resumable(trainer_state, config, checkpoint)
    for process_index in range(int(trainer_state["num_processes"])):
        try:
            read_rng_state(checkpoint, process_index)
        except ConfigError as error:
            if not ignore_rng_state:
                raise
            logger.warning("%s Resuming without them, as --resume-ignore-rng asks.", error)
    return checkpoint


def _latest_intact_checkpoint(folder: Path) -> Path:
    checkpoints = list_checkpoints(folder)
    published = sorted(path for path in folder.glob("[!.]*") if path.is_dir()) if folder.is_dir() else []
    # A folder whose trainer state is unreadable cannot be ordered: it is only reported.
    broken = {path: "trainer_state.json is missing or unreadable" for path in published if path not in checkpoints}
    chosen = None
    for checkpoint in reversed(checkpoints):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            chosen = checkpoint
            break
        broken[checkpoint] = problem
    for path, problem in broken.items():
        logger.warning("Checkpoint %s is broken (%s); it is not resumed from.", path, problem)
    if chosen is None:
        found = f" ({len(broken)} broken one(s) were skipped, see the warnings)" if broken else ""
        raise ConfigError(
            f"Nothing to resume from: no intact checkpoint in {folder}{found}. Checkpoints are saved when "
            "training.checkpoint_every_steps > 0; run without resuming to start from scratch."
        )
    if broken:
        logger.warning("Resuming from %s, the most advanced intact checkpoint.", chosen)
    return chosen


def checkpoint_problem(checkpoint: Path) -> Optional[str]:
    """Why `checkpoint` cannot be resumed from, or None if it is intact.

    Intact: trainer_state.json parses into a known progress, the weights and best weights have readable
    safetensors headers whose tensors fit in the file, the optimizer state is a complete torch archive
    (its zip directory is at the end of the file, so a truncated one fails), and every process has its
    random-state file.
    """
    try:
        trainer_state = read_trainer_state(checkpoint)
        TrainingProgress(**trainer_state["progress"])
        num_processes = int(trainer_state["num_processes"])
        for key in ("config", "finished_stages", "timings", "data_fingerprint"):
            trainer_state[key]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{TRAINER_STATE_NAME} is unreadable: {_first_line(error)}"
    for name in (SAFE_WEIGHTS_NAME, BEST_STATE_NAME):
        problem = _safetensors_problem(checkpoint / name)
        if problem:
            return problem
    optimizer_file = checkpoint / f"{OPTIMIZER_NAME}.bin"
    if not zipfile.is_zipfile(optimizer_file):
        return f"{optimizer_file.name} is missing or truncated"
    missing = [name for name in (_rng_file_name(index) for index in range(num_processes)) if not (checkpoint / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    return None


def _safetensors_problem(path: Path) -> Optional[str]:
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()  # the header; safe_open also checks that every tensor's bytes lie inside the file
    except Exception as error:  # SafetensorError and OSError: the file is truncated or garbled
        return f"{path.name} is unreadable ({_first_line(error)})"
    return None


def _first_line(error: BaseException, width: int = 120) -> str:
    """Torch's load errors run to a page of advice; a log line or error message needs their first line."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= width else text[: width - 1] + "…"


def _rng_file_name(process_index: int) -> str:
    return f"{RNG_STATE_NAME}_{process_index}.pkl"


def read_rng_state(checkpoint: Path, process_index: int) -> dict[str, Any]:
    """The random states `Accelerator.save_state` wrote for one process, or a ConfigError saying why not.

    Accelerate's `load_state` only logs when it cannot restore them, and the resumed run would then draw
    other dropout masks and negatives than the interrupted one, so they are read here first. The file is
    the user's own training output, written by `Accelerator.save_state` with torch.save; it is read as
    `load_state` reads it (accelerate's `load`, i.e. torch.load with weights_only=True), which runs no code.
    """
    path = checkpoint / _rng_file_name(process_index)
    try:
        states = load_torch_file(path)
        required = ("random_state", "numpy_random_seed", "torch_manual_seed")
        if not isinstance(states, dict) or any(key not in states for key in required):
            raise ValueError(f"it lacks {', '.join(key for key in required if not isinstance(states, dict) or key not in states)}")
        if not isinstance(states["torch_manual_seed"], torch.Tensor):
            raise ValueError("torch_manual_seed is not a tensor")
    except Exception as error:  # truncated, garbled or foreign: any failure means the states are lost
        raise ConfigError(
            f"The random states of checkpoint {checkpoint} ({path.name}) cannot be read ({_first_line(error)}), so the resumed run "
            "would not reproduce an uninterrupted one. Resume from an older checkpoint (--resume CHECKPOINT), or "
            "pass --resume-ignore-rng to resume anyway."
        ) from None
    return states


def check_rng_restored(checkpoint: Path, process_index: int, ignore_rng_state: bool) -> None:
    """`load_state` swallows a failure to restore the random states: compare them with the file's.

    A mismatch is a ConfigError unless `ignore_rng_state` (--resume-ignore-rng), which only warns.
    """
    try:
        states = read_rng_state(checkpoint, process_index)
        if not torch.equal(torch.get_rng_state(), states["torch_manual_seed"]):
            raise ConfigError(
                f"The random states of checkpoint {checkpoint} could not be restored, so the resumed run "
                "would not reproduce an uninterrupted one. Resume from an older checkpoint, or pass "
                "--resume-ignore-rng to resume anyway."
            )
    except ConfigError as error:
        if not ignore_rng_state:
            raise
        logger.warning("%s Resuming without them, as --resume-ignore-rng asks.", error)


def remove_folder(folder: Path) -> None:
    """Hide a folder before deleting it, so a kill mid-delete cannot leave a partial checkpoint that looks published."""
    hidden = folder.parent / f".deleting-{folder.name}"
    try:
        os.replace(folder, hidden)
    except OSError:
        hidden = folder
    if hidden.is_dir():
        shutil.rmtree(hidden, ignore_errors=True)
    else:
        hidden.unlink(missing_ok=True)
