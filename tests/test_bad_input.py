"""Bad input gets one clear error and nothing is lost: a table of malformed cards, data files,
flags, output folders, checkpoints and models, each with the exact message it must give (naming
the file, line or field). Every case runs in-process through `training.run` (the recipes' and
`mtnlp train`'s code path) and leaves no output folder behind (or the one that was there,
untouched); a few go through the recipe and the `mtnlp` CLI as subprocesses to check exit code
2 and that no traceback is printed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_runs import reset_accelerate, write_tiny_tasks
from transformers import BertConfig, BertModel

from mtnlp import training
from mtnlp.artifacts.run_folder import save_run
from mtnlp.cards.schema import HeadOptions
from mtnlp.metrics import METRICS
from mtnlp.modeling.heads import HEADS
from mtnlp.modeling.tiny import train_wordpiece
from mtnlp.training.args import parse_args
from mtnlp.training.samplers import SAMPLERS
from mtnlp.utils.errors import UserError

from conftest import REPO, run_command


@dataclass
class Case:
    """A malformed input: `setup` breaks a copy of the tiny tasks in folder `case`; `message` is
    the exact error (`{case}` stands for that folder); `flags` are added to the training flags."""

    id: str
    setup: Callable[[Path], object]
    message: str
    flags: tuple[str, ...] = ()


def write(path: str, text: str | bytes) -> Callable[[Path], object]:
    def setup(case: Path) -> None:
        target = case / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))

    return setup


def edit_card(name: str, old: str, new: str) -> Callable[[Path], object]:
    def setup(case: Path) -> None:
        card = case / "cards" / f"{name}.yaml"
        text = card.read_text()
        assert old in text
        card.write_text(text.replace(old, new))

    return setup


def fake_checkpoint(tasks: list[str]) -> Callable[[Path], object]:
    def setup(case: Path) -> None:
        folder = case / "out" / "checkpoint-4"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"")
        meta = {"step": 4, "tasks": [{"name": name} for name in tasks], "num_processes": 1}
        (folder / "checkpoint.json").write_text(json.dumps(meta))

    return setup


def model_with_one_token_type(case: Path) -> None:
    """An encoder whose tokenizer marks a pair's second sentence as token type 1, while the
    encoder embeds only type 0 (type_vocab_size=1)."""
    tokenizer = train_wordpiece(["the cat sat", "a dog ran"], vocab_size=60)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
        intermediate_size=8, type_vocab_size=1,
    )  # fmt: skip
    BertModel(config).save_pretrained(case / "model")
    tokenizer.save_pretrained(case / "model")


CLS_CARD, CLS_TRAIN = "{case}/cards/cls.yaml", "{case}/data/cls/train.tsv"
CASES = [
    # ---------------------------------------------------------------- data files
    Case(
        "missing-data-file",
        lambda case: (case / "data/cls/train.tsv").unlink(),
        f"{CLS_CARD}: train data file not found: cls/train.tsv (looked in {{case}}/data)",
    ),
    Case(
        "missing-column",
        write("data/cls/train.tsv", "text\tlabel\nthe cat\tpos\n"),
        f"{CLS_TRAIN}: column 'sentence' (named by {CLS_CARD}) not found; columns: text, label",
    ),
    Case(
        "label-not-in-card",
        write("data/cls/train.tsv", "sentence\tlabel\nthe cat\tpos\na dog\tmaybe\n"),
        f"{CLS_TRAIN}: line 3: label: 'maybe' is not one of the card's labels (neg, pos)",
    ),
    Case(
        "empty-split",
        write("data/cls/dev.tsv", "sentence\tlabel\n"),
        "{case}/data/cls/dev.tsv: the validation split of task cls has no examples",
    ),
    Case(
        "non-utf8-data",
        write("data/cls/train.tsv", "sentence\tlabel\ncaf\xe9\tpos\n".encode("latin-1")),
        f"{CLS_TRAIN}: line 2: not valid utf-8-sig text (byte 18)",
    ),
    Case(
        "regression-target-not-a-number",
        write("data/reg/train.tsv", "sentence1\tsentence2\tscore\na\tb\t1.0\nc\td\thigh\n"),
        "{case}/data/reg/train.tsv: line 3: score: 'high' is not a number",
    ),
    Case(
        "regression-target-nan",
        write("data/reg/train.tsv", "sentence1\tsentence2\tscore\na\tb\tnan\n"),
        "{case}/data/reg/train.tsv: line 2: score: 'nan' is not a finite number",
    ),
    Case(
        "tokens-and-tags-differ",
        write("data/tag/train.txt", "-DOCSTART- O\n\nalice\tB-PER\nran\tO\n\nbob\tB-PER\nsat\n"),
        "{case}/data/tag/train.txt: line 6: tags: 1 tags for 2 tokens",
    ),
    Case(
        "tag-not-in-card",
        write("data/tag/train.txt", "alice\tB-PER\nran\tO\n\nbob\tB-LOC\n"),
        "{case}/data/tag/train.txt: line 4: tags: tag 'B-LOC' is not in the card's labels",
    ),
    # ---------------------------------------------------------------- cards
    Case(
        "unknown-task-type",
        edit_card("cls", "type: classification", "type: classify"),
        f"{CLS_CARD}: type: unknown task type 'classify'; known: {', '.join(HEADS.names())}",
    ),
    Case(
        "unknown-head-option",
        edit_card("cls", "max_length: 32", "max_length: 32\nhead: {colour: red}"),
        f"{CLS_CARD}: head.colour: unknown field; known: {', '.join(HeadOptions.model_fields)}",
    ),
    Case(
        "unknown-metric",
        edit_card("cls", "metrics: [accuracy]", "metrics: [acc]"),
        f"{CLS_CARD}: metrics: unknown metric 'acc'; known: {', '.join(METRICS.names())} (or an "
        "evaluate Hub id like 'evaluate-metric/bleu', or a local metric script path)",
    ),
    Case(
        "duplicate-task-names",
        lambda case: shutil.copy(case / "cards/cls.yaml", case / "cards/cls2.yaml"),
        "{case}/cards/cls2.yaml: name: task 'cls' is also defined in {case}/cards/cls.yaml",
    ),
    Case(
        "card-not-a-mapping",
        write("cards/cls.yaml", "- name: cls\n- type: classification\n"),
        f"{CLS_CARD}: expected a mapping of fields (a YAML card), got a list",
    ),
    Case(
        "yaml-syntax-error",
        write("cards/cls.yaml", "name: cls\ntype: [classification\ninputs: x\n"),
        f"{CLS_CARD}: line 3: YAML syntax error: expected ',' or ']', but got ':'",
    ),
    Case(
        "max-length-not-positive",
        edit_card("cls", "max_length: 32", "max_length: 0"),
        f"{CLS_CARD}: max_length: Input should be greater than 0",
    ),
    Case(
        "non-utf8-card",
        write("cards/cls.yaml", "name: cls\n# caf\xe9\n".encode("latin-1")),
        f"{CLS_CARD}: not UTF-8 text (invalid continuation byte at byte 15)",
    ),
    Case(
        "card-file-missing",
        lambda case: None,
        "{case}/nope.yaml: no such card file or folder",
        ("--cards", "{case}/nope.yaml"),
    ),
    # ---------------------------------------------------------------- flags
    Case(
        "tasks-names-no-card",
        lambda case: None,
        "--tasks: no card for nope; available: cls, reg, tag",
        ("--tasks", "cls,nope"),
    ),
    Case(
        "unknown-sampler",
        lambda case: None,
        f"--sampler: unknown sampler 'nope'; known: {', '.join(SAMPLERS.names())}",
        ("--sampler", "nope"),
    ),
    Case(
        "max-bad-steps-not-positive",
        lambda case: None,
        "--max-bad-steps: must be positive, got 0",
        ("--max-bad-steps", "0"),
    ),
    # ---------------------------------------------------------------- output folder
    Case(
        "output-dir-holds-another-run",
        write("out/config.json", "{}"),
        "--output-dir: {case}/out is not empty (it holds another run); pass "
        "--overwrite-output-dir to replace it",
    ),
    Case(
        "output-dir-holds-checkpoints",
        fake_checkpoint(["cls", "reg", "tag"]),
        "--output-dir: {case}/out is not empty (it holds another run); pass "
        "--overwrite-output-dir to replace it, or --resume-from-checkpoint latest to continue it",
    ),
    Case(
        "output-dir-is-a-file",
        write("out", "not a folder"),
        "--output-dir: {case}/out is a file, not a folder",
    ),
    # ---------------------------------------------------------------- checkpoints
    Case(
        "checkpoint-of-other-tasks",
        fake_checkpoint(["cls", "reg"]),
        "--resume-from-checkpoint: {case}/out/checkpoint-4 was saved for tasks cls, reg; this run "
        "trains cls, reg, tag (give the same cards and --tasks, in that order)",
        ("--resume-from-checkpoint", "latest"),
    ),
    Case(
        "resume-latest-without-checkpoint",
        lambda case: None,
        "--resume-from-checkpoint latest: no checkpoint-<step> folder in {case}/out; run without "
        "--resume-from-checkpoint to start afresh",
        ("--resume-from-checkpoint", "latest"),
    ),
    Case(
        "resume-from-a-non-checkpoint",
        write("elsewhere/notes.txt", "hello"),
        "--resume-from-checkpoint: {case}/elsewhere: not a checkpoint folder (no checkpoint.json "
        "or model.safetensors); give a checkpoint-<step> folder or 'latest'",
        ("--resume-from-checkpoint", "{case}/elsewhere"),
    ),
    # ---------------------------------------------------------------- models
    Case(
        "model-path-missing",
        lambda case: None,
        "--model: {case}/no-model: no such model folder",
        ("--model", "{case}/no-model"),
    ),
    Case(
        "model-without-safetensors",
        write("model/pytorch_model.bin", b"not unpickled"),
        "--model: {case}/model: no *.safetensors weights (mtnlp never unpickles models)",
        ("--model", "{case}/model"),
    ),
    Case(
        "tokenizer-cannot-encode-pairs",
        model_with_one_token_type,
        "--model: {case}/model: cannot encode the sentence pairs of task reg: its tokenizer marks "
        "the second sentence as token type 1, but the encoder has 1 token type(s)",
        ("--model", "{case}/model"),
    ),
]
BY_ID = {case.id: case for case in CASES}


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_tasks(root, train_size=8, dev_size=4)
    return root


def prepare(case: Case, tiny_tasks: Path, folder: Path) -> tuple[list[str], str]:
    """Copy the tiny tasks into `folder`, break them; return (training flags, expected error)."""
    shutil.copytree(tiny_tasks / "cards", folder / "cards")
    shutil.copytree(tiny_tasks / "data", folder / "data")
    case.setup(folder)
    flags = [
        "--model", "tiny", "--cards", str(folder / "cards"), "--data-dir", str(folder / "data"),
        "--output-dir", str(folder / "out"), "--max-steps", "1", "--batch-size", "4",
        *(flag.format(case=folder) for flag in case.flags),
    ]  # fmt: skip
    return flags, case.message.format(case=folder)


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file under `folder` (or None if it does not exist), to compare before and after."""
    if not folder.exists():
        return None
    if folder.is_file():
        return {"": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_table_is_big_enough():
    assert len(CASES) >= 20 and len(BY_ID) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gives_its_exact_error(case, tiny_tasks, tmp_path):
    flags, expected = prepare(case, tiny_tasks, tmp_path)
    before = snapshot(tmp_path / "out")
    reset_accelerate()
    try:
        with pytest.raises(UserError) as error:
            training.run(parse_args(flags), default_cards=[])
    finally:
        reset_accelerate()
    assert str(error.value) == expected
    assert snapshot(tmp_path / "out") == before  # no partial output, the old one untouched


def train_errors(flags: list[str], out: Path, capsys) -> list[str]:
    """`mtnlp train FLAGS` in-process as a user mistake: exit 2, no traceback, the output folder
    `out` as it was (none, or the old one untouched). Returns the `error:` lines, unprefixed."""
    from mtnlp.cli import main

    before = snapshot(out)
    reset_accelerate()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", *flags])
    finally:
        reset_accelerate()
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in stderr
    assert snapshot(out) == before
    return [
        line.removeprefix("error: ") for line in stderr.splitlines() if line.startswith("error:")
    ]


# ------------------------------------------------------------------------------ subprocesses
RECIPE = [sys.executable, str(REPO / "recipes" / "glue_mt.py")]
CLI_TRAIN = [sys.executable, "-m", "mtnlp.cli", "train"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return run_command(command)  # each fails early: the start-up is its time


@pytest.mark.parametrize(
    ("entry_point", "case_id"),
    [(RECIPE, "label-not-in-card"), (CLI_TRAIN, "checkpoint-of-other-tasks")],
    ids=["recipe", "mtnlp-train"],
)
def test_exit_code_2_without_traceback(entry_point, case_id, tiny_tasks, tmp_path):
    flags, expected = prepare(BY_ID[case_id], tiny_tasks, tmp_path)
    before = snapshot(tmp_path / "out")
    result = run([*entry_point, *flags])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: {expected}"
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path / "out") == before


def test_cards_check_lists_every_broken_card(tiny_tasks, tmp_path):
    prepare(BY_ID["unknown-metric"], tiny_tasks, tmp_path)  # breaks cls.yaml
    edit_card("tag", "type: tagging", "type: tags")(tmp_path)
    result = run([sys.executable, "-m", "mtnlp.cli", "cards", "check", str(tmp_path / "cards")])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        BY_ID["unknown-metric"].message.format(case=tmp_path),
        f"{tmp_path}/cards/tag.yaml: type: unknown task type 'tags'; known: "
        f"{', '.join(HEADS.names())}",
    ]


