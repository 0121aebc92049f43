"""Bad options of tensor-factorised sharing (issue 17, item 3): the rank flags, the column
flags, an encoder the columns do not fit, and the ranks of a model's config.json (untrusted
input). Each case runs `mtnlp ...` in-process on a copy of the tiny tasks (hidden size 32, 2
layers): exit 2, one `error:` line, no traceback, no output folder left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_bad_input import (
    PREDICT,
    Case,
    SafetyCase,
    prepare,
    run_safety_case,
    tiny_model_folder,  # noqa: F401  (a fixture)
    tiny_tasks,  # noqa: F401  (a fixture)
    train_errors,
)
from test_bad_input_limits import edit_json
from transformers import DistilBertConfig, DistilBertModel

from mtnlp.modeling.tiny import train_wordpiece

INPUT_SIZE = "the smallest input size of the factorised layers (32)"
OUTPUT_SIZE = "the smallest output size of the factorised layers (32)"


def tensor(*flags: str) -> tuple[str, ...]:
    return ("--sharing", "tensor", *flags)


def distilbert(case: Path) -> None:
    """A DistilBERT encoder (no `encoder.layer` stack) with a tokenizer, in `{case}/distil`."""
    tokenizer = train_wordpiece(["the cat sat", "a dog ran"], vocab_size=60)
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=8, n_layers=2, n_heads=1, hidden_dim=8)
    DistilBertModel(config).save_pretrained(case / "distil")
    tokenizer.save_pretrained(case / "distil")


CASES = [
    Case(
        "rank-task-zero",
        lambda case: None,
        "--tensor-rank-task: must be positive, got 0",
        tensor("--tensor-rank-task", "0"),
    ),
    Case(
        "rank-in-zero",
        lambda case: None,
        "--tensor-rank-in: must be positive, got 0",
        tensor("--tensor-rank-in", "0"),
    ),
    Case(
        "rank-out-negative",
        lambda case: None,
        "--tensor-rank-out: must be positive, got -4",
        tensor("--tensor-rank-out", "-4"),
    ),
    Case(
        "rank-in-above-the-hidden-size",
        lambda case: None,
        f"--model: --tensor-rank-in: 33 is above {INPUT_SIZE}",
        tensor("--tensor-rank-in", "33"),
    ),
    Case(
        "rank-out-above-the-hidden-size",
        lambda case: None,
        f"--model: --tensor-rank-out: 64 is above {OUTPUT_SIZE}",
        tensor("--tensor-rank-out", "64"),
    ),
    Case(
        "rank-task-above-the-most-tasks",
        lambda case: None,
        "--model: --tensor-rank-task: 1001 is above the largest number of tasks (1000)",
        tensor("--tensor-rank-task", "1001"),
    ),
    Case(
        "layers-above-the-encoder",
        lambda case: None,
        "--model: --sharing-layers: 3 is not a number of top layers of this encoder (1..2)",
        tensor("--sharing-layers", "3"),
    ),
    Case(
        "not-a-bert-like-encoder",
        distilbert,
        "--model: --sharing tensor: needs a BERT-like encoder (encoder.embeddings, then "
        "encoder.encoder.layer[i] one after the other); DistilBertModel is built otherwise; use "
        "--sharing hard",
        tensor("--model", "{case}/distil"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_tensor_option_exits_2_with_one_error_line(
    case,
    tiny_tasks,  # noqa: F811  (the fixture imported from test_bad_input)
    tmp_path,
    capsys,
):
    flags, expected = prepare(case, tiny_tasks, tmp_path)
    if "--model" in case.flags:  # the case's own encoder in place of the tiny one
        at = flags.index("--model")
        del flags[at : at + 2]
    assert train_errors(flags, tmp_path / "out", capsys) == [expected]


def sharing(**ranks: object):
    """The tiny model's config.json asking for tensor sharing of its top layer at `ranks`."""
    options = {"rank_task": 1, "rank_in": 4, "rank_out": 4, **ranks}
    return edit_json(
        lambda config: config.update(sharing={"name": "tensor", "layers": 1, **options})
    )


MODEL_CONFIG = "{case}/model/config.json"
SAFETY_CASES = [
    SafetyCase(
        "config-rank-zero",
        sharing(rank_in=0),
        PREDICT,
        f"{MODEL_CONFIG}: sharing.rank_in: expected an integer from 1 to 65536, got 0",
    ),
    SafetyCase(
        "config-rank-a-string",
        sharing(rank_task="two"),
        PREDICT,
        f"{MODEL_CONFIG}: sharing.rank_task: expected an integer from 1 to 65536, got a string",
    ),
    SafetyCase(
        "config-rank-huge",
        sharing(rank_out=10**40),
        PREDICT,
        f"{MODEL_CONFIG}: sharing.rank_out: expected an integer from 1 to 65536, got an integer "
        "of 41 digits",
    ),
    SafetyCase(
        "config-rank-above-the-hidden-size",
        sharing(rank_out=40),
        PREDICT,
        f"{MODEL_CONFIG}: --tensor-rank-out: 40 is above {OUTPUT_SIZE}",
    ),
]


@pytest.mark.parametrize("case", SAFETY_CASES, ids=[case.id for case in SAFETY_CASES])
def test_bad_ranks_in_a_model_config(
    case,
    tiny_tasks,  # noqa: F811  (the fixtures imported from test_bad_input)
    tiny_model_folder,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    run_safety_case(case, tiny_tasks, tiny_model_folder, tmp_path, monkeypatch, capsys)


def test_tensor_table_is_complete():
    ids = [case.id for case in CASES] + [case.id for case in SAFETY_CASES]
    assert len(ids) == len(set(ids)) == 12
