"""Data formats users have: cards read local Parquet and Arrow files and `Dataset.save_to_disk`
folders inside `--data-dir` (docs/data-formats.md), with the path rules of the text formats.

The three tiny tasks of `tiny_runs.write_tiny_tasks` (TSV and CoNLL) are written again in the
binary formats from the rows mtnlp read: cls as Parquet, reg as Arrow files, tag as a
save_to_disk DatasetDict with its tags as `ClassLabel` ids. Each reads and tokenizes exactly like
its text original, a run trains and evaluates on them, and every mistake is one line.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import datasets
import pytest
from tiny_runs import write_tiny_tasks

from mtnlp.cards.load import load_cards
from mtnlp.data.read import load_raw
from mtnlp.data.tokenize import load_task
from mtnlp.training.args import parse_args
from mtnlp.training.loop import train
from mtnlp.utils.errors import UserError

SPLITS = ("train", "validation")
CARDS = {
    "cls": """name: cls
type: classification
source:
  local:
    format: parquet
    files: {train: cls/train.parquet, validation: cls/dev.parquet}
inputs: [sentence]
labels: [neg, pos]
metrics: [accuracy]
max_length: 32
""",
    "reg": """name: reg
type: regression
source:
  local:
    format: arrow
    files: {train: reg/train.arrow, validation: reg/dev.arrow}
    columns: {score: similarity}
inputs: [sentence1, sentence2]
label_column: score
metrics: [pearsonr]
max_length: 32
""",
    "tag": """name: tag
type: tagging
source:
  local:
    format: save_to_disk
    files: {train: tag/saved/train, validation: tag/saved/validation}
inputs: [tokens]
label_column: tags
labels: [O, B-PER]
metrics: [seqeval]
max_length: 32
""",
}


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(text cards, binary cards, data folder holding both)."""
    root = tmp_path_factory.mktemp("formats")
    text_cards, data = write_tiny_tasks(root)
    text = {card.name: card for card in load_cards([text_cards])}
    raw = {name: load_raw(card, SPLITS, [data]) for name, card in text.items()}
    for split, file in (("train", "train"), ("validation", "dev")):
        raw["cls"][split].to_parquet(data / "cls" / f"{file}.parquet")
        # one Arrow file, as datasets writes them, with a column the card renames
        saved = root / "arrow" / split
        raw["reg"][split].rename_column("score", "similarity").save_to_disk(saved)
        shutil.copy(saved / "data-00000-of-00001.arrow", data / "reg" / f"{file}.arrow")
    tags = datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER"]))
    datasets.DatasetDict(raw["tag"]).cast_column("tags", tags).save_to_disk(data / "tag" / "saved")
    cards = root / "binary_cards"
    cards.mkdir()
    for name, content in CARDS.items():
        (cards / f"{name}.yaml").write_text(content, encoding="utf-8")
    return text_cards, cards, data


def test_binary_formats_tokenize_like_their_text_originals(formats, tiny_tokenizer):
    text_cards, cards, data = formats
    text = {card.name: card for card in load_cards([text_cards])}
    for card in load_cards([cards]):
        ours, original = (load_task(c, tiny_tokenizer, [data]) for c in (card, text[card.name]))
        for split in ("train", "validation"):
            got = ours.train if split == "train" else ours.evals[split]
            want = original.train if split == "train" else original.evals[split]
            assert got.to_dict() == want.to_dict(), (card.name, split)


def test_a_run_trains_and_evaluates_on_them(formats, tmp_path, fresh_accelerate):
    _, cards, data = formats
    flags = [
        "--model", "tiny", "--cards", str(cards), "--data-dir", str(data),
        "--output-dir", str(tmp_path / "out"), "--max-steps", "6", "--batch-size", "8",
    ]  # fmt: skip
    results = train(parse_args(flags), load_cards([cards]))
    assert set(results) == {"cls", "reg", "tag"}
    assert set(results["reg"]) == {"pearsonr"} and "overall_f1" in results["tag"]
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert all(summary["task_steps"][task] > 0 for task in results)


