"""Issue 14, items 1 and 16: a card's Hub source names a Hub dataset, never a local path (checked
when a card is parsed, and again where the data is read), and `mtnlp cards check --data-dir`
opens each card's local files. The bad-input table is tests/test_bad_input_sources.py."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import yaml
from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
from tiny_runs import write_tiny_tasks

from mtnlp.cards.load import load_card
from mtnlp.cards.schema import FILE_BUILDERS, TaskCard
from mtnlp.cli import main
from mtnlp.data.check import PROBLEMS_PER_SPLIT, check_card_data
from mtnlp.data.read import load_raw
from mtnlp.utils.errors import UserError


def hub_card(folder: Path, **hub) -> TaskCard:
    """A card with Hub source `hub`, read from `folder/toy.yaml` (as errors name a card file)."""
    data = {
        "name": "toy",
        "type": "classification",
        "source": {"hub": hub},
        "inputs": ["sentence"],
        "labels": ["neg", "pos"],
        "metrics": ["accuracy"],
    }
    (folder / "toy.yaml").write_text(yaml.safe_dump(data))
    return load_card(folder / "toy.yaml")


@pytest.fixture
def no_hub(monkeypatch):
    """`datasets.load_dataset` of a Hub id returns two rows and records the call (no network);
    local builders (csv, json, conll, ...) read as usual."""
    calls, real_load = [], datasets.load_dataset

    def load_dataset(path, *args, **kwargs):
        if path in _PACKAGED_DATASETS_MODULES:
            return real_load(path, *args, **kwargs)
        calls.append(path)
        return datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": ["neg", "pos"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


# ------------------------------------------------------------------------------ item 1
@pytest.mark.parametrize(
    ("path", "name", "split"),
    [
        ("nyu-mll/glue", "rte", "validation"),
        ("lhoestq/conll2003", None, "test"),
        ("glue", "mnli", "validation_matched"),  # a canonical id without a namespace
        ("Org_1/data.set-v2", "20231101.en", "train[:10%]"),
        ("stanfordnlp/imdb", "plain_text", "train+test"),
    ],
)
def test_hub_ids_are_accepted(tmp_path, path, name, split):
    card = hub_card(tmp_path, path=path, name=name, splits={"validation": split})
    assert (card.source.hub.path, card.source.hub.splits) == (path, {"validation": split})


def test_every_datasets_file_builder_is_refused():
    """The card's list of datasets' packaged builders covers the installed datasets' own."""
    assert set(_PACKAGED_DATASETS_MODULES) <= FILE_BUILDERS


def test_reading_refuses_a_hub_id_found_in_the_working_folder(tmp_path, monkeypatch, no_hub):
    card = hub_card(tmp_path, path="nyu-mll/glue", name="rte")
    monkeypatch.chdir(tmp_path)
    assert len(load_raw(card, ["validation"])["validation"]) == 2  # nothing local: the Hub's
    (tmp_path / "nyu-mll").mkdir()
    (tmp_path / "nyu-mll" / "glue").symlink_to(tmp_path / "elsewhere")  # even a dangling link
    with pytest.raises(UserError) as error:
        load_raw(card, ["validation"])
    assert str(error.value) == (
        f"{tmp_path}/toy.yaml: source.hub.path: 'nyu-mll/glue' is also a local path in the "
        f"working folder {tmp_path}, which datasets reads instead of the Hub; read local files "
        "through source.local with --data-dir"
    )
    assert no_hub == ["nyu-mll/glue"]  # the first read only


def test_reading_refuses_a_file_builder_the_card_does_not_know(tmp_path, monkeypatch, no_hub):
    """A builder of a later datasets release (not in FILE_BUILDERS) is refused where the data is
    read: `load_dataset("newformat")` would read the working folder's files."""
    monkeypatch.setitem(_PACKAGED_DATASETS_MODULES, "newformat", ("", {}))
    card = hub_card(tmp_path, path="newformat")
    with pytest.raises(UserError) as error:
        load_raw(card, ["train"])
    assert str(error.value) == (
        f"{tmp_path}/toy.yaml: source.hub.path: 'newformat' is datasets' newformat builder, which "
        "reads files of the working folder instead of the Hub; read local files through "
        "source.local with --data-dir"
    )
    assert no_hub == []