# ------------------------------------------------------------------------------ arguments (#11)
def no_setup(case: Path) -> None:
    """The tiny tasks as they are: the flags are the bad input."""


def config(text: str) -> Callable[[Path], object]:
    """A `--config` file `run.yaml` in the case folder (pass `--config {case}/run.yaml`)."""
    return write("run.yaml", text)


CONFIG = ("--config", "{case}/run.yaml")
HARDENING_ARGS_CASES = [
    # ---------------------------------------------------------------- config values
    Case("config-int-got-float", config("max_steps: 10.7\n"),
         "{case}/run.yaml: max_steps: expected an integer, got 10.7", CONFIG),
    Case("config-int-got-string", config("batch-size: '8'\n"),
         "{case}/run.yaml: batch-size: expected an integer, got '8'", CONFIG),
    Case("config-float-got-word", config("learning_rate: fast\n"),
         "{case}/run.yaml: learning_rate: expected a number, got 'fast'", CONFIG),
    Case("config-float-got-bool", config("weight_decay: true\n"),
         "{case}/run.yaml: weight_decay: expected a number, got true", CONFIG),
    Case("config-null-for-a-number", config("seed: null\n"),
         "{case}/run.yaml: seed: expected an integer, got null", CONFIG),
    Case("config-epochs-zero", config("epochs: 0\n"),
         "{case}/run.yaml: epochs: must be positive, got 0", CONFIG),
    Case("config-learning-rate-nan", config("learning_rate: .nan\n"),
         "{case}/run.yaml: learning_rate: must be a finite number, got nan", CONFIG),
    Case("config-warmup-ratio-above-1", config("warmup-ratio: 2\n"),
         "{case}/run.yaml: warmup-ratio: must be <= 1, got 2", CONFIG),
    Case("config-bool-got-string", config("keep_best: 'yes'\n"),
         "{case}/run.yaml: keep_best: expected true or false, got 'yes'", CONFIG),
    Case("config-not-a-choice", config("batch_mode: both\n"),
         "{case}/run.yaml: batch_mode: expected 'one_task', 'all_tasks' or 'joint', "
         "got 'both'", CONFIG),
    Case("config-list-got-a-number", config("data_dir: 3\n"),
         "{case}/run.yaml: data_dir: expected a list, got 3", CONFIG),
    Case("config-list-item-not-a-string", config("cards: [cards, 3]\n"),
         "{case}/run.yaml: cards: item 1: expected a string, got 3", CONFIG),
    Case("config-two-bad-values", config("max_steps: 10.7\nseed: -1\n"),
         "{case}/run.yaml: max_steps: expected an integer, got 10.7\n"
         "{case}/run.yaml: seed: must be >= 0, got -1", CONFIG),
    # ---------------------------------------------------------------- flags
    Case("epochs-zero", no_setup, "--epochs: must be positive, got 0", ("--epochs", "0")),
    Case("epochs-negative", no_setup, "--epochs: must be positive, got -1",
         ("--epochs", "-1")),
    Case("seed-negative", no_setup, "--seed: must be >= 0, got -1", ("--seed", "-1")),
    Case("seed-above-32-bits", no_setup, "--seed: must be <= 4294967295, got 4294967296",
         ("--seed", "4294967296")),
    Case("learning-rate-nan", no_setup, "--learning-rate: must be a finite number, got nan",
         ("--learning-rate", "nan")),
    Case("learning-rate-zero", no_setup, "--learning-rate: must be positive, got 0",
         ("--learning-rate", "0")),
    Case("weight-decay-negative", no_setup, "--weight-decay: must be >= 0, got -0.01",
         ("--weight-decay", "-0.01")),
    Case("warmup-ratio-above-1", no_setup, "--warmup-ratio: must be <= 1, got 1.5",
         ("--warmup-ratio", "1.5")),
    Case("warmup-ratio-negative", no_setup, "--warmup-ratio: must be >= 0, got -0.1",
         ("--warmup-ratio", "-0.1")),
    Case("max-grad-norm-negative", no_setup, "--max-grad-norm: must be >= 0, got -1",
         ("--max-grad-norm", "-1")),
    Case("max-grad-norm-nan", no_setup, "--max-grad-norm: must be a finite number, got nan",
         ("--max-grad-norm", "nan")),
    Case("finetune-learning-rate-inf", no_setup,
         "--finetune-learning-rate: must be a finite number, got inf",
         ("--finetune-learning-rate", "inf")),
    Case("soft-weight-negative", no_setup, "--soft-weight: must be >= 0, got -1",
         ("--soft-weight", "-1")),
]  # fmt: skip

