"""Bad options of the task-relationship prior and task clustering (issue 17, items 1 and 4):
each case breaks a copy of the tiny tasks or gives a bad flag and runs `mtnlp train`
in-process: exit 2, one `error:` line naming the flag or the card file and field, no traceback,
no output folder left behind."""

from __future__ import annotations

import pytest
from test_bad_input import (
    Case,
    edit_card,
    prepare,
    tiny_tasks,  # noqa: F401  (a fixture)
    train_errors,
)

CLS, REG, TAG = "{case}/cards/cls.yaml", "{case}/cards/reg.yaml", "{case}/cards/tag.yaml"
CARD_END = "max_length: 32\n"  # the last line of the tiny cards: fields are added after it
TWO_TASKS = ("--tasks", "cls,tag")  # heads of one shape: 2 labels each
SHAPES = (
    "give the tasks heads of one shape (sentence tasks: the same head.hidden_size in their cards)"
)


def add(card: str, text: str):
    """Append the YAML `text` to the tiny card `card`."""
    return edit_card(card, CARD_END, CARD_END + text + "\n")


def nothing(case) -> None:
    """The tiny tasks as they are."""


CASES = [
    Case(
        "relationship-prior-negative",
        nothing,
        "--relationship-prior: must be >= 0, got -0.5",
        ("--relationship-prior", "-0.5"),
    ),
    Case(
        "relationship-update-every-zero",
        nothing,
        "--relationship-update-every: must be positive, got 0",
        ("--relationship-prior", "0.1", "--relationship-update-every", "0"),
    ),
    Case(
        "relationship-prior-heads-of-different-shapes",
        nothing,
        f"--relationship-prior: the heads of cls (2 x 32) and reg (1 x 32) differ in shape; "
        f"{SHAPES}",
        ("--relationship-prior", "0.1"),
    ),
    Case(
        "relationship-prior-one-task",
        nothing,
        "--relationship-prior: needs two or more tasks whose heads read the encoder",
        ("--relationship-prior", "0.1", "--tasks", "cls"),
    ),
    Case(
        "task-clusters-more-than-tasks",
        nothing,
        "--task-clusters: 3 clusters for 2 tasks; at most 2",
        ("--task-clusters", "3", *TWO_TASKS),
    ),
    Case(
        "task-clusters-zero",
        nothing,
        "--task-clusters: expected a number of clusters (1 or more) or 'cards', got '0'",
        ("--task-clusters", "0", *TWO_TASKS),
    ),
    Case(
        "task-clusters-a-word",
        nothing,
        "--task-clusters: expected a number of clusters (1 or more) or 'cards', got "
        "'paraphrase-and-entai...'",
        ("--task-clusters", "paraphrase-and-entailment-tasks", *TWO_TASKS),
    ),
    Case(
        "cluster-in-only-some-cards",
        add("cls", "cluster: sentences"),
        f"--task-clusters cards: {TAG}: cluster: missing; give every card a cluster, or learn "
        "them with --task-clusters K",
        ("--task-clusters", "cards", *TWO_TASKS),
    ),
    Case(
        "cluster-not-a-name",
        add("cls", "cluster: two words"),
        f"{CLS}: cluster: String should match pattern '^[A-Za-z][A-Za-z0-9_]*$'",
    ),
    Case(
        "task-clusters-heads-of-different-shapes",
        nothing,
        f"--task-clusters: the heads of cls (2 x 32) and reg (1 x 32) differ in shape; {SHAPES}",
        ("--task-clusters", "2"),
    ),
    Case(
        "cluster-weight-negative",
        nothing,
        "--cluster-within-weight: must be >= 0, got -1",
        ("--task-clusters", "2", "--cluster-within-weight", "-1", *TWO_TASKS),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_relationship_option_exits_2_with_one_error_line(
    case,
    tiny_tasks,  # noqa: F811  (the fixture imported from test_bad_input)
    tmp_path,
    capsys,
):
    flags, expected = prepare(case, tiny_tasks, tmp_path)
    assert train_errors(flags, tmp_path / "out", capsys) == [expected]


def test_relationships_table_is_complete():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) == 11
