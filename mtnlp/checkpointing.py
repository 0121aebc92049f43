"""Checkpoints: atomic, rotated, resumable snapshots of a training run under `--output-dir`.

A checkpoint is `accelerator.save_state`: the model (safetensors), optimizer, LR scheduler,
gradient scaler, each process's RNG states, and every object registered with
`accelerator.register_for_checkpointing` (the task sampler, the loss weighting and the loop's
`TrainState`: step, data position, running totals), plus the tokenizer. It is written into
`.checkpoint-<step>.tmp` and then renamed to `checkpoint-<step>`, so a kill during a save leaves
every earlier checkpoint intact and at worst a temporary folder that `latest` never picks.
`checkpoint.json` records the step and the tasks' model metadata, so a checkpoint of other tasks
is refused before it loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import reprlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from mtnlp.errors import UserError
from mtnlp.modeling import check_weight_files

logger = logging.getLogger(__name__)

CHECKPOINT_META = "checkpoint.json"
MODEL_FILE = "model.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_STAGING = ".checkpoint-{step}.tmp"
# model metadata that may change between a checkpoint and its resumed run
_FREE_SPEC_KEYS = {"metrics", "main_metric", "description"}


# ------------------------------------------------------------------------------ finding
def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete `checkpoint-<step>` folders of `output_dir`, lowest step first."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(match[1]), path)
        for path in output_dir.iterdir()
        if (match := _NAME.match(path.name)) and (path / CHECKPOINT_META).is_file()
    ]
    return [path for _, path in sorted(found)]


def resolve_checkpoint(spec: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder `--resume-from-checkpoint` names: a path, or `latest` (the highest
    step in `output_dir`); None when not resuming."""
    if spec is None:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(
                f"--resume-from-checkpoint latest: no checkpoint-<step> folder in {output_dir}"
            )
        return found[-1]
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"--resume-from-checkpoint: {spec}: no such folder")
    if not (path / CHECKPOINT_META).is_file() or not (path / MODEL_FILE).is_file():
        raise UserError(
            f"--resume-from-checkpoint: {spec}: not a checkpoint folder (no {CHECKPOINT_META} "
            f"or {MODEL_FILE}); give a checkpoint-<step> folder or 'latest'"
        )
    return path


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_task_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(task, dict) and isinstance(task.get("name"), str) for task in value
    )


# what checkpoint.json must hold, for check_tasks and load_checkpoint: (check, expected)
_META_FIELDS = {
    "step": (_is_step, "a step number (an integer >= 0)"),
    "tasks": (_is_task_list, "a list of tasks, each a mapping with a name"),
}


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's `checkpoint.json`; a `UserError` naming the field that is missing or of
    the wrong type (a hand-edited or foreign file must not end in a KeyError)."""
    path = checkpoint / CHECKPOINT_META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key, (valid, expected) in _META_FIELDS.items():
        if key not in meta:
            raise UserError(f"{path}: {key}: missing")
        if not valid(meta[key]):
            raise UserError(f"{path}: {key}: expected {expected}, got {reprlib.repr(meta[key])}")
    return meta


def check_tasks(checkpoint: Path, specs: Sequence[dict[str, Any]]) -> None:
    """Refuse a checkpoint whose tasks (names, order, or model metadata) differ from the cards'.
    A key that the checkpoint lacks is metadata added to mtnlp after it was written (such as
    `max_length`): it is not compared, since the checkpoint cannot say what it was."""
    saved = read_meta(checkpoint)["tasks"]
    specs = json.loads(json.dumps(list(specs)))  # as JSON stores them (tuples become lists)
    saved_names = [spec["name"] for spec in saved]
    names = [spec["name"] for spec in specs]
    if saved_names != names:
        raise UserError(
            f"--resume-from-checkpoint: {checkpoint} was saved for tasks {', '.join(saved_names)}; "
            f"this run trains {', '.join(names)} (give the same cards and --tasks, in that order)"
        )
    for old, new in zip(saved, specs, strict=True):
        for key in sorted(set(old) - _FREE_SPEC_KEYS):
            if old.get(key) != new.get(key):
                raise UserError(
                    f"--resume-from-checkpoint: {checkpoint}: task {new['name']}: the card's {key} "
                    f"({new.get(key)!r}) differs from the checkpoint's ({old.get(key)!r})"
                )


# ------------------------------------------------------------------------------ saving
def check_finite(step: int, *modules: nn.Module) -> None:
    """Refuse to go on with NaN/inf weights: they must never reach a checkpoint or the output."""
    parameters = [(name, p) for module in modules for name, p in module.named_parameters()]
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in parameters])
    if not bool(finite.all()):
        name = parameters[int((~finite).nonzero()[0])][0]
        raise UserError(
            f"step {step}: the weights are no longer finite ({name} holds NaN/inf); nothing was "
            "saved. Lower --learning-rate or resume from an earlier checkpoint"
        )


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    specs: Sequence[dict[str, Any]],
    keep: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write `checkpoint-<step>` atomically (every process calls this) and keep the newest `keep`.

    Each process writes its RNG states into the staging folder (accelerate's layout); everything
    else (the tokenizer too, which a resumed `--model tiny` run reads back), the rename and the
    rotation are the main process's.
    """
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / _STAGING.format(step=step)
    if accelerator.is_main_process:
        for leftover in output_dir.glob(_STAGING.format(step="*")):  # from killed saves
            shutil.rmtree(leftover)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        meta = {"step": step, "tasks": list(specs), "num_processes": accelerator.num_processes}
        (staging / CHECKPOINT_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _sync_to_disk(staging)
        if final.exists():  # resumed from an earlier step: replace the old copy of this step
            shutil.rmtree(final)
        staging.rename(final)
        _sync_to_disk(output_dir, recursive=False)
        _rotate(output_dir, keep, final)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def _rotate(output_dir: Path, keep: int | None, newest: Path) -> None:
    if keep is None:
        return
    others = [path for path in list_checkpoints(output_dir) if path != newest]
    for old in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old)