BY_ARGS_ID = {case.id: case for case in HARDENING_ARGS_CASES}


@pytest.mark.parametrize("case", HARDENING_ARGS_CASES, ids=[c.id for c in HARDENING_ARGS_CASES])
def test_bad_argument_gives_its_exact_error(case, tiny_tasks, tmp_path):
    flags, expected = prepare(case, tiny_tasks, tmp_path)
    with pytest.raises(UserError) as error:
        parse_args(flags)  # before anything loads or any folder is made
    assert str(error.value) == expected
    assert not (tmp_path / "out").exists()


def test_bad_config_value_exits_2_with_one_error_line_each(tiny_tasks, tmp_path):
    flags, expected = prepare(BY_ARGS_ID["config-two-bad-values"], tiny_tasks, tmp_path)
    result = run([*CLI_TRAIN, *flags])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [f"error: {line}" for line in expected.split("\n")]


# ------------------------------------------------------------------------------ issue 11: cards
# items 1, 3, 12, 17: main metrics, metrics and inputs that fit the task type, encodings, data
# paths inside --data-dir, no file contents in errors, JSON nulls, CoNLL encodings
def steps(*setups: Callable[[Path], object]) -> Callable[[Path], object]:
    def setup(case: Path) -> None:
        for step in setups:
            step(case)

    return setup


def link(path: str, target: str) -> Callable[[Path], object]:
    def setup(case: Path) -> None:
        (case / target).write_text("sentence\tlabel\nprivate words\tpos\n")
        (case / path).unlink()
        (case / path).symlink_to(case / target)

    return setup


