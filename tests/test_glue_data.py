"""The local GLUE reader: exact row counts, labels checked against the card, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtnlp.cards.load import load_cards, parse_card
from mtnlp.data.labels import label_to_id
from mtnlp.data.read import load_raw
from mtnlp.data.tokenize import load_task
from mtnlp.data.words import align_labels
from mtnlp.modeling.heads import IGNORE_INDEX
from mtnlp.utils.errors import UserError

from conftest import REPO

GLUE_COUNTS = {
    "rte": (2490, 277),
    "mrpc": (3668, 408),
    "stsb": (5749, 1500),
    "cola": (8551, 1043),
    "sst2": (67349, 872),
    "wnli": (635, 71),
}


@pytest.fixture(scope="module")
def glue_cards():
    return {card.name: card for card in load_cards([REPO / "tasks" / "glue"])}


@pytest.mark.parametrize("task", sorted(GLUE_COUNTS))
def test_local_glue_row_counts(task, glue_cards, data_dir):
    card = glue_cards[task]
    raw = load_raw(card, ["train", "validation"], [data_dir / "glue"])
    assert (len(raw["train"]), len(raw["validation"])) == GLUE_COUNTS[task]


def test_qnli_dev_reads_and_missing_train_is_named(glue_cards, data_dir):
    card = glue_cards["qnli"]
    assert len(load_raw(card, ["validation"], [data_dir / "glue"])["validation"]) == 5463
    with pytest.raises(UserError) as error:
        load_raw(card, ["train"], [data_dir / "glue"])
    assert str(error.value) == (
        f"{card.path}: train data file not found: QNLI/train.tsv (looked in {data_dir / 'glue'})"
    )


@pytest.mark.parametrize("task", ["mnli", "qqp"])
def test_absent_glue_tasks_fail_naming_the_file(task, glue_cards, data_dir):
    with pytest.raises(UserError, match=r"train data file not found: (MNLI|QQP)/train\.tsv"):
        load_raw(glue_cards[task], ["train"], [data_dir / "glue"])


def test_labels_encoded_from_names_and_indices(glue_cards, data_dir, tiny_tokenizer):
    rte = load_task(glue_cards["rte"], tiny_tokenizer, [data_dir / "glue"], max_train_samples=4)
    # RTE train rows 0-3: not_entailment, entailment, entailment, entailment
    assert rte.train["labels"] == [1, 0, 0, 0]
    stsb = load_task(glue_cards["stsb"], tiny_tokenizer, [data_dir / "glue"], max_train_samples=2)
    assert stsb.train["labels"] == pytest.approx([5.0, 3.8])
    mrpc = load_task(glue_cards["mrpc"], tiny_tokenizer, [data_dir / "glue"], max_eval_samples=3)
    assert mrpc.evals["validation"]["labels"] == [1, 0, 0]
    assert set(mrpc.train.column_names) == {
        "input_ids",
        "token_type_ids",
        "attention_mask",
        "labels",
    }


def test_label_to_id():
    labels = ["neg", "pos"]
    assert [label_to_id(v, labels) for v in ["pos", "0", 1, " 1", "2", -1, "x"]] == [
        1, 0, 1, 1, None, None, None,
    ]  # fmt: skip


def _tsv_card(tmp_path: Path, rows: list[str], **extra) -> tuple:
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\tpos\n")
    card = parse_card(
        {
            "name": "toy",
            "type": extra.pop("type", "classification"),
            "source": {
                "local": {"format": "tsv", "files": {"train": "train.tsv", "validation": "dev.tsv"}}
            },
            "inputs": ["sentence"],
            "metrics": ["accuracy"],
            **extra,
        },
        "toy.yaml",
    )
    return card, tmp_path / "train.tsv"


def test_label_not_in_card_names_file_and_line(tmp_path, tiny_tokenizer):
    card, train = _tsv_card(tmp_path, ["good\tpos", "bad\tneutral"], labels=["neg", "pos"])
    with pytest.raises(UserError) as error:
        load_task(card, tiny_tokenizer, [tmp_path])
    assert str(error.value) == (
        f"{train}: line 3: label: 'neutral' is not one of the card's labels (neg, pos)"
    )


def test_regression_target_not_a_number(tmp_path, tiny_tokenizer):
    card, train = _tsv_card(
        tmp_path, ["good\t4.5", "bad\thigh"], type="regression", metrics=["pearson"]
    )
    with pytest.raises(UserError) as error:
        load_task(card, tiny_tokenizer, [tmp_path])
    assert str(error.value) == f"{train}: line 3: label: 'high' is not a number"


def test_missing_column(tmp_path, tiny_tokenizer):
    card, train = _tsv_card(tmp_path, ["good\tpos"], labels=["neg", "pos"], label_column="gold")
    with pytest.raises(UserError) as error:
        load_task(card, tiny_tokenizer, [tmp_path])
    assert str(error.value) == (
        f"{train}: column 'gold' (named by task toy) not found; columns: sentence, label"
    )


def test_align_labels_first_subtoken_and_all_subtokens():
    word_ids = [None, 0, 1, 1, 1, 2, None]  # [CLS] w0 w1a w1b w1c w2 [SEP]
    assert align_labels(word_ids, [3, 4, 5], all_subtokens=False) == [
        IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX, 5, IGNORE_INDEX,
    ]  # fmt: skip
    assert align_labels(word_ids, [3, 4, 5], all_subtokens=True) == [
        IGNORE_INDEX, 3, 4, 4, 4, 5, IGNORE_INDEX,
    ]  # fmt: skip
