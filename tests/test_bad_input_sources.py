"""Bad input, issue 14 items 1 and 16: a card's Hub source names a Hub dataset, never a local
path (in `cards check`, training, `evaluate`, `predict --split` and the cards of a model
folder), and `cards check --data-dir` opens the cards' files. Each case breaks a copy of the
tiny tasks and of an untrained model of them (`{case}/model`), then runs `mtnlp ARGS`
in-process from the case folder: exit 2, the exact error lines, no traceback, nothing read
from the local path."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_bad_input import edit, steps, write
from tiny_runs import reset_accelerate, save_tiny_model, write_tiny_tasks

from mtnlp.cli import main


@dataclass
class SourceCase:
    id: str
    setup: Callable[[Path], object]
    command: tuple[str, ...]
    message: str  # the error lines, `{case}` for the case folder


def hub(path: str, card: str = "cards/cls.yaml", extra: str = "") -> Callable[[Path], object]:
    """Give `card` a Hub source `path` (written as YAML: quote it where YAML needs)."""
    return edit(card, "source:\n", f"source:\n  hub: {{{{path: {path}{extra}}}}}\n")


def local_folder(name: str) -> Callable[[Path], object]:
    """A folder `name` in the case folder (the working folder) holding a private CSV file."""
    return write(f"{name}/train.csv", "sentence,label\nprivate words,pos\n")


def remove(path: str) -> Callable[[Path], object]:
    return lambda case: (case / path).unlink()


CHECK = ("cards", "check", "{case}/cards")
CHECK_DATA = (*CHECK, "--data-dir", "{case}/data")
TRAIN = (
    "train", "--model", "tiny", "--cards", "{case}/cards", "--data-dir", "{case}/data",
    "--output-dir", "{case}/out", "--max-steps", "1", "--batch-size", "4",
)  # fmt: skip
TRAIN_FROM_HUB = ("train", "--model", "tiny", "--cards", "{case}/cards", "--tasks", "cls",
                  "--output-dir", "{case}/out")  # fmt: skip
EVALUATE = ("evaluate", "{case}/model", "--tasks", "cls")
PREDICT_SPLIT = ("predict", "{case}/model", "--split", "test", "--tasks", "cls",
                 "--output-dir", "{case}/out")  # fmt: skip

CLS_CARD, MODEL_CARD = "{case}/cards/cls.yaml", "{case}/model/cards/cls.yaml"
CLS_TRAIN, CLS_DEV = "{case}/data/cls/train.tsv", "{case}/data/cls/dev.tsv"
NOT_AN_ID = (
    "is not a Hub dataset id ('namespace/name' or 'name' of letters, digits, '-', '_', '.'; at "
    "most 96 characters each, no '..' or '--'); local files are read through source.local with "
    "--data-dir"
)
LOCAL_INSTEAD = "instead of the Hub; read local files through source.local with --data-dir"
BUILDER = "builder, which reads files of the working folder"


def not_an_id(shown: str, card: str = CLS_CARD) -> str:
    return f"{card}: source.hub.path: {shown} {NOT_AN_ID}"


def found_locally(shown: str, card: str = CLS_CARD) -> str:
    return (
        f"{card}: source.hub.path: {shown} is also a local path in the working folder {{case}}, "
        f"which datasets reads {LOCAL_INSTEAD}"
    )


SOURCE_CASES = [
    # ------------------------------------------------------------ item 1: paths in the card
    SourceCase("hub-path-absolute", hub("/etc"), CHECK, not_an_id("'/etc'")),
    SourceCase("hub-path-parent", hub("../data/glue"), CHECK, not_an_id("'../data/glue'")),
    SourceCase("hub-path-dot", hub("./x"), CHECK, not_an_id("'./x'")),
    SourceCase("hub-path-home", hub("~/x"), CHECK, not_an_id("'~/x'")),
    SourceCase("hub-path-dotdot-inside", hub("x/../y"), CHECK, not_an_id("'x/../y'")),
    SourceCase("hub-path-three-parts", hub("a/b/c"), CHECK, not_an_id("'a/b/c'")),
    SourceCase("hub-path-file-url", hub("'file:///etc'"), CHECK, not_an_id("'file:///etc'")),
    SourceCase("hub-path-windows-drive", hub("'C:\\x'"), CHECK, not_an_id("'C:\\\\x'")),
    SourceCase("hub-path-nul", hub('"a\\0b"'), CHECK, not_an_id("'a\\x00b'")),
    SourceCase("hub-path-newline", hub('"a\\nb/c"'), CHECK, not_an_id("'a\\nb/c'")),
    SourceCase("hub-path-empty", hub("''"), CHECK, not_an_id("''")),
    SourceCase("hub-path-double-dash", hub("a--b/c"), CHECK, not_an_id("'a--b/c'")),
    SourceCase("hub-path-very-long", hub("x" * 5000), CHECK, not_an_id(f"'{'x' * 38}…")),
    SourceCase(
        "hub-path-file-builder",
        hub("json"),
        CHECK,
        f"{CLS_CARD}: source.hub.path: 'json' is datasets' json {BUILDER}, not a Hub dataset; "
        "local files are read through source.local with --data-dir",
    ),
    SourceCase(
        "hub-path-bucket",
        hub("buckets/x"),
        CHECK,
        f"{CLS_CARD}: source.hub.path: 'buckets/x' names a Hub storage bucket, not a dataset",
    ),
    SourceCase(
        "hub-config-name-path",
        hub("nyu-mll/glue", extra=", name: ../rte"),
        CHECK,
        f"{CLS_CARD}: source.hub.name: '../rte' is not a dataset configuration name (letters, "
        "digits, '_', '.', '+', '=' and '-', at most 100 characters, not starting with '.' or "
        "'-')",
    ),
    SourceCase(
        "hub-split-path",
        hub("nyu-mll/glue", extra=", splits: {{test: /etc/test}}"),
        CHECK,
        f"{CLS_CARD}: source.hub.splits: '/etc/test' (for split 'test') is not a Hub split name: "
        "letters, digits and '_', with an optional slice, e.g. 'validation_matched' or "
        "'train[:10%]'",
    ),
    SourceCase("train-hub-path-absolute", hub("/etc"), TRAIN, not_an_id("'/etc'")),
    SourceCase(
        "evaluate-model-card-hub-path-absolute",
        hub("/etc", card="model/cards/cls.yaml"),
        EVALUATE,
        not_an_id("'/etc'", MODEL_CARD),
    ),
    SourceCase(
        "predict-split-model-card-hub-path-parent",
        hub("../data/glue", card="model/cards/cls.yaml"),
        PREDICT_SPLIT,
        not_an_id("'../data/glue'", MODEL_CARD),
    ),
    # ------------------------------------------------------------ item 1: a Hub id found locally
    SourceCase(
        "train-hub-id-is-a-local-folder",
        steps(hub("glue"), local_folder("glue")),
        TRAIN_FROM_HUB,
        found_locally("'glue'"),
    ),
    SourceCase(
        "train-hub-id-is-a-local-file",
        steps(hub("nyu-mll/glue"), write("nyu-mll/glue", "sentence,label\nsecret,pos\n")),
        TRAIN_FROM_HUB,
        found_locally("'nyu-mll/glue'"),
    ),
    SourceCase(
        "evaluate-model-card-hub-id-is-a-local-folder",
        steps(hub("glue", card="model/cards/cls.yaml"), local_folder("glue")),
        EVALUATE,
        found_locally("'glue'", MODEL_CARD),
    ),
    SourceCase(
        "predict-split-model-card-hub-id-is-a-local-folder",
        steps(hub("nyu-mll/glue", card="model/cards/cls.yaml"), local_folder("nyu-mll/glue")),
        PREDICT_SPLIT,
        found_locally("'nyu-mll/glue'", MODEL_CARD),
    ),
    # ------------------------------------------------------------ item 16: cards check --data-dir
    SourceCase(
        "check-data-column-typo",
        edit("cards/cls.yaml", "inputs: [sentence]", "inputs: [sentense]"),
        CHECK_DATA,
        f"{CLS_TRAIN}: column 'sentense' (named by {CLS_CARD}) not found; columns: sentence, "
        f"label\n{CLS_DEV}: column 'sentense' (named by {CLS_CARD}) not found; columns: sentence, "
        "label",
    ),
    SourceCase(
        "check-data-renamed-column-typo",
        edit("cards/cls.yaml", "format: tsv", "format: tsv\n    columns: {{label: polarity}}"),
        CHECK_DATA,
        f"{CLS_TRAIN}: column 'polarity' (for {CLS_CARD} source.local.columns) not found; "
        f"columns: sentence, label\n{CLS_DEV}: column 'polarity' (for {CLS_CARD} "
        "source.local.columns) not found; columns: sentence, label",
    ),
    SourceCase(
        "check-data-label-typo",
        write("data/cls/train.tsv", "sentence\tlabel\nthe cat\tneg\n\na dog\tpso\n"),
        CHECK_DATA,
        f"{CLS_TRAIN}: line 4: label: 'pso' is not one of the card's labels (neg, pos)",
    ),
    SourceCase(
        "check-data-card-label-typo",
        edit("cards/cls.yaml", "labels: [neg, pos]", "labels: [neg, positive]"),
        CHECK_DATA,
        "",  # every 'pos' row: filled in by `expected_lines`
    ),
    SourceCase(
        "check-data-missing-file",
        remove("data/cls/dev.tsv"),
        CHECK_DATA,
        f"{CLS_CARD}: validation data file not found: cls/dev.tsv (looked in {{case}}/data)",
    ),
    SourceCase(
        "check-data-json-text-not-text",
        steps(
            edit("cards/cls.yaml", "format: tsv", "format: json"),
            edit("cards/cls.yaml", "cls/dev.tsv", "cls/train.jsonl"),
            edit("cards/cls.yaml", "cls/train.tsv", "cls/train.jsonl"),
            write("data/cls/train.jsonl", '{"sentence": "a", "label": "pos"}\n{"sentence": 3}\n'),
        ),
        CHECK_DATA,
        "{case}/data/cls/train.jsonl: example 2: sentence: 3 is not text",
    ),
    SourceCase(
        "check-data-tags-for-tokens",
        write("data/tag/train.txt", "alice\tB-PER\nran\tO\n\nbob\tB-PER\nsat\n"),
        CHECK_DATA,
        "{case}/data/tag/train.txt: line 4: tags: 1 tags for 2 tokens",
    ),
    SourceCase(
        "check-data-regression-not-a-number",
        write("data/reg/dev.tsv", "sentence1\tsentence2\tscore\na\tb\t1.5\nc\td\t1_000\n"),
        CHECK_DATA,
        "{case}/data/reg/dev.tsv: line 3: score: '1_000' is not a number",
    ),
    SourceCase(
        "check-data-empty-split",
        write("data/cls/dev.tsv", "sentence\tlabel\n"),
        CHECK_DATA,
        f"{CLS_DEV}: the validation split of task cls has no examples",
    ),
    SourceCase(
        "check-data-problems-in-three-cards",
        steps(
            edit("cards/cls.yaml", "inputs: [sentence]", "inputs: [sentense]"),
            remove("data/reg/train.tsv"),
            write("data/tag/dev.txt", "alice\tB-LOC\n"),
        ),
        CHECK_DATA,
        f"{CLS_TRAIN}: column 'sentense' (named by {CLS_CARD}) not found; columns: sentence, "
        f"label\n{CLS_DEV}: column 'sentense' (named by {CLS_CARD}) not found; columns: sentence, "
        "label\n{case}/cards/reg.yaml: train data file not found: reg/train.tsv (looked in "
        "{case}/data)\n{case}/data/tag/dev.txt: line 1: tags: tag 'B-LOC' is not in the card's "
        "labels",
    ),
]


def expected_lines(case: SourceCase, folder: Path) -> list[str]:
    if case.id == "check-data-card-label-typo":  # one line per 'pos' row, at most five
        return label_typo_lines(folder)
    return case.message.format(case=folder).split("\n")


def label_typo_lines(folder: Path) -> list[str]:
    lines = []
    for file in ("train", "dev"):
        path = folder / "data" / "cls" / f"{file}.tsv"
        rows = path.read_text().splitlines()
        bad = [number for number, row in enumerate(rows, 1) if row.endswith("\tpos")]
        for number in bad[:5]:
            lines.append(
                f"{path}: line {number}: label: 'pos' is not one of the card's labels "
                "(neg, positive)"
            )
        if len(bad) > 5:
            lines.append(f"{path}: {len(bad) - 5} more row(s) with problems among the first "
                         f"{len(rows) - 1}")  # fmt: skip
    assert lines
    return lines


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny tasks (with a test split for cls) and an untrained model of them."""
    root = tmp_path_factory.mktemp("sources")
    write_tiny_tasks(root, train_size=24, dev_size=6)
    save_tiny_model(root / "model", root / "cards")
    return root


