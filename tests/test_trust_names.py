"""Issue 14, items 2, 3 and 13 for `mtnlp predict --split`: names from cards are data, never
paths; prediction files are written only where nothing else lives (never through a link, never
over a file mtnlp did not write, all or nothing); tasks that read the same inputs share one
encoder pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_runs import save_tiny_model, write_tiny_tasks

from mtnlp.cards.load import parse_card
from mtnlp.cli import main
from mtnlp.inference.submission import PREDICTIONS_MANIFEST
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# SICK's two tasks on the same sentence pairs: relatedness (reg) and entailment (ent)
ENT_CARD = """name: ent
type: classification
source:
  local:
    format: tsv
    files: {train: reg/train.tsv, validation: reg/dev.tsv, test: reg/dev.tsv}
inputs: [sentence1, sentence2]
label_column: score
labels: [neutral, entailment]
metrics: [accuracy]
max_length: 32
"""


def write_sick_tasks(root: Path) -> tuple[Path, Path, Path]:
    """The tiny tasks with a test split (their dev file), and `ent`, which reads the test pairs
    that `reg` reads; (cards, data, an untrained model of the four tasks)."""
    cards, data = write_tiny_tasks(root, train_size=8, dev_size=6)
    for name in ("cls", "reg", "tag"):
        card = cards / f"{name}.yaml"
        dev = f"{name}/dev.{'txt' if name == 'tag' else 'tsv'}"
        card.write_text(card.read_text().replace("}", f", test: {dev}}}", 1))
    (cards / "ent.yaml").write_text(ENT_CARD)
    return cards, data, save_tiny_model(root / "model", cards)


@pytest.fixture(scope="module")
def sick(tmp_path_factory):
    return write_sick_tasks(tmp_path_factory.mktemp("sick"))


@pytest.fixture
def encoder_passes(monkeypatch) -> list[list[str]]:
    """The tasks of every encoder pass (`forward_tasks` call) the pipeline makes."""
    passes: list[list[str]] = []
    forward_tasks = MultiTaskModel.forward_tasks

    def counted(self, tasks, *args, **kwargs):
        passes.append(sorted(tasks))
        return forward_tasks(self, tasks, *args, **kwargs)

    monkeypatch.setattr(MultiTaskModel, "forward_tasks", counted)
    return passes


def predict_split(sick, out: Path, *flags: str) -> None:
    cards, data, model = sick
    main(["predict", str(model), "--split", "test", "--data-dir", str(data), "--cards",
          str(cards), "--output-dir", str(out), *flags])  # fmt: skip


def error_line(call, capsys) -> str:
    """The one `error:` line of a call that must fail as a user mistake (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    return line.removeprefix("error: ")


def files_in(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------ item 13
def test_tasks_reading_the_same_inputs_share_one_encoder_pass(
    sick, tmp_path, encoder_passes, capsys
):
    predict_split(sick, tmp_path / "out", "--tasks", "reg,ent")
    assert encoder_passes == [["ent", "reg"]]  # before: one pass for reg, one for ent
    shared = files_in(tmp_path / "out")
    assert sorted(shared) == [PREDICTIONS_MANIFEST, "ent.tsv", "reg.tsv"]
    encoder_passes.clear()
    predict_split(sick, tmp_path / "reg", "--tasks", "reg")
    predict_split(sick, tmp_path / "ent", "--tasks", "ent")
    assert encoder_passes == [["reg"], ["ent"]]
    # the same predictions as separate runs, to the byte
    assert shared["reg.tsv"] == (tmp_path / "reg" / "reg.tsv").read_bytes()
    assert shared["ent.tsv"] == (tmp_path / "ent" / "ent.tsv").read_bytes()
    assert len(shared["ent.tsv"].splitlines()) == 7  # header and 6 pairs


def test_every_task_gets_its_file_with_one_pass_per_input(sick, tmp_path, encoder_passes, capsys):
    out = tmp_path / "out"
    predict_split(sick, out)
    # cls reads single sentences, tag words: their own passes; reg and ent share theirs
    assert sorted(encoder_passes) == [["cls"], ["ent", "reg"], ["tag"]]
    assert capsys.readouterr().out.splitlines() == [
        f"{out / name}.tsv: 6 predictions" for name in ("cls", "ent", "reg", "tag")
    ]


# ------------------------------------------------------------------------------ item 2
def test_two_tasks_writing_one_file_is_one_error_before_any_work(
    sick, tmp_path, encoder_passes, capsys
):
    cards, data, model = sick
    shutil.copytree(cards, tmp_path / "cards")
    with (tmp_path / "cards" / "ent.yaml").open("a") as card:
        card.write("submission: {files: {test: REG.tsv}}\n")  # one file on macOS and Windows
    out = tmp_path / "out"
    line = error_line(lambda: predict_split((tmp_path / "cards", data, model), out), capsys)
    assert line == (
        f"{tmp_path}/cards/reg.yaml: test: prediction file reg.tsv is also written for "
        f"{tmp_path}/cards/ent.yaml: test; give each its own file (submission.files)"
    )
    assert encoder_passes == []
    assert not out.exists()  # nothing written (the folder the lock created is removed)


def test_a_rerun_replaces_only_the_files_mtnlp_wrote(sick, tmp_path, capsys):
    out = tmp_path / "out"
    predict_split(sick, out, "--tasks", "cls")
    first = files_in(out)
    assert json.loads(first[PREDICTIONS_MANIFEST]) == {"files": ["cls.tsv"]}
    (out / "cls.tsv").write_text("stale\n")  # mtnlp's own file: replaced
    predict_split(sick, out, "--tasks", "cls,reg")
    assert files_in(out)["cls.tsv"] == first["cls.tsv"]
    assert json.loads((out / PREDICTIONS_MANIFEST).read_text()) == {"files": ["cls.tsv", "reg.tsv"]}
    # a file of the same name that mtnlp did not write is refused, and kept as it was
    (out / "tag.tsv").write_text("my notes\n")
    line = error_line(lambda: predict_split(sick, out, "--tasks", "cls,tag"), capsys)
    assert line == (
        f"{out}/tag.tsv: already exists, and mtnlp did not write it (it replaces only the "
        f"prediction files that {PREDICTIONS_MANIFEST} lists); remove it, or give another "
        "--output-dir"
    )
    assert (out / "tag.tsv").read_text() == "my notes\n"
    assert sorted(files_in(out)) == [PREDICTIONS_MANIFEST, "cls.tsv", "reg.tsv", "tag.tsv"]


def test_a_link_in_the_output_folder_is_never_written_through(sick, tmp_path, capsys):
    out, secret = tmp_path / "out", tmp_path / "secret.txt"
    secret.write_text("keep me\n")
    out.mkdir()
    (out / "cls.tsv").symlink_to(secret)
    predict_split(sick, out, "--tasks", "reg")  # other files are fine
    reg = (out / "reg.tsv").stat().st_ino
    for tasks in ("cls", "reg,cls"):  # with reg: refused before reg.tsv is replaced
        line = error_line(lambda tasks=tasks: predict_split(sick, out, "--tasks", tasks), capsys)
        assert (
            line
            == f"{out}/cls.tsv: is a symbolic link; mtnlp never writes through a link: remove it"
        )
    assert secret.read_text() == "keep me\n"
    assert (out / "cls.tsv").is_symlink()
    assert (out / "reg.tsv").stat().st_ino == reg


def test_a_bad_value_leaves_no_file_behind(sick, tmp_path, capsys):
    """Files are staged and renamed into place together: an error in the last file leaves
    neither the earlier files nor staged ones."""
    cards, data, model = sick
    shutil.copytree(cards, tmp_path / "cards")
    shutil.copytree(data, tmp_path / "data")
    (tmp_path / "data" / "tag" / "test.jsonl").write_text(
        json.dumps({"index": "1\n2", "tokens": ["alice", "ran"]}) + "\n"
    )
    tag = tmp_path / "cards" / "tag.yaml"
    text = tag.read_text().replace("format: conll", "format: json")
    text = text.replace("test: tag/dev.txt", "test: tag/test.jsonl")
    tag.write_text(text.replace("    column_names: [tokens, tags]\n", ""))
    out = tmp_path / "out"
    line = error_line(
        lambda: predict_split((tmp_path / "cards", tmp_path / "data", model), out), capsys
    )
    assert line == (
        f"{tag}: test: example 1: index: '1\\n2' holds a tab or line break, which would break "
        "the submission file's rows"
    )
    assert not out.exists()


# ------------------------------------------------------------------------------ the card schema
def card(**fields) -> dict:
    local = {"format": "tsv", "files": {"train": "t.tsv", "validation": "d.tsv", "test": "d.tsv"}}
    return {
        "name": "toy",
        "type": "classification",
        "source": {"local": local},
        "inputs": ["sentence"],
        "labels": ["neg", "pos"],
        "metrics": ["accuracy"],
        **fields,
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"submission": {"files": {"test": "a" * 101}}},
            f"submission.files.test: file name {repr('a' * 101)[:39]}… must be at most 100 "
            "characters, got 101",
        ),
        (
            {"submission": {"files": {"test": "out.tsv", "validation": "OUT.tsv"}}},
            "submission.files.validation: OUT.tsv is also the file of split test",
        ),
        ({"name": "t" * 101}, "name: String should have at most 100 characters"),
        ({"stack_on": "../t"}, "stack_on: String should match pattern '^[A-Za-z][A-Za-z0-9_]*$'"),
        (
            {"train_split": "train\n"},
            "train_split: split name 'train\\n' may hold only letters, digits and _ . + = - (no "
            "path separators, '..', control characters or spaces) and must not start with '.' "
            "or '-'",
        ),
    ],
    ids=[
        "long-file-name",
        "files-differing-in-case",
        "long-task-name",
        "stack-on-path",
        "train-split",
    ],
)
def test_names_in_a_card_are_checked(fields, message, tmp_path):
    with pytest.raises(UserError) as error:
        parse_card(card(**fields), str(tmp_path / "toy.yaml"))
    assert str(error.value) == f"{tmp_path / 'toy.yaml'}: {message}"
