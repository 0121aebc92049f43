"""Issue 14 (trust boundaries and rough edges), data and prediction side: labels keep their
meaning (6), submission files are well-formed (7), data values and line numbers (9), `predict
--input` applies the card's column mapping (12), `evaluate --split` (15), regression `range`
(17)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from tiny_runs import save_tiny_model, write_tiny_tasks

from mtnlp.cards.load import load_card, parse_card
from mtnlp.cli import main
from mtnlp.data.labels import encode_label, label_to_id
from mtnlp.data.read import load_raw
from mtnlp.data.tokenize import load_task
from mtnlp.inference.loading import load_model
from mtnlp.modeling.config import MultiTaskConfig
from mtnlp.modeling.heads import HEADS
from mtnlp.utils.errors import UserError

from conftest import REPO, task_spec

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny tasks (cls, reg, tag) and an untrained model of them."""
    root = tmp_path_factory.mktemp("trust")
    cards, data = write_tiny_tasks(root, train_size=8, dev_size=6)
    return root, cards, data, save_tiny_model(root / "model", cards)


def card_of(tmp_path: Path, local: dict, **fields):
    """A card read from `tmp_path/toy.yaml` (as a card file names its errors)."""
    data = {
        "name": "toy",
        "type": "classification",
        "source": {"local": local},
        "inputs": ["sentence"],
        "labels": ["neg", "pos"],
        "metrics": ["accuracy"],
        **fields,
    }
    if fields.get("type") == "regression":
        data.pop("labels")
        data["metrics"] = ["pearson"]
    return parse_card(data, str(tmp_path / "toy.yaml"))


