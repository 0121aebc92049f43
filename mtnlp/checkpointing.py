"""Checkpoints: atomic, rotated, resumable snapshots of a training run under `--output-dir`,
and the output folder's lock.

A checkpoint is `accelerator.save_state`: the model (safetensors), optimizer, LR scheduler,
gradient scaler, each process's RNG states, and every object registered with
`accelerator.register_for_checkpointing` (the task sampler, the loss weighting, the loop's
`TrainState`: step, data position, running totals; the `--keep-best` tracker and the successive
regularization snapshots when used), plus the tokenizer. It is written into
`.checkpoint-<step>.tmp` and then renamed to `checkpoint-<step>`, so a kill during a save leaves
every earlier checkpoint intact and at worst a temporary folder that `latest` never picks (and the
next run removes). `checkpoint.json` records the step, the tasks' model metadata and the run's
arguments, so a checkpoint of other tasks or another `--model` is refused before it loads, and a
state file missing from it is named instead of silently skipped.

One run at a time writes into an output folder: `output_lock` holds an OS lock on
`OUTPUT/.mtnlp.lock` (released by the kernel when a run dies, so a stale file never blocks).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import reprlib
import shutil
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import load as load_state_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from mtnlp.errors import WRITE_PROBE, UserError, first_line, writable_output_dir
from mtnlp.modeling import check_weight_files

logger = logging.getLogger(__name__)

CHECKPOINT_META = "checkpoint.json"
MODEL_FILE = "model.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_STAGING = ".checkpoint-{step}.tmp"
LOCK_FILE = ".mtnlp.lock"
# what a killed run leaves behind: staging folders of checkpoints and of the final save, the
# lock file, a write probe; and the trackers' logs (accelerate's logging_dir)
_LEFTOVERS = (_STAGING.format(step="*"), ".saving-*", LOCK_FILE, WRITE_PROBE.format(pid="*"))
LOGS = "logs"
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
            way_out = (
                "run without --resume-from-checkpoint to start afresh"
                if only_leftovers(output_dir)
                else "to start afresh, run without --resume-from-checkpoint and with "
                "--overwrite-output-dir"
            )
            raise UserError(
                f"--resume-from-checkpoint latest: no checkpoint-<step> folder in {output_dir}; "
                f"{way_out}"
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


def in_folder(checkpoint: Path, output_dir: Path) -> bool:
    """Whether `checkpoint` is one of `output_dir`'s own checkpoints (resuming in place)."""
    return checkpoint.resolve().parent == output_dir.resolve()


def _model_id(model: str) -> str:
    """`--model` as checkpoints record it: a local folder as its absolute path, else the name."""
    folder = Path(model).expanduser()
    return str(folder.resolve()) if folder.is_dir() else model


