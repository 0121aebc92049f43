"""Checkpoints and resume: a run SIGKILLed while writing a checkpoint and resumed from `latest`
ends exactly like an uninterrupted run; writing is atomic and rotated; the data position resumes
batch for batch; a NaN/inf loss skips its update and a diverging run stops with a clear error."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tiny_runs import reset_accelerate, write_tiny_tasks
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

import mtnlp.modeling.tiny
from mtnlp import training
from mtnlp.cards.load import load_cards
from mtnlp.data.read import training_text
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.tiny import tiny_bert, train_wordpiece
from mtnlp.training.args import parse_args
from mtnlp.training.checkpointing import (
    CHECKPOINT_META,
    MODEL_FILE,
    check_finite,
    check_tasks,
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from mtnlp.training.mixing import TaskStreams
from mtnlp.utils.errors import UserError

from conftest import REPO, TRAINING_TIMEOUT, run_command

RUN = [
    "--max-steps", "12", "--gradient-accumulation-steps", "2",
    "--batch-size", "4", "--eval-batch-size", "4", "--learning-rate", "3e-3",
    "--log-every", "1", "--seed", "7",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Cards, data and a tiny encoder folder. Runs compared with each other load that encoder:
    `--model tiny` learns a vocabulary in every run, and its trainer may break ties differently."""
    root = tmp_path_factory.mktemp("tasks")
    # 16 examples = 4 batches per task: 24 micro-batches cross every task's epoch boundary
    cards, data = write_tiny_tasks(root, train_size=16)
    tokenizer = train_wordpiece(training_text(load_cards([cards]), [data]))
    tokenizer.save_pretrained(root / "encoder")
    tiny_bert(tokenizer).save_pretrained(root / "encoder")
    return cards, data, root / "encoder"


def run_recipe(tasks, output: Path, *extra: str, kill_during_save: int | None = None):
    cards, data, encoder = tasks
    env = {"OMP_NUM_THREADS": "1", "KILL_DURING_SAVE": str(kill_during_save or "")}
    command = [
        sys.executable, str(REPO / "tests" / "tiny_runs.py"), str(REPO / "recipes" / "glue_mt.py"),
        *RUN, "--model", str(encoder), "--cards", str(cards), "--data-dir", str(data),
        "--output-dir", str(output), *extra,
    ]  # fmt: skip
    return run_command(command, timeout=TRAINING_TIMEOUT, env=env)


def flat(record, prefix=""):
    """A nested log record as {"a.b.c": leaf}."""
    if isinstance(record, dict):
        return {
            k: v for key, value in record.items() for k, v in flat(value, f"{prefix}{key}.").items()
        }
    return {prefix: record}


def read_log(output: Path) -> list[dict]:
    return [
        flat(json.loads(line)) for line in (output / "train_log.jsonl").read_text().splitlines()
    ]


def test_killed_run_resumes_exactly(tiny_tasks, tmp_path):
    reference = run_recipe(tiny_tasks, tmp_path / "reference" / "out")
    assert reference.returncode == 0, reference.stderr[-3000:]

    output = tmp_path / "killed" / "out"
    save = ("--checkpoint-every", "3", "--keep-checkpoints", "2")
    killed = run_recipe(tiny_tasks, output, *save, kill_during_save=6)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # the kill hit the save of step 6: step 3 is intact, step 6 only a temporary folder; the
    # dead run's lock file stays, but its OS lock died with it; its log, written as it went, too
    assert sorted(p.name for p in output.iterdir()) == [
        ".checkpoint-6.tmp", ".mtnlp.lock", "checkpoint-3", "train_log.jsonl",
    ]  # fmt: skip
    assert resolve_checkpoint("latest", output) == output / "checkpoint-3"

    resumed = run_recipe(tiny_tasks, output, *save, "--resume-from-checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [p.name for p in list_checkpoints(output)] == ["checkpoint-9", "checkpoint-12"]
    assert not list(output.glob(".checkpoint-*")) and not (output / ".mtnlp.lock").exists()

    expected = load_file(tmp_path / "reference" / "out" / MODEL_FILE)
    weights = load_file(output / MODEL_FILE)
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6, msg=name)

    # same task sequence and the same losses step by step; same dev metrics
    reference_log, resumed_log = read_log(tmp_path / "reference" / "out"), read_log(output)
    assert [r.keys() for r in resumed_log] == [r.keys() for r in reference_log]
    for got, want in zip(resumed_log, reference_log, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    summary = json.loads((output / "train_summary.json").read_text())
    reference_summary = json.loads((tmp_path / "reference/out/train_summary.json").read_text())
    assert summary["task_steps"] == reference_summary["task_steps"]
    assert summary["train_examples"] == reference_summary["train_examples"]
    assert summary["resumed_from"] == "checkpoint-3"  # no local paths in what is pushed


# ------------------------------------------------------------------------------ in-process
@pytest.fixture
def fresh_accelerate():
    """accelerate keeps process-wide singletons: start and leave each test with clean ones."""
    reset_accelerate()
    yield
    reset_accelerate()


def fake_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / MODEL_FILE).write_bytes(b"")
    if complete:
        (path / CHECKPOINT_META).write_text(json.dumps({"step": step, "tasks": []}))
    return path