def test_the_sources_table_is_complete():
    ids = [case.id for case in SOURCE_CASES]
    assert len(ids) == len(set(ids)) == 34


@pytest.mark.parametrize("case", SOURCE_CASES, ids=[case.id for case in SOURCE_CASES])
def test_bad_source_gives_its_exact_error(case, tiny, tmp_path, monkeypatch, capsys):
    import datasets

    for name in ("cards", "data", "model"):
        shutil.copytree(tiny / name, tmp_path / name)
    case.setup(tmp_path)
    monkeypatch.chdir(tmp_path)  # the working folder, where a Hub id may be a local path
    real_load = datasets.load_dataset

    def load_dataset(path, *args, **kwargs):
        assert path in ("csv", "json", "conll"), f"load_dataset({path!r}) must not run"
        assert not Path(path).exists()
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    reset_accelerate()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main([arg.format(case=tmp_path) for arg in case.command])
    finally:
        reset_accelerate()
    out, err = capsys.readouterr()
    expected = expected_lines(case, tmp_path)
    lines = err.strip().splitlines()
    if case.command[0] != "cards":  # other commands log as they go; their errors say "error:"
        lines = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    assert exit_info.value.code == 2
    assert lines == expected
    assert "Traceback" not in err and "OK" not in out
    assert not (tmp_path / "out").exists()
