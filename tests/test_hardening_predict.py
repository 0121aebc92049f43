"""Issue 11, items 6, 16, 18, 19: the pipeline truncates each task as training did (the card's
`max_length`, stored with the model); `mtnlp predict` reads JSON lines, CSV and TSV rows (blank
lines skipped, other keys passed through) and predicts whole card splits into GLUE submission
files; short runs log often enough to draw curves; Getting started's custom card is valid."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from test_pipeline import count_encoder_calls
from tiny_runs import reset_accelerate, save_tiny_model, write_tiny_tasks
from transformers import AutoTokenizer

from mtnlp import training
from mtnlp.cards.load import load_card, load_cards
from mtnlp.cli import main
from mtnlp.data.read import load_raw
from mtnlp.inference.pipeline import MultiTaskPipeline
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.tiny import tiny_bert
from mtnlp.training.args import parse_args
from mtnlp.training.callbacks import default_log_every
from mtnlp.training.checkpointing import CHECKPOINT_META, check_tasks
from mtnlp.utils.errors import UserError
from mtnlp.utils.files import output_lock

from conftest import REPO, task_spec

LONG = "stocks fell sharply in early trading today"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny tasks (cls: sentence, reg: sentence1 + sentence2, tag: tokens) and an untrained
    model of them saved as training saves one."""
    root = tmp_path_factory.mktemp("predict")
    cards, data = write_tiny_tasks(root, train_size=8, dev_size=6)
    return root, cards, data, save_tiny_model(root / "model", cards)


def pipeline_of(folder: Path) -> MultiTaskPipeline:
    model = MultiTaskModel.from_pretrained(folder)
    return MultiTaskPipeline(model, AutoTokenizer.from_pretrained(folder))


