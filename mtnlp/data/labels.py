"""Labels of a row: encoding a card's label values to ids, with errors that name the row
(file and line) and the column.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from typing import Any

from mtnlp.cards.schema import LocalSource, TaskCard
from mtnlp.modeling.heads import HEADS
from mtnlp.utils.errors import UserError
from mtnlp.utils.untrusted import clip

MISSING = "the value is missing or null"


def label_to_id(value: Any, labels: list[str]) -> int | None:
    """The id of a label value: the label of that name first (an integer as its digits, so 3 is
    label "3" of star ratings ["1", "2", "3"]); an index into the list (int or digit string)
    only when no label name is an integer, so an index never shifts a label's meaning; None if
    neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        name = str(value)
    elif isinstance(value, str):
        name = value
    else:
        return None
    if name in labels:
        return labels.index(name)
    digits = name.strip()
    if _named_by_numbers(tuple(labels)) or not digits.lstrip("-").isdigit():
        return None
    index = int(digits)
    return index if 0 <= index < len(labels) else None


@functools.lru_cache(maxsize=64)
def _named_by_numbers(labels: tuple[str, ...]) -> bool:
    """True when some label name is an integer: then values are names, never indices."""
    return any(label.strip().lstrip("-").isdigit() for label in labels)


def row_place(where: str, index: int, local: LocalSource | None) -> str:
    """Where example `index` (0-based) is: `file: line N` in a local TSV/CSV file (its row) or
    CoNLL file (its sentence's first line), `source: example N` otherwise (Hub, JSON)."""
    if local is not None and local.format in ("tsv", "csv"):
        stat = os.stat(where)
        lines = _row_lines(where, stat.st_mtime_ns, local.format, local.header, local.encoding)
        return f"{where}: line {lines[index] if index < len(lines) else '?'}"
    if local is not None and local.format in ("conll", "conllu"):
        stat = os.stat(where)
        lines = _sentence_lines(where, stat.st_mtime_ns, local.format == "conllu", local.encoding)
        return f"{where}: line {lines[index]}"
    return f"{where}: example {index + 1}"


@functools.lru_cache(maxsize=8)
def _row_lines(path: str, mtime_ns: int, format: str, header: bool, encoding: str) -> list[int]:
    """The line (1-based) where each data row of a TSV/CSV file starts, counted as the file's
    lines are: blank lines (which the reader skips) and line breaks inside quoted CSV cells
    count."""
    quoting = csv.QUOTE_NONE if format == "tsv" else csv.QUOTE_MINIMAL
    starts: list[int] = []
    with open(path, encoding=encoding, newline="") as file:
        reader = csv.reader(file, delimiter="\t" if format == "tsv" else ",", quoting=quoting)
        end, skip_header = 0, header
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record:  # a blank line
                continue
            if skip_header:
                skip_header = False
                continue
            starts.append(start)
    return starts


@functools.lru_cache(maxsize=8)
def _sentence_lines(path: str, mtime_ns: int, comments: bool, encoding: str) -> list[int]:
    """The line (1-based) where each sentence of a CoNLL file starts, split as datasets' conll
    builder splits it: blank lines end a sentence; -DOCSTART- and `#` comment lines are skipped."""
    starts, in_sentence = [], False
    with open(path, encoding=encoding) as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                in_sentence = False
            elif not (line.startswith("-DOCSTART-") or (comments and line.startswith("#"))):
                if not in_sentence:
                    starts.append(number)
                in_sentence = True
    return starts


def number_of(card: TaskCard, value: Any, place: str) -> float:
    """A regression target: a finite number; a `UserError` naming `place` and the column else."""
    if value is None:  # a JSON null or missing key, a Hub dataset's missing value
        raise UserError(f"{place}: {card.label_column}: {MISSING}")
    try:
        if isinstance(value, str) and "_" in value:  # Python's 1_000, not a data number
            raise ValueError(value)
        target = float(value)
    except (TypeError, ValueError):
        raise UserError(
            f"{place}: {card.label_column}: {clip(repr(value))} is not a number"
        ) from None
    if not math.isfinite(target):  # a NaN/inf target makes every loss it touches NaN/inf
        raise UserError(f"{place}: {card.label_column}: {clip(repr(value))} is not a finite number")
    return target


def bin_of(value: float, low: float, high: float, bins: int) -> int:
    """The bin of `value` among `bins` equal bins of [low, high]: bin i holds
    [low + i * width, low + (i + 1) * width), the last one also `high`; values outside the range
    fall into the end bins."""
    index = math.floor((value - low) * bins / (high - low))
    return min(max(index, 0), bins - 1)


def derived_label(card: TaskCard, value: Any, place: str) -> int | float | None:
    """The target of a derived task (`card.derive`): the bin of the parent's number, or the
    index of the parent's graded label as a number. Without `derive.range` (which `load_task`
    sets from the training split, and a run folder's cards hold) a bin is not known yet: the
    value is checked, and None returned."""
    derive = card.derive
    if derive.kind == "bins":
        number = number_of(card, value, place)
        if derive.range is None:
            return None
        low, high = derive.range
        return bin_of(number, low, high, derive.bins)
    index = label_to_id(value, derive.labels)
    if index is None:
        raise UserError(
            f"{place}: {card.label_column}: {clip(repr(value))} is not one of the labels of "
            f"{derive.parent} ({', '.join(derive.labels)})"
        )
    return float(index)


def encode_label(card: TaskCard, value: Any, place: str) -> Any:
    """The label id(s) or float target of one example; a bad value raises a `UserError`."""
    if value is None:  # a JSON null or missing key, a Hub dataset's missing value
        raise UserError(f"{place}: {card.label_column}: {MISSING}")
    if card.derive is not None:
        return derived_label(card, value, place)
    if card.type == "regression":
        return number_of(card, value, place)
    if HEADS.get(card.type).token_level:
        ids = [label_to_id(tag, card.labels) for tag in value]
        if None in ids:
            bad = value[ids.index(None)]
            raise UserError(
                f"{place}: {card.label_column}: tag {clip(repr(bad))} is not in the card's labels"
            )
        return ids
    label = label_to_id(value, card.labels)
    if label is None:
        raise UserError(
            f"{place}: {card.label_column}: {clip(repr(value))} is not one of the card's labels "
            f"({', '.join(card.labels)})"
        )
    return label
