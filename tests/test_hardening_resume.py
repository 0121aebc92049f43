"""Issue 11, items 4, 7 and 13: resume is exact with `--keep-best` and successive regularization,
refuses incomplete checkpoints and another `--model`, warns about changed schedule flags; resuming
from an older checkpoint drops the abandoned run's newer ones; a folder holding only a killed
run's leftovers is no obstacle; one run at a time per output folder, checked writable at start.

Runs are in-process (`training.train`) and "killed" by an exception from `on_step`, after the
step's checkpoint; compared runs load one saved tiny encoder (`--model tiny` learns a vocabulary
per run)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_resume import run_recipe
from tiny_runs import CARDS, reset_accelerate, write_tiny_tasks

from mtnlp import training
from mtnlp.artifacts import run_folder
from mtnlp.artifacts.run_folder import TRAIN_LOG
from mtnlp.cards.load import load_cards
from mtnlp.data.read import training_text
from mtnlp.modeling.tiny import tiny_bert, train_wordpiece
from mtnlp.training import callbacks, setup
from mtnlp.training.args import parse_args
from mtnlp.training.callbacks import OnStep
from mtnlp.training.checkpointing import MODEL_FILE, list_checkpoints
from mtnlp.utils import files
from mtnlp.utils.errors import UserError
from mtnlp.utils.files import LOCK_FILE, output_lock

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# the tiny `tag` task's card, stacked on it as JMT's next task, pulled toward it
STACKED = CARDS["tag"].replace("name: tag", "name: upper") + (
    "stack_on: tag\n"
    "task_layer: {type: bilstm, hidden_size: 8, label_embedding_size: 4, dropout: 0.0}\n"
    "successive_regularization: 1.0\n"
)


class Killed(Exception):
    """Stands for a kill right after a step's checkpoint."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Cards (cls, reg, tag and `upper`, stacked on tag), data and a tiny encoder folder."""
    root = tmp_path_factory.mktemp("hardening_resume")
    cards, data = write_tiny_tasks(root, train_size=16)
    (cards / "upper.yaml").write_text(STACKED, encoding="utf-8")
    tokenizer = train_wordpiece(training_text(load_cards([cards]), [data]))
    tiny_bert(tokenizer).save_pretrained(root / "encoder")
    tokenizer.save_pretrained(root / "encoder")
    return cards, data, root / "encoder"


@pytest.fixture(autouse=True)
def fresh_accelerate(monkeypatch):
    """Clean accelerate singletons around each test; no report plots (slow, not tested here)."""
    monkeypatch.setattr(run_folder, "write_report", lambda *args, **kwargs: None)
    reset_accelerate()
    yield
    reset_accelerate()


def flags(tiny, output: Path, tasks: str, *extra: str) -> list[str]:
    cards, data, encoder = tiny
    return [
        "--model", str(encoder), "--cards", str(cards), "--data-dir", str(data), "--tasks", tasks,
        "--output-dir", str(output), "--max-steps", "12", "--batch-size", "4",
        "--eval-batch-size", "4", "--learning-rate", "3e-3", "--log-every", "1", "--seed", "7",
        *extra,
    ]  # fmt: skip


def train(argv: list[str], kill_at: int | None = None, on_step=None) -> dict:
    """One in-process run (raising `Killed` after step `kill_at`); its dev results."""
    args = parse_args(argv)

    def step_done(step: int, tasks: list[str]) -> None:
        if on_step is not None:
            on_step(step, tasks)
        if step == kill_at:
            raise Killed

    reset_accelerate()
    try:
        return training.train(args, load_cards(args.cards, args.task_list), [OnStep(step_done)])
    finally:
        reset_accelerate()


def assert_same_weights(got: Path, want: Path) -> None:
    expected, weights = load_file(want / MODEL_FILE), load_file(got / MODEL_FILE)
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6, msg=name)


def summary(output: Path) -> dict:
    return json.loads((output / "train_summary.json").read_text())


def killed_and_resumed(argv: list[str], output: Path, kill_at: int, **hooks) -> None:
    with pytest.raises(Killed):
        train(argv, kill_at=kill_at, **hooks)
    train([*argv, "--resume-from-checkpoint", "latest"], **hooks)
    assert summary(output)["resumed_from"] == f"checkpoint-{kill_at}"