REG_CARD, TAG_CARD, TAG_TRAIN = (
    "{case}/cards/reg.yaml",
    "{case}/cards/tag.yaml",
    "{case}/data/tag/train.txt",
)
CLS_AS_JSON = edit_card(
    "cls",
    "format: tsv\n    files: {train: cls/train.tsv, validation: cls/dev.tsv}",
    "format: json\n    files: {train: cls/train.jsonl, validation: cls/train.jsonl}",
)
TAGGING_METRICS = (
    "accuracy, f1_macro, f1_micro, seqeval, seqeval_bilou, seqeval_iob1, seqeval_iobes, "
    "seqeval_ioe1 or seqeval_ioe2"
)
CLASSIFICATION_METRICS = "accuracy, f1, f1_macro, f1_micro or matthews_correlation"
HARDENING_CARDS_CASES = [
    Case(
        "metric-binary-f1-on-three-labels",
        edit_card(
            "cls",
            "labels: [neg, pos]\nmetrics: [accuracy]",
            "labels: [neg, pos, mid]\nmetrics: [f1]",
        ),
        f"{CLS_CARD}: metrics: 'f1' is a binary metric (positive class = the second label) and "
        "task cls has 3 labels; use f1_macro or f1_micro",
    ),
    Case(
        "metric-accuracy-on-regression",
        edit_card("reg", "metrics: [pearson]", "metrics: [accuracy]"),
        f"{REG_CARD}: metrics: 'accuracy' scores classification or tagging tasks, not "
        "regression; use pearson or spearmanr",
    ),
    Case(
        "metric-matthews-on-regression",
        edit_card("reg", "metrics: [pearson]", "metrics: [matthews_correlation]"),
        f"{REG_CARD}: metrics: 'matthews_correlation' scores classification tasks, not "
        "regression; use pearson or spearmanr",
    ),
    Case(
        "metric-seqeval-on-classification",
        edit_card("cls", "metrics: [accuracy]", "metrics: [seqeval]"),
        f"{CLS_CARD}: metrics: 'seqeval' scores tagging tasks, not classification; use "
        f"{CLASSIFICATION_METRICS}",
    ),
    Case(
        "metric-pearson-on-classification",
        edit_card("cls", "metrics: [accuracy]", "metrics: [accuracy, pearson]"),
        f"{CLS_CARD}: metrics: 'pearson' scores regression tasks, not classification; use "
        f"{CLASSIFICATION_METRICS}",
    ),
    Case(
        "metric-pearson-on-tagging",
        edit_card("tag", "metrics: [seqeval]", "metrics: [pearson]"),
        f"{TAG_CARD}: metrics: 'pearson' scores regression tasks, not tagging; use "
        f"{TAGGING_METRICS}",
    ),
    Case(
        "tagging-with-two-inputs",
        edit_card("tag", "inputs: [tokens]", "inputs: [tokens, tags]"),
        f"{TAG_CARD}: inputs: a tagging task reads one column of words, not 2",
    ),
    Case(
        "unknown-encoding",
        edit_card("cls", "format: tsv", "format: tsv\n    encoding: utf-9"),
        f"{CLS_CARD}: source.local.encoding: unknown text encoding 'utf-9'",
    ),
    Case(
        "main-metric-not-a-result",
        edit_card("tag", "metrics: [seqeval]", "metrics: [seqeval]\nmain_metric: f1"),
        f"{TAG_CARD}: main_metric: 'f1' is not a result of the card's metrics (overall_precision, "
        "overall_recall, overall_f1, overall_accuracy)",
    ),
    Case(
        "data-path-goes-up",
        edit_card("cls", "train: cls/train.tsv", "train: ../../secret.tsv"),
        f"{CLS_CARD}: source.local.files.train: '../../secret.tsv' leaves the --data-dir folder "
        "('..'); give a path inside it",
    ),
    Case(
        "data-path-absolute",
        edit_card("cls", "train: cls/train.tsv", "train: /etc/passwd"),
        f"{CLS_CARD}: source.local.files.train: '/etc/passwd' is an absolute path; give a path "
        "relative to --data-dir",
    ),
    Case(
        "data-file-links-outside-data-dir",
        link("data/cls/train.tsv", "secret.tsv"),
        f"{CLS_CARD}: source.local.files.train: {CLS_TRAIN} leads outside --data-dir {{case}}/data "
        "(through a symbolic link); refusing to read it",
    ),
    Case(
        "long-label-clipped",
        write("data/cls/train.tsv", "sentence\tlabel\nthe cat\t" + "private " * 20 + "\n"),
        f"{CLS_TRAIN}: line 2: label: 'private private private private privat… is not one of the "
        "card's labels (neg, pos)",
    ),
    Case(
        "header-missing-columns-clipped",
        write("data/cls/train.tsv", "private " * 10 + "\tpos\nthe cat\tneg\n"),
        f"{CLS_TRAIN}: column 'sentence' (named by {CLS_CARD}) not found; columns: private private "
        "private private private…, pos",
    ),
    Case(
        "json-text-missing",
        steps(
            CLS_AS_JSON,
            write("data/cls/train.jsonl", '{"sentence": "a", "label": "pos"}\n{"label": "neg"}\n'),
        ),
        "{case}/data/cls/train.jsonl: example 2: sentence: the value is missing or null",
    ),
    Case(
        "json-text-null",
        steps(CLS_AS_JSON, write("data/cls/train.jsonl", '{"sentence": null, "label": "pos"}\n')),
        "{case}/data/cls/train.jsonl: example 1: sentence: the value is missing or null",
    ),
    Case(
        "json-label-null",
        steps(CLS_AS_JSON, write("data/cls/train.jsonl", '{"sentence": "a", "label": null}\n')),
        "{case}/data/cls/train.jsonl: example 1: label: the value is missing or null",
    ),
    Case(
        "conll-not-in-card-encoding",
        write("data/tag/train.txt", "alice\tB-PER\n\nz\xfcrich\tO\n".encode("latin-1")),
        f"{TAG_TRAIN}: line 3: not valid utf-8-sig text (byte 14)",
    ),
]


def test_hardening_cards_cases_are_distinct():
    ids = [case.id for case in HARDENING_CARDS_CASES]
    assert len(set(ids)) == len(ids) and not set(ids) & set(BY_ID)


@pytest.mark.parametrize(
    "case", HARDENING_CARDS_CASES, ids=[case.id for case in HARDENING_CARDS_CASES]
)
def test_hardening_cards_bad_input(case, tiny_tasks, tmp_path):
    test_bad_input_gives_its_exact_error(case, tiny_tasks, tmp_path)


def test_cards_check_refuses_misfit_metrics(tiny_tasks, tmp_path):
    """`mtnlp cards check` reports the checks of a card's fit, one line each, exit 2."""
    cases = {case.id: case for case in HARDENING_CARDS_CASES}
    prepare(cases["metric-accuracy-on-regression"], tiny_tasks, tmp_path)
    cases["tagging-with-two-inputs"].setup(tmp_path)
    result = run([sys.executable, "-m", "mtnlp.cli", "cards", "check", str(tmp_path / "cards")])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        cases[name].message.format(case=tmp_path)
        for name in ("metric-accuracy-on-regression", "tagging-with-two-inputs")
    ]


# ------------------------------------------------------------------------------ hardening: safety
# Issue 11, items 10, 11, 14, 15: nothing in a model folder runs code or loads half-way, and the
# Hub being out of reach is one line. Each case breaks a copy of the tiny tasks and of a saved
# model of them (`{case}/model`), then runs `mtnlp ARGS` in-process: exit 2, one `error:` line.
@dataclass
class SafetyCase:
    id: str
    setup: Callable[[Path], object]
    command: tuple[str, ...]
    message: str


