"""TrainArguments (a strict pydantic dataclass) and the flag <-> sharing-option mapping."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic.dataclasses import is_pydantic_dataclass

from mtnlp.modeling.sharing import SHARING, SharingMismatch, resolve_sharing
from mtnlp.training.args import (
    SHARING_FLAG_OPTIONS,
    TrainArguments,
    _Parser,
    parse_args,
    sharing_from_args,
    sharing_mismatch_error,
)
from mtnlp.utils.errors import UserError


# ------------------------------------------------------------------------------ the dataclass
def test_train_arguments_is_a_strict_pydantic_dataclass():
    assert is_pydantic_dataclass(TrainArguments) and dataclasses.is_dataclass(TrainArguments)
    args = TrainArguments(epochs=1, cards="cards")
    assert type(args.epochs) is float and args.cards == ["cards"]  # converted, as from YAML
    assert list(vars(args)) == [f.name for f in dataclasses.fields(TrainArguments)]
    replaced = dataclasses.replace(args, max_steps=3, learning_rate=1)
    assert (replaced.max_steps, replaced.learning_rate, replaced.epochs) == (3, 1.0, 1.0)
    with pytest.raises(UserError) as error:  # every bad value: one line, in field order
        TrainArguments(seed=-1, max_steps=2.5, learning_rate="fast", cards=["a", 3])
    assert str(error.value).splitlines() == [
        "--cards: item 1: expected a string, got 3",
        "--max-steps: expected an integer, got 2.5",
        "--learning-rate: expected a number, got 'fast'",
        "--seed: must be >= 0, got -1",
    ]
    with pytest.raises(UserError, match=r"^--cards: expected a list, got 3$"):
        TrainArguments("tiny", 3)  # by position: named by its flag too
    with pytest.raises(TypeError, match="bogus"):  # a bug, not a user mistake
        TrainArguments(bogus=1)


def test_checks_after_the_values_run_on_checked_values():
    with pytest.raises(UserError, match=r"^--epochs: must be positive, got 0$"):
        TrainArguments(epochs=0, sampler="nope")  # the values first, then the names
    with pytest.raises(UserError, match=r"^--sampler: unknown"):
        TrainArguments(sampler="nope")
    with pytest.raises(UserError, match=r"^--sharing: unknown sharing strategy 'nope'"):
        TrainArguments(sharing="nope")


def test_parse_args_and_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max-steps: 10\nlearning_rate: 5e-5\nsharing: soft\nsoft_weight: 1\n")
    args = parse_args(["--config", str(config), "--max-steps", "3", "--keep-best"])
    assert (args.max_steps, args.learning_rate, args.keep_best) == (3, 5e-5, True)
    assert args.sharing_config == {"name": "soft", "layers": 2, "penalty": "l2", "weight": 1.0}
    assert type(args.sharing_config["weight"]) is float


def test_keep_best_help_names_the_main_metric():
    parser = _Parser(TrainArguments)
    (action,) = [a for a in parser._actions if a.dest == "keep_best"]
    assert "each task's main metric" in action.help and "first metric" not in action.help


# ------------------------------------------------------------------------------ sharing flags
def test_every_sharing_option_has_a_flag():
    options = {o for n in SHARING.names() for o in SHARING.get(n).config_class.option_names()}
    assert options - {"init"} == set(SHARING_FLAG_OPTIONS.values())  # init: no flag
    fields = {f.name for f in dataclasses.fields(TrainArguments)}
    assert set(SHARING_FLAG_OPTIONS) <= fields


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], None),
        (["--sharing", "hard", "--sharing-layers", "1"], None),
        (
            ["--sharing", "soft", "--sharing-layers", "1", "--soft-penalty", "trace"],
            {"name": "soft", "layers": 1, "penalty": "trace", "weight": 0.01},
        ),
        (
            ["--sharing", "cross_stitch", "--mixing-lr-scale", "3", "--soft-weight", "5"],
            {"name": "cross_stitch", "layers": 2, "init": 0.9, "lr_scale": 3.0},
        ),
        (
            ["--sharing", "sluice", "--sluice-subspaces", "4", "--orthogonality-weight", "0"],
            {"name": "sluice", "layers": 2, "subspaces": 4, "orthogonality_weight": 0.0,
             "init": 0.9, "lr_scale": 100.0},
        ),
    ],
)  # fmt: skip
def test_sharing_from_args(flags, expected):
    args = parse_args(flags)
    assert sharing_from_args(args) == expected == args.sharing_config
    if expected:
        assert list(expected) == list(resolve_sharing(expected))  # config.json's key order


@pytest.mark.parametrize(
    ("trained", "requested", "expected"),
    [
        (
            {"name": "soft", "layers": 2},
            {"name": "soft", "layers": 1},
            "--sharing soft --sharing-layers 2, this run asks for --sharing soft "
            "--sharing-layers 1",
        ),
        (
            {"name": "sluice", "layers": 2, "subspaces": 2},
            {"name": "sluice", "layers": 2, "subspaces": 4},
            "--sharing sluice --sharing-layers 2 --sluice-subspaces 2, this run asks for "
            "--sharing sluice --sharing-layers 2 --sluice-subspaces 4",
        ),
        (
            {"name": "cross_stitch", "layers": 2},
            {"name": "hard"},
            "--sharing cross_stitch --sharing-layers 2, this run asks for --sharing hard",
        ),
    ],
)
def test_sharing_mismatch_error_words_the_flags(trained, requested, expected):
    trained, requested = resolve_sharing(trained), resolve_sharing(requested) or {"name": "hard"}
    mismatch = SharingMismatch(trained, requested)
    assert isinstance(mismatch, UserError) and "--" not in str(mismatch)
    error = sharing_mismatch_error(mismatch)
    assert type(error) is UserError
    assert str(error) == (
        f"--sharing: --model was trained with {expected}; give the same flags to keep its task "
        "columns"
    )