# ------------------------------------------------------------------------------ item 4
def test_keep_best_resumes_exactly(tiny, tmp_path, monkeypatch):
    """The dev score peaks at step 4, before the checkpoint of step 6: the resumed run must
    remember that evaluation (and its weights) to end like the uninterrupted run."""
    evaluate, done = callbacks.evaluate, {"step": 0}

    def peak_at_step_4(*args, **kwargs):  # the step being evaluated: one after the last done
        results = evaluate(*args, **kwargs)
        bonus = 10.0 if done["step"] + 1 == 4 else 0.0
        return {task: {k: v + bonus for k, v in scores.items()} for task, scores in results.items()}

    def on_step(step: int, tasks: list[str]) -> None:
        done["step"] = step

    monkeypatch.setattr(callbacks, "evaluate", peak_at_step_4)
    run = ("--keep-best", "--eval-every", "2", "--checkpoint-every", "3")
    reference = train(flags(tiny, tmp_path / "reference", "cls,tag", *run), on_step=on_step)
    output = tmp_path / "resumed"
    killed_and_resumed(flags(tiny, output, "cls,tag", *run), output, 6, on_step=on_step)

    assert summary(tmp_path / "reference")["best_step"] == summary(output)["best_step"] == 4
    results = json.loads((output / "eval_results.json").read_text())
    assert results.keys() == reference.keys()
    for task, metrics in reference.items():
        assert results[task] == pytest.approx(metrics), task
    assert_same_weights(output, tmp_path / "reference")


def test_successive_regularization_resumes_exactly(tiny, tmp_path):
    """`upper` is pulled toward `tag`'s parameters after tag's last update: the snapshot taken
    before the checkpoint must be restored, not taken anew at tag's next update."""
    run = ("--checkpoint-every", "3")
    train(flags(tiny, tmp_path / "reference", "tag,upper", *run))
    output = tmp_path / "resumed"
    killed_and_resumed(flags(tiny, output, "tag,upper", *run), output, 6)
    assert_same_weights(output, tmp_path / "reference")


@pytest.fixture
def checkpointed(tiny, tmp_path) -> tuple[list[str], Path]:
    """A run of cls with checkpoints at steps 3, 6, 9 and 12: its flags and output folder."""
    argv = flags(tiny, tmp_path / "out", "cls", "--checkpoint-every", "3")
    train(argv)
    return argv, tmp_path / "out"


def test_missing_random_states_are_refused(checkpointed):
    argv, output = checkpointed
    (output / "checkpoint-6" / "random_states_0.pkl").unlink()
    with pytest.raises(UserError) as error:
        train([*argv, "--resume-from-checkpoint", str(output / "checkpoint-6")])
    assert str(error.value) == (
        f"--resume-from-checkpoint: {output}/checkpoint-6: random_states_0.pkl is missing (the "
        "random number generators' states), so the run cannot continue exactly; resume from a "
        "complete checkpoint"
    )
    assert [p.name for p in list_checkpoints(output)][-1] == "checkpoint-12"  # nothing removed