def one_card(root: Path, form: str, path: str, extra: str = "") -> Path:
    """A cls card under `root` reading both its splits from `path` in format `form`; `extra`:
    more lines of its `source.local`."""
    local = f"    format: {form}\n{extra}    files: {{train: {path}, validation: {path}}}\n"
    before, after = CARDS["cls"].split("  local:\n")
    card = root / "cls.yaml"
    card.write_text(before + "  local:\n" + local + after.split("\n", 2)[2], encoding="utf-8")
    return card


def read(card: Path, data: Path) -> None:
    [loaded] = load_cards([card])
    load_raw(loaded, ["train"], [data])


@pytest.mark.parametrize("form", ["parquet", "arrow", "save_to_disk"])
@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("../secret", "'../secret' leaves the --data-dir folder ('..'); give a path inside it"),
        ("/etc/secret", "'/etc/secret' is an absolute path; give a path relative to --data-dir"),
    ],
)
def test_paths_outside_data_dir_are_refused(tmp_path, form, path, error):
    card = one_card(tmp_path, form, path)
    expected = f"{card}: source.local.files.train: {error}"
    with pytest.raises(UserError, match=f"^{re.escape(expected)}$"):
        load_cards([card])


def test_links_out_of_data_dir_are_refused(formats, tmp_path):
    _, _, data = formats
    outside, inside = tmp_path / "outside", tmp_path / "data"
    shutil.copytree(data, outside)
    inside.mkdir()
    (inside / "file.parquet").symlink_to(outside / "cls" / "train.parquet")
    (inside / "folder").symlink_to(outside / "tag" / "saved" / "train", target_is_directory=True)
    shutil.copytree(data / "tag" / "saved" / "train", inside / "linked_data")
    arrow = inside / "linked_data" / "data-00000-of-00001.arrow"
    arrow.unlink()
    arrow.symlink_to(outside / "tag" / "saved" / "train" / arrow.name)
    for form, path in [("parquet", "file.parquet"), ("save_to_disk", "folder"),
                       ("save_to_disk", "linked_data")]:  # fmt: skip
        card = one_card(tmp_path, form, path)
        leads = f"{card}: source.local.files.train: {inside / path} leads outside --data-dir"
        with pytest.raises(UserError, match=f"^{re.escape(leads)}"):
            read(card, inside)


@pytest.mark.parametrize(
    ("source", "error"),
    [
        (
            ("parquet", "cls/train.tsv"),
            "{data}/cls/train.tsv: could not read as parquet: ",
        ),
        (
            ("arrow", "cls/train.parquet"),
            "{data}/cls/train.parquet: could not read as arrow: ",
        ),
        (
            ("parquet", "tag/saved/train"),
            "{card}: source.local.files.train: {data}/tag/saved/train is a folder, and format "
            "'parquet' reads a file (a folder written by Dataset.save_to_disk is format "
            "'save_to_disk')",
        ),
        (
            ("save_to_disk", "reg/train.arrow"),
            "{card}: source.local.files.train: {data}/reg/train.arrow is a file, and format "
            "'save_to_disk' reads the folder Dataset.save_to_disk writes (one .arrow file is "
            "format 'arrow')",
        ),
        (
            ("save_to_disk", "tag/saved"),
            "{data}/tag/saved: a DatasetDict folder (splits train, validation); give each "
            "split's folder in files, e.g. saved/train",
        ),
        (
            ("save_to_disk", "cls"),
            "{data}/cls: not a folder written by Dataset.save_to_disk (no readable state.json)",
        ),
        (
            ("parquet", "cls/train.parquet", "    header: false\n"),
            "{card}: source.local.header: not used by format 'parquet', whose data name their "
            "columns (map them with 'columns')",
        ),
    ],
)
def test_a_wrong_format_is_one_line(formats, tmp_path, source, error):
    _, _, data = formats
    card = one_card(tmp_path, *source)
    with pytest.raises(UserError) as raised:
        read(card, data)
    message = str(raised.value)
    assert message.startswith(error.format(card=card, data=data)), message
    assert "\n" not in message
