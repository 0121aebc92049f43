"""What a run folder holds: one owner for every file name in it, and the one function that
writes it (`save_run`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from mtnlp.artifacts.affinity import write_heatmap, write_relationship_heatmap
from mtnlp.artifacts.report import CLUSTERS_KEY, RELATIONSHIPS_KEY, write_report
from mtnlp.cards.load import load_cards
from mtnlp.cards.schema import TaskCard
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.utils.errors import UserError
from mtnlp.utils.files import (
    LOCK_FILE,
    TEMPORARY_FILE,
    WRITE_PROBE,
    atomic_folder,
    new_file,
    outside_link_problem,
    remove_path,
)

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ the names
# what `save_run` writes; the model folder's own names (config.json, label_maps.json, README.md,
# the companion files) belong to the model layer, which writes them in `save_pretrained`
CARDS_DIR = "cards"
EVAL_RESULTS = "eval_results.json"
TRAIN_LOG = "train_log.jsonl"
SUMMARY = "train_summary.json"
MODEL_FILE = "model.safetensors"
SAVING_PREFIX = ".saving-"  # the final save's staging folder
# the task structure learned by --relationship-prior / --task-clusters (training/relationships.py):
# its latest record of the run's log, under these keys
TASK_RELATIONSHIPS = "task_relationships.json"
TASK_CLUSTERS = "task_clusters.json"
TASK_STRUCTURE_FILES = {RELATIONSHIPS_KEY: TASK_RELATIONSHIPS, CLUSTERS_KEY: TASK_CLUSTERS}
# checkpoints (training/checkpointing.py)
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_STAGING = ".checkpoint-{step}.tmp"
CHECKPOINT_META = "checkpoint.json"
LOGS = "logs"  # the trackers' logs (accelerate's logging_dir)
# MT-DNN's second stage (training/stages.py)
FINETUNED_DIR = "finetuned"
RESULTS_JSON = "finetune_results.json"
RESULTS_MARKDOWN = "finetune_results.md"
# pushing: what goes to the Hub
PUSHED_FOLDERS = (CARDS_DIR, "plots")  # not checkpoints, fine-tuned runs or tracker logs


# what a killed run leaves behind: staging folders of checkpoints and of the final save, the
# lock file, a write probe; and the trackers' logs (accelerate's logging_dir)
_LEFTOVERS = (
    CHECKPOINT_STAGING.format(step="*"),
    f"{SAVING_PREFIX}*",
    LOCK_FILE,
    WRITE_PROBE.format(pid="*"),
    TRAIN_LOG,  # written as training goes (`LiveLog`); rewritten by a resumed run
    f".{TRAIN_LOG}.*",  # its temporary name
    TEMPORARY_FILE.format(name="*", tag="*"),  # `write_file`'s
)


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
        remove_path(path)  # a link is removed, never followed
    if doomed:
        logger.info("removed leftovers of an earlier run: %s", ", ".join(p.name for p in doomed))


def save_run(
    output_dir: Path,
    model: MultiTaskModel,
    tokenizer: PreTrainedTokenizerBase,
    cards: Sequence[TaskCard],
    results: dict[str, dict[str, float]],
    history: list[dict[str, Any]],
    summary: dict[str, Any],
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write everything into a staging folder inside `output_dir`, then move it in entry by
    entry (each synced to disk first), so an interrupted save never leaves a half-written model
    behind (a killed save's staging folder is a leftover that the next run removes).
    `state_dict`: the model's whole weights when they are sharded over processes (FSDP)."""
    staging = output_dir / f"{SAVING_PREFIX}{os.getpid()}"
    with atomic_folder(output_dir, staging, merge=True):
        model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        (staging / CARDS_DIR).mkdir()
        for card in cards:
            (staging / CARDS_DIR / f"{card.name}.yaml").write_text(card.to_yaml(), encoding="utf-8")
        (staging / EVAL_RESULTS).write_text(json.dumps(results, indent=2) + "\n")
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        with open(staging / TRAIN_LOG, "w") as log:
            for record in history:
                log.write(json.dumps(record) + "\n")
        write_heatmap(staging, history)  # task affinity, when --affinity-every logged it
        write_task_structure(staging, history)
        write_report(staging, history, results, summary)


def write_task_structure(folder: Path, history: Sequence[dict[str, Any]]) -> None:
    """The latest task relationships and task clusters of the run's log, each as its JSON file
    (`{"step": ..., ...}`), and the relationships' heat map; nothing for a run without them."""
    for key, name in TASK_STRUCTURE_FILES.items():
        latest = next((record for record in reversed(history) if key in record), None)
        if latest is not None:
            text = json.dumps({"step": latest["step"], **latest[key]}, indent=2) + "\n"
            (folder / name).write_text(text, encoding="utf-8")
    write_relationship_heatmap(folder, history)


class LiveLog(list):
    """A run's log records, each also written to `path` (JSON lines) as it is appended and
    flushed at once, so `tail -f train_log.jsonl` follows the run. Entering writes the records so
    far under a temporary name that then replaces `path` (a link there is replaced, never
    followed); leaving closes the file."""

    def __init__(self, path: Path, records: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(records)
        self.path = path
        self.file: Any = None

    def __enter__(self) -> LiveLog:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        temporary.unlink(missing_ok=True)  # a killed run's (a link is removed, not followed)
        self.file = new_file(temporary)
        for record in self:
            self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.replace(temporary, self.path)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()

    def append(self, record: dict[str, Any]) -> None:
        super().append(record)
        if self.file is not None and not self.file.closed:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


PICKLES = (".bin", ".pkl", ".pt", ".pth", ".ckpt")  # never pushed: unpickling runs code


def read_cards(folder: Path | None) -> dict[str, TaskCard]:
    """The run's task cards by name (`cards/` written by `training.save_run`), if any."""
    if folder is None or not (folder / CARDS_DIR).is_dir():
        return {}
    return {card.name: card for card in load_cards([folder / CARDS_DIR])}


def artifact_files(folder: Path) -> dict[str, Path]:
    """Path in the repo -> file: the folder's top-level files and its cards/ and plots/. A link
    out of the folder is refused (`README.md -> ~/.ssh/id_rsa` in a downloaded folder must never
    be uploaded); links within it, and a Hub cache snapshot's into its blobs, are followed."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.suffix not in PICKLES:
            files[path.name] = path
        elif path.name in PUSHED_FOLDERS:
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                files[file.relative_to(folder).as_posix()] = file
    for file in files.values():
        if problem := outside_link_problem(file, folder):
            raise UserError(
                f"{file}: {problem}; mtnlp uploads only a folder's own files (replace it with "
                "the file itself, or remove it)"
            )
    return files


def model_cards(name: str) -> Path:
    """The `cards/` folder that training saved with the model (fetched for a Hub id)."""
    folder = Path(name)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, allow_patterns=[f"{CARDS_DIR}/*"]))
    if not (folder / CARDS_DIR).is_dir():
        raise UserError(f"{name}: no cards/ folder with the model; give the cards with --cards")
    return folder / CARDS_DIR


def public_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """The run's arguments as `train_summary.json` (which is pushed) records them: a local path
    by its last part only (absolute, home or parent-relative paths name the machine's folders)."""
    return {name: _public(value) for name, value in arguments.items()}


def _public(value: Any) -> Any:
    if isinstance(value, list):
        return [_public(item) for item in value]
    if isinstance(value, str) and (
        Path(value).is_absolute() or value.startswith(("~", "..")) or Path(value).exists()
    ):
        return Path(value).name or value
    return value