TRAIN = (
    "train", "--model", "tiny", "--cards", "{case}/cards", "--data-dir", "{case}/data",
    "--output-dir", "{case}/out", "--max-steps", "1", "--batch-size", "4",
)  # fmt: skip
EVALUATE = ("evaluate", "{case}/model", "--data-dir", "{case}/data")
PREDICT = ("predict", "{case}/model", "--input", "{case}/inputs.jsonl")
PUSH = ("push", "{case}/model", "--hub-model-id", "me/tiny")
MODEL_CLS_CARD = "{case}/model/cards/cls.yaml"
NOT_BUILT_IN = (
    "is not a built-in metric; loading it would run code from evaluate.load; pass "
    "--allow-custom-metrics to allow it"
)
NO_SAFETENSORS = "{case}/model: no *.safetensors weights (mtnlp never unpickles models)"
TRUNCATED = (
    "{case}/model/model.safetensors: not a complete safetensors file (Error while deserializing "
    "header: incomplete metadata, file not fully covered)"
)
NO_TOKENIZER = (
    "{case}/model: no tokenizer files (tokenizer.json / tokenizer_config.json / vocab.txt ...)"
)
GLUE_RTE = str(REPO / "tasks" / "glue" / "rte.yaml")


def edit(path: str, old: str, new: str) -> Callable[[Path], object]:
    def setup(case: Path) -> None:
        file = case / path
        text = file.read_text()
        assert old in text
        file.write_text(text.replace(old, new.format(case=case)))

    return setup


def pickle_only(case: Path) -> None:
    """The model's weights as a pickled `pytorch_model.bin` (torch.save of its state dict)."""
    import torch
    from safetensors.torch import load_file

    weights = case / "model" / "model.safetensors"
    torch.save(load_file(weights), case / "model" / "pytorch_model.bin")
    weights.unlink()


def truncate(path: str) -> Callable[[Path], object]:
    def setup(case: Path) -> None:
        file = case / path
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    return setup


def edit_config(change: Callable[[dict], object]) -> Callable[[Path], object]:
    def setup(case: Path) -> None:
        path = case / "model" / "config.json"
        config = json.loads(path.read_text())
        change(config["tasks"])
        path.write_text(json.dumps(config))

    return setup


def remove(*names: str) -> Callable[[Path], object]:
    return lambda case: [(case / name).unlink() for name in names]


def checkpoint_of_the_model(meta: dict | None = None, weights: bytes | None = None):
    """`{case}/out/checkpoint-1`: the model's weights and tokenizer and a checkpoint.json for the
    tiny tasks (or `meta`), `weights` replacing model.safetensors when given."""

    def setup(case: Path) -> None:
        from mtnlp.cards.load import load_cards

        folder = case / "out" / "checkpoint-1"
        folder.mkdir(parents=True)
        for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(case / "model" / name, folder / name)
        if weights is not None:
            (folder / "model.safetensors").write_bytes(weights)
        specs = [card.model_spec() for card in load_cards([case / "cards"])]
        record = {"step": 1, "tasks": specs, "num_processes": 1} if meta is None else meta
        (folder / "checkpoint.json").write_text(json.dumps(record))

    return setup


HARDENING_SAFETY_CASES = [
    # ------------------------------------------------------------ item 10: metrics that run code
    SafetyCase(
        "evaluate-hub-metric-in-the-model-cards",
        edit("model/cards/cls.yaml", "- accuracy", "- someone/metric"),
        EVALUATE,
        f"{MODEL_CLS_CARD}: metrics: 'someone/metric' {NOT_BUILT_IN}",
    ),
    SafetyCase(
        "evaluate-metric-script-in-given-cards",
        lambda case: (
            write("metric.py", f"open({str(case / 'ran')!r}, 'w')\n")(case),  # if it ever runs
            edit("cards/cls.yaml", "metrics: [accuracy]", "metrics: [{case}/metric.py]")(case),
        ),
        (*EVALUATE, "--cards", "{case}/cards"),
        f"{CLS_CARD}: metrics: '{{case}}/metric.py' {NOT_BUILT_IN}",
    ),
    # ------------------------------------------------------------ item 11: safetensors only
    SafetyCase("evaluate-pickle-only-model", pickle_only, EVALUATE, NO_SAFETENSORS),
    SafetyCase("predict-pickle-only-model", pickle_only, PREDICT, NO_SAFETENSORS),
    SafetyCase("push-pickle-only-model", pickle_only, PUSH, NO_SAFETENSORS),
    SafetyCase(
        "train-from-pickle-only-mtnlp-model",
        pickle_only,
        (*TRAIN, "--model", "{case}/model"),
        f"--model: {NO_SAFETENSORS}",
    ),
    # ------------------------------------------------------------ item 15: damaged model folders
    SafetyCase(
        "evaluate-truncated-safetensors", truncate("model/model.safetensors"), EVALUATE, TRUNCATED
    ),
    SafetyCase(
        "predict-truncated-safetensors", truncate("model/model.safetensors"), PREDICT, TRUNCATED
    ),
    SafetyCase(
        "train-from-truncated-safetensors",
        truncate("model/model.safetensors"),
        (*TRAIN, "--model", "{case}/model"),
        f"--model: {TRUNCATED}",
    ),
    SafetyCase(
        "resume-truncated-safetensors",
        checkpoint_of_the_model(weights=b"\x10\x00\x00\x00\x00\x00\x00\x00{"),
        # --max-steps above the checkpoint's step 1 (at it is refused: nothing left to train)
        (*TRAIN, "--max-steps", "2", "--resume-from-checkpoint", "latest"),
        "--resume-from-checkpoint: {case}/out/checkpoint-1/model.safetensors: not a complete "
        "safetensors file (Error while deserializing header: invalid header length)",
    ),
    SafetyCase(
        "resume-empty-checkpoint-json",
        checkpoint_of_the_model(meta={}),
        (*TRAIN, "--resume-from-checkpoint", "latest"),
        "{case}/out/checkpoint-1/checkpoint.json: step: missing",
    ),
    SafetyCase(
        "resume-checkpoint-json-step-not-a-number",
        checkpoint_of_the_model(meta={"step": "1", "tasks": []}),
        (*TRAIN, "--resume-from-checkpoint", "latest"),
        "{case}/out/checkpoint-1/checkpoint.json: step: expected a step number (an integer >= 0), "
        "got '1'",
    ),
    SafetyCase(
        "evaluate-stack-on-cycle-in-config",
        edit_config(
            lambda tasks: [tasks[0].update(stack_on="tag"), tasks[2].update(stack_on="cls")]
        ),
        EVALUATE,
        "{case}/model/config.json: task cls: stack_on: stack_on forms a cycle (cls -> tag -> cls); "
        "task tag: stack_on: stack_on forms a cycle (tag -> cls -> tag)",
    ),
    SafetyCase(
        "evaluate-heads-of-other-shapes",
        edit_config(lambda tasks: tasks[0].update(labels=["neg", "pos", "mixed"])),
        EVALUATE,
        "{case}/model: the weights do not fit the tasks of its config.json (other shape: "
        "heads.cls.out.bias, heads.cls.out.weight)",
    ),
    SafetyCase(  # transformers alone would load this with a random `sent` head
        "predict-heads-of-other-tasks",
        edit_config(lambda tasks: tasks[0].update(name="sent")),
        PREDICT,
        "{case}/model: the weights do not fit the tasks of its config.json (missing: "
        "heads.sent.out.bias, heads.sent.out.weight; unexpected: heads.cls.out.bias, "
        "heads.cls.out.weight)",
    ),
    SafetyCase(
        "evaluate-no-tokenizer",
        remove("model/tokenizer.json", "model/tokenizer_config.json"),
        EVALUATE,
        NO_TOKENIZER,
    ),
    SafetyCase(
        "predict-no-tokenizer",
        remove("model/tokenizer.json", "model/tokenizer_config.json"),
        PREDICT,
        NO_TOKENIZER,
    ),
    # ------------------------------------------------------------ item 14: the Hub out of reach
    SafetyCase(
        "evaluate-offline-without-data-dir",
        edit(
            "model/cards/cls.yaml",
            "source:\n",
            "source:\n  hub: {{path: nyu-mll/glue, name: sst2}}\n",
        ),
        ("evaluate", "{case}/model", "--tasks", "cls"),
        f"{MODEL_CLS_CARD}: the data comes from the Hugging Face Hub (nyu-mll/glue, sst2), which "
        "cannot be reached (offline); pass --data-dir with local files",
    ),
    SafetyCase(
        "train-offline-without-data-dir",
        lambda case: None,
        ("train", "--model", "tiny", "--cards", GLUE_RTE, "--output-dir", "{case}/out"),
        f"{GLUE_RTE}: the data comes from the Hugging Face Hub (nyu-mll/glue, rte), which cannot "
        "be reached (offline); pass --data-dir with local files",
    ),
    SafetyCase(
        "train-hub-encoder-offline-not-cached",
        lambda case: None,
        (*TRAIN, "--model", "nobody-xyz/no-such-encoder"),
        "--model: nobody-xyz/no-such-encoder: not a local model folder and not loadable from the "
        "Hub (We couldn't connect to 'https://huggingface.co' to load the files, and couldn't "
        "find them in the cached files.)",
    ),
    SafetyCase(
        "push-offline",
        lambda case: None,
        PUSH,
        "push to me/tiny: cannot reach the Hugging Face Hub (offline mode: HF_HUB_OFFLINE is set)",
    ),
]


