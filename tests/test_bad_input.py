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
from mtnlp.args import parse_args
from mtnlp.cards import HeadOptions
from mtnlp.errors import UserError
from mtnlp.heads import HEADS
from mtnlp.metrics import METRICS
from mtnlp.samplers import SAMPLERS
from mtnlp.tiny import train_wordpiece

from conftest import REPO


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
        f"{CLS_TRAIN}: not valid utf-8-sig text (byte 18)",
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
        "--max-bad-steps: must be positive",
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


# ------------------------------------------------------------------------------ subprocesses
RECIPE = [sys.executable, str(REPO / "recipes" / "glue_mt.py")]
CLI_TRAIN = [sys.executable, "-m", "mtnlp.cli", "train"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


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
    tokenizer and accelerate's files (`states` registered objects') as empty stand-ins, without
    `missing`."""

    def setup(case: Path) -> None:
        from mtnlp.cards import load_cards

        folder = case / "out" / "checkpoint-4"
        folder.mkdir(parents=True)
        train_wordpiece(["the cat sat", "a dog ran"], vocab_size=60).save_pretrained(folder)
        files = ["model.safetensors", "random_states_0.pkl"]
        files += [f"custom_checkpoint_{i}.pkl" for i in range(states)]
        for name in files:
            if name != missing:
                (folder / name).write_bytes(b"")
        specs = [card.model_spec() for card in load_cards([case / "cards"])]
        meta = {"step": 4, "tasks": specs, "num_processes": 1, "args": {"model": model}}
        (folder / "checkpoint.json").write_text(json.dumps(meta))

    return setup


CHECKPOINT = "--resume-from-checkpoint: {case}/out/checkpoint-4"
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
        ("--resume-from-checkpoint", "latest"),
    ),
    Case(
        "checkpoint-without-random-states",
        checkpoint_of_this_run(missing="random_states_0.pkl"),
        f"{CHECKPOINT}: random_states_0.pkl is missing (the random number generators' states), "
        "so the run cannot continue exactly; resume from a complete checkpoint",
        ("--resume-from-checkpoint", "latest"),
    ),
    Case(
        "checkpoint-without-keep-best-state",
        checkpoint_of_this_run(),
        f"{CHECKPOINT}: custom_checkpoint_5.pkl is missing (the --keep-best tracker), so the run "
        "cannot continue exactly; resume from a complete checkpoint",
        ("--resume-from-checkpoint", "latest", "--keep-best"),
    ),
    Case(
        "checkpoint-with-more-states-than-this-run",
        checkpoint_of_this_run(states=6),
        f"{CHECKPOINT}: holds 6 saved states, this run has 5 (learning-rate schedule, task "
        "sampler, loss weighting, loop state, epoch losses); resume with the options it was "
        "written with (--keep-best, --block-sparse, --adversarial, successive_regularization)",
        ("--resume-from-checkpoint", "latest"),
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
