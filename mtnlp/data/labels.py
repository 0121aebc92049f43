"""Labels of a row: encoding a card's label values to ids, with errors that name the row
(file and line) and the column.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

from mtnlp.cards.schema import LocalSource, TaskCard
from mtnlp.data.read import clip
from mtnlp.modeling.heads import HEADS
from mtnlp.utils.errors import UserError

MISSING = "the value is missing or null"


def label_to_id(value: Any, labels: list[str]) -> int | None:
    """A label name, or an index into the label list (int or digit string); None if neither."""
    if isinstance(value, str):
        if value in labels:
            return labels.index(value)
        value = value.strip()
        if value.lstrip("-").isdigit():
            value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    return None


def row_place(where: str, index: int, local: LocalSource | None) -> str:
    """Where example `index` (0-based) is: `file: line N` in a local TSV/CSV file (its row) or
    CoNLL file (its sentence's first line), `source: example N` otherwise (Hub, JSON)."""
    if local is not None and local.format in ("tsv", "csv"):
        return f"{where}: line {index + (2 if local.header else 1)}"
    if local is not None and local.format in ("conll", "conllu"):
        stat = os.stat(where)
        lines = _sentence_lines(where, stat.st_mtime_ns, local.format == "conllu", local.encoding)
        return f"{where}: line {lines[index]}"
    return f"{where}: example {index + 1}"


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


def encode_label(card: TaskCard, value: Any, place: str) -> Any:
    """The label id(s) or float target of one example; a bad value raises a `UserError`."""
    if value is None:  # a JSON null or missing key, a Hub dataset's missing value
        raise UserError(f"{place}: {card.label_column}: {MISSING}")
    if card.type == "regression":
        try:
            target = float(value)
        except (TypeError, ValueError):
            raise UserError(
                f"{place}: {card.label_column}: {clip(repr(value))} is not a number"
            ) from None
        if not math.isfinite(target):  # a NaN/inf target makes every loss it touches NaN/inf
            raise UserError(
                f"{place}: {card.label_column}: {clip(repr(value))} is not a finite number"
            )
        return target
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