@pytest.fixture(scope="module")
def tiny_model_folder(tiny_tasks, tmp_path_factory) -> Path:
    """A saved, untrained model of the tiny tasks (what `training.save_run` writes)."""
    import torch

    from mtnlp.cards.load import load_cards
    from mtnlp.modeling.model import MultiTaskModel
    from mtnlp.modeling.tiny import tiny_bert

    cards = load_cards([tiny_tasks / "cards"])
    tokenizer = train_wordpiece(["the cat sat on a mat", "alice ran to bob"], vocab_size=60)
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(tiny_bert(tokenizer), [c.model_spec() for c in cards])
    folder = tmp_path_factory.mktemp("safety") / "model"
    save_run(folder, model, tokenizer, cards, {}, [], {})
    return folder


def test_the_safety_table_is_complete():
    ids = [case.id for case in HARDENING_SAFETY_CASES]
    assert len(ids) == len(set(ids)) >= 20


@pytest.mark.parametrize("case", HARDENING_SAFETY_CASES, ids=[c.id for c in HARDENING_SAFETY_CASES])
def test_safety_bad_input_gives_its_exact_error(
    case, tiny_tasks, tiny_model_folder, tmp_path, monkeypatch, capsys
):
    run_safety_case(case, tiny_tasks, tiny_model_folder, tmp_path, monkeypatch, capsys)


def run_safety_case(case, tiny_tasks, tiny_model_folder, tmp_path, monkeypatch, capsys) -> None:
    """`mtnlp COMMAND` on a copy of the tiny cards, data and model that `case.setup` damaged:
    exit 2, the case's exact last `error:` line, no traceback, no metric script run."""
    import datasets
    from huggingface_hub import constants

    from mtnlp.cli import main

    # an empty cache: the Hub cases must not find the data or encoder cached from another run
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    shutil.copytree(tiny_tasks / "cards", tmp_path / "cards")
    shutil.copytree(tiny_tasks / "data", tmp_path / "data")
    shutil.copytree(tiny_model_folder, tmp_path / "model")
    (tmp_path / "inputs.jsonl").write_text('{"text": "the cat sat"}\n')
    case.setup(tmp_path)
    reset_accelerate()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main([arg.format(case=tmp_path) for arg in case.command])
    finally:
        reset_accelerate()
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert stderr.strip().splitlines()[-1] == f"error: {case.message.format(case=tmp_path)}"
    assert "Traceback" not in stderr and "LOAD REPORT" not in stderr
    assert not (tmp_path / "ran").exists()  # no metric script ran