def check_model(checkpoint: Path, model: str) -> None:
    """Refuse to resume a checkpoint written with another `--model` (its tokenizer, encoder
    configuration and vocabulary would not be the ones trained)."""
    saved = read_meta(checkpoint).get("args", {}).get("model")
    if saved is not None and saved != _model_id(model):
        raise UserError(
            f"--resume-from-checkpoint: {checkpoint} was written with --model {saved}; this run "
            f"has --model {model} (resume with the checkpoint's --model)"
        )


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
    arguments: dict[str, Any] | None = None,
) -> Path:
    """Write `checkpoint-<step>` atomically (every process calls this) and keep the newest `keep`.

    Each process writes its RNG states into the staging folder (accelerate's layout); everything
    else (the tokenizer too, which a resumed `--model tiny` run reads back), the rename and the
    rotation are the main process's. `arguments` (the run's flags) go to `checkpoint.json`, for
    the checks of a resumed run.
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
        if arguments is not None:
            meta["args"] = {**arguments, "model": _model_id(arguments["model"])}
        text = json.dumps(meta, indent=2, default=str) + "\n"
        (staging / CHECKPOINT_META).write_text(text, encoding="utf-8")
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


def _step(checkpoint: Path) -> int:
    return int(_NAME.match(checkpoint.name)[1])


def remove_checkpoints(output_dir: Path, after: int | None = None) -> None:
    """Delete checkpoints so that `latest` and the rotation never pick them: another run's
    (`--overwrite-output-dir`), or, resuming at step `after`, the newer ones of the continuation
    that was abandoned (they would outrank this run's own)."""
    doomed = [path for path in list_checkpoints(output_dir) if after is None or _step(path) > after]
    for path in doomed:
        shutil.rmtree(path)
    if doomed and after is not None:
        logger.warning(
            "resuming at step %d: removed %s of %s (newer than the resumed checkpoint, from the "
            "run that was abandoned there)",
            after, ", ".join(path.name for path in doomed), output_dir,
        )  # fmt: skip


def only_leftovers(output_dir: Path) -> bool:
    """Whether `output_dir` is missing, empty, or holds only what a run killed before its first
    checkpoint leaves (staging folders, the lock file, tracker logs): nothing to resume or lose."""
    if not output_dir.is_dir():
        return not output_dir.exists()
    return all(_is_leftover(path) for path in output_dir.iterdir())


def _is_leftover(path: Path) -> bool:
    return path.name == LOGS or any(path.match(pattern) for pattern in _LEFTOVERS)


def clean_leftovers(output_dir: Path, logs: bool) -> None:
    """Remove killed runs' staging folders (and write probes) from `output_dir`, and, when `logs`
    (a run starting afresh), the tracker logs of the run it replaces (main process only; the
    lock file stays: this run holds it)."""
    if not output_dir.is_dir():
        return
    doomed = [
        path
        for path in output_dir.iterdir()
        if _is_leftover(path) and path.name != LOCK_FILE and (logs or path.name != LOGS)
    ]
    for path in doomed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if doomed:
        logger.info("removed leftovers of an earlier run: %s", ", ".join(p.name for p in doomed))


# ------------------------------------------------------------------------------ loading
# flags that change the schedule or the data order: a resumed run with other values goes on, but
# does not continue the checkpoint's run exactly
_SCHEDULE_FLAGS = ("batch_size", "gradient_accumulation_steps", "max_steps")


def load_checkpoint(
    accelerator: Accelerator,
    checkpoint: Path,
    registered: Sequence[str],
    arguments: dict[str, Any] | None = None,
) -> int:
    """Restore everything `save_checkpoint` wrote; returns the checkpoint's step.

    `registered` names the objects registered for checkpointing, in their order (a missing state
    file is refused, naming what it holds); `arguments`, the run's flags, are compared with the
    checkpoint's (a warning for each schedule flag that differs).
    """
    meta = read_meta(checkpoint)
    same_processes = meta.get("num_processes") == accelerator.num_processes
    if accelerator.is_main_process:
        if not same_processes:
            logger.warning(
                "%s was written by %s process(es) and is resumed by %d: the data order and RNG "
                "streams differ, so the run will not match an uninterrupted one exactly",
                checkpoint, meta.get("num_processes"), accelerator.num_processes,
            )  # fmt: skip
        _warn_changed_flags(checkpoint, meta.get("args", {}), arguments or {})
    try:
        check_weight_files(checkpoint)  # a truncated file: its name, not the loader's traceback
    except UserError as error:
        raise UserError(f"--resume-from-checkpoint: {error}") from None
    # with another number of processes, the RNG states cannot match anyway (warned above)
    rng = accelerator.process_index if same_processes else None
    _check_state_files(checkpoint, registered, rng)
    try:
        accelerator.load_state(str(checkpoint))
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        raise UserError(
            f"--resume-from-checkpoint: {checkpoint}: does not fit this run's model "
            f"({first_line(error)})"
        ) from None

    logger.info("resumed from %s (step %d)", checkpoint, meta["step"])
    return meta["step"]


def _check_state_files(checkpoint: Path, registered: Sequence[str], process: int | None) -> None:
    """Refuse a checkpoint without a state file this run loads: accelerate would skip a missing
    RNG state silently (the run then differs from an uninterrupted one)."""
    expected = {f"custom_checkpoint_{i}.pkl": f"the {name}" for i, name in enumerate(registered)}
    if process is not None:
        expected[f"random_states_{process}.pkl"] = "the random number generators' states"
    for name, holds in expected.items():
        if not (checkpoint / name).is_file():
            raise UserError(
                f"--resume-from-checkpoint: {checkpoint}: {name} is missing ({holds}), so the run "
                "cannot continue exactly; resume from a complete checkpoint"
            )
        try:  # as accelerate reads it (weights only), which skips an unreadable RNG file silently
            load_state_file(checkpoint / name)
        except Exception as error:  # torch.load raises many types for a damaged file
            raise UserError(
                f"--resume-from-checkpoint: {checkpoint}: {name} is damaged ({holds}: "
                f"{first_line(error)}); resume from a complete checkpoint"
            ) from None
    saved = len(list(checkpoint.glob("custom_checkpoint_*.pkl")))
    if saved != len(registered):
        raise UserError(
            f"--resume-from-checkpoint: {checkpoint}: holds {saved} saved states, this run has "
            f"{len(registered)} ({', '.join(registered)}); resume with the options it was written "
            "with (--keep-best, --block-sparse, --adversarial, successive_regularization)"
        )


def _warn_changed_flags(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    for name in _SCHEDULE_FLAGS:
        if name in saved and name in current and saved[name] != current[name]:
            flag = "--" + name.replace("_", "-")
            logger.warning(
                "--resume-from-checkpoint: %s was written with %s %s; this run has %s %s, so it "
                "will not continue that run exactly",
                checkpoint, flag, saved[name], flag, current[name],
            )  # fmt: skip


# ------------------------------------------------------------------------------ the lock
@contextmanager
def output_lock(output_dir: Path, main: bool = True) -> Iterator[None]:
    """Hold `output_dir`'s lock (the main process; the others only go along): check first that
    the folder can be created and written, so a bad `--output-dir` fails now, not at the first
    save. Refuses a folder another live run holds. On leaving, removes the lock file and the
    folders it created if they stayed empty (a run refused early leaves nothing behind)."""
    if not main:
        yield
        return
    created = _missing_folders(output_dir)
    try:
        descriptor = _lock(output_dir)
    except UserError:
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        (output_dir / LOCK_FILE).unlink(missing_ok=True)
        os.close(descriptor)  # releases the lock
        _remove_empty(created)


def _lock(output_dir: Path) -> int:
    """Create `output_dir`, probe a write, take the lock; returns the lock file's descriptor."""
    writable_output_dir(output_dir)
    try:
        while (descriptor := _try_lock(output_dir, output_dir / LOCK_FILE)) is None:
            pass  # its holder removed the file between our open and flock: lock the new one
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError(f"--output-dir: {output_dir}: cannot write here ({reason})") from None
    return descriptor


def _try_lock(output_dir: Path, lock: Path) -> int | None:
    """Open and flock `lock`, and write this process into it: its descriptor; None if the file
    was removed meanwhile. A lock that another process holds is refused, naming it."""
    descriptor, held = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644), False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.path.samestat(os.fstat(descriptor), os.stat(lock)):
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            held = True
            return descriptor
    except FileNotFoundError:
        pass
    except BlockingIOError:
        holder = os.read(descriptor, 200).decode("utf-8", "replace").strip() or "a run"
        raise UserError(
            f"--output-dir: {output_dir}: another run is writing into this folder ({holder} holds "
            f"{lock}); wait for it to end, or give another --output-dir"
        ) from None
    finally:
        if not held:
            os.close(descriptor)
    return None


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove `folders` (deepest first) as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


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