def _sync_to_disk(folder: Path, recursive: bool = True) -> None:
    """fsync the files (and the folder entry) so a rename never outlives its contents on a crash."""
    if recursive:
        for path in folder.rglob("*"):
            if path.is_file():
                with open(path, "rb") as file:
                    os.fsync(file.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_checkpoints(output_dir: Path) -> None:
    """Delete another run's checkpoints (`--overwrite-output-dir`), so `latest` never finds them."""
    for path in list_checkpoints(output_dir):
        shutil.rmtree(path)


# ------------------------------------------------------------------------------ loading
def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> int:
    """Restore everything `save_checkpoint` wrote; returns the checkpoint's step."""
    meta = read_meta(checkpoint)
    if meta.get("num_processes") != accelerator.num_processes:
        logger.warning(
            "%s was written by %s process(es) and is resumed by %d: the data order and RNG "
            "streams differ, so the run will not match an uninterrupted one exactly",
            checkpoint, meta.get("num_processes"), accelerator.num_processes,
        )  # fmt: skip
    try:
        check_weight_files(checkpoint)  # a truncated file: its name, not the loader's traceback
    except UserError as error:
        raise UserError(f"--resume-from-checkpoint: {error}") from None
    try:
        accelerator.load_state(str(checkpoint))
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise UserError(
            f"--resume-from-checkpoint: {checkpoint}: does not fit this run's model ({first_line})"
        ) from None
    logger.info("resumed from %s (step %d)", checkpoint, meta["step"])
    return meta["step"]


# ------------------------------------------------------------------------------ loop state
class TrainState:
    """The training loop's position and running totals, registered for checkpointing.

    `streams` knows the data position (per task: epoch, batches taken, shuffling-generator state
    at the epoch start); the totals make the logs of a resumed run continue where they stopped.
    Loss sums stay tensors on the device (no sync per step) and are saved as floats.
    """

    def __init__(self, tasks: Sequence[str], streams: Any, device: torch.device) -> None:
        self.streams = streams
        self.step = 0
        self.bad_steps = 0  # consecutive steps with a non-finite loss
        self.examples = 0
        self.task_steps = dict.fromkeys(tasks, 0)
        self.window_steps = dict.fromkeys(tasks, 0)
        self.loss_sums = {task: torch.zeros((), device=device) for task in tasks}
        self.history: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "bad_steps": self.bad_steps,
            "examples": self.examples,
            "task_steps": dict(self.task_steps),
            "window_steps": dict(self.window_steps),
            "loss_sums": {task: float(value) for task, value in self.loss_sums.items()},
            "history": list(self.history),
            "streams": self.streams.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.bad_steps = state["bad_steps"]
        self.examples = state["examples"]
        self.task_steps = dict(state["task_steps"])
        self.window_steps = dict(state["window_steps"])
        for task, value in state["loss_sums"].items():
            self.loss_sums[task].fill_(value)
        self.history = list(state["history"])
        self.streams.load_state_dict(state["streams"])