# ------------------------------------------------------------------------------ issue 11: predict
# `mtnlp predict`'s inputs (items 16, 18): each case prepares folder `case` (a copy of the tiny
# tasks' cards/ and data/ plus what `setup` writes) and runs `mtnlp predict MODEL FLAGS` on an
# untrained model of the tiny tasks; `{case}` and `{model}` stand for the folders.
HARDENING_PREDICT_CASES = [
    Case(
        "predict-not-utf8-json",
        write("in.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n'),
        "{case}/in.jsonl: line 2: not UTF-8 text (invalid continuation byte at byte 14 of the "
        "line)",
        ("--input", "{case}/in.jsonl"),
    ),
    Case(
        "predict-not-utf8-csv",
        write("in.csv", b"id,sentence\n1,a\n2,\xff\n"),
        "{case}/in.csv: line 3: not UTF-8 text (invalid start byte at byte 3 of the line)",
        ("--input", "{case}/in.csv"),
    ),
    Case(
        "predict-lone-surrogate",
        write("in.jsonl", b'{"text": "\\ud800 x"}\n'),
        '{case}/in.jsonl: line 1: "text": a lone surrogate (\\ud800) is not text',
        ("--input", "{case}/in.jsonl"),
    ),
    Case(
        "predict-lone-surrogate-in-passed-key",
        write("in.jsonl", b'{"text": "a", "id": ["\\udfff"]}\n'),
        '{case}/in.jsonl: line 1: "id": a lone surrogate (\\udfff) is not text',
        ("--input", "{case}/in.jsonl"),
    ),
    Case(
        "predict-deeply-nested-json",
        write("in.jsonl", b'{"text": "a"}\n{"text": "a", "x": ' + b"[" * 100_000 + b"\n"),
        "{case}/in.jsonl: line 2: JSON nested too deeply",
        ("--input", "{case}/in.jsonl"),
    ),
    Case(
        "predict-not-json",
        write("in.jsonl", b'{"text": "a"}\n\n{"text": \n'),
        "{case}/in.jsonl: line 3: not JSON (Expecting value)",
        ("--input", "{case}/in.jsonl"),
    ),
    Case(
        "predict-json-nan",
        write("in.jsonl", b'{"text": "a", "score": NaN}\n'),
        '{case}/in.jsonl: line 1: "score": NaN or infinity is not JSON',
        ("--input", "{case}/in.jsonl"),
    ),
    Case(
        "predict-json-huge-integer",
        write("in.jsonl", b'{"text": "a", "id": ' + b"9" * 5000 + b"}\n"),
        "{case}/in.jsonl: line 1: not JSON (Exceeds the limit (4300 digits) for integer string "
        "conversion: value has 5000 digits)",
        ("--input", "{case}/in.jsonl"),
    ),
    Case(
        "predict-json-array",
        write("in.jsonl", b'["a"]\n'),
        '{case}/in.jsonl: line 1: expected a JSON object such as {{"text": ...}}, got an array',
        ("--input", "{case}/in.jsonl"),
    ),
    Case(
        "predict-text-null",
        write("in.jsonl", b'{"text": null}\n'),
        "{case}/in.jsonl: line 1: text: expected a string, got null",
        ("--input", "{case}/in.jsonl"),
    ),
    Case(
        "predict-column-not-text",
        write("in.jsonl", b'{"sentence": 3}\n'),
        "{case}/in.jsonl: line 1: sentence: expected a string, got a number",
        ("--input", "{case}/in.jsonl"),
    ),
    Case(
        "predict-no-text",
        write("in.jsonl", b'{"id": 1}\n'),
        '{case}/in.jsonl: line 1: no text: give "text" (and "text_pair") or the columns that '
        "tasks read (sentence, sentence1, sentence2, tokens)",
        ("--input", "{case}/in.jsonl"),
    ),
    Case(
        "predict-key-named-like-a-task",
        write("in.jsonl", b'{"text": "a", "cls": 1}\n'),
        "{case}/in.jsonl: line 1: key 'cls' is also a task's name (output lines key the "
        "predictions by task); rename it",
        ("--input", "{case}/in.jsonl"),
    ),
    Case(
        "predict-column-of-named-task-missing",
        write("in.jsonl", b'{"sentence": "a"}\n'),
        "{case}/in.jsonl: line 1: no text or column 'sentence1', which task reg reads",
        ("--input", "{case}/in.jsonl", "--tasks", "reg"),
    ),
    Case(
        "predict-pair-for-single-text-task",
        write("in.jsonl", b'\n{"text": "a", "text_pair": "b"}\n'),
        "{case}/in.jsonl: input 2 has a text_pair, but task cls reads a single text",
        ("--input", "{case}/in.jsonl", "--tasks", "cls"),
    ),
    Case(
        "predict-csv-row-length",
        write("in.csv", b"id,sentence\n\n1,a,b\n"),
        "{case}/in.csv: line 3: 3 fields, but the header names 2",
        ("--input", "{case}/in.csv"),
    ),
    Case(
        "predict-csv-header-twice",
        write("in.tsv", b"sentence\tsentence\na\tb\n"),
        "{case}/in.tsv: line 1: column 'sentence' appears twice in the header",
        ("--input", "{case}/in.tsv"),
    ),
    Case(
        "predict-unknown-task",
        write("in.jsonl", b'{"text": "a"}\n'),
        "tasks: no task nope in this model; tasks: cls, reg, tag",
        ("--input", "{case}/in.jsonl", "--tasks", "nope"),
    ),
    Case(
        "predict-input-missing",
        lambda case: None,
        "--input: {case}/missing.jsonl: No such file or directory",
        ("--input", "{case}/missing.jsonl"),
    ),
    Case(
        "predict-split-and-input",
        lambda case: None,
        "--input: not with --split (which reads the cards' data)",
        ("--split", "test", "--input", "{case}/in.jsonl"),
    ),
    Case(
        "predict-data-dir-without-split",
        lambda case: None,
        "--data-dir: only with --split",
        ("--data-dir", "{case}/data"),
    ),
    Case(
        "predict-split-not-in-card",
        lambda case: None,
        "{model}/cards/cls.yaml: source.local.files: no test split (splits: train, validation)",
        ("--split", "test", "--data-dir", "{case}/data"),
    ),
    Case(
        "predict-split-other-labels",
        edit_card("cls", "labels: [neg, pos]", "labels: [bad, good]"),
        "{case}/cards/cls.yaml: labels: differ from the labels {model} learned",
        ("--split", "test", "--data-dir", "{case}/data", "--cards", "{case}/cards"),
    ),
    Case(
        "predict-split-submission-path",
        edit_card("cls", "metrics:", "submission: {files: {test: ../CLS.tsv}}\nmetrics:"),
        "{case}/cards/cls.yaml: submission.files.test: file name '../CLS.tsv' may hold only "
        "letters, digits and _ . + = - (no path separators, '..', control characters or spaces) "
        "and must not start with '.' or '-'",
        ("--split", "test", "--data-dir", "{case}/data", "--cards", "{case}/cards"),
    ),
    Case(
        "predict-split-options-of-unknown-split",
        edit_card("cls", "    format: tsv\n", "    format: tsv\n    split_options: {test: {}}\n"),
        "{case}/cards/cls.yaml: source.local.split_options: no file for split(s) test",
        ("--split", "test", "--data-dir", "{case}/data", "--cards", "{case}/cards"),
    ),
    Case(
        "predict-split-output-dir-is-a-file",
        write("out", "not a folder"),
        "--output-dir: {case}/out is a file, not a folder",
        ("--split", "validation", "--data-dir", "{case}/data", "--output-dir", "{case}/out"),
    ),
]


@pytest.fixture(scope="module")
def predict_model(tiny_tasks, tmp_path_factory) -> Path:
    from tiny_runs import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("predict") / "model", tiny_tasks / "cards")


def prepare_predict(case: Case, tiny_tasks: Path, folder: Path, model: Path):
    """Copy the tiny tasks into `folder`, break them; return (predict flags, expected error)."""
    shutil.copytree(tiny_tasks / "cards", folder / "cards")
    shutil.copytree(tiny_tasks / "data", folder / "data")
    case.setup(folder)
    flags = [flag.format(case=folder) for flag in case.flags]
    return ["predict", str(model), *flags], case.message.format(case=folder, model=model)


def test_the_predict_table_has_every_case():
    assert len({case.id for case in HARDENING_PREDICT_CASES}) == len(HARDENING_PREDICT_CASES) == 26


@pytest.mark.parametrize("case", HARDENING_PREDICT_CASES, ids=lambda case: case.id)
def test_predict_bad_input_gives_its_exact_error(case, tiny_tasks, predict_model, tmp_path, capsys):
    from mtnlp.cli import main

    argv, expected = prepare_predict(case, tiny_tasks, tmp_path, predict_model)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == f"error: {expected}"
    assert out == ""  # nothing predicted for an input that has a mistake


@pytest.mark.parametrize(
    "case_id", ["predict-not-utf8-json", "predict-deeply-nested-json", "predict-lone-surrogate"]
)
def test_predict_exit_code_2_without_traceback(case_id, tiny_tasks, predict_model, tmp_path):
    case = next(case for case in HARDENING_PREDICT_CASES if case.id == case_id)
    argv, expected = prepare_predict(case, tiny_tasks, tmp_path, predict_model)
    result = run([sys.executable, "-m", "mtnlp.cli", *argv])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: {expected}"
    assert "Traceback" not in result.stderr


