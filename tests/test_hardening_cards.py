"""Issue 11, items 1, 3, 12 and 17: each task's main metric (model selection, the report), metrics
and inputs that fit the task type, data paths that stay inside --data-dir, error messages without
file contents, JSON nulls, and CoNLL files in the card's encoding."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from tiny_runs import reset_accelerate, write_tiny_tasks

from mtnlp import training
from mtnlp.artifacts.report import dev_series
from mtnlp.cards.load import load_card, load_cards, parse_card
from mtnlp.data.read import load_raw, resolve_file
from mtnlp.metrics import (
    METRICS,
    Metric,
    compute_metrics,
    default_main_metric,
    main_metrics,
    main_score,
)
from mtnlp.training import callbacks
from mtnlp.training.args import parse_args
from mtnlp.training.selection import BestCheckpoint, dev_score
from mtnlp.utils.errors import UserError

from conftest import REPO

VALID = {
    "name": "t",
    "type": "classification",
    "source": {"local": {"format": "tsv", "files": {"train": "t.tsv", "validation": "d.tsv"}}},
    "inputs": ["sentence"],
    "labels": ["a", "b", "c"],
    "metrics": ["accuracy"],
}


def card_error(change: dict, where: str = "t.yaml") -> str:
    with pytest.raises(UserError) as error:
        parse_card({**VALID, **change}, where)
    return str(error.value)


# ------------------------------------------------------------------------------ 1. main metric
SHIPPED_MAIN_METRICS = {
    "chunk": ["overall_f1"],  # [accuracy, seqeval]: entity F1, not the first metric
    "ner": ["overall_f1"],  # [seqeval]: F1, not overall_precision (its first result)
    "pos": ["accuracy"],
    "upos": ["accuracy"],
    "cola": ["matthews_correlation"],
    "mrpc": ["f1"],  # [accuracy, f1]
    "qqp": ["f1"],
    "stsb": ["pearson", "spearmanr"],  # their mean
    "mnli": ["accuracy"],
    "qnli": ["accuracy"],
    "rte": ["accuracy"],
    "sst2": ["accuracy"],
    "wnli": ["accuracy"],
}


def test_shipped_cards_main_metrics():
    cards = load_cards([REPO / "tasks"])
    assert {card.name: card.model_spec()["main_metric"] for card in cards} == SHIPPED_MAIN_METRICS


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        (["seqeval"], ["overall_f1"]),
        (["accuracy", "seqeval_iobes"], ["overall_f1"]),
        (["accuracy", "f1"], ["f1"]),
        (["accuracy", "matthews_correlation"], ["matthews_correlation"]),
        (["spearmanr", "pearson"], ["pearson", "spearmanr"]),
        (["spearmanr"], ["spearmanr"]),
        (["f1_macro", "accuracy"], ["accuracy"]),
        (["f1_micro"], ["f1_micro"]),
        (["evaluate-metric/bleu"], None),  # known only when it runs: its first result
    ],
)
def test_default_main_metric(metrics, expected):
    assert default_main_metric(metrics) == expected


def test_card_main_metric_is_stored_in_the_model_spec(tmp_path):
    data = {**VALID, "type": "tagging", "inputs": ["tokens"], "labels": ["O", "B-X"]}
    data |= {"metrics": ["seqeval"], "main_metric": "overall_recall"}
    card = parse_card(data, "t.yaml")
    assert card.model_spec()["main_metric"] == ["overall_recall"]
    path = tmp_path / "again.yaml"
    path.write_text(card.to_yaml())
    assert yaml.safe_load(path.read_text())["main_metric"] == "overall_recall"
    assert load_card(path).model_spec() == card.model_spec()
    mean = parse_card({**data, "main_metric": ["overall_recall", "overall_f1"]}, "t.yaml")
    assert mean.model_spec()["main_metric"] == ["overall_recall", "overall_f1"]


def test_main_metric_must_be_a_result_of_the_metrics():
    assert card_error({"metrics": ["accuracy", "f1_macro"], "main_metric": "f1"}) == (
        "t.yaml: main_metric: 'f1' is not a result of the card's metrics (accuracy, f1_macro)"
    )
    assert card_error({"main_metric": []}) == (
        "t.yaml: main_metric: give a result name or a non-empty list of them"
    )
    assert card_error({"main_metric": {"a": 1}}) == (
        "t.yaml: main_metric: expected a result name or a list of result names"
    )
    # an evaluate module's result names are unknown before it runs: checked at evaluation
    card = parse_card({**VALID, "metrics": ["owner/metric"], "main_metric": "score"}, "t.yaml")
    assert card.model_spec()["main_metric"] == ["score"]
    with pytest.raises(UserError) as error:
        main_score({"other": 0.5}, ["score"], "t")
    assert str(error.value) == "task t: main_metric: 'score' is not among its dev results (other)"
    history = [{"step": 1, "eval": {"t": {"other": 0.5}}}]
    assert dev_series(history, {"t": ["score"]}) == {}  # the report draws no point for it
    assert dev_series(history, {"t": None}) == {"t (other)": ([1], [0.5])}  # the first result


SEQEVAL_RESULTS = {  # a tagger that predicts few entities: precise, but low recall and F1
    "overall_precision": 0.9,
    "overall_recall": 0.1,
    "overall_f1": 0.18,
    "overall_accuracy": 0.8,
}


def test_dev_score_ranks_by_the_main_metric():
    ner = parse_card(
        {**VALID, "name": "ner", "type": "tagging", "inputs": ["tokens"], "labels": ["O", "B-X"]}
        | {"metrics": ["seqeval"]},
        "ner.yaml",
    )
    stsb = parse_card(
        {**VALID, "name": "stsb", "type": "regression", "labels": None}
        | {"metrics": ["pearson", "spearmanr"]},
        "stsb.yaml",
    )
    main = main_metrics([ner.model_spec(), stsb.model_spec()])
    results = {"ner": SEQEVAL_RESULTS, "stsb": {"pearson": 0.8, "spearmanr": 0.6}}
    assert dev_score(results, main) == pytest.approx((0.18 + 0.7) / 2)
    # metadata saved before cards had main_metric gets the default for its metrics
    old = {key: value for key, value in ner.model_spec().items() if key != "main_metric"}
    assert main_metrics([old]) == {"ner": ["overall_f1"]}


def test_every_registered_metric_records_its_direction(monkeypatch):
    assert all(METRICS.get(name).greater_is_better for name in METRICS.names())
    # a smaller-is-better result counts negated, so that the greater score is always better
    loss = Metric(lambda p, r: {"loss": 0.0}, ("loss",), ("regression",), greater_is_better=False)
    monkeypatch.setitem(METRICS._entries, "loss", loss)
    assert main_score({"loss": 0.25, "pearson": 0.75}, ["loss"], "t") == -0.25
    assert main_score({"loss": 0.25, "pearson": 0.75}, ["pearson", "loss"], "t") == 0.25


def test_best_checkpoint_keeps_the_best_main_metric():
    import torch

    layer = torch.nn.Linear(1, 1)
    best = BestCheckpoint({"ner": ["overall_f1"]})
    assert best.update(1, {"ner": SEQEVAL_RESULTS}, layer)
    better_f1 = {**SEQEVAL_RESULTS, "overall_precision": 0.5, "overall_f1": 0.4}
    assert best.update(2, {"ner": better_f1}, layer)  # lower precision, higher F1
    assert best.step == 2


@pytest.mark.usefixtures("one_thread")
def test_keep_best_selects_by_seqeval_f1_in_training(tmp_path, monkeypatch):
    """A tagging run with --keep-best keeps the evaluation with the best entity F1, though
    another has the best precision (the card's first result)."""
    cards, data = write_tiny_tasks(tmp_path, train_size=8, dev_size=4)
    scripted = iter(
        [
            {"overall_precision": 0.9, "overall_recall": 0.1, "overall_f1": 0.18},
            {"overall_precision": 0.4, "overall_recall": 0.6, "overall_f1": 0.48},
            {"overall_precision": 0.5, "overall_recall": 0.2, "overall_f1": 0.29},
        ]
    )
    monkeypatch.setattr(callbacks, "evaluate", lambda *args: {"tag": next(scripted)})
    output = tmp_path / "out"
    flags = [
        "--model", "tiny", "--cards", str(cards), "--data-dir", str(data), "--tasks", "tag",
        "--output-dir", str(output), "--max-steps", "3", "--eval-every", "1", "--keep-best",
        "--batch-size", "4",
    ]  # fmt: skip
    reset_accelerate()
    try:
        results = training.run(parse_args(flags), default_cards=[])
    finally:
        reset_accelerate()
    assert json.loads((output / "train_summary.json").read_text())["best_step"] == 2
    assert results["tag"]["overall_f1"] == 0.48
    assert json.loads((output / "config.json").read_text())["tasks"][0]["main_metric"] == [
        "overall_f1"
    ]
    assert "![Dev metric](plots/dev_metrics.png)" in (output / "report.md").read_text()


# ------------------------------------------------------------------------------ 3. fit checks
BAD_FITS = [
    (
        {"metrics": ["accuracy", "f1"]},
        "metrics: 'f1' is a binary metric (positive class = the second label) and task t has 3 "
        "labels; use f1_macro or f1_micro",
    ),
    (
        {"type": "regression", "labels": None, "metrics": ["accuracy"]},
        "metrics: 'accuracy' scores classification or tagging tasks, not regression; use pearson "
        "or spearmanr",
    ),
    (
        {"type": "regression", "labels": None, "metrics": ["matthews_correlation"]},
        "metrics: 'matthews_correlation' scores classification tasks, not regression; use "
        "pearson or spearmanr",
    ),
    (
        {"metrics": ["seqeval"]},
        "metrics: 'seqeval' scores tagging tasks, not classification; use accuracy, f1_macro, "
        "f1_micro or matthews_correlation",
    ),
    (
        {"labels": ["a", "b"], "metrics": ["pearson"]},
        "metrics: 'pearson' scores regression tasks, not classification; use accuracy, f1, "
        "f1_macro, f1_micro or matthews_correlation",
    ),
    (
        {"type": "tagging", "metrics": ["spearmanr"]},
        "metrics: 'spearmanr' scores regression tasks, not tagging; use accuracy, f1_macro, "
        "f1_micro, seqeval, seqeval_bilou, seqeval_iob1, seqeval_iobes, seqeval_ioe1 or "
        "seqeval_ioe2",
    ),
    (
        {"type": "tagging", "inputs": ["tokens", "tags"]},
        "inputs: a tagging task reads one column of words, not 2",
    ),
    (
        {"source": {"local": {**VALID["source"]["local"], "encoding": "utf-9"}}},
        "source.local.encoding: unknown text encoding 'utf-9'",
    ),
]


@pytest.mark.parametrize(("change", "message"), BAD_FITS, ids=[m[:40] for _, m in BAD_FITS])
def test_metric_inputs_and_encoding_must_fit(change, message):
    assert card_error(change) == f"t.yaml: {message}"


def test_fitting_cards_pass():
    parse_card(
        {**VALID, "metrics": ["accuracy", "f1_macro", "f1_micro", "matthews_correlation"]}, ""
    )
    parse_card({**VALID, "labels": ["a", "b"], "metrics": ["f1"]}, "")
    tagging = {**VALID, "type": "tagging", "inputs": ["tokens"]}
    parse_card({**tagging, "metrics": ["accuracy", "f1_macro", "seqeval_bilou"]}, "")
    local = {**VALID["source"]["local"], "encoding": "Latin-1"}
    parse_card({**VALID, "source": {"local": local}}, "")


def test_multiclass_f1_by_hand():
    predictions, references = [0, 1, 2, 2, 1], [0, 1, 1, 2, 2]
    # per class: 0 -> f1 1; 1 -> tp 1, fp 1, fn 1: 1/2; 2 -> tp 1, fp 1, fn 1: 1/2; pooled 3 of 5
    result = compute_metrics(["f1_macro", "f1_micro"], predictions, references)
    assert result == pytest.approx({"f1_macro": 2 / 3, "f1_micro": 0.6})
    tags = compute_metrics(["f1_micro"], [["O", "B-X"], ["O"]], [["O", "O"], ["O"]])
    assert tags == pytest.approx({"f1_micro": 2 / 3})  # per word, like accuracy


# ------------------------------------------------------------------------------ 12. data paths
UP = "leaves the --data-dir folder ('..'); give a path inside it"
ABSOLUTE = "is an absolute path; give a path relative to --data-dir"


@pytest.mark.parametrize(
    ("file", "message"),
    [
        ("../secret.tsv", f"'../secret.tsv' {UP}"),
        ("a/../../b.tsv", f"'a/../../b.tsv' {UP}"),
        ("a\\..\\..\\b.tsv", f"'a\\\\..\\\\..\\\\b.tsv' {UP}"),
        ("/etc/passwd", f"'/etc/passwd' {ABSOLUTE}"),
        ("C:/data/t.tsv", f"'C:/data/t.tsv' {ABSOLUTE}"),
    ],
)
def test_data_paths_stay_inside_the_data_dir(file, message):
    local = {"format": "tsv", "files": {"train": "t.tsv", "validation_2": file}}
    change = {"source": {"local": local}, "eval_splits": ["validation_2"]}
    assert card_error(change) == f"t.yaml: source.local.files.validation_2: {message}"


def test_symlink_out_of_the_data_dir_is_refused(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "secret.tsv").write_text("sentence\tlabel\nprivate\ta\n")
    (tmp_path / "data" / "t.tsv").symlink_to(tmp_path / "secret.tsv")
    (tmp_path / "data" / "sub" / "d.tsv").write_text("sentence\tlabel\nfine\ta\n")
    os.symlink("sub/d.tsv", tmp_path / "data" / "d.tsv")  # a link inside the folder is fine
    card = parse_card(VALID, "t.yaml")
    data = tmp_path / "data"
    assert resolve_file(card, "validation", [data]) == data / "d.tsv"
    with pytest.raises(UserError) as error:
        resolve_file(card, "train", [data])
    assert str(error.value) == (
        f"task t: source.local.files.train: {data}/t.tsv leads outside --data-dir {data} "
        "(through a symbolic link); refusing to read it"
    )


def test_reader_errors_show_no_file_content(tmp_path, monkeypatch):
    """A parser's message may quote the file: only its first line shows, quoted text masked."""
    (tmp_path / "t.tsv").write_text("sentence\tlabel\nprivate words\ta\n")

    def fail(*args, **kwargs):
        raise ValueError("bad value 'private words' in line 2, near \"private\"\nprivate words\ta")

    monkeypatch.setattr("mtnlp.data.read.datasets.load_dataset", fail)
    with pytest.raises(UserError) as error:
        load_raw(parse_card(VALID, "t.yaml"), ["train"], [tmp_path])
    assert str(error.value) == (
        f"{tmp_path}/t.tsv: could not read as tsv: bad value '…' in line 2, near '…'"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sentence\tlabel\na\tb\tc\ta\nd\te\tf\tb\n", "its header line"),
        ("a\tb\tc\ta\n", "the card's column_names"),  # headerless: column_names below
    ],
)
def test_rows_longer_than_the_header_are_refused(tmp_path, text, message):
    """pandas would take the extra leading fields as an index: the columns would hold other
    fields (here `sentence` would read "c" and `label` "a")."""
    (tmp_path / "t.tsv").write_text(text)
    local = {"format": "tsv", "files": {"train": "t.tsv", "validation": "t.tsv"}}
    if not text.startswith("sentence"):
        local.update(header=False, column_names=["sentence", "label"])
    card = parse_card({**VALID, "source": {"local": local}}, "t.yaml")
    with pytest.raises(UserError) as error:
        load_raw(card, ["train"], [tmp_path])
    assert str(error.value) == (
        f"{tmp_path}/t.tsv: every row has more fields than {message} names; check the separator"
    )


