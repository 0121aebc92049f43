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

import json
import logging
import os
import pickle
import re
import reprlib
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils import load as load_state_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from transformers import PreTrainedTokenizerBase

from mtnlp.artifacts.run_folder import (
    CHECKPOINT_META,
    CHECKPOINT_NAME,
    CHECKPOINT_STAGING,
    MODEL_FILE,
    only_leftovers,
)
from mtnlp.modeling.loading import check_weight_files
from mtnlp.training.state import ENTRIES, Run, RunState
from mtnlp.utils.errors import UserError, first_line
from mtnlp.utils.files import (
    commit_folder,
    file_digest,
    remove_path,
    staging_folder,
    umask_permissions,
)

logger = logging.getLogger(__name__)


STATE_FILE = "custom_checkpoint_{index}.pkl"  # accelerate's name for registered objects
RNG_FILE = "random_states_{process}.pkl"
# the model in an FSDP checkpoint, as accelerate writes it: sharded (`fsdp_state_dict_type:
# SHARDED_STATE_DICT`, torch.distributed.checkpoint's folder) or whole (`FULL_STATE_DICT`)
FSDP_WEIGHTS = ("pytorch_model_fsdp_0", "pytorch_model_fsdp.bin")


# model metadata that may change between a checkpoint and its resumed run
_FREE_SPEC_KEYS = {"metrics", "main_metric", "description"}


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete `checkpoint-<step>` folders of `output_dir`, lowest step first."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(match[1]), path)
        for path in output_dir.iterdir()
        if (match := CHECKPOINT_NAME.match(path.name)) and (path / CHECKPOINT_META).is_file()
    ]
    return [path for _, path in sorted(found)]