# ============================================================================ hardening: resume
# Issue 11, items 4, 7 and 13: checkpoints that cannot be resumed exactly, output folders that
# another run holds or that cannot be written.
_HELD_LOCKS: dict[Path, int] = {}  # case folder -> descriptor of the lock "another run" holds


def hold_output_lock(case: Path) -> None:
    """Lock `case/out` as a live run would (its own open file: flock conflicts in-process too)."""
    import fcntl

    (case / "out").mkdir()
    descriptor = os.open(case / "out" / ".mtnlp.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(descriptor, b"pid 999 on elsewhere\n")
    _HELD_LOCKS[case] = descriptor


def checkpoint_of_this_run(
    model: str = "tiny", missing: str = "", states: int = 5
) -> Callable[[Path], object]:
    """`out/checkpoint-4` for these very cards, written with `--model model`, holding the
    tokenizer and accelerate's files (`states` registered objects') as readable stand-ins (a
    one-tensor model, empty state dicts), without `missing`."""

    def setup(case: Path) -> None:
        import torch
        from safetensors.torch import save_file

        from mtnlp.cards.load import load_cards

        folder = case / "out" / "checkpoint-4"
        folder.mkdir(parents=True)
        train_wordpiece(["the cat sat", "a dog ran"], vocab_size=60).save_pretrained(folder)
        save_file({"stand_in": torch.zeros(1)}, folder / "model.safetensors")
        files = ["random_states_0.pkl", *(f"custom_checkpoint_{i}.pkl" for i in range(states))]
        for name in files:
            if name != missing:
                torch.save({}, folder / name)
        specs = [card.model_spec() for card in load_cards([case / "cards"])]
        meta = {"step": 4, "tasks": specs, "num_processes": 1, "args": {"model": model}}
        (folder / "checkpoint.json").write_text(json.dumps(meta))

    return setup


CHECKPOINT = "--resume-from-checkpoint: {case}/out/checkpoint-4"
# the cases that resume checkpoint-4 train to step 8: a --max-steps at or below 4 is refused first
HARDENING_RESUME_CASES = [
    Case(
        "output-dir-locked-by-another-run",
        hold_output_lock,
        "--output-dir: {case}/out: another run is writing into this folder (pid 999 on elsewhere "
        "holds {case}/out/.mtnlp.lock); wait for it to end, or give another --output-dir",
    ),
    Case(
        "output-dir-under-a-file",
        write("somefile", "a file, not a folder"),
        "--output-dir: {case}/somefile/out: cannot write here (Not a directory)",
        ("--output-dir", "{case}/somefile/out"),
    ),
    Case(
        "resume-latest-in-a-run-without-checkpoints",
        write("out/config.json", "{}"),
        "--resume-from-checkpoint latest: no checkpoint-<step> folder in {case}/out; to start "
        "afresh, run without --resume-from-checkpoint and with --overwrite-output-dir",
        ("--resume-from-checkpoint", "latest"),
    ),
    Case(
        "checkpoint-of-another-model",
        checkpoint_of_this_run(model="/models/bert-base"),
        f"{CHECKPOINT} was written with --model /models/bert-base; this run has --model tiny "
        "(resume with the checkpoint's --model)",
        ("--max-steps", "8", "--resume-from-checkpoint", "latest"),
    ),
    Case(
        "checkpoint-without-random-states",
        checkpoint_of_this_run(missing="random_states_0.pkl"),
        f"{CHECKPOINT}: random_states_0.pkl is missing (the random number generators' states), "
        "so the run cannot continue exactly; resume from a complete checkpoint",
        ("--max-steps", "8", "--resume-from-checkpoint", "latest"),
    ),
    Case(
        "checkpoint-without-keep-best-state",
        checkpoint_of_this_run(),
        f"{CHECKPOINT}: custom_checkpoint_5.pkl is missing (the --keep-best tracker), so the run "
        "cannot continue exactly; resume from a complete checkpoint",
        ("--max-steps", "8", "--resume-from-checkpoint", "latest", "--keep-best"),
    ),
    Case(
        "checkpoint-with-more-states-than-this-run",
        checkpoint_of_this_run(states=6),
        f"{CHECKPOINT}: holds 6 saved states, this run has 5 (learning-rate schedule, task "
        "sampler, loss weighting, loop state, epoch losses); resume with the options it was "
        "written with (--keep-best, --block-sparse, --adversarial, successive_regularization)",
        ("--max-steps", "8", "--resume-from-checkpoint", "latest"),
    ),
]


@pytest.mark.parametrize(
    "case", HARDENING_RESUME_CASES, ids=[case.id for case in HARDENING_RESUME_CASES]
)
def test_hardening_resume_bad_input(case, tiny_tasks, tmp_path):
    flags, expected = prepare(case, tiny_tasks, tmp_path)
    before = snapshot(tmp_path / "out")
    reset_accelerate()
    try:
        with pytest.raises(UserError) as error:
            training.run(parse_args(flags), default_cards=[])
    finally:
        reset_accelerate()
        if tmp_path in _HELD_LOCKS:
            os.close(_HELD_LOCKS.pop(tmp_path))
    assert str(error.value) == expected
    assert snapshot(tmp_path / "out") == before  # no partial output, the old one untouched


def test_hardening_resume_locked_output_dir_exits_2(tiny_tasks, tmp_path):
    flags, expected = prepare(HARDENING_RESUME_CASES[0], tiny_tasks, tmp_path)
    try:
        result = run([*CLI_TRAIN, *flags])
    finally:
        os.close(_HELD_LOCKS.pop(tmp_path))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: {expected}"
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------ unparsable flags
# argparse's own errors (a value of the wrong type, an unknown choice or command, a missing
# argument) are one `error:` line naming the command and the flag, exit 2, not its usage text.
UNPARSABLE_FLAGS = [
    (
        ["train", "--max-steps", "10.7"],
        "mtnlp train: argument --max_steps/--max-steps: invalid int value: '10.7' "
        "(see mtnlp train --help)",
    ),
    (
        ["train", "--batch-mode", "both"],
        "mtnlp train: argument --batch_mode/--batch-mode: invalid choice: 'both' (choose from "
        "'one_task', 'all_tasks', 'joint') (see mtnlp train --help)",
    ),
    (
        ["predict", "some/model", "--batch-size", "0"],
        "mtnlp predict: argument --batch-size: must be positive, got 0 (see mtnlp predict --help)",
    ),
    (
        ["evaluate"],
        "mtnlp evaluate: the following arguments are required: model (see mtnlp evaluate --help)",
    ),
    (
        ["frobnicate"],
        "mtnlp: argument COMMAND: invalid choice: 'frobnicate' (choose from 'train', 'evaluate', "
        "'predict', 'cards', 'push', 'export') (see mtnlp --help)",
    ),
]


@pytest.mark.parametrize(("argv", "message"), UNPARSABLE_FLAGS, ids=lambda v: str(v)[:30])
def test_an_unparsable_flag_is_one_error_line(argv, message, capsys):
    from mtnlp.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
