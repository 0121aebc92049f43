"""Task cards: every shipped card validates; each kind of mistake gives its one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mtnlp.cards.load import load_card, load_cards, parse_card
from mtnlp.utils.errors import UserError

from conftest import REPO

ALL_CARDS = sorted((REPO / "tasks").rglob("*.yaml"))
GLUE = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
GLUE_METRICS = {
    "cola": ["matthews_correlation"],
    "sst2": ["accuracy"],
    "mrpc": ["accuracy", "f1"],
    "stsb": ["pearson", "spearmanr"],
    "qqp": ["accuracy", "f1"],
    "mnli": ["accuracy"],
    "qnli": ["accuracy"],
    "rte": ["accuracy"],
    "wnli": ["accuracy"],
}

VALID = {
    "name": "rte",
    "type": "classification",
    "source": {"local": {"format": "tsv", "files": {"train": "t.tsv", "validation": "d.tsv"}}},
    "inputs": ["sentence1", "sentence2"],
    "labels": ["entailment", "not_entailment"],
    "metrics": ["accuracy"],
}


@pytest.mark.parametrize("path", ALL_CARDS, ids=lambda p: str(p.relative_to(REPO / "tasks")))
def test_every_shipped_card_validates(path: Path) -> None:
    card = load_card(path)
    assert card.name == path.stem
    assert card.path == path


def test_glue_cards_have_official_metrics() -> None:
    cards = {card.name: card for card in load_cards([REPO / "tasks" / "glue"])}
    assert sorted(cards) == sorted(GLUE)
    assert {name: card.metrics for name, card in cards.items()} == GLUE_METRICS
    assert cards["stsb"].type == "regression"
    assert cards["mnli"].eval_splits == ["validation_matched", "validation_mismatched"]


def write(tmp_path: Path, data, name: str = "rte.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


BAD_CARDS = [
    ({"labels": "entailment"}, "labels: expected a list of strings"),
    ({"labels": [1, 2]}, "labels: expected a list of strings"),
    ({"colour": "red"}, "colour: unknown field"),
    ({"type": "translation"}, "type: unknown task type 'translation'; known: "),
    ({"metrics": ["bleuu"]}, "metrics: unknown metric 'bleuu'; known: accuracy, f1,"),
    ({"max_length": 0}, "max_length: Input should be greater than 0"),
    ({"inputs": ["a", "b", "c"]}, "inputs: List should have at most 2 items"),
    ({"labels": ["yes", "yes"]}, "labels: label names must be unique"),
    ({"labels": None}, "labels: required for a classification task"),
    ({"source": {}}, "source: give at least one of 'hub' and 'local'"),
    (
        {"source": {"local": {"format": "tsv", "files": {"train": "t.tsv"}}}},
        "source.local.files: no file for split(s) validation",
    ),
    (
        {"source": {"local": {"format": "xml", "files": {"train": "t", "validation": "d"}}}},
        "source.local.format: Input should be 'tsv', 'csv', 'json', 'conll', 'conllu', 'parquet', "
        "'arrow' or 'save_to_disk'",
    ),
]


@pytest.mark.parametrize(("change", "message"), BAD_CARDS, ids=[m for _, m in BAD_CARDS])
def test_bad_card_names_file_and_field(tmp_path: Path, change: dict, message: str) -> None:
    path = write(tmp_path, {**VALID, **change})
    with pytest.raises(UserError) as error:
        load_card(path)
    assert str(error.value).startswith(f"{path}: {message}"), str(error.value)
    assert "\n" not in str(error.value)


def test_missing_field(tmp_path: Path) -> None:
    data = dict(VALID)
    del data["inputs"]
    with pytest.raises(UserError, match=r"rte\.yaml: inputs: required field is missing$"):
        load_card(write(tmp_path, data))


def test_card_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- just\n- a list\n")
    with pytest.raises(UserError) as error:
        load_card(path)
    assert str(error.value) == f"{path}: expected a mapping of fields (a YAML card), got a list"


def test_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: rte\ntype: [classification\n")
    with pytest.raises(UserError, match=r"rte\.yaml: line 3: YAML syntax error"):
        load_card(path)


def test_duplicate_task_names(tmp_path: Path) -> None:
    first = write(tmp_path, VALID, "a.yaml")
    second = write(tmp_path, VALID, "b.yaml")
    with pytest.raises(UserError) as error:
        load_cards([tmp_path])
    assert str(error.value) == f"{second}: name: task 'rte' is also defined in {first}"


def test_tasks_filter_and_unknown_task(tmp_path: Path) -> None:
    write(tmp_path, VALID)
    assert [card.name for card in load_cards([tmp_path], ["rte"])] == ["rte"]
    with pytest.raises(UserError, match=r"^--tasks: no card for nope; available: rte$"):
        load_cards([tmp_path], ["nope"])


def test_model_spec_round_trips_through_yaml(tmp_path: Path) -> None:
    card = load_card(write(tmp_path, VALID))
    again = load_card(write(tmp_path, card.to_yaml(), "again.yaml"))
    assert again.model_spec() == card.model_spec()
    assert card.model_spec()["labels"] == ["entailment", "not_entailment"]


def test_replace_gives_a_validated_copy_that_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ner.yaml"
    path.write_text((REPO / "tasks" / "conll2003" / "ner.yaml").read_text(encoding="utf-8"))
    card = load_card(path)
    copy = card.replace(layer=4, stack_on="chunk", task_layer={"type": "transformer"})
    assert (copy.layer, copy.stack_on, copy.task_layer.type) == (4, "chunk", "transformer")
    assert (card.layer, card.stack_on, card.task_layer) == (-1, None, None)  # unchanged
    assert copy.path == path and copy.where == str(path)
    assert copy.model_dump(exclude={"layer", "stack_on", "task_layer"}) == card.model_dump(
        exclude={"layer", "stack_on", "task_layer"}
    )
    assert copy.replace(layer=-1, stack_on=None, task_layer=None) == card  # back to the defaults
    with pytest.raises(UserError) as error:
        card.replace(successive_regularization=0.5)  # needs stack_on
    assert str(error.value) == (
        f"{path}: successive_regularization: needs stack_on (the task it is pulled to)"
    )
    with pytest.raises(UserError, match=rf"^{path}: layers: unknown field; known: name, type"):
        card.replace(layers=4)
    built = parse_card(card.model_dump(), "code")  # a card built in code: named by its task
    assert built.replace(layer=2).path is None
    with pytest.raises(UserError, match=r"^task ner: layer: Input should be a valid integer"):
        built.replace(layer="top")


def test_evaluate_metric_names_are_accepted(tmp_path: Path) -> None:
    """`pearsonr` (evaluate's name for `pearson`) scores a regression card, under its own result
    name; cards with `pearson` keep theirs. Only our names are suggested for a wrong one."""
    stsb = {
        **VALID, "name": "stsb", "type": "regression", "labels": None,
        "metrics": ["pearsonr", "spearmanr"],
    }  # fmt: skip
    card = load_card(write(tmp_path, stsb, "stsb.yaml"))
    assert card.resolved_main_metric() == ["pearsonr", "spearmanr"]
    with pytest.raises(UserError, match=r"not regression; use pearson or spearmanr$"):
        load_card(write(tmp_path, {**stsb, "metrics": ["accuracy"]}, "stsb.yaml"))