# ------------------------------------------------------------------------------ 17. JSON, CoNLL
def json_card(tmp_path: Path, rows: list[str], **change) -> tuple[dict, Path]:
    (tmp_path / "t.jsonl").write_text("".join(row + "\n" for row in rows))
    local = {"format": "json", "files": {"train": "t.jsonl", "validation": "t.jsonl"}}
    return {**VALID, "source": {"local": local}, **change}, tmp_path / "t.jsonl"


FIRST = '{"sentence": "x", "label": "a"}'


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([FIRST, '{"label": "b"}'], "example 2: sentence: the value"),
        ([FIRST, '{"sentence": null, "label": "b"}'], "example 2: sentence: the value"),
        ([FIRST, '{"sentence": "y"}'], "example 2: label: the value"),
        (['{"sentence": "x", "label": null}'], "example 1: label: the value"),
    ],
    ids=["missing-text", "null-text", "missing-label", "null-label"],
)
def test_json_null_or_missing_values(tmp_path, tiny_tokenizer, rows, message):
    from mtnlp.data.tokenize import load_task

    data, path = json_card(tmp_path, rows)
    with pytest.raises(UserError) as error:
        load_task(parse_card(data, "t.yaml"), tiny_tokenizer, [tmp_path])
    assert str(error.value) == f"{path}: {message} is missing or null"


