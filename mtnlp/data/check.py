"""`mtnlp cards check --data-dir`: open each card's local files and check what training meets
first (the file is there and readable, the columns the card names, the first rows' texts and
labels), so a column or label typo is found before a run. Nothing is tokenized and no model is
loaded; a card with only a Hub source is not opened (no network).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets

from mtnlp.cards.schema import TaskCard
from mtnlp.data.labels import encode_label, row_place
from mtnlp.data.read import read_split, split_problems
from mtnlp.data.tokenize import row_problem
from mtnlp.utils.errors import UserError

ROWS_CHECKED = 100
"""The rows of each split whose texts and labels are checked."""
PROBLEMS_PER_SPLIT = 5
"""Row problems listed per split; more are counted in one line."""


def check_card_data(cards: Sequence[TaskCard], data_dirs: Sequence[Path]) -> None:
    """Raise one `UserError` with a line per problem in the local files of every card: a file
    that is missing or unreadable, a column not found, a text or label of the first
    `ROWS_CHECKED` rows that training would refuse. The train and dev splits must hold the label
    column; other splits (test) only the inputs. Cards without `source.local` are skipped."""
    problems = []
    with _quiet_reading():
        for card in cards:
            if card.source.local is None:
                continue
            labelled = {card.train_split, *card.eval_splits}
            for split in card.source.local.files:
                problems += _file_problems(card, split, data_dirs, split in labelled)
    if problems:  # a file that two splits read: its problems once
        raise UserError("\n".join(dict.fromkeys(problems)))


@contextlib.contextmanager
def _quiet_reading() -> Iterator[None]:
    """No progress bars from datasets' readers: the check's output is its problem lines."""
    bars_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars_on:
            datasets.enable_progress_bars()


def _file_problems(
    card: TaskCard, split: str, data_dirs: Sequence[Path], labelled: bool
) -> list[str]:
    """One line per problem of one split's file, as training words it."""
    try:
        dataset, where = read_split(card, split, data_dirs, labels=labelled)
    except UserError as error:  # not found, not readable
        return str(error).splitlines()
    problems = split_problems(card, dataset, where, split, labelled)
    if problems:  # columns not found, no rows
        return problems
    local = card.source.local.for_split(split)
    rows = dataset.select(range(min(ROWS_CHECKED, len(dataset))))
    problems = []
    for index, row in enumerate(rows):
        problem = _row_problem(card, row, row_place(where, index, local), labelled)
        if problem is not None:
            problems.append(problem)
    if len(problems) > PROBLEMS_PER_SPLIT:
        more = len(problems) - PROBLEMS_PER_SPLIT
        problems[PROBLEMS_PER_SPLIT:] = [
            f"{where}: {more} more row(s) with problems among the first {len(rows)}"
        ]
    return problems


def _row_problem(card: TaskCard, row: dict[str, Any], place: str, labelled: bool) -> str | None:
    """What training would refuse in the row at `place` (`place: column: problem`), or None."""
    problem = row_problem(card, row, labelled)
    if problem is not None:
        return f"{place}: {problem}"
    if not labelled:
        return None
    try:
        encode_label(card, row[card.label_column], place)
    except UserError as error:
        return str(error)
    return None