def resolve_checkpoint(spec: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder `--resume-from-checkpoint` names: a path, or `latest` (the highest
    step in `output_dir`), its files checked against `checkpoint.json` (`verify_files`) before
    anything reads them; None when not resuming."""
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
        return verify_files(found[-1])
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"--resume-from-checkpoint: {spec}: no such folder")
    if not (path / CHECKPOINT_META).is_file() or model_weights(path) is None:
        raise UserError(
            f"--resume-from-checkpoint: {spec}: not a checkpoint folder (no {CHECKPOINT_META} "
            f"or {MODEL_FILE}); give a checkpoint-<step> folder or 'latest'"
        )
    return verify_files(path)


def model_weights(checkpoint: Path) -> str | None:
    """The name of the checkpoint's model weights: `MODEL_FILE`, or FSDP's layout; None if it
    has none."""
    names = [MODEL_FILE, *FSDP_WEIGHTS]
    return next((name for name in names if (checkpoint / name).exists()), None)


def check_engine(checkpoint: Path, accelerator: Accelerator) -> None:
    """A checkpoint resumes under the engine that wrote it: FSDP's sharded weights only under
    FSDP, whole ones only without it."""
    written_by_fsdp = model_weights(checkpoint) in FSDP_WEIGHTS
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if written_by_fsdp != fsdp:
        way = "under FSDP" if written_by_fsdp else "without FSDP"
        raise UserError(
            f"--resume-from-checkpoint: {checkpoint}: written {way}; resume it with the accelerate "
            "launch configuration it was written with (docs/distributed.md)"
        )


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


# ------------------------------------------------------------------------------ integrity
FILES = "files"  # checkpoint.json: relative path -> {"size": bytes, "sha256": hex digest}
_RECORD_NAME = re.compile(r"[^/\x00-\x1f\x7f]{1,255}(/[^/\x00-\x1f\x7f]{1,255}){0,7}")
_PLAIN_NAME = re.compile(r"[\w.+=/-]{1,200}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# what a checkpoint's files hold, for the messages (fnmatch on the file's first path part)
_ROLES = (
    (MODEL_FILE, "the model's weights"),
    ("pytorch_model_fsdp*", "the model's weights"),
    ("optimizer*", "the optimizer's state"),
    ("scheduler*", "the learning-rate schedule's state"),
    ("scaler*", "the gradient scaler's state"),
    (RNG_FILE.format(process="*"), "the random number generators' states"),
    (STATE_FILE.format(index="*"), "the run's state"),
    ("*sampler*", "the data order's state"),
)


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file of a written checkpoint but `checkpoint.json` (whichever engine wrote it: the
    weights, accelerate's optimizer, scheduler, RNG and state files, FSDP's shard folders, the
    tokenizer): relative path -> size and SHA-256, for `verify_files`."""
    return {
        name: {"size": path.stat().st_size, "sha256": file_digest(path)}
        for name, path in _entries(folder).items()
    }


def _entries(folder: Path) -> dict[str, Path]:
    """Relative path -> path of everything in `folder` but `checkpoint.json`, links (to files or
    folders) and special files included, never followed."""
    entries = {}
    for root, folders, names in os.walk(folder):
        links = [name for name in folders if os.path.islink(os.path.join(root, name))]
        for name in [*names, *links]:
            path = Path(root, name)
            entries[path.relative_to(folder).as_posix()] = path
    entries.pop(CHECKPOINT_META, None)
    return dict(sorted(entries.items()))


def _role(name: str) -> str:
    first = name.split("/")[0]
    return next((role for pattern, role in _ROLES if fnmatch(first, pattern)), "a checkpoint file")


def _shown_name(name: str) -> str:
    """A file name for a message: as it is when it is a plain one, else quoted and cut short."""
    return name if _PLAIN_NAME.fullmatch(name) else reprlib.repr(name)


def _read_records(checkpoint: Path, meta: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The `files` record of checkpoint.json (None: written before mtnlp recorded it), checked:
    plain relative names (never a way out of the folder), sizes and digests of the right form."""
    records = meta.get(FILES)
    if records is None:
        return None
    path = checkpoint / CHECKPOINT_META
    if not isinstance(records, dict):
        raise UserError(f"{path}: {FILES}: expected a mapping, got {type(records).__name__}")
    for name, record in records.items():
        if not _RECORD_NAME.fullmatch(name) or {".", ".."} & set(name.split("/")):
            raise UserError(
                f"{path}: {FILES}: {_shown_name(name)} is not a file name inside the checkpoint"
            )
        if not (
            isinstance(record, dict)
            and _is_step(record.get("size"))
            and isinstance(record.get("sha256"), str)
            and _SHA256.fullmatch(record["sha256"])
        ):
            raise UserError(
                f'{path}: {FILES}: {_shown_name(name)}: expected {{"size": bytes, "sha256": '
                "64 hex digits}"
            )
    return records


def verify_files(checkpoint: Path) -> Path:
    """Check `checkpoint`'s files against the sizes and SHA-256 digests `checkpoint.json`
    records, before any of them is read (accelerate unpickles the state files): a file missing,
    added, replaced by a link, truncated, changed or foreign is named in one `UserError`. Sizes
    are compared first (cheap: truncation), then digests. A checkpoint written by an mtnlp
    that recorded no digests loads, with a warning. Returns `checkpoint`."""
    records = _read_records(checkpoint, read_meta(checkpoint))
    if records is None:
        logger.warning(
            "--resume-from-checkpoint: %s: written by an earlier mtnlp, without file digests in "
            "%s, so its files cannot be verified", checkpoint, CHECKPOINT_META,
        )  # fmt: skip
        return checkpoint
    where = f"--resume-from-checkpoint: {checkpoint}"
    entries = _entries(checkpoint)
    for name in records:
        if name not in entries:
            raise UserError(
                f"{where}: {_shown_name(name)} is missing ({_role(name)}), so the run cannot "
                "continue exactly; resume from a complete checkpoint"
            )
    for name in entries:
        if name not in records:
            raise UserError(
                f"{where}: {_shown_name(name)} is not one of its files ({CHECKPOINT_META} does "
                "not list it); remove it, or resume from a complete checkpoint"
            )

    def damaged(name: str, why: str) -> UserError:
        return UserError(
            f"{where}: {_shown_name(name)} is damaged ({_role(name)}: {why}); resume from a "
            "complete checkpoint"
        )

    for name, record in records.items():
        status = entries[name].lstat()
        if not stat.S_ISREG(status.st_mode):
            raise damaged(name, "not a regular file but a link or a special file")
        if status.st_size != record["size"]:
            raise damaged(
                name, f"{status.st_size} bytes where {CHECKPOINT_META} records {record['size']}"
            )
    for name, record in records.items():
        if file_digest(entries[name]) != record["sha256"]:
            raise damaged(
                name, f"its sha256 differs from {CHECKPOINT_META}: the file was changed or damaged"
            )
    return checkpoint


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


def check_finite(step: int, *modules: nn.Module) -> None:
    """Refuse to go on with NaN/inf weights: they must never reach a checkpoint or the output.
    Under FSDP each process checks its shard of the weights."""
    parameters = [(name, p) for module in modules for name, p in module.named_parameters()]
    finite = torch.stack([torch.isfinite(_local(p.detach())).all() for _, p in parameters])
    if not bool(finite.all()):
        name = parameters[int((~finite).nonzero()[0])][0]
        raise UserError(
            f"step {step}: the weights are no longer finite ({name} holds NaN/inf); nothing was "
            "saved. Lower --learning-rate or resume from an earlier checkpoint"
        )


def _local(tensor: Tensor) -> Tensor:
    """This process's part of a tensor (its shard of an FSDP2 `DTensor`), or the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def start_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter the state AdamW creates at its first update (zeros, step 0), for
    FSDP: torch.distributed.checkpoint loads a checkpoint into an optimizer whose every
    parameter has state, so one saved before every head had a gradient would not load. The
    run is unchanged: a parameter without a gradient is still skipped, and its first update
    starts from the same zeros. (torch's own initialization, a step with zero gradients and
    learning rate 0, leaves step 1, which would change AdamW's bias correction.)"""
    fresh = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    fresh = [p for p in fresh if p not in optimizer.state]
    for parameter in fresh:
        parameter.grad = torch.zeros_like(parameter)
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0  # the parameters stay as they are
    optimizer.step()
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    for parameter in fresh:
        parameter.grad = None
        optimizer.state[parameter]["step"].zero_()


def full_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, Tensor] | None:
    """The whole model's weights, gathered on the main process, when an engine shards them
    (FSDP, DeepSpeed; every process must call this); None when the model holds them whole."""
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    return accelerator.get_state_dict(model)


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
    staging = staging_folder(final)  # CHECKPOINT_STAGING: what `latest` never picks
    if accelerator.is_main_process:
        for leftover in output_dir.glob(CHECKPOINT_STAGING.format(step="*")):  # from killed saves
            remove_path(leftover)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        umask_permissions(staging.rglob("*.safetensors"))  # safetensors writes 0600
        meta = {"step": step, "tasks": list(specs), "num_processes": accelerator.num_processes}
        if arguments is not None:
            meta["args"] = {**arguments, "model": _model_id(arguments["model"])}
        meta[FILES] = file_records(staging)  # every process's files are written by now
        text = json.dumps(meta, indent=2, default=str) + "\n"
        (staging / CHECKPOINT_META).write_text(text, encoding="utf-8")
        # an earlier copy of this step (resumed from before it) is replaced
        commit_folder(staging, final)
        _rotate(output_dir, keep, final)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def _rotate(output_dir: Path, keep: int | None, newest: Path) -> None:
    if keep is None:
        return
    others = [path for path in list_checkpoints(output_dir) if path != newest]
    for old in others[: max(0, len(others) - (keep - 1))]:
        remove_path(old)


def _step(checkpoint: Path) -> int:
    return int(CHECKPOINT_NAME.match(checkpoint.name)[1])


def remove_checkpoints(output_dir: Path, after: int | None = None) -> None:
    """Delete checkpoints so that `latest` and the rotation never pick them: another run's
    (`--overwrite-output-dir`), or, resuming at step `after`, the newer ones of the continuation
    that was abandoned (they would outrank this run's own)."""
    doomed = [path for path in list_checkpoints(output_dir) if after is None or _step(path) > after]
    for path in doomed:
        remove_path(path)
    if doomed and after is not None:
        logger.warning(
            "resuming at step %d: removed %s of %s (newer than the resumed checkpoint, from the "
            "run that was abandoned there)",
            after, ", ".join(path.name for path in doomed), output_dir,
        )  # fmt: skip


# flags that change the schedule or the data order (warned about first); every other recorded
# flag changes the result too, except these: where things go, what is logged or published, and
# what is checked elsewhere (the tasks and cards by `check_tasks`, --model by `check_model`)
_SCHEDULE_FLAGS = ("batch_size", "gradient_accumulation_steps", "max_steps")
_NEUTRAL_FLAGS = frozenset(
    {
        "model", "cards", "tasks", "data_dir", "output_dir", "overwrite_output_dir",
        "resume_from_checkpoint", "checkpoint_every", "keep_checkpoints", "log_every",
        "report_to", "push_to_hub", "hub_model_id", "hub_private", "license", "language",
        "base_model", "eval_batch_size", "finetune_each", "finetune_epochs",
        "finetune_max_steps", "finetune_learning_rate",
    }
)  # fmt: skip


def check_max_steps(checkpoint: Path, step: int, arguments: dict[str, Any]) -> None:
    """Refuse a `--max-steps` at or below the checkpoint's step: there is nothing left to train,
    and the run would end with a summary that contradicts its own task steps."""
    max_steps = arguments.get("max_steps")
    if max_steps is not None and max_steps <= step:
        raise UserError(
            f"--max-steps {max_steps}: {checkpoint} is already at step {step}; give a --max-steps "
            f"above {step} to train on, or resume an earlier checkpoint"
        )


def load_checkpoint(
    accelerator: Accelerator,
    checkpoint: Path,
    run_state: RunState,
    arguments: dict[str, Any] | None = None,
) -> int:
    """Restore everything `save_checkpoint` wrote; returns the checkpoint's step.

    `run_state` holds the run's resumable components by name: a checkpoint whose entries differ
    (written with other options) is refused, naming what it holds or lacks. A checkpoint written
    before the keyed state (`custom_checkpoint_<i>.pkl`, one file per component, by position) is
    read in that layout's order. `arguments`, the run's flags, are compared with the
    checkpoint's (a warning for each schedule flag that differs).
    """
    meta = read_meta(checkpoint)
    check_max_steps(checkpoint, meta["step"], arguments or {})
    same_processes = meta.get("num_processes") == accelerator.num_processes
    if accelerator.is_main_process:
        if not same_processes:
            logger.warning(
                "%s was written by %s process(es) and is resumed by %d: the data order and RNG "
                "streams differ, so the run will not match an uninterrupted one exactly",
                checkpoint, meta.get("num_processes"), accelerator.num_processes,
            )  # fmt: skip
        _warn_changed_flags(checkpoint, meta.get("args", {}), arguments or {})
    check_engine(checkpoint, accelerator)
    try:
        if model_weights(checkpoint) == MODEL_FILE:  # FSDP's own files are torch's to check
            check_weight_files(checkpoint)  # a truncated file: its name, not a traceback
    except UserError as error:
        raise UserError(f"--resume-from-checkpoint: {error}") from None
    # with another number of processes, the RNG states cannot match anyway (warned above)
    rng = accelerator.process_index if same_processes else None
    run_state.where = str(checkpoint)
    legacy = is_legacy(checkpoint)
    names = legacy_names(run_state) if legacy else None
    states = _check_state_files(checkpoint, run_state, names, rng)
    if not legacy:
        run_state.check_names(states[0])
    try:
        with _registered_as(accelerator, [run_state.entries[n] for n in names] if legacy else None):
            accelerator.load_state(str(checkpoint))
    except (pickle.UnpicklingError, EOFError) as error:  # unverified (earlier mtnlp): foreign
        raise UserError(
            f"--resume-from-checkpoint: {checkpoint}: a state file cannot be read as one "
            f"({first_line(error)}); resume from a complete checkpoint"
        ) from None
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        raise UserError(
            f"--resume-from-checkpoint: {checkpoint}: does not fit this run's model "
            f"({first_line(error)})"
        ) from None
    logger.info("resumed from %s (step %d)", checkpoint, meta["step"])
    return meta["step"]


def is_legacy(checkpoint: Path) -> bool:
    """Whether `checkpoint` was written before the keyed `RunState`: one file per component."""
    return (checkpoint / STATE_FILE.format(index=1)).is_file()


@contextmanager
def _registered_as(accelerator: Accelerator, objects: list[Any] | None) -> Iterator[None]:
    """While loading a legacy checkpoint, its components stand registered one by one, in the
    legacy order, so accelerate loads `custom_checkpoint_<i>.pkl` into the i-th (the keyed
    `RunState` is registered again afterwards). `None`: the run's own registration."""
    if objects is None:
        yield
        return
    registered = accelerator._custom_objects  # accelerate keeps no public way to re-register
    accelerator._custom_objects = objects
    try:
        yield
    finally:
        accelerator._custom_objects = registered


def legacy_names(run_state: RunState) -> list[str]:
    """The entries of a legacy checkpoint, in its file order: the components this run has, in
    the order they were registered then."""
    return [name for name in ENTRIES if name in run_state.entries]


def _check_state_files(
    checkpoint: Path, run_state: RunState, legacy: list[str] | None, process: int | None
) -> list[Any]:
    """Refuse a checkpoint without a state file this run loads (accelerate would skip a missing
    RNG state silently, and the run would differ from an uninterrupted one), or with a damaged
    one; return the contents of the run's state files (legacy: one per component)."""
    holds = [f"the {run_state.describe(name)}" for name in legacy or []] or ["the run's state"]
    expected = {STATE_FILE.format(index=i): what for i, what in enumerate(holds)}
    if process is not None:
        expected[RNG_FILE.format(process=process)] = "the random number generators' states"
    states = []
    for name, what in expected.items():
        if not (checkpoint / name).is_file():
            raise UserError(
                f"--resume-from-checkpoint: {checkpoint}: {name} is missing ({what}), so the run "
                "cannot continue exactly; resume from a complete checkpoint"
            )
        try:  # as accelerate reads it (weights only), which skips an unreadable RNG file silently
            states.append(load_state_file(checkpoint / name))
        except Exception as error:  # torch.load raises many types for a damaged file
            raise UserError(
                f"--resume-from-checkpoint: {checkpoint}: {name} is damaged ({what}: "
                f"{first_line(error)}); resume from a complete checkpoint"
            ) from None
    saved = len(list(checkpoint.glob(STATE_FILE.format(index="*"))))
    if legacy is not None and saved != len(legacy):
        described = ", ".join(run_state.describe(name) for name in legacy)
        raise UserError(
            f"--resume-from-checkpoint: {checkpoint}: holds {saved} saved states, this run has "
            f"{len(legacy)} ({described}); resume with the options it was written "
            "with (--keep-best, --block-sparse, --adversarial, successive_regularization)"
        )
    return states[: len(holds)]


def _warn_changed_flags(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """One warning per recorded flag whose value changed and that changes the result (the
    sampler, seed, learning rate, weighting, batch size, ...): the resumed run goes on, but does
    not continue the checkpoint's run exactly."""
    current = json.loads(json.dumps(current, default=str))  # as checkpoint.json stores them
    names = [*_SCHEDULE_FLAGS, *(name for name in current if name not in _SCHEDULE_FLAGS)]
    for name in names:
        if name in _NEUTRAL_FLAGS or name not in saved or name not in current:
            continue
        if saved[name] != current[name]:
            flag = "--" + name.replace("_", "-")
            logger.warning(
                "--resume-from-checkpoint: %s was written with %s %s; this run has %s %s, so it "
                "will not continue that run exactly",
                checkpoint, flag, _shown(saved[name]), flag, _shown(current[name]),
            )  # fmt: skip


def _shown(value: Any) -> str:
    """A flag's value as typed: a list as its items, None as `(not given)`."""
    if value is None:
        return "(not given)"
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    return str(value)


def check_output_dir(path: Path, overwrite: bool, resume: Path | None = None) -> None:
    """Refuse to write into a folder that holds something (beyond what a run killed before its
    first checkpoint leaves), unless told to overwrite or resuming a checkpoint of that folder."""
    if resume is not None and in_folder(resume, path):
        return
    if path.is_dir() and not overwrite and not only_leftovers(path):
        resumable = list_checkpoints(path)
        hint = ", or --resume-from-checkpoint latest to continue it" if resumable else ""
        raise UserError(
            f"--output-dir: {path} is not empty (it holds another run); "
            f"pass --overwrite-output-dir to replace it{hint}"
        )


def resume(run: Run) -> None:
    """Continue from `run.resume_from` if set; then drop the checkpoints `latest` must never
    pick: the abandoned continuation's newer ones (resuming in place), or another run's
    (`--overwrite-output-dir`)."""
    resumed_at = None
    if run.resume_from is not None:
        resumed_at = load_checkpoint(run.accelerator, run.resume_from, run.run_state, run.arguments)
    if run.accelerator.is_main_process:
        if resumed_at is not None and in_folder(run.resume_from, run.output_dir):
            remove_checkpoints(run.output_dir, after=resumed_at)
        elif run.overwrite_output_dir:  # another run's (also when resuming one from elsewhere)
            remove_checkpoints(run.output_dir)
    run.start_examples = run.state.examples