def predict(argv: list[str], capsys, stdin: bytes | None = None, monkeypatch=None) -> list[dict]:
    """`mtnlp predict ...` in-process; its JSON output lines."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    main(["predict", *argv])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


# ------------------------------------------------------------------------------ item 6
def test_the_model_stores_each_cards_max_length(tiny):
    _, cards, _, model = tiny
    assert load_cards([cards], ["cls"])[0].model_spec()["max_length"] == 32
    config = json.loads((model / "config.json").read_text())
    assert {task["name"]: task["max_length"] for task in config["tasks"]} == {
        "cls": 32,
        "reg": 32,
        "tag": 32,
    }


def test_each_task_reads_its_input_truncated_as_in_training(tiny_tokenizer):
    specs = [
        task_spec("short", "classification", ["neg", "pos"], max_length=5),
        task_spec("long", "regression", max_length=64),
        task_spec("tag", "tagging", ["O", "B-X", "I-X"], max_length=5),
    ]
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(tiny_bert(tiny_tokenizer), specs).eval()
    pipeline = MultiTaskPipeline(model, tiny_tokenizer)
    calls = count_encoder_calls(model)
    result = pipeline(LONG, tasks=["short", "long", "tag"])
    assert calls[0] == 2  # 5 and 64 tokens give different inputs: two passes
    with torch.no_grad():
        short = tiny_tokenizer(LONG, truncation=True, max_length=5, return_tensors="pt")
        probabilities = model(task="short", **short).logits.softmax(-1)[0]
        value = model(task="long", **tiny_tokenizer(LONG, return_tensors="pt")).logits[0]
    assert result["short"]["score"] == pytest.approx(probabilities.max().item(), abs=1e-6)
    assert result["long"]["value"] == pytest.approx(value.item(), abs=1e-6)
    assert result["tag"]["tags"][3:] == [None] * 4  # [CLS] + 3 words + [SEP]
    calls[0] = 0
    pipeline(["a dog", "the cat"], tasks=["short", "long", "tag"])
    assert calls[0] == 1  # nothing truncated: the same tokens, one pass for all three


def test_models_saved_without_max_length_read_up_to_the_encoders_maximum(
    tiny_model, tiny_tokenizer
):
    assert "max_length" not in tiny_model.config.task("cls")
    assert MultiTaskPipeline(tiny_model, tiny_tokenizer).max_length_of("cls") == 512
    assert MultiTaskPipeline(tiny_model, tiny_tokenizer, max_length=7).max_length_of("cls") == 7


def test_resume_from_a_checkpoint_written_before_max_length_was_stored(tiny, tmp_path):
    _, cards, _, _ = tiny
    spec = load_cards([cards], ["cls"])[0].model_spec()
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    old = {key: value for key, value in spec.items() if key != "max_length"}
    (checkpoint / CHECKPOINT_META).write_text(json.dumps({"step": 4, "tasks": [old]}))
    check_tasks(checkpoint, [spec])  # the checkpoint cannot say: not compared
    (checkpoint / CHECKPOINT_META).write_text(
        json.dumps({"step": 4, "tasks": [{**spec, "max_length": 64}]})
    )
    with pytest.raises(UserError) as error:
        check_tasks(checkpoint, [spec])
    assert str(error.value) == (
        f"--resume-from-checkpoint: {checkpoint}: task cls: the card's max_length (32) differs "
        "from the checkpoint's (64)"
    )


# ------------------------------------------------------------------------------ item 16
def test_jsonl_skips_blank_lines_and_passes_other_keys_through(tiny, capsys, monkeypatch):
    *_, model = tiny
    stdin = (
        b'\xef\xbb\xbf{"id": 7, "text": "the cat sat"}\n\n'
        b'{"text": "alice ran", "text_pair": "bob sat", "id": "b", "meta": {"x": [1, null]}}\n'
        b"   \n"
        b'{"id": 3, "sentence": "happy dog", "sentence1": "a", "sentence2": "b", "note": "n"}\n'
        b'{"tokens": ["alice", "ran"]}\n'
        b"\n"
    )
    outputs = predict([str(model)], capsys, stdin, monkeypatch)
    pipeline = pipeline_of(model)
    expected = pipeline(["the cat sat", ("alice ran", "bob sat"), "happy dog", ("a", "b")])
    assert [list(output) for output in outputs] == [
        ["id", "cls", "tag"],
        ["id", "meta", "reg"],
        ["id", "note", "cls", "reg"],  # each task reads its own columns; tag's are absent
        ["tag"],  # a list of words
    ]
    assert outputs[3]["tag"]["words"] == ["alice", "ran"]
    assert outputs[0]["id"] == 7 and outputs[1]["meta"] == {"x": [1, None]}
    assert outputs[0]["cls"]["label"] == expected[0]["cls"]["label"]
    assert outputs[0]["tag"]["tags"] == expected[0]["tag"]["tags"]
    assert outputs[1]["reg"]["value"] == pytest.approx(expected[1]["reg"]["value"], abs=1e-5)
    assert outputs[2]["cls"]["score"] == pytest.approx(expected[2]["cls"]["score"], abs=1e-5)
    assert outputs[2]["reg"]["value"] == pytest.approx(expected[3]["reg"]["value"], abs=1e-5)


def test_errors_name_the_true_line_after_blank_lines(tiny, capsys, monkeypatch):
    *_, model = tiny
    stdin = b'{"text": "a"}\n\n\n{"text": "b", "text_pair": "c"}\n'
    with pytest.raises(SystemExit) as exit_info:
        predict([str(model), "--tasks", "cls"], capsys, stdin, monkeypatch)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: stdin: input 4 has a text_pair, but task cls reads a single text"
    )


# ------------------------------------------------------------------------------ item 18: rows
def test_csv_and_tsv_rows_keep_their_ids(tiny, tmp_path, capsys):
    *_, model = tiny
    table = tmp_path / "in.csv"
    table.write_text('id,text,text_pair\n1,"alice, bob",\n\n2,a dog,the cat\n', encoding="utf-8")
    outputs = predict([str(model), "--input", str(table)], capsys)
    expected = pipeline_of(model)(["alice, bob", ("a dog", "the cat")])
    # an empty text_pair cell: no pair (a cell cannot be null)
    assert [list(output) for output in outputs] == [["id", "cls", "tag"], ["id", "reg"]]
    assert [output["id"] for output in outputs] == ["1", "2"]
    assert outputs[0]["tag"]["words"] == ["alice,", "bob"]
    assert outputs[0]["cls"]["score"] == pytest.approx(expected[0]["cls"]["score"], abs=1e-5)
    assert outputs[1]["reg"]["value"] == pytest.approx(expected[1]["reg"]["value"], abs=1e-5)

    tsv = tmp_path / "in.tsv"
    tsv.write_text('index\tsentence1\tsentence2\tsentence\n0\ta "dog\tthe cat\tbig red\n')
    (output,) = predict([str(model), "--input", str(tsv)], capsys)
    expected = pipeline_of(model)([('a "dog', "the cat"), "big red"])  # TSV has no quoting
    assert list(output) == ["index", "cls", "reg"]
    assert output["reg"]["value"] == pytest.approx(expected[0]["reg"]["value"], abs=1e-5)
    assert output["cls"]["label"] == expected[1]["cls"]["label"]

    as_csv = tmp_path / "rows.txt"
    as_csv.write_text("sentence\nhappy dog\n")
    (output,) = predict([str(model), "--input", str(as_csv), "--format", "csv"], capsys)
    assert list(output) == ["cls"]


# ------------------------------------------------------------------------------ item 18: splits
def with_test_split(cards: Path, tmp_path: Path) -> Path:
    """Copies of the tiny cards whose test split is their dev file (cls: GLUE-style file name)."""
    shutil.copytree(cards, tmp_path / "cards")
    for name, extra in {
        "cls": "submission: {files: {test: CLS.tsv}, label_format: index}\n",
        "reg": "",
        "tag": "",
    }.items():
        card = tmp_path / "cards" / f"{name}.yaml"
        dev = f"{name}/dev.{'txt' if name == 'tag' else 'tsv'}"
        text = card.read_text().replace("validation: ", f"test: {dev}, validation: ")
        card.write_text(text + extra)
    return tmp_path / "cards"


def test_split_predictions_take_the_output_lock(tiny, tmp_path, capsys):
    """Two writers never share a prediction folder: one held by a live run is refused."""
    _, cards, data, model = tiny
    cards = with_test_split(cards, tmp_path)
    out = tmp_path / "out"
    with output_lock(out), pytest.raises(SystemExit) as exit_:
        main(["predict", str(model), "--split", "test", "--data-dir", str(data), "--cards",
              str(cards), "--output-dir", str(out)])  # fmt: skip
    assert exit_.value.code == 2
    assert "another run is writing into this folder" in capsys.readouterr().err
    assert not (out / "CLS.tsv").exists()


def test_split_predictions_follow_the_cards_submission_format(tiny, tmp_path, capsys):
    _, cards, data, model = tiny
    with_test_split(cards, tmp_path)
    out = tmp_path / "out"
    main(["predict", str(model), "--split", "test", "--data-dir", str(data), "--cards",
          str(tmp_path / "cards"), "--output-dir", str(out)])  # fmt: skip
    assert capsys.readouterr().out.splitlines() == [
        f"{out / 'CLS.tsv'}: 6 predictions",
        f"{out / 'reg.tsv'}: 6 predictions",
        f"{out / 'tag.tsv'}: 6 predictions",
    ]
    dev = load_raw(load_card(tmp_path / "cards" / "cls.yaml"), ["test"], [data])["test"]
    pipeline = pipeline_of(model)
    predicted = pipeline(list(dev["sentence"]), tasks=["cls"])
    rows = [line.split("\t") for line in (out / "CLS.tsv").read_text().splitlines()]
    assert rows[0] == ["index", "prediction"]
    assert rows[1:] == [
        [str(i), str(["neg", "pos"].index(p["cls"]["label"]))] for i, p in enumerate(predicted)
    ]
    reg = [line.split("\t") for line in (out / "reg.tsv").read_text().splitlines()[1:]]
    assert [index for index, _ in reg] == [str(i) for i in range(6)]
    assert all(isinstance(float(value), float) for _, value in reg)
    tag = (out / "tag.tsv").read_text().splitlines()[1].split("\t")[1].split(" ")
    assert set(tag) <= {"O", "B-PER"} and len(tag) >= 3


GLUE_TEST = {  # card -> (file, rows, predictions allowed)
    "cola": ("CoLA.tsv", 1063, {"0", "1"}),
    "sst2": ("SST-2.tsv", 1821, {"0", "1"}),
    "rte": ("RTE.tsv", 3000, {"entailment", "not_entailment"}),
    "stsb": ("STS-B.tsv", 1379, None),
}


def test_glue_test_split_in_the_submission_format(data_dir, tmp_path, capsys):
    glue = data_dir / "glue"
    model = save_tiny_model(tmp_path / "model", REPO / "tasks" / "glue", list(GLUE_TEST))
    out = tmp_path / "out"
    main(
        [
            "predict",
            str(model),
            "--split",
            "test",
            "--data-dir",
            str(glue),
            "--output-dir",
            str(out),
        ]
    )
    assert sorted(path.name for path in out.iterdir() if path.name[0] != ".") == sorted(
        f for f, _, _ in GLUE_TEST.values()
    )  # and mtnlp's list of the files it wrote, .mtnlp-predictions.json
    for task, (file, size, allowed) in GLUE_TEST.items():
        lines = (out / file).read_text().splitlines()
        assert lines[0] == "index\tprediction"
        rows = [line.split("\t") for line in lines[1:]]
        assert len(rows) == size, task
        assert [index for index, _ in rows] == [str(i) for i in range(size)]  # the files' index
        if allowed is None:
            assert all(float(value) == float(value) for _, value in rows)
        else:
            assert {value for _, value in rows} <= allowed, task
    # CoLA's test file has a header line, unlike its train and dev files
    cola = load_cards([REPO / "tasks" / "glue"], ["cola"])[0]
    test = load_raw(cola, ["test"], [glue], labels=False)["test"]
    assert test.column_names == ["index", "sentence"]
    assert test[0]["sentence"] == "Bill whistled past the house."


def test_split_options_are_checked(tmp_path):
    card = (REPO / "tasks" / "glue" / "cola.yaml").read_text()
    path = tmp_path / "cola.yaml"
    path.write_text(card.replace("      test: {header: true}", "      dev: {header: false}"))
    with pytest.raises(UserError) as error:
        load_card(path)
    assert str(error.value) == f"{path}: source.local.split_options: no file for split(s) dev"
    path.write_text(
        card.replace("header: false ", "header: true ").replace("{header: true}", "{header: false}")
        .replace("    column_names: [source, label, mark, sentence]\n", "")
    )  # fmt: skip
    with pytest.raises(UserError) as error:
        load_card(path)
    assert str(error.value) == (
        f"{path}: source.local.split_options.test.column_names: required for format 'tsv' "
        "without a header"
    )


# ------------------------------------------------------------------------------ item 19
def test_short_runs_log_twenty_points(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("mtnlp.artifacts.run_folder.write_report", lambda *args, **kwargs: None)
    _, cards, data, _ = tiny
    assert default_log_every(40) == 2
    assert default_log_every(10) == 1
    assert default_log_every(100_000) == 50
    for flags, points in [((), 20), (("--log-every", "50"), 1)]:
        output = tmp_path / f"out{len(flags)}"
        reset_accelerate()
        training.run(parse_args([
            "--model", "tiny", "--cards", str(cards), "--data-dir", str(data), "--tasks", "cls",
            "--max-steps", "40", "--batch-size", "4", "--max-eval-samples", "2",
            "--output-dir", str(output), *flags,
        ]), default_cards=[])  # fmt: skip
        reset_accelerate()
        log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
        assert [record["step"] for record in log if "share" in record] == (
            list(range(2, 41, 2)) if points == 20 else [40]
        )


def readme_block(after: str, language: str) -> str:
    """The first ```language block of docs/getting-started.md after the line holding `after`."""
    text = (REPO / "docs" / "getting-started.md").read_text()
    start = text.index(f"```{language}\n", text.index(after)) + len(language) + 4
    return text[start : text.index("```", start)]


def test_readme_custom_card_loads_its_data(tmp_path, capsys):
    card = tmp_path / "my_tasks" / "reviews.yaml"
    card.parent.mkdir()
    card.write_text(readme_block("A task of your own", "yaml"))
    data = tmp_path / "my_data" / "reviews"
    data.mkdir(parents=True)
    for line in readme_block("my_data/reviews/train.jsonl", "json").splitlines():
        assert json.loads(line)["label"] in ("negative", "positive")
    rows = readme_block("my_data/reviews/train.jsonl", "json")
    (data / "train.jsonl").write_text(rows)
    (data / "dev.jsonl").write_text(rows)
    main(["cards", "check", str(card.parent)])
    assert capsys.readouterr().out == "1 card(s) OK: reviews\n"
    loaded = load_raw(load_card(card), ["train", "validation"], [tmp_path / "my_data"])
    assert loaded["train"].column_names[:2] == ["review", "label"]
