"""`mtnlp predict`'s rows: JSON lines, CSV or TSV in (line-numbered errors, keys passed
through), one JSON line out per row.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from mtnlp.inference.pipeline import MultiTaskPipeline
from mtnlp.utils.errors import UserError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


TEXT_KEYS = ("text", "text_pair")


@dataclass
class Row:
    """One input: its line number and its values (key -> value)."""

    number: int
    values: dict[str, Any]


def input_format(path: str, given: str | None) -> str:
    """`--format`, else the file's extension (.jsonl/.json, .csv, .tsv), else JSON lines."""
    return given or FORMATS.get(Path(path).suffix.lower(), "jsonl")


def text_lines(file: BinaryIO, where: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file (a byte-order mark is dropped); bytes that are not
    UTF-8 are a `UserError` naming the line and the byte."""
    for number, raw in enumerate(file, start=1):
        skip = len(codecs.BOM_UTF8) if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
        try:
            yield number, raw[skip:].decode("utf-8")
        except UnicodeDecodeError as error:
            byte = skip + error.start + 1
            raise UserError(
                f"{where}: line {number}: not UTF-8 text ({error.reason} at byte {byte} of the "
                "line)"
            ) from None


def json_rows(lines: Iterable[tuple[int, str]], where: str) -> Iterator[Row]:
    """One JSON object per non-blank line."""
    for number, line in lines:
        if not line.strip():
            continue
        place = f"{where}: line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{place}: not JSON ({error.msg})") from None
        except ValueError as error:  # e.g. an integer of more than 4300 digits
            raise UserError(f"{place}: not JSON ({str(error).split(';')[0]})") from None
        except RecursionError:
            raise UserError(f"{place}: JSON nested too deeply") from None
        if not isinstance(value, dict):
            raise UserError(
                f'{place}: expected a JSON object such as {{"text": ...}}, got {kind(value)}'
            )
        check_writable(value, place)
        yield Row(number, value)


def kind(value: Any) -> str:
    """How error messages name a JSON value (never its contents)."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "true or false"}
    if value is None:
        return "null"
    return kinds.get(type(value), "a number")


def as_text(value: Any) -> Any:
    """A list of words (a tagging task's column) as the pipeline reads it: joined by spaces;
    anything else as it is."""
    if isinstance(value, list) and value and all(isinstance(word, str) for word in value):
        return " ".join(value)
    return value


def check_writable(value: dict[str, Any], place: str) -> None:
    """A value that cannot be written back as UTF-8 JSON (a lone surrogate such as "\\ud800",
    which no text holds, NaN or infinity, which JSON has not, or nesting too deep to write) is a
    `UserError` naming its key."""
    for key, item in value.items():
        try:
            json.dumps({key: item}, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except UnicodeEncodeError as error:
            char = error.object[error.start]
            raise UserError(
                f"{place}: {json.dumps(key)}: a lone surrogate (\\u{ord(char):04x}) is not text"
            ) from None
        except ValueError:  # after UnicodeEncodeError, a ValueError too
            raise UserError(f"{place}: {json.dumps(key)}: NaN or infinity is not JSON") from None
        except RecursionError:
            raise UserError(f"{place}: {json.dumps(key)}: JSON nested too deeply") from None


def table_rows(lines: Iterable[tuple[int, str]], where: str, delimiter: str) -> Iterator[Row]:
    """CSV/TSV rows under a header line that names the columns; blank lines are skipped. TSV has
    no quoting (GLUE's files hold unbalanced quotes); CSV quotes as Excel does."""
    numbered = iter(lines)
    current = [0]

    def text() -> Iterator[str]:
        for number, line in numbered:
            current[0] = number
            yield line

    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(text(), delimiter=delimiter, quoting=quoting)
    header: list[str] | None = None
    while True:
        start = current[0] + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise UserError(
                f"{where}: line {current[0]}: not {delimiter_name(delimiter)} ({error})"
            ) from None
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header = check_header(cells, f"{where}: line {start}")
            continue
        if len(cells) != len(header):
            raise UserError(
                f"{where}: line {start}: {len(cells)} fields, but the header names {len(header)}"
            )
        values: dict[str, Any] = dict(zip(header, cells, strict=True))
        if values.get("text_pair") == "":  # a cell cannot be null: empty means no pair
            values["text_pair"] = None
        yield Row(start, values)


def delimiter_name(delimiter: str) -> str:
    return "TSV" if delimiter == "\t" else "CSV"


def check_header(cells: list[str], place: str) -> list[str]:
    seen = set()
    for name in cells:
        if name in seen:
            raise UserError(f"{place}: column {name!r} appears twice in the header")
        seen.add(name)
    return cells


def read_rows(file: BinaryIO, where: str, format: str) -> Iterator[Row]:
    """The rows of a JSON-lines, CSV or TSV file."""
    lines = text_lines(file, where)
    if format == "jsonl":
        return json_rows(lines, where)
    return table_rows(lines, where, "\t" if format == "tsv" else ",")


def chunks(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class Reading:
    """What one call of the pipeline reads: the tasks, and per row its input and number."""

    tasks: list[str] | None
    rows: list[int] = field(default_factory=list)  # positions in the chunk
    inputs: list[dict[str, str | None]] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)


class RowPredictor:
    """Predictions for rows: each row's text (as `text`/`text_pair` or in the cards' columns)
    goes to the pipeline in batches, its other keys into its output line."""

    def __init__(self, pipeline: MultiTaskPipeline, tasks: Sequence[str] | None, where: str):
        self.pipeline = pipeline
        self.tasks = list(tasks) if tasks is not None else None
        self.where = where
        self.outputs = pipeline.check_tasks(tasks)  # the task keys an output line may hold
        # each task reads its own columns when a row has no `text`: its card's inputs, named as
        # the card's data files name them (the card's `source.local.columns`, as in training)
        self.columns = {name: self.task_columns(pipeline, name) for name in self.outputs}
        self.read_keys = {column for columns in self.columns.values() for column in columns}

    def __call__(self, rows: list[Row]) -> list[dict[str, Any]]:
        readings: dict[tuple[str, ...], Reading] = {}
        kept = []
        for position, row in enumerate(rows):
            keep, by_columns = self.split_row(row)
            kept.append(keep)
            for columns, example in by_columns.items():
                tasks = self.tasks if columns == TEXT_KEYS else self.tasks_reading(columns)
                reading = readings.setdefault(columns, Reading(tasks))
                reading.rows.append(position)
                reading.inputs.append(example)
                reading.numbers.append(row.number)
        results: list[dict[str, dict]] = [{} for _ in rows]
        for reading in readings.values():
            try:
                predicted = self.pipeline(reading.inputs, reading.tasks, numbers=reading.numbers)
            except UserError as error:  # inputs are numbered by line
                raise UserError(f"{self.where}: {error}") from None
            for position, result in zip(reading.rows, predicted, strict=True):
                results[position].update(result)
        order = self.outputs
        return [
            {**keep, **{task: result[task] for task in order if task in result}}
            for keep, result in zip(kept, results, strict=True)
        ]

    @staticmethod
    def task_columns(pipeline: MultiTaskPipeline, name: str) -> tuple[str, ...]:
        spec = pipeline.model.config.task(name)
        renames = spec.get("input_columns") or {}
        return tuple(renames.get(column, column) for column in spec["inputs"])

    def tasks_reading(self, columns: tuple[str, ...]) -> list[str]:
        return [name for name, own in self.columns.items() if own == columns]

    def split_row(self, row: Row) -> tuple[dict[str, Any], dict[tuple[str, ...], dict]]:
        """(the keys passed through, columns read -> the pipeline's input for them)."""
        values, place = row.values, f"{self.where}: line {row.number}"
        if "text" in values:
            read = set(TEXT_KEYS)
            by_columns = {TEXT_KEYS: self.example(values, TEXT_KEYS, place)}
        else:
            read = self.read_keys
            by_columns = {
                columns: self.example(values, columns, place)
                for columns in dict.fromkeys(self.columns.values())
                if all(column in values for column in columns)
            }
            self.check_fits(by_columns, values, place)
        keep = {key: value for key, value in values.items() if key not in read}
        clash = [key for key in keep if key in self.outputs]
        if clash:
            raise UserError(
                f"{place}: key {clash[0]!r} is also a task's name (output lines key the "
                "predictions by task); rename it"
            )
        return keep, by_columns

    @staticmethod
    def example(values: dict[str, Any], columns: tuple[str, ...], place: str) -> dict:
        """The pipeline's `{"text", "text_pair"}` input from `columns` of a row (a list of words
        is joined by spaces)."""
        texts = [as_text(values.get(column)) for column in columns]
        for column, text in zip(columns, texts, strict=True):
            if not isinstance(text, str) and not (column == "text_pair" and text is None):
                raise UserError(f"{place}: {column}: expected a string, got {kind(text)}")
        return dict(zip(TEXT_KEYS, texts, strict=False))

    def check_fits(self, by_columns: dict, values: dict[str, Any], place: str) -> None:
        """Without `text`: every named task needs its columns, and some task must fit."""
        for name in self.tasks or []:
            missing = [column for column in self.columns[name] if column not in values]
            if missing:
                raise UserError(
                    f"{place}: no text or column {missing[0]!r}, which task {name} reads"
                )
        if not by_columns:
            wanted = sorted(self.read_keys)
            raise UserError(
                f'{place}: no text: give "text" (and "text_pair") or the columns that tasks '
                f"read ({', '.join(wanted)})"
            )