def error_line(argv: list[str], capsys) -> str:
    """`mtnlp ...` that must fail as a user mistake: its one `error:` line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


# ------------------------------------------------------------------------------ item 6
def test_integer_labels_match_label_names_before_indices():
    stars = ["1", "2", "3"]
    # a JSON 1 is star "1", never index 1 (star "2")
    assert [label_to_id(v, stars) for v in [1, 3, "2", 0, "0", True]] == [0, 2, 1, None, None, None]
    # names that are no integers: 0/1 files hold indices (GLUE's CoLA)
    assert [label_to_id(v, ["no", "yes"]) for v in [0, "1", "yes", 2]] == [0, 1, 1, None]


def test_a_json_star_rating_keeps_its_label(tmp_path, tiny_tokenizer):
    rows = [{"sentence": "good film", "label": 3}, {"sentence": "bad film", "label": 1}]
    (tmp_path / "train.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    (tmp_path / "dev.jsonl").write_text(json.dumps({"sentence": "ok", "label": 2}) + "\n")
    local = {"format": "json", "files": {"train": "train.jsonl", "validation": "dev.jsonl"}}
    card = card_of(tmp_path, local, labels=["1", "2", "3"])
    task = load_task(card, tiny_tokenizer, [tmp_path])
    assert task.train["labels"] == [2, 0]
    assert task.evals["validation"]["labels"] == [1]
    (tmp_path / "dev.jsonl").write_text(json.dumps({"sentence": "ok", "label": 0}) + "\n")
    with pytest.raises(UserError, match=r"dev.jsonl: example 1: label: 0 is not one of"):
        load_task(card, tiny_tokenizer, [tmp_path])


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (
            [task_spec("a", "classification", ["x", "x"])],
            "config.json: tasks[0] (a).labels: label 'x' appears twice",
        ),
        (
            [task_spec("a", "classification", ["x", 1])],
            "config.json: tasks[0] (a).labels: expected a list of strings",
        ),
        (
            [task_spec("a", "regression"), task_spec("a", "regression")],
            "config.json: tasks[1]: task 'a' appears twice",
        ),
    ],
    ids=["duplicate-labels", "non-string-label", "duplicate-task"],
)
def test_config_task_entries_are_checked(tasks, message, tiny, tmp_path):
    with pytest.raises(UserError) as error:
        MultiTaskConfig(tasks=tasks)
    assert str(error.value) == message
    # and from a model folder's config.json
    shutil.copytree(tiny[3], tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["tasks"] = tasks
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as error:
        load_model(str(tmp_path / "model"))
    assert str(error.value) == f"{tmp_path / 'model' / message}"  # names the model folder


# ------------------------------------------------------------------------------ item 7
def split_card(tmp_path: Path, tiny, name: str, rows: list[dict]) -> tuple[Path, Path]:
    """The model's card `name` reading a JSON test split of `rows`: (cards folder, data)."""
    _, cards, data, _ = tiny
    (tmp_path / "cards").mkdir()
    text = (cards / f"{name}.yaml").read_text()
    text = text.replace("format: tsv", "format: json").replace("format: conll", "format: json")
    text = text.replace("validation: ", "test: test.jsonl, validation: ")
    text = text.replace("    column_names: [tokens, tags]\n", "")
    (tmp_path / "cards" / f"{name}.yaml").write_text(text)
    folder = tmp_path / "data"
    shutil.copytree(data, folder)
    (folder / "test.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    return tmp_path / "cards", folder


def test_an_index_with_a_line_break_is_refused(tiny, tmp_path, capsys):
    rows = [{"index": "1", "sentence": "happy alice"}, {"index": "2\n3\tpos", "sentence": "x"}]
    cards, data = split_card(tmp_path, tiny, "cls", rows)
    argv = ["predict", str(tiny[3]), "--split", "test", "--data-dir", str(data), "--cards",
            str(cards), "--output-dir", str(tmp_path / "out")]  # fmt: skip
    line = error_line(argv, capsys)
    assert line.endswith(
        "cls.yaml: test: example 2: index: '2\\n3\\tpos' holds a tab or line break, which "
        "would break the submission file's rows"
    )


def test_tagging_tokens_are_never_resplit(tiny, tmp_path, capsys):
    rows = [{"tokens": ["New York", "is", "10\u00a0000", "alice"]}, {"tokens": ["bob", "a b c"]}]
    cards, data = split_card(tmp_path, tiny, "tag", rows)
    out = tmp_path / "out"
    main(["predict", str(tiny[3]), "--split", "test", "--data-dir", str(data), "--cards",
          str(cards), "--output-dir", str(out)])  # fmt: skip
    lines = (out / "tag.tsv").read_text(encoding="utf-8").splitlines()
    assert [len(line.split("\t")[1].split(" ")) for line in lines[1:]] == [4, 2]


# ------------------------------------------------------------------------------ item 9
def test_python_only_number_syntax_is_refused(tmp_path):
    local = {"format": "tsv", "files": {"train": "t.tsv", "validation": "d.tsv"}}
    card = card_of(tmp_path, local, type="regression")
    assert encode_label(card, "1000", "here") == 1000.0
    with pytest.raises(UserError, match=r"^here: label: '1_000' is not a number$"):
        encode_label(card, "1_000", "here")


def test_a_duplicated_header_column_is_refused(tmp_path):
    (tmp_path / "t.tsv").write_text("sentence\tsentence\tlabel\na\tb\tpos\n")
    local = {"format": "tsv", "files": {"train": "t.tsv", "validation": "t.tsv"}}
    with pytest.raises(UserError) as error:
        load_raw(card_of(tmp_path, local), ["train"], [tmp_path])
    assert (
        str(error.value)
        == f"{tmp_path / 't.tsv'}: line 1: column 'sentence' appears twice in the header"
    )


def test_a_conll_line_with_more_columns_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text("alice B-PER\n\nbob B-PER extra\nsaw O\n")
    local = {"format": "conll", "files": {"train": "t.txt", "validation": "t.txt"},
             "column_names": ["tokens", "tags"]}  # fmt: skip
    card = card_of(tmp_path, local, type="tagging", inputs=["tokens"], label_column="tags",
                   labels=["O", "B-PER"], metrics=["seqeval"])  # fmt: skip
    with pytest.raises(UserError) as error:
        load_raw(card, ["train"], [tmp_path])
    assert str(error.value) == (
        f"{tmp_path / 't.txt'}: line 3: 3 columns, but the card names 2 "
        "(source.local.column_names: tokens, tags)"
    )


@pytest.mark.parametrize(
    ("format", "text", "line"),
    [
        ("tsv", "sentence\tlabel\n\ngood\tpos\n\n\nbad\tneutral\n", 6),
        ("csv", 'sentence,label\n"two\nlines",pos\n\nbad,neutral\n', 5),
    ],
    ids=["tsv-blank-lines", "csv-quoted-line-break"],
)
def test_error_lines_are_file_lines(format, text, line, tmp_path, tiny_tokenizer):
    (tmp_path / f"t.{format}").write_text(text)
    (tmp_path / f"d.{format}").write_text(text.replace("neutral", "neg"))
    local = {"format": format, "files": {"train": f"t.{format}", "validation": f"d.{format}"}}
    with pytest.raises(UserError) as error:
        load_task(card_of(tmp_path, local), tiny_tokenizer, [tmp_path])
    assert str(error.value).startswith(f"{tmp_path / f't.{format}'}: line {line}: label: ")


def test_a_failed_read_keeps_its_reason(tmp_path):
    (tmp_path / "t.csv").write_text('sentence,label\n"open,pos\n')
    local = {"format": "csv", "files": {"train": "t.csv", "validation": "t.csv"}}
    with pytest.raises(UserError) as error:
        load_raw(card_of(tmp_path, local), ["train"], [tmp_path])
    assert str(error.value).startswith(f"{tmp_path / 't.csv'}: could not read as csv: ")
    assert error.value.__cause__ is not None  # the parser's own error, for a traceback


# ------------------------------------------------------------------------------ item 12
def test_predict_input_reads_the_cards_column_names(tmp_path, capsys):
    cards, _ = write_tiny_tasks(tmp_path, train_size=4, dev_size=2)
    reg = cards / "reg.yaml"
    mapping = "    columns: {sentence1: sentence_A, sentence2: sentence_B}\n"
    reg.write_text(reg.read_text().replace("    format: tsv\n", "    format: tsv\n" + mapping))
    model = save_tiny_model(tmp_path / "model", cards, ["reg"])
    assert load_card(reg).model_spec()["input_columns"] == {
        "sentence1": "sentence_A",
        "sentence2": "sentence_B",
    }
    rows = tmp_path / "sick.tsv"
    rows.write_text("pair_ID\tsentence_A\tsentence_B\n7\talice is happy\tbob is sad\n")
    main(["predict", str(model), "--input", str(rows)])
    (line,) = capsys.readouterr().out.splitlines()
    result = json.loads(line)
    assert result["pair_ID"] == "7" and isinstance(result["reg"]["value"], float)


# ------------------------------------------------------------------------------ item 15
def test_evaluate_scores_a_labelled_test_split(tiny, tmp_path, capsys, fresh_accelerate):
    _, cards, data, model = tiny
    shutil.copytree(cards, tmp_path / "cards")
    reg = tmp_path / "cards" / "reg.yaml"
    reg.write_text(reg.read_text().replace("validation: ", "test: reg/train.tsv, validation: "))
    argv = ["evaluate", str(model), "--cards", str(reg), "--data-dir", str(data)]
    main([*argv, "--split", "test"])
    test = json.loads(capsys.readouterr().out)
    main(argv)
    dev = json.loads(capsys.readouterr().out)
    assert set(test["reg"]) == set(dev["reg"]) == {"pearson"}
    assert test["reg"]["pearson"] != dev["reg"]["pearson"]  # 8 train rows, not the 6 dev rows
    line = error_line([*argv, "--split", "final"], capsys)
    assert (
        line
        == f"error: {reg}: source.local.files: no final split (splits: test, train, validation)"
    )


# ------------------------------------------------------------------------------ item 17
def test_regression_range_is_checked(tmp_path):
    local = {"format": "tsv", "files": {"train": "t.tsv", "validation": "d.tsv"}}
    card = card_of(tmp_path, local, type="regression", range=[0, 5])
    assert card.model_spec()["range"] == [0.0, 5.0]
    assert "range" not in card_of(tmp_path, local, type="regression").model_spec()
    toy = tmp_path / "toy.yaml"
    for value, message in [
        ([5, 0], "range: low (5) must be below high (0)"),
        ([1, 1], "range: low (1) must be below high (1)"),
        ([0], "range: give two finite numbers [low, high]"),
        ([0, float("inf")], "range: give two finite numbers [low, high]"),
        (["a", 1], "range: expected two numbers [low, high]"),
        ("0-5", "range: expected two numbers [low, high]"),
    ]:
        with pytest.raises(UserError, match=f"^{re.escape(f'{toy}: {message}')}"):
            card_of(tmp_path, local, type="regression", range=value)
    with pytest.raises(UserError, match="range: a classification task has no values to clip"):
        card_of(tmp_path, local, range=[0, 1])


def test_regression_predictions_are_clipped_to_the_range():
    spec = task_spec("sts", "regression", range=[0.0, 5.0])
    head = HEADS.get("regression")(spec, 8)
    assert head.decode(torch.tensor([-1.5, 2.5, 7.0])).tolist() == [0.0, 2.5, 5.0]
    plain = HEADS.get("regression")(task_spec("sts", "regression"), 8)
    assert plain.decode(torch.tensor([-1.5, 7.0])).tolist() == [-1.5, 7.0]
    stsb = load_card(REPO / "tasks" / "glue" / "stsb.yaml")
    assert stsb.model_spec()["range"] == [0.0, 5.0]


def test_submission_values_are_clipped(tiny, tmp_path, capsys):
    """The pipeline (and so `predict --split` and ONNX) decodes through the head."""
    cards = tiny[1]
    (tmp_path / "cards").mkdir()
    reg = (cards / "reg.yaml").read_text().replace("metrics:", "range: [0.0, 0.001]\nmetrics:")
    (tmp_path / "cards" / "reg.yaml").write_text(reg)
    model = save_tiny_model(tmp_path / "model", tmp_path / "cards")
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"sentence1": "alice", "sentence2": "bob"}) + "\n")
    main(["predict", str(model), "--input", str(rows)])
    value = json.loads(capsys.readouterr().out)["reg"]["value"]
    assert 0.0 <= value <= 0.001