def test_long_values_are_clipped_in_errors(tmp_path, tiny_tokenizer):
    from mtnlp.data.tokenize import load_task

    long = "private " * 20
    data, path = json_card(tmp_path, [json.dumps({"sentence": "x", "label": long})])
    with pytest.raises(UserError) as error:
        load_task(parse_card(data, "t.yaml"), tiny_tokenizer, [tmp_path])
    assert str(error.value) == (
        f"{path}: example 1: label: 'private private private private privat… is not one of "
        "the card's labels (a, b, c)"
    )


CONLL_TAGGING = {
    **VALID,
    "type": "tagging",
    "inputs": ["tokens"],
    "label_column": "tags",
    "labels": ["O", "B-LOC"],
}


@pytest.mark.parametrize("layout", ["conll", "conllu"])
def test_conll_files_are_read_in_the_card_encoding(tmp_path, layout):
    if layout == "conll":
        text = "-DOCSTART- O\n\nZürich\tB-LOC\nist\tO\n\nGrüße\tO\n"
        local = {"format": "conll", "column_names": ["tokens", "tags"]}
        card = {**CONLL_TAGGING}
    else:
        text = "# text = Zürich ist\n1\tZürich\t_\tB-LOC\n2\tist\t_\tO\n\n1\tGrüße\t_\tO\n"
        local = {"format": "conllu", "columns": {"tokens": "form", "tags": "upos"}}
        card = {**CONLL_TAGGING}
    (tmp_path / "t.txt").write_bytes(text.encode("latin-1"))
    files = {"train": "t.txt", "validation": "t.txt"}
    card["source"] = {"local": {**local, "files": files, "encoding": "latin-1"}}
    raw = load_raw(parse_card(card, "t.yaml"), ["train"], [tmp_path])["train"]
    assert raw["tokens"] == [["Zürich", "ist"], ["Grüße"]]
    assert raw["tags"] == [["B-LOC", "O"], ["O"]]


def test_undecodable_conll_names_line_and_file_offset(tmp_path):
    """The conll reader decodes in chunks: the line and byte are counted from the file start."""
    lines = "".join(f"word{i}\tO\n" for i in range(3000))
    (tmp_path / "t.txt").write_bytes(lines.encode() + "Z\xfcrich\tO\n".encode("latin-1"))
    local = {"format": "conll", "column_names": ["tokens", "tags"]}
    card = {**CONLL_TAGGING, "source": {"local": {**local, "files": {"train": "t.txt"}}}}
    card["eval_splits"] = ["train"]
    with pytest.raises(UserError) as error:
        load_raw(parse_card(card, "t.yaml"), ["train"], [tmp_path])
    byte = len(lines.encode()) + 1
    assert str(error.value) == (
        f"{tmp_path}/t.txt: line 3001: not valid utf-8-sig text (byte {byte})"
    )