def test_latest_skips_temporary_and_unfinished_folders(tmp_path):
    fake_checkpoint(tmp_path, 2)
    newest = fake_checkpoint(tmp_path, 10)  # numeric order: 10 > 9 > 2
    fake_checkpoint(tmp_path, 9)
    fake_checkpoint(tmp_path, 12, complete=False)  # e.g. copied by hand, half-way
    (tmp_path / ".checkpoint-14.tmp").mkdir()  # left by a kill during a save
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-2", "checkpoint-9", "checkpoint-10",
    ]  # fmt: skip
    assert resolve_checkpoint("latest", tmp_path) == newest
    assert resolve_checkpoint(str(newest), tmp_path) == newest
    assert resolve_checkpoint(None, tmp_path) is None


def test_save_is_atomic_rotates_and_refuses_nan(tmp_path, fresh_accelerate):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 2)
    model, _ = accelerator.prepare(linear, torch.optim.AdamW(linear.parameters()))
    specs = [{"name": "a", "type": "classification", "labels": ["x", "y"]}]
    (tmp_path / ".checkpoint-7.tmp").mkdir()  # a save killed half-way
    for step in (1, 2, 3):
        save_checkpoint(accelerator, tmp_path, step, specs, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    meta = json.loads((tmp_path / "checkpoint-3" / CHECKPOINT_META).read_text())
    assert set(meta.pop("files")) == {"model.safetensors", "optimizer.bin", "random_states_0.pkl"}
    assert meta == {"step": 3, "tasks": specs, "num_processes": 1}
    torch.testing.assert_close(
        load_file(tmp_path / "checkpoint-3" / MODEL_FILE)["weight"], model.weight
    )

    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    with pytest.raises(UserError) as error:
        check_finite(4, model)
    assert str(error.value) == (
        "step 4: the weights are no longer finite (weight holds NaN/inf); nothing was saved. "
        "Lower --learning-rate or resume from an earlier checkpoint"
    )


def test_check_tasks_refuses_changed_labels(tmp_path):
    checkpoint = fake_checkpoint(tmp_path, 4)
    saved = [{"name": "a", "type": "classification", "labels": ["x", "y"], "metrics": ["f1"]}]
    (checkpoint / CHECKPOINT_META).write_text(json.dumps({"step": 4, "tasks": saved}))
    check_tasks(checkpoint, [{**saved[0], "metrics": ["accuracy"]}])  # metrics may change
    with pytest.raises(UserError) as error:
        check_tasks(checkpoint, [{**saved[0], "labels": ["y", "x"]}])
    assert str(error.value) == (
        f"--resume-from-checkpoint: {checkpoint}: task a: the card's labels (['y', 'x']) "
        "differs from the checkpoint's (['x', 'y'])"
    )


def make_loaders(seed: int = 3) -> dict[str, DataLoader]:
    return {
        task: DataLoader(
            list(range(size)),
            batch_size=2,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        for task, size in (("a", 5), ("b", 4))
    }


def test_task_streams_resume_batch_for_batch():
    order = ["a", "b", "a", "a", "b", "a", "b", "a", "a", "b", "b", "a", "a"]
    streams = TaskStreams(make_loaders())
    for task in order[:7]:  # a: 4 batches (epoch 1 started), b: 3 (mid-epoch 1)
        streams.next(task)
    state = streams.state_dict()
    expected = [streams.next(task).tolist() for task in order[7:]]

    resumed = TaskStreams(make_loaders())
    resumed.load_state_dict(state)
    assert [resumed.next(task).tolist() for task in order[7:]] == expected
    assert resumed.epochs == streams.epochs and resumed.taken == streams.taken


def test_resumed_tiny_run_keeps_its_vocabulary(tiny_tasks, tmp_path, monkeypatch, fresh_accelerate):
    """`--model tiny` learns its vocabulary once; resuming (in the run's own output folder, over
    a newer checkpoint of the same run) reads the checkpoint's instead of learning another."""
    cards, data, _ = tiny_tasks
    output = tmp_path / "out"
    flags = [
        "--model", "tiny", "--cards", str(cards), "--data-dir", str(data), "--output-dir",
        str(output), "--batch-size", "4", "--checkpoint-every", "1", "--log-every", "1",
    ]  # fmt: skip
    training.run(parse_args([*flags, "--max-steps", "2"]), [])
    vocab = AutoTokenizer.from_pretrained(output / "checkpoint-1").get_vocab()
    reset_accelerate()

    def learn_vocabulary(texts):
        raise AssertionError("a resumed run learned a new vocabulary")

    monkeypatch.setattr(mtnlp.modeling.tiny, "train_wordpiece", learn_vocabulary)
    resume = ["--max-steps", "3", "--resume-from-checkpoint", str(output / "checkpoint-1")]
    training.run(parse_args([*flags, *resume]), [])
    assert AutoTokenizer.from_pretrained(output).get_vocab() == vocab
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-1" and summary["steps"] == 3
    assert sum(summary["task_steps"].values()) == 3
    assert [p.name for p in list_checkpoints(output)] == [f"checkpoint-{i}" for i in (1, 2, 3)]


# ------------------------------------------------------------------------------ NaN / inf losses
def test_nonfinite_loss_skips_update_then_stops(
    tiny_tasks, tmp_path, monkeypatch, caplog, fresh_accelerate
):
    """NaN losses at steps 3, 5 and 6: step 3's update is skipped with a warning; 5 and 6 in a
    row reach --max-bad-steps 2 and stop the run; no checkpoint ever holds non-finite weights."""
    forward, calls = MultiTaskModel.forward, []

    def poisoned(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if self.training:
            calls.append(kwargs["task"])
            if len(calls) in (3, 5, 6):
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(MultiTaskModel, "forward", poisoned)
    cards, data, _ = tiny_tasks
    output = tmp_path / "out"
    args = parse_args([
        "--model", "tiny", "--cards", str(cards), "--data-dir", str(data), "--output-dir",
        str(output), "--max-steps", "8", "--batch-size", "4", "--learning-rate", "1e-2",
        "--checkpoint-every", "1", "--max-bad-steps", "2", "--log-every", "4",
    ])  # fmt: skip
    with pytest.raises(UserError) as error:
        training.run(args, [])
    assert str(error.value) == (
        f"step 6: the loss of task {calls[5]} was NaN/inf in 2 steps in a row "
        "(--max-bad-steps 2); training stopped. Lower --learning-rate, check the data, or resume "
        "from an earlier checkpoint"
    )
    warnings = [r.getMessage() for r in caplog.records if r.name == "mtnlp.training.step"]
    assert warnings == [
        f"step 3: the loss of task {calls[2]} is NaN/inf; this update is skipped (1 in a row, "
        "stopping at --max-bad-steps 2)",
        f"step 5: the loss of task {calls[4]} is NaN/inf; this update is skipped (1 in a row, "
        "stopping at --max-bad-steps 2)",
    ]
    assert [p.name for p in list_checkpoints(output)] == [f"checkpoint-{i}" for i in range(1, 6)]
    weights = {i: load_file(output / f"checkpoint-{i}" / MODEL_FILE) for i in range(1, 6)}
    for step in weights:
        assert all(torch.isfinite(v).all() for v in weights[step].values())
    encoder = "encoder.embeddings.word_embeddings.weight"
    assert torch.equal(weights[3][encoder], weights[2][encoder])  # step 3 skipped
    assert not torch.equal(weights[4][encoder], weights[3][encoder])  # step 4 trained
    assert torch.equal(weights[5][encoder], weights[4][encoder])  # step 5 skipped
    assert not (output / MODEL_FILE).exists()  # no final model from a stopped run
