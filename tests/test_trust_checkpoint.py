"""Issue 14, item 5: a checkpoint's files are checked against the sizes and SHA-256 digests that
`checkpoint.json` records when it is written, before any of them is read, so flipped bytes,
truncation or a foreign file give one line naming the file; a foreign pickle never runs, not even
in a checkpoint of an earlier mtnlp (no digests: loaded with a warning, state files read weights
only). (The table of tampered checkpoints is in test_bad_input_writes.py.)

Runs are in-process (`training.train`) on the tiny tasks of `tiny_runs.py`, resumed from copies
of the checkpoints of one module-wide run."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
from tiny_runs import reset_accelerate, write_tiny_tasks

from mtnlp import training
from mtnlp.cards.load import load_cards
from mtnlp.data.read import training_text
from mtnlp.modeling.tiny import tiny_bert, train_wordpiece
from mtnlp.training.args import parse_args
from mtnlp.training.checkpointing import resolve_checkpoint
from mtnlp.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")  # conftest.py


def train(argv: list[str]) -> dict:
    args = parse_args(argv)
    reset_accelerate()
    try:
        return training.train(args, load_cards(args.cards, args.task_list))
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished 4-step run of cls with checkpoints at steps 2 and 4; its flags (without
    --output-dir)."""
    root = tmp_path_factory.mktemp("trust_checkpoint")
    cards, data = write_tiny_tasks(root, train_size=16)
    tokenizer = train_wordpiece(training_text(load_cards([cards]), [data]))
    tiny_bert(tokenizer).save_pretrained(root / "encoder")
    tokenizer.save_pretrained(root / "encoder")
    argv = [
        "--model", str(root / "encoder"), "--cards", str(cards), "--data-dir", str(data),
        "--tasks", "cls", "--max-steps", "4", "--batch-size", "4", "--eval-batch-size", "4",
        "--seed", "7",
    ]  # fmt: skip
    reset_accelerate()
    try:
        train([*argv, "--output-dir", str(root / "run"), "--checkpoint-every", "2"])
    finally:
        reset_accelerate()
    return root / "run", argv


@pytest.fixture
def checkpoint(run, tmp_path) -> Path:
    """A copy of the run's checkpoint-2, to damage."""
    return Path(shutil.copytree(run[0] / "checkpoint-2", tmp_path / "checkpoint-2"))


def resume(run, checkpoint: Path, output: Path) -> dict:
    argv = [*run[1], "--output-dir", str(output)]
    return train([*argv, "--resume-from-checkpoint", str(checkpoint)])


class Marker:
    """A pickle that creates a file when it is loaded: code from a foreign state file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_checkpoint_json_records_every_file(run):
    folder = run[0] / "checkpoint-2"
    records = json.loads((folder / "checkpoint.json").read_text())["files"]
    on_disk = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "checkpoint.json"
    )
    assert sorted(records) == on_disk
    expected = ["model.safetensors", "optimizer.bin", "random_states_0.pkl"]
    assert {*expected, "custom_checkpoint_0.pkl", "tokenizer.json"} <= set(records)
    for name, record in records.items():
        content = (folder / name).read_bytes()
        assert record == {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def test_an_intact_copy_resumes(run, checkpoint, tmp_path):
    resume(run, checkpoint, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-2" and summary["steps"] == 4


def test_a_foreign_optimizer_pickle_is_refused_before_it_is_read(run, checkpoint, tmp_path):
    marker = tmp_path / "ran"
    (checkpoint / "optimizer.bin").write_bytes(pickle.dumps(Marker(marker)))
    with pytest.raises(UserError) as error:
        resume(run, checkpoint, tmp_path / "out")
    size = (run[0] / "checkpoint-2" / "optimizer.bin").stat().st_size
    foreign = (checkpoint / "optimizer.bin").stat().st_size
    assert str(error.value) == (
        f"--resume-from-checkpoint: {checkpoint}: optimizer.bin is damaged (the optimizer's "
        f"state: {foreign} bytes where checkpoint.json records {size}); resume from a complete "
        "checkpoint"
    )
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_checkpoint_without_digests_loads_with_a_warning(run, checkpoint, tmp_path, caplog):
    """Written by an earlier mtnlp: nothing to verify against, so it loads, and says so."""
    meta = json.loads((checkpoint / "checkpoint.json").read_text())
    del meta["files"]
    (checkpoint / "checkpoint.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="mtnlp.training.checkpointing"):
        assert resolve_checkpoint(str(checkpoint), tmp_path) == checkpoint
    assert caplog.messages == [
        f"--resume-from-checkpoint: {checkpoint}: written by an earlier mtnlp, without file "
        "digests in checkpoint.json, so its files cannot be verified"
    ]
    resume(run, checkpoint, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["optimizer.bin", "custom_checkpoint_0.pkl"])
def test_a_foreign_pickle_without_digests_never_runs(run, checkpoint, tmp_path, name):
    """Without digests, the state files are read weights only (accelerate's custom states too,
    which it unpickles in full: mtnlp reads them weights-only first): one line, no code run."""
    meta = json.loads((checkpoint / "checkpoint.json").read_text())
    del meta["files"]
    (checkpoint / "checkpoint.json").write_text(json.dumps(meta))
    marker = tmp_path / "ran"
    (checkpoint / name).write_bytes(pickle.dumps(Marker(marker)))
    with pytest.raises(UserError) as error:
        resume(run, checkpoint, tmp_path / "out")
    message = str(error.value)
    assert message.startswith(f"--resume-from-checkpoint: {checkpoint}: ")
    assert "Weights only load failed" in message and "\n" not in message
    assert message.endswith("; resume from a complete checkpoint")
    assert not marker.exists()
