"""`mtnlp predict MODEL --split test`: a split of the cards' data into one prediction file
per task (the cards' `submission`: GLUE's format).

Files are written only where nothing else lives: every file is staged under a fresh name
(`O_EXCL|O_NOFOLLOW`) and renamed into place once all of them are complete; a name that two
tasks would write, a link, or a file that mtnlp did not write there (`PREDICTIONS_MANIFEST`
lists those it did) is refused before any work. Tasks whose split inputs are the same share
one encoder pass.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtnlp.cards.schema import TaskCard, shown
from mtnlp.inference.pipeline import Example, MultiTaskPipeline
from mtnlp.inference.rows import as_text, kind
from mtnlp.utils.errors import UserError
from mtnlp.utils.files import file_name_problem, new_file, writable_output_dir

PREDICTIONS_MANIFEST = ".mtnlp-predictions.json"
"""The prediction files that mtnlp wrote into an output folder: a later `predict --split` into
the folder replaces these, and refuses to replace any other file. (Its leading dot keeps it out
of reach of a card's file names.)"""
MAX_MANIFEST_BYTES = 1 << 20


def check_cards_fit(cards: Sequence[TaskCard], model: str, config: Any) -> None:
    """Every card must be a task of the model, with the labels it learned."""
    for card in cards:
        if card.name not in config.task_names:
            raise UserError(f"{card.where}: task {card.name} is not a task of {model}")
        if card.labels != config.task(card.name).get("labels"):
            raise UserError(f"{card.where}: labels: differ from the labels {model} learned")


def card_splits(card: TaskCard, name: str, local: bool) -> list[str]:
    """The splits of a card that `--split NAME` predicts: NAME, or, for a card without a split
    NAME, its splits NAME_* (MNLI's test_matched and test_mismatched). From local files
    (`local`) the card must name them in `source.local.files`."""
    if local:
        known = set(card.source.local.files)
    else:  # the Hub's splits are unknown offline: the ones the card names
        hub = card.source.hub.splits if card.source.hub is not None else {}
        known = {*card.submission.files, *hub, card.train_split, *card.eval_splits}
    if name in known:
        return [name]
    prefixed = sorted(split for split in known if split.startswith(f"{name}_"))
    if not prefixed and local:
        splits = ", ".join(sorted(known))
        raise UserError(f"{card.where}: source.local.files: no {name} split (splits: {splits})")
    return prefixed or [name]


def submission_file(card: TaskCard, split: str, name: str) -> str:
    """The card's file name for `split`: `submission.files`, else `<task>.tsv`, or
    `<task>-<split>.tsv` for one of several NAME_* splits."""
    default = f"{card.name}.tsv" if split == name else f"{card.name}-{split}.tsv"
    return card.submission.files.get(split, default)


def prediction_cell(card: TaskCard, result: dict[str, Any]) -> str:
    """A prediction as the submission file writes it: the label's name or index, the value, or
    the tags of the words (`_` for words beyond max_length)."""
    if "value" in result:
        return f"{result['value']:.6g}"
    if "tags" in result:
        return " ".join(tag or "_" for tag in result["tags"])
    if card.submission.label_format == "index":
        return str(card.labels.index(result["label"]))
    return result["label"]


def split_inputs(card: TaskCard, dataset: Any, where: str) -> list[Example]:
    """The pipeline's inputs for a split: its input columns; a tagging task's words stay the
    split's words (a token such as "New York" is one word, never re-split on whitespace)."""
    columns = [dataset[column] for column in card.inputs]
    inputs = []
    for index, values in enumerate(zip(*columns, strict=True)):
        words = values[0] if len(values) == 1 and _is_words(values[0]) else None
        texts = []
        for column, value in zip(card.inputs, map(as_text, values), strict=True):
            if not isinstance(value, str):
                raise UserError(
                    f"{where}: example {index + 1}: {column}: expected text, got {kind(value)}"
                )
            texts.append(value)
        words = tuple(words) if words is not None else None
        inputs.append(Example(*texts, words=words))
    return inputs


def _is_words(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(w, str) for w in value)


def cell(value: Any, place: str) -> str:
    """A value as one TSV cell: text with a tab or a line break of any kind (which would forge a
    cell or a row) is refused, naming the place, never the whole value."""
    text = str(value)
    if "\t" not in text and len(text.splitlines()) <= 1 and not text.endswith(("\n", "\r")):
        return text
    raise UserError(
        f"{place}: {shown(text)} holds a tab or line break, which would break the "
        "submission file's rows"
    )


@dataclass(frozen=True, eq=False)  # one per file: equal only to itself
class Target:
    """One prediction file: a card's split, and the file's name in the output folder."""

    card: TaskCard
    split: str
    file: str

    @property
    def where(self) -> str:
        return f"{self.card.where}: {self.split}"


def prediction_targets(
    cards: Sequence[TaskCard], name: str, data_dirs: Sequence[Path] | None
) -> list[Target]:
    """The files that `--split name` writes, one per card and split; two that would write the
    same file (or names that differ only in case: one file on macOS and Windows) are refused."""
    targets, seen = [], {}
    for card in cards:
        local = bool(data_dirs) and card.source.local is not None  # as load_raw decides
        for split in card_splits(card, name, local):
            target = Target(card, split, submission_file(card, split, name))
            other = seen.setdefault(target.file.casefold(), target)
            if other is not target:
                raise UserError(
                    f"{target.where}: prediction file {target.file} is also written for "
                    f"{other.where}; give each its own file (submission.files)"
                )
            targets.append(target)
    return targets


def own_files(output_dir: Path) -> set[str]:
    """The prediction files that mtnlp wrote into `output_dir`, as its manifest lists them."""
    path = output_dir / PREDICTIONS_MANIFEST
    info = _lstat(path)
    if info is None:
        return set()
    unreadable = UserError(
        f"{path}: not mtnlp's list of the prediction files it wrote here; remove it, or give "
        "another --output-dir"
    )
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_MANIFEST_BYTES:
        raise unreadable
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(descriptor, "rb") as file:
            files = json.loads(file.read(MAX_MANIFEST_BYTES).decode("utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise unreadable from None
    if not isinstance(files, list) or any(file_name_problem(file) for file in files):
        raise unreadable
    return set(files)


def check_replaceable(path: Path, own: set[str]) -> None:
    """`path` may be replaced by a prediction file: nothing is there, or a file mtnlp wrote
    (never a link, whose target would be written, nor a folder or someone else's file)."""
    info = _lstat(path)
    if info is None:
        return
    if stat.S_ISLNK(info.st_mode):
        raise UserError(f"{path}: is a symbolic link; mtnlp never writes through a link: remove it")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path}: is not a regular file; remove it, or give another --output-dir")
    if path.name not in own:
        raise UserError(
            f"{path}: already exists, and mtnlp did not write it (it replaces only the prediction "
            f"files that {PREDICTIONS_MANIFEST} lists); remove it, or give another --output-dir"
        )


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def submission_lines(target: Target, dataset: Any, results: list[dict[str, dict]]) -> Iterator[str]:
    """The lines of a target's file: the header, then `index<TAB>prediction` per example."""
    card = target.card
    column = card.submission.index_column
    ids = dataset[column] if column in dataset.column_names else range(len(dataset))
    yield "index\tprediction\n"
    for number, (index, result) in enumerate(zip(ids, results, strict=True), 1):
        place = f"{target.where}: example {number}"
        row = (
            cell(index, f"{place}: {column}"),
            cell(prediction_cell(card, result[card.name]), f"{place}: prediction"),
        )
        yield "\t".join(row) + "\n"


class StagedFiles:
    """Prediction files written under fresh hidden names in the output folder, then renamed
    into place all together (`commit`); those not committed are removed on leaving."""

    def __init__(self, output_dir: Path, own: set[str]) -> None:
        self.output_dir = output_dir
        self.own = own
        self.staged: list[tuple[Path, Path]] = []  # (staged file, its final path)

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for staged, _ in self.staged:
            staged.unlink(missing_ok=True)

    def write(self, file: str, lines: Iterator[str]) -> Path:
        """Stage `file`'s lines (created anew: never through a link, never truncating)."""
        staged = self.output_dir / f".{file}.{uuid.uuid4().hex[:12]}.tmp"
        with new_file(staged, "wb") as handle:
            self.staged.append((staged, self.output_dir / file))
            for line in lines:
                handle.write(line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        return self.output_dir / file

    def commit(self) -> None:
        """Rename every staged file into place (a rename replaces a link, never writes through
        it), then record them in the manifest."""
        for _, path in self.staged:
            check_replaceable(path, self.own)  # again: the folder may have changed meanwhile
        for staged, path in self.staged:
            os.replace(staged, path)
        self.own |= {path.name for _, path in self.staged}
        self.staged = []
        kept = sorted(name for name in self.own if _lstat(self.output_dir / name) is not None)
        manifest = self.output_dir / f".{PREDICTIONS_MANIFEST}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            with new_file(manifest) as handle:
                json.dump({"files": kept}, handle, indent=1)
            os.replace(manifest, self.output_dir / PREDICTIONS_MANIFEST)
        finally:
            manifest.unlink(missing_ok=True)


def predict_split(
    pipeline: MultiTaskPipeline,
    cards: Sequence[TaskCard],
    name: str,
    data_dirs: Sequence[Path] | None,
    output_dir: Path,
) -> list[tuple[Path, int]]:
    """Predict split `name` of every card into `output_dir`, one `index<TAB>prediction` TSV
    file per task and split (GLUE's submission format); return (file, rows) per file.

    The files' names are checked before any work (`prediction_targets`, `check_replaceable`);
    tasks whose splits hold the same inputs (SICK's relatedness and entailment on the same
    pairs) are predicted in one pipeline call, so they share the encoder's passes."""
    from mtnlp.data.read import load_raw

    writable_output_dir(output_dir)
    targets = prediction_targets(cards, name, data_dirs)
    own = own_files(output_dir)
    for target in targets:
        check_replaceable(output_dir / target.file, own)
    readings: dict[tuple[Example, ...], list[tuple[Target, Any]]] = {}
    for card in cards:
        mine = [target for target in targets if target.card is card]
        splits = load_raw(card, [target.split for target in mine], data_dirs, labels=False)
        for target in mine:
            dataset = splits[target.split]
            examples = tuple(split_inputs(card, dataset, target.where))
            readings.setdefault(examples, []).append((target, dataset))
    rows = {}
    with StagedFiles(output_dir, own) as staged:
        for examples, reading in readings.items():
            tasks = list(dict.fromkeys(target.card.name for target, _ in reading))
            results = pipeline(list(examples), tasks)
            for target, dataset in reading:
                staged.write(target.file, submission_lines(target, dataset, results))
                rows[target] = len(results)
        staged.commit()
    return [(output_dir / target.file, rows[target]) for target in targets]