@pytest.mark.parametrize("name", ["random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_a_truncated_state_file_is_one_line(checkpointed, name):
    argv, output = checkpointed
    state = output / "checkpoint-6" / name
    state.write_bytes(state.read_bytes()[:10])
    with pytest.raises(UserError) as error:
        train([*argv, "--resume-from-checkpoint", str(output / "checkpoint-6")])
    message = str(error.value)
    assert message.startswith(f"--resume-from-checkpoint: {output}/checkpoint-6: {name} is damaged")
    assert message.endswith("; resume from a complete checkpoint") and "\n" not in message


def test_keep_best_state_missing_from_an_older_checkpoint_is_named(checkpointed):
    argv, output = checkpointed
    with pytest.raises(UserError) as error:
        train([*argv, "--keep-best", "--resume-from-checkpoint", str(output / "checkpoint-6")])
    assert str(error.value) == (
        f"--resume-from-checkpoint: {output}/checkpoint-6: holds no --keep-best tracker (it was "
        "written without it), so the run cannot continue exactly; resume with the options it was "
        "written with"
    )


def test_another_model_is_refused(checkpointed, tiny):
    argv, output = checkpointed
    _, _, encoder = tiny
    other = [*argv, "--model", "tiny", "--resume-from-checkpoint", "latest"]
    with pytest.raises(UserError) as error:
        train(other)
    assert str(error.value) == (
        f"--resume-from-checkpoint: {output}/checkpoint-12 was written with --model {encoder}; "
        "this run has --model tiny (resume with the checkpoint's --model)"
    )
    meta = json.loads((output / "checkpoint-12" / "checkpoint.json").read_text())
    assert meta["args"]["batch_size"] == 4 and meta["args"]["model"] == str(encoder)


def test_changed_schedule_flags_warn(checkpointed, caplog):
    argv, output = checkpointed
    resume = ["--resume-from-checkpoint", str(output / "checkpoint-9")]
    with caplog.at_level(logging.WARNING, logger="mtnlp.training.checkpointing"):
        train([*argv, "--batch-size", "2", "--max-steps", "10", *resume])
    warnings = [r.getMessage() for r in caplog.records if r.name == "mtnlp.training.checkpointing"]
    assert warnings == [
        f"--resume-from-checkpoint: {output}/checkpoint-9 was written with --batch-size 4; this "
        "run has --batch-size 2, so it will not continue that run exactly",
        f"--resume-from-checkpoint: {output}/checkpoint-9 was written with --max-steps 12; this "
        "run has --max-steps 10, so it will not continue that run exactly",
        f"resuming at step 9: removed checkpoint-12 of {output} (newer than the resumed "
        "checkpoint, from the run that was abandoned there)",
    ]


# ------------------------------------------------------------------------------ item 7
def test_resuming_an_older_checkpoint_drops_the_newer_ones(checkpointed):
    """Resumed at step 6 and killed at step 7: `latest` must find checkpoint-6, not the abandoned
    continuation's checkpoint-12."""
    argv, output = checkpointed
    with pytest.raises(Killed):
        train([*argv, "--resume-from-checkpoint", str(output / "checkpoint-6")], kill_at=7)
    assert [p.name for p in list_checkpoints(output)] == ["checkpoint-3", "checkpoint-6"]


def test_rotation_after_resuming_keeps_this_runs_checkpoints(checkpointed):
    argv, output = checkpointed
    train([*argv, "--keep-checkpoints", "2", "--resume-from-checkpoint", f"{output}/checkpoint-3"])
    assert [p.name for p in list_checkpoints(output)] == ["checkpoint-9", "checkpoint-12"]


def leftovers(output: Path) -> None:
    """What a run killed during its first checkpoint (or its final save) leaves."""
    (output / ".checkpoint-3.tmp").mkdir(parents=True)
    (output / ".checkpoint-3.tmp" / "random_states_0.pkl").write_bytes(b"half")
    (output / ".saving-x1y2").mkdir()
    (output / LOCK_FILE).write_text("pid 1 on gone\n")
    (output / "logs").mkdir()


def test_a_folder_of_leftovers_counts_as_empty_and_is_cleaned(tiny, tmp_path):
    output = tmp_path / "out"
    leftovers(output)
    argv = flags(tiny, output, "cls", "--max-steps", "2")
    with pytest.raises(UserError) as error:
        train([*argv, "--resume-from-checkpoint", "latest"])
    assert str(error.value) == (
        f"--resume-from-checkpoint latest: no checkpoint-<step> folder in {output}; run without "
        "--resume-from-checkpoint to start afresh"
    )
    train(argv)  # the way out the message names
    names = {p.name for p in output.iterdir()}
    assert MODEL_FILE in names and not names & {".checkpoint-3.tmp", ".saving-x1y2", LOCK_FILE}
    assert "logs" not in names  # the dead run's tracker logs do not mix with this run's


def test_resume_latest_in_a_finished_run_without_checkpoints_names_overwrite(tiny, tmp_path):
    output = tmp_path / "out"
    argv = flags(tiny, output, "cls", "--max-steps", "1")
    train(argv)
    with pytest.raises(UserError) as error:
        train([*argv, "--resume-from-checkpoint", "latest"])
    assert str(error.value) == (
        f"--resume-from-checkpoint latest: no checkpoint-<step> folder in {output}; to start "
        "afresh, run without --resume-from-checkpoint and with --overwrite-output-dir"
    )


def test_kill_during_the_first_checkpoint_write(tiny, tmp_path):
    """A real SIGKILL while writing checkpoint-3, the first: `latest` names the way out, and the
    rerun it names starts afresh in that folder."""
    cards, data, encoder = tiny
    tasks = (cards, data, encoder)
    output = tmp_path / "out"
    save = ("--checkpoint-every", "3", "--tasks", "cls")
    killed = run_recipe(tasks, output, *save, kill_during_save=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # the log written as the run went stays too (a leftover: the rerun replaces it)
    assert sorted(p.name for p in output.iterdir()) == [".checkpoint-3.tmp", LOCK_FILE, TRAIN_LOG]

    resumed = run_recipe(tasks, output, *save, "--resume-from-checkpoint", "latest")
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert resumed.stderr.strip().splitlines()[-1] == (
        f"error: --resume-from-checkpoint latest: no checkpoint-<step> folder in {output}; run "
        "without --resume-from-checkpoint to start afresh"
    )
    rerun = run_recipe(tasks, output, *save)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [p.name for p in list_checkpoints(output)] == [f"checkpoint-{i}" for i in (3, 6, 9, 12)]
    assert not list(output.glob(".checkpoint-*")) and not (output / LOCK_FILE).exists()


# ------------------------------------------------------------------------------ item 13
def hold_lock(output: Path, holder: str = "pid 999 on elsewhere") -> int:
    """Lock `output` as another live run would (another open file: flock conflicts even within
    this process); returns the descriptor to close."""
    output.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(output / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(descriptor, f"{holder}\n".encode())
    return descriptor


def test_a_second_run_into_a_locked_folder_is_refused(tiny, tmp_path):
    output = tmp_path / "out"
    descriptor = hold_lock(output)
    try:
        with pytest.raises(UserError) as error:
            train(flags(tiny, output, "cls", "--max-steps", "1"))
    finally:
        os.close(descriptor)
    assert str(error.value) == (
        f"--output-dir: {output}: another run is writing into this folder (pid 999 on elsewhere "
        f"holds {output}/{LOCK_FILE}); wait for it to end, or give another --output-dir"
    )
    assert [p.name for p in output.iterdir()] == [LOCK_FILE]  # the holder's file is left alone


def locked(folder: Path) -> bool:
    """Whether some open file holds `folder`'s lock."""
    if not (folder / LOCK_FILE).exists():
        return False
    descriptor = os.open(folder / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)


def test_the_lock_is_held_while_training_and_released_after(tiny, tmp_path):
    output = tmp_path / "out"
    held = []

    def check(step: int, tasks: list[str]) -> None:
        held.append(locked(output))
        assert (output / LOCK_FILE).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"

    train(flags(tiny, output, "cls", "--max-steps", "2"), on_step=check)
    assert held == [True, True]
    assert not (output / LOCK_FILE).exists()


def test_finetune_each_keeps_the_folder_locked_and_locks_each_stage(tiny, tmp_path, monkeypatch):
    from mtnlp.training import stages

    output, held = tmp_path / "out", []
    stage_train = stages.train

    def checked_stage(args, cards):
        if Path(args.output_dir) == output:  # the multi-task stage
            return stage_train(args, cards)

        def check(step: int, tasks: list[str]) -> None:
            held.append((locked(output), locked(Path(args.output_dir))))

        return stage_train(args, cards, [OnStep(check)])

    monkeypatch.setattr(stages, "train", checked_stage)
    argv = flags(tiny, output, "cls,reg", "--max-steps", "2", "--finetune-each")
    training.run(parse_args([*argv, "--finetune-max-steps", "1"]), [])
    assert held == [(True, True), (True, True)]  # each task's stage: its folder and the run's
    assert not list(output.rglob(LOCK_FILE))
    assert (output / "finetune_results.json").is_file()


def test_a_stale_lock_file_does_not_block(tiny, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / LOCK_FILE).write_text("pid 1 on crashed\n")  # no process holds its OS lock
    train(flags(tiny, output, "cls", "--max-steps", "1"))
    assert (output / MODEL_FILE).is_file() and not (output / LOCK_FILE).exists()


def test_output_dir_is_checked_writable_before_training(tiny, tmp_path, monkeypatch):
    """Root ignores file modes, so the refusal is simulated on the write probe (created with
    `files.new_file`: never through a link)."""
    new_file = files.new_file

    def read_only(path, *args):
        if path.name.startswith(".mtnlp-probe-"):
            raise PermissionError(13, "Permission denied")
        return new_file(path, *args)

    monkeypatch.setattr(files, "new_file", read_only)
    monkeypatch.setattr(setup, "load_task", lambda *a, **k: pytest.fail("data loaded"))
    output = tmp_path / "new" / "out"
    with pytest.raises(UserError) as error:
        train(flags(tiny, output, "cls", "--max-steps", "1"))
    assert str(error.value) == f"--output-dir: {output}: cannot write here (Permission denied)"
    assert not (tmp_path / "new").exists()  # the folders it made for the check are gone


def test_output_lock_leaves_no_empty_folder_and_excludes_this_process_too(tmp_path):
    output = tmp_path / "a" / "b"
    with output_lock(output):
        assert (output / LOCK_FILE).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        with pytest.raises(UserError), output_lock(output):
            pass
        with output_lock(output / "finetuned" / "cls"):  # --finetune-each's nested runs
            pass
    assert not (tmp_path / "a").exists()


def test_a_lock_file_removed_before_flock_is_locked_anew(tmp_path, monkeypatch):
    """Its holder removed the file between this run's open and flock (inside filelock): holding
    that unlinked file would let a third run lock a new one, so the run locks the path anew."""
    flock, path, raced = fcntl.flock, tmp_path / LOCK_FILE, []

    def racing_flock(descriptor: int, operation: int) -> None:
        at_path = path.exists() and os.path.samestat(os.fstat(descriptor), path.stat())
        if operation & fcntl.LOCK_EX and at_path and not raced:
            path.unlink()  # the holder leaves, just before this run's flock
            raced.append(descriptor)
        flock(descriptor, operation)

    monkeypatch.setattr(fcntl, "flock", racing_flock)  # what filelock locks with on Unix
    with output_lock(tmp_path):
        monkeypatch.setattr(fcntl, "flock", flock)
        assert raced and locked(tmp_path)  # the file now at the path is the one held
        assert path.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        with pytest.raises(UserError, match="another run is writing"), output_lock(tmp_path):
            pass  # a third run
    assert not path.exists()