def test_a_hub_error_does_not_echo_a_long_value(tmp_path):
    with pytest.raises(UserError) as error:
        hub_card(tmp_path, path="a/" + "b" * 10_000)
    assert len(str(error.value)) < 400 and "b" * 50 not in str(error.value)


def test_cards_check_names_every_missing_column_training_the_first(tmp_path):
    _, data = write_tiny_tasks(tmp_path, train_size=4, dev_size=2)
    card = hub_card(tmp_path, path="nyu-mll/glue").replace(
        source={"local": {"format": "tsv", "files": {"train": "reg/train.tsv"}}},
        inputs=["sentence", "other"],
        eval_splits=["train"],
    )
    where = f"{data}/reg/train.tsv"
    lines = [
        f"{where}: column {column!r} (named by {tmp_path}/toy.yaml) not found; columns: "
        "sentence1, sentence2, score"
        for column in ("sentence", "other", "label")
    ]
    with pytest.raises(UserError) as error:
        check_card_data([card], [data])
    assert str(error.value).splitlines() == lines
    with pytest.raises(UserError) as error:
        load_raw(card, ["train"], [data])
    assert str(error.value) == lines[0]


# ------------------------------------------------------------------------------ item 16
def cards_check(argv: list[str], capsys) -> tuple[int, list[str], list[str]]:
    """`mtnlp cards check ARGV`: (exit code, stdout lines, stderr lines)."""
    code = 0
    try:
        main(["cards", "check", *argv])
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_cards_check_data_dir_passes_good_data_and_skips_hub_cards(tmp_path, capsys, no_hub):
    cards, data = write_tiny_tasks(tmp_path, train_size=4, dev_size=2)
    (cards / "hubbed.yaml").write_text(
        "name: hubbed\ntype: classification\nsource: {hub: {path: nyu-mll/glue, name: rte}}\n"
        "inputs: [sentence]\nlabels: [neg, pos]\nmetrics: [accuracy]\n"
    )
    assert cards_check([str(cards), "--data-dir", str(data)], capsys) == (
        0,
        ["4 card(s) OK: cls, hubbed, reg, tag"],
        [],
    )
    assert no_hub == []  # a card with only a Hub source is not opened


def test_cards_check_data_dir_needs_no_labels_in_a_test_split(tmp_path, capsys):
    cards, data = write_tiny_tasks(tmp_path, train_size=4, dev_size=2)
    card = cards / "cls.yaml"
    card.write_text(card.read_text().replace("cls/dev.tsv}", "cls/dev.tsv, test: cls/test.tsv}"))
    (data / "cls" / "test.tsv").write_text("sentence\nthe cat\n")
    assert cards_check([str(card), "--data-dir", str(data)], capsys)[0] == 0
    (data / "cls" / "test.tsv").write_text("text\nthe cat\n")
    assert cards_check([str(card), "--data-dir", str(data)], capsys) == (
        2,
        [],
        [
            f"{data}/cls/test.tsv: column 'sentence' (named by {card}) not found; columns: text",
        ],
    )


def test_cards_check_data_dir_counts_row_problems_beyond_five(tmp_path):
    from mtnlp.cards.load import load_cards

    cards, data = write_tiny_tasks(tmp_path, train_size=4, dev_size=2)
    rows = "".join(f"cat {i}\tmaybe\n" for i in range(8))
    (data / "cls" / "train.tsv").write_text(f"sentence\tlabel\n{rows}")
    with pytest.raises(UserError) as error:
        check_card_data(load_cards([cards / "cls.yaml"]), [data])
    where = f"{data}/cls/train.tsv"
    assert str(error.value).splitlines() == [
        *(
            f"{where}: line {line}: label: 'maybe' is not one of the card's labels (neg, pos)"
            for line in range(2, 2 + PROBLEMS_PER_SPLIT)
        ),
        f"{where}: 3 more row(s) with problems among the first 8",
    ]
