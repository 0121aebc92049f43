"""Bad per-task hyperparameters (issue 21, item 3): a card's `loss_weight`, `class_weights`,
`label_smoothing` and `finetune`, the `--head-learning-rate` flag, and the loss
options of a model's config.json (untrusted input). Each case breaks a copy of the tiny tasks
(and of a saved model of them) and runs `mtnlp ...` in-process: exit 2, one `error:` line
naming the file and the field, no traceback, no output folder left behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_bad_input import (
    PREDICT,
    Case,
    SafetyCase,
    edit_card,
    prepare,
    run_safety_case,
    steps,
    tiny_model_folder,  # noqa: F401  (a fixture)
    tiny_tasks,  # noqa: F401  (a fixture)
    train_errors,
)
from test_bad_input_limits import task

CLS, REG, TAG = "{case}/cards/cls.yaml", "{case}/cards/reg.yaml", "{case}/cards/tag.yaml"
CLS_END = "max_length: 32\n"  # the last line of the tiny cards: fields are added after it
WEIGHTS = "a list of positive numbers, one per label, or 'balanced'"
LEGACY = Path(__file__).parent / "fixtures" / "legacy_run" / "checkpoint-4"


def add(card: str, text: str):
    """Append the YAML `text` to the tiny card `card`."""
    return edit_card(card, CLS_END, CLS_END + text + "\n")


def legacy_checkpoint(case: Path) -> None:
    """The checkpoint of tests/fixtures/legacy_run, written before --head-learning-rate."""
    shutil.copytree(LEGACY, case / "out" / "checkpoint-4")


CASES = [
    Case(
        "class-weights-wrong-length",
        add("cls", "class_weights: [1.0, 2.0, 3.0]"),
        f"{CLS}: class_weights: expected one weight per label (2), got 3",
    ),
    Case(
        "class-weights-negative",
        add("cls", "class_weights: [1.0, -2]"),
        f"{CLS}: class_weights: weight 2 is -2; each must be positive",
    ),
    Case(
        "class-weights-zero",
        add("tag", "class_weights: [0, 1]"),
        f"{TAG}: class_weights: weight 1 is 0; each must be positive",
    ),
    Case(
        "class-weights-balance-typo",
        add("cls", "class_weights: balance"),
        f"{CLS}: class_weights: expected {WEIGHTS}, got 'balance'",
    ),
    Case(
        "class-weights-not-numbers",
        add("cls", "class_weights: [heavy, light]"),
        f"{CLS}: class_weights: expected {WEIGHTS}",
    ),
    Case(
        "class-weights-on-regression",
        add("reg", "class_weights: [1.0]"),
        f"{REG}: class_weights: a regression task has no labels; remove 'class_weights'",
    ),
    Case(
        "balanced-label-never-trained",
        steps(
            edit_card("tag", "labels: [O, B-PER]", "labels: [O, B-PER, I-PER]"),
            add("tag", "class_weights: balanced"),
        ),
        f"{TAG}: class_weights: balanced: label 'I-PER' does not occur in the training split "
        "(train); give the weights as a list",
    ),
    Case(
        "label-smoothing-one",
        add("cls", "label_smoothing: 1.0"),
        f"{CLS}: label_smoothing: Input should be less than 1",
    ),
    Case(
        "label-smoothing-on-regression",
        add("reg", "label_smoothing: 0.1"),
        f"{REG}: label_smoothing: a regression task has no labels; remove 'label_smoothing'",
    ),
    Case(
        "loss-weight-zero",
        add("cls", "loss_weight: 0"),
        f"{CLS}: loss_weight: Input should be greater than 0",
    ),
    Case(
        "loss-weight-infinite",
        add("cls", "loss_weight: .inf"),
        f"{CLS}: loss_weight: Input should be a finite number",
    ),
    Case(
        "finetune-epochs-zero",
        add("cls", "finetune: {epochs: 0}"),
        f"{CLS}: finetune.epochs: Input should be greater than 0",
    ),
    Case(
        "finetune-unknown-setting",
        add("cls", "finetune: {lr: 1.0e-4}"),
        f"{CLS}: finetune.lr: unknown field; known: learning_rate, epochs",
    ),
    Case(
        "finetune-learning-rate-negative",
        add("tag", "finetune: {learning_rate: -1.0e-5}"),
        f"{TAG}: finetune.learning_rate: Input should be greater than 0",
    ),
    Case(
        "head-learning-rate-zero",
        lambda case: None,
        "--head-learning-rate: must be positive, got 0",
        ("--head-learning-rate", "0"),
    ),
    Case(
        "head-learning-rate-on-a-checkpoint-from-before-it",
        legacy_checkpoint,
        "--head-learning-rate: {case}/out/checkpoint-4 was written before --head-learning-rate "
        "existed (one learning rate for the whole model); resume it without the flag",
        (
            "--tasks",
            "cls,tag",
            "--max-steps",
            "8",
            "--batch-size",
            "8",
            "--seed",
            "7",
            "--head-learning-rate",
            "1e-3",
            "--resume-from-checkpoint",
            "latest",
        ),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_hyperparameter_exits_2_with_one_error_line(
    case,
    tiny_tasks,  # noqa: F811  (the fixture imported from test_bad_input)
    tmp_path,
    capsys,
):
    flags, expected = prepare(case, tiny_tasks, tmp_path)
    assert train_errors(flags, tmp_path / "out", capsys) == [expected]


MODEL_CONFIG = "{case}/model/config.json"
SAFETY_CASES = [
    SafetyCase(
        "config-class-weights-wrong-length",
        task(0, loss={"class_weights": [1.0, 2.0, 3.0], "label_smoothing": 0.0}),
        PREDICT,
        f"{MODEL_CONFIG}: task cls: loss.class_weights: expected 2 positive numbers, one per label",
    ),
    SafetyCase(
        "config-class-weights-balanced",
        task(0, loss={"class_weights": "balanced", "label_smoothing": 0.0}),
        PREDICT,
        f"{MODEL_CONFIG}: task cls: loss.class_weights: 'balanced' is computed from the "
        "training data; training puts the weights in its place",
    ),
    SafetyCase(
        "config-label-smoothing-out-of-range",
        task(0, loss={"label_smoothing": 2}),
        PREDICT,
        f"{MODEL_CONFIG}: task cls: loss.label_smoothing: expected a number in [0, 1)",
    ),
    SafetyCase(
        "config-loss-not-an-object",
        task(0, loss=[1, 2]),
        PREDICT,
        f"{MODEL_CONFIG}: task cls: loss: expected an object of class_weights and label_smoothing",
    ),
]


@pytest.mark.parametrize("case", SAFETY_CASES, ids=[case.id for case in SAFETY_CASES])
def test_bad_loss_options_in_a_model_config(
    case,
    tiny_tasks,  # noqa: F811  (the fixtures imported from test_bad_input)
    tiny_model_folder,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    run_safety_case(case, tiny_tasks, tiny_model_folder, tmp_path, monkeypatch, capsys)


def test_hparams_table_is_complete():
    ids = [case.id for case in CASES] + [case.id for case in SAFETY_CASES]
    assert len(ids) == len(set(ids)) == 20
