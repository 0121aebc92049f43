"""Bad auxiliary tasks (issue 17, item 5): a card's `role` and `derive` fields. Each case breaks
a copy of the tiny tasks and runs `mtnlp train` in-process: exit 2, one `error:` line naming the
card file and the field, no traceback, no output folder left behind."""

from __future__ import annotations

import pytest
from test_bad_input import (
    Case,
    edit_card,
    prepare,
    steps,
    tiny_tasks,  # noqa: F401  (a fixture)
    train_errors,
    write,
)

CLS, REG = "{case}/cards/cls.yaml", "{case}/cards/reg.yaml"
BINS, VALUE = "{case}/cards/bins.yaml", "{case}/cards/value.yaml"
CLS_END = "max_length: 32\n"  # the last line of the tiny cards: fields are added after it


def derived(file: str, text: str):
    """A derived card `file`.yaml in the tiny cards folder."""
    return write(f"cards/{file}.yaml", text)


def tasks(names: str) -> tuple[str, ...]:
    return ("--tasks", names)


CASES = [
    Case(
        "derive-unknown-parent",
        derived("bins", "name: bins\nderive: {from: stsb, kind: bins, bins: 5}\n"),
        f"{BINS}: derive.from: no card 'stsb' among the cards loaded together (cls, reg, tag)",
    ),
    Case(
        "derive-bins-of-a-classification-task",
        derived("bins", "name: bins\nderive: {from: cls, kind: bins, bins: 5}\n"),
        f"{BINS}: derive.from: kind 'bins' derives from a regression task; 'cls' is a "
        "classification task",
    ),
    Case(
        "derive-regression-of-a-regression-task",
        derived("value", "name: value\nderive: {from: reg, kind: regression}\n"),
        f"{VALUE}: derive.from: kind 'regression' derives from a classification task; 'reg' is "
        "a regression task",
    ),
    Case(
        "derive-one-bin",
        derived("bins", "name: bins\nderive: {from: reg, kind: bins, bins: 1}\n"),
        f"{BINS}: derive.bins: Input should be greater than or equal to 2",
    ),
    Case(
        "derive-bins-missing",
        derived("bins", "name: bins\nderive: {from: reg, kind: bins}\n"),
        f"{BINS}: derive.bins: required for kind 'bins' (the number of bins, at least 2)",
    ),
    Case(
        "derive-bins-option-on-regression",
        derived("value", "name: value\nderive: {from: cls, kind: regression, bins: 3}\n"),
        f"{VALUE}: derive.bins: not an option of kind 'regression'; remove it",
    ),
    Case(
        "derive-unknown-kind",
        derived("bins", "name: bins\nderive: {from: reg, kind: ordinal}\n"),
        f"{BINS}: derive.kind: Input should be 'bins' or 'regression'",
    ),
    Case(
        "derive-unknown-option",
        derived("bins", "name: bins\nderive: {from: reg, kind: bins, bins: 3, edges: [1]}\n"),
        f"{BINS}: derive.edges: unknown field; known: from, kind, bins, range, labels",
    ),
    Case(
        "derive-range-upside-down",
        derived("bins", "name: bins\nderive: {from: reg, kind: bins, bins: 3, range: [5, 0]}\n"),
        f"{BINS}: derive.range: low (5) must be below high (0)",
    ),
    Case(
        "derive-from-itself",
        derived("bins", "name: bins\nderive: {from: bins, kind: bins, bins: 3}\n"),
        f"{BINS}: derive.from: a task cannot derive from itself",
    ),
    Case(
        "derive-chain",
        steps(
            derived("bins", "name: bins\nderive: {from: reg, kind: bins, bins: 3}\n"),
            derived("value", "name: value\nderive: {from: bins, kind: regression}\n"),
        ),
        f"{VALUE}: derive.from: 'bins' is itself a derived card; derive from a card that is not",
    ),
    Case(
        "derive-cycle",
        steps(
            derived("bins", "name: bins\nderive: {from: value, kind: bins, bins: 3}\n"),
            derived("value", "name: value\nderive: {from: bins, kind: regression}\n"),
        ),
        f"{BINS}: derive.from: 'value' is itself a derived card; derive from a card that is not\n"
        f"{VALUE}: derive.from: 'bins' is itself a derived card; derive from a card that is not",
    ),
    Case(
        "derive-wrong-labels",
        derived(
            "bins", "name: bins\nlabels: [low, high]\nderive: {from: reg, kind: bins, bins: 3}\n"
        ),
        f"{BINS}: labels: a task derived as 3 bins has the labels 0, 1, 2 (leave 'labels' out)",
    ),
    Case(
        "derive-bins-of-constant-scores",
        steps(
            derived("bins", "name: bins\nderive: {from: reg, kind: bins, bins: 3}\n"),
            lambda case: _constant_scores(case),
        ),
        f"{BINS}: derive.range: the train split has no two different values to bin; give "
        "derive.range [low, high]",
        tasks("cls,bins"),
    ),
    Case(
        "role-unknown",
        edit_card("cls", CLS_END, CLS_END + "role: helper\n"),
        f"{CLS}: role: Input should be 'main' or 'auxiliary'",
    ),
    Case(
        "every-task-auxiliary",
        steps(
            edit_card("cls", CLS_END, CLS_END + "role: auxiliary\n"),
            edit_card("reg", CLS_END, CLS_END + "role: auxiliary\n"),
        ),
        f"{CLS}: role: every task is auxiliary (cls, reg); give at least one task with role: main",
        tasks("cls,reg"),
    ),
]


def _constant_scores(case) -> None:
    """Every training score of the tiny `reg` task the same."""
    train = case / "data" / "reg" / "train.tsv"
    lines = train.read_text().splitlines()
    rows = [line.rsplit("\t", 1)[0] + "\t2.00" for line in lines[1:]]
    train.write_text("\n".join([lines[0], *rows]) + "\n")


def test_the_auxiliary_table_is_complete():
    assert len(CASES) == 16 and len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_auxiliary_task_exits_2_with_its_error(
    case,
    tiny_tasks,  # noqa: F811  (the fixture imported from test_bad_input)
    tmp_path,
    capsys,
):
    flags, expected = prepare(case, tiny_tasks, tmp_path)
    assert train_errors(flags, tmp_path / "out", capsys) == expected.splitlines()
