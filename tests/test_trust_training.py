"""Issue 14 ("trust boundaries and rough edges"), the training items: a resume warns about every
changed setting and refuses a `--max-steps` it has already passed (8); Ctrl-C saves the current
step and says how to resume, exit 130 (11); `train_log.jsonl` grows as training goes and the dev
metrics get their own line (14); `model.safetensors` gets the umask's permissions (18); `--help`
says each default once, booleans are flags, the trackers name their extras, a launch that starts
one process of several is warned about (19); files mtnlp writes are never written through a link
(3).

Runs are in-process (`training.train`) on the tiny tasks of `tiny_runs.py`, resumed from the
checkpoints of one module-wide run into fresh output folders."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
from pathlib import Path

import pytest
from tiny_runs import reset_accelerate, write_tiny_tasks

from mtnlp import training
from mtnlp.artifacts.run_folder import TRAIN_LOG, LiveLog
from mtnlp.cards.load import load_cards
from mtnlp.data.read import training_text
from mtnlp.modeling.tiny import tiny_bert, train_wordpiece
from mtnlp.training import callbacks, loop, setup
from mtnlp.training.args import TrainArguments, _Parser, parse_args
from mtnlp.training.callbacks import OnStep
from mtnlp.utils.errors import UserError, exit_on_user_error
from mtnlp.utils.files import new_file

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")  # conftest.py


class Killed(Exception):
    """Stands for a kill after a step."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("trust_training")
    cards, data = write_tiny_tasks(root, train_size=16)
    tokenizer = train_wordpiece(training_text(load_cards([cards]), [data]))
    tiny_bert(tokenizer).save_pretrained(root / "encoder")
    tokenizer.save_pretrained(root / "encoder")
    return cards, data, root / "encoder"


def flags(tiny, output: Path, *extra: str) -> list[str]:
    cards, data, encoder = tiny
    return [
        "--model", str(encoder), "--cards", str(cards), "--data-dir", str(data),
        "--tasks", "cls,tag", "--output-dir", str(output), "--max-steps", "6",
        "--batch-size", "4", "--eval-batch-size", "4", "--learning-rate", "3e-3",
        "--log-every", "1", "--seed", "7", *extra,
    ]  # fmt: skip


def train(argv: list[str], on_step=None) -> dict:
    args = parse_args(argv)
    hooks = [OnStep(on_step)] if on_step is not None else []
    reset_accelerate()
    try:
        return training.train(args, load_cards(args.cards, args.task_list), hooks)
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def checkpointed(tiny, tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished 6-step run with checkpoints at steps 3 and 6 (umask 022)."""
    output = tmp_path_factory.mktemp("checkpointed") / "run"
    umask = os.umask(0o022)
    try:
        train(flags(tiny, output, "--checkpoint-every", "3"))
    finally:
        os.umask(umask)
        reset_accelerate()
    return output, flags(tiny, output)


def resumed_flags(checkpointed, output: Path, *extra: str) -> list[str]:
    run, argv = checkpointed
    argv = [*argv, "--output-dir", str(output), *extra]
    return [*argv, "--resume-from-checkpoint", str(run / "checkpoint-3")]


# ------------------------------------------------------------------------------ item 8
def test_resume_warns_about_every_changed_setting(checkpointed, tmp_path, caplog):
    argv = resumed_flags(
        checkpointed, tmp_path / "out",
        "--seed", "8", "--sampler", "uniform", "--learning-rate", "1e-3",
        "--warmup-ratio", "0.2", "--log-every", "2", "--eval-batch-size", "8",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mtnlp.training.checkpointing"):
        train(argv)
    warnings = [r.getMessage() for r in caplog.records if r.name == "mtnlp.training.checkpointing"]
    checkpoint = checkpointed[0] / "checkpoint-3"
    changed = [("learning-rate", "0.003", "0.001"), ("warmup-ratio", "0.1", "0.2")]
    changed += [("seed", "7", "8"), ("sampler", "proportional", "uniform")]
    assert warnings == [
        f"--resume-from-checkpoint: {checkpoint} was written with --{name} {old}; this run has "
        f"--{name} {new}, so it will not continue that run exactly"
        for name, old, new in changed
    ]  # not --log-every, --eval-batch-size or --output-dir: they do not change the result


@pytest.mark.parametrize("max_steps", ["3", "2"])
def test_max_steps_at_or_below_the_checkpoint_is_refused(checkpointed, tmp_path, max_steps):
    argv = resumed_flags(checkpointed, tmp_path / "out", "--max-steps", max_steps)
    with pytest.raises(UserError) as error:
        train(argv)
    assert str(error.value) == (
        f"--max-steps {max_steps}: {checkpointed[0] / 'checkpoint-3'} is already at step 3; "
        "give a --max-steps above 3 to train on, or resume an earlier checkpoint"
    )
    assert not (tmp_path / "out" / "train_summary.json").exists()


# ------------------------------------------------------------------------------ item 11
@exit_on_user_error
def command(argv: list[str], on_step=None) -> dict:
    """`train` as an entry point runs it: through `exit_on_user_error`."""
    return train(argv, on_step)


def ctrl_c_at(at: int):
    def on_step(step: int, tasks: list[str]) -> None:
        if step == at:
            raise KeyboardInterrupt

    return on_step


def test_ctrl_c_saves_the_step_and_says_how_to_resume(tiny, tmp_path, capsys):
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        command(flags(tiny, output), ctrl_c_at(2))
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"training interrupted at step 2; to resume from {output}/checkpoint-2, run the same "
        f"command with --resume-from-checkpoint {output}/checkpoint-2"
    )
    assert json.loads((output / "checkpoint-2" / "checkpoint.json").read_text())["step"] == 2
    assert not (output / ".mtnlp.lock").exists()  # the lock is released
    train([*flags(tiny, output), "--resume-from-checkpoint", str(output / "checkpoint-2")])
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["resumed_from"] == "checkpoint-2"


def test_ctrl_c_mid_step_names_the_last_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    """Interrupted inside a step (the update half done), the step cannot be saved: the message
    names the newest checkpoint instead, or says there is none."""
    train_step = loop.train_step

    def interrupted_in_step_4(run, step):
        if step == 4:
            raise KeyboardInterrupt
        return train_step(run, step)

    monkeypatch.setattr(loop, "train_step", interrupted_in_step_4)
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        command(flags(tiny, output, "--checkpoint-every", "2"))
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"training interrupted at step 3; to resume from {output}/checkpoint-2, run the same "
        f"command with --resume-from-checkpoint {output}/checkpoint-2"
    )
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-2"]
    with pytest.raises(SystemExit):
        command(flags(tiny, tmp_path / "none"))
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "training interrupted at step 3; no checkpoint to resume from"
    )


# ------------------------------------------------------------------------------ item 14
def test_train_log_is_written_as_training_goes(tiny, tmp_path, monkeypatch):
    output = tmp_path / "out"
    seen: dict[int, list[dict]] = {}
    written: list[str] = []
    monkeypatch.setattr(callbacks.tqdm, "write", lambda text, *a, **k: written.append(text))

    def read_log(step: int, tasks: list[str]) -> None:
        lines = (output / TRAIN_LOG).read_text().splitlines()
        seen[step] = [json.loads(line) for line in lines]

    train(flags(tiny, output, "--eval-every", "2"), read_log)
    windows = {step: [r["step"] for r in records if "loss" in r] for step, records in seen.items()}
    assert windows[1] == [1] and windows[3] == [1, 2, 3]  # each window record as it comes
    assert any("eval" in record for record in seen[3])  # step 2's dev metrics
    final = [json.loads(line) for line in (output / TRAIN_LOG).read_text().splitlines()]
    assert final[: len(seen[5])] == seen[5]
    assert [text.split(":")[0] for text in written] == ["step 2", "step 4"]  # own lines


def test_live_log_replaces_a_link_never_writes_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    path = tmp_path / TRAIN_LOG
    path.symlink_to(victim)
    (tmp_path / f".{TRAIN_LOG}.{os.getpid()}").symlink_to(victim)  # at its temporary name too
    with LiveLog(path, [{"step": 1}]) as log:
        log.append({"step": 2})
        assert [json.loads(line) for line in path.read_text().splitlines()] == log
    assert victim.read_text() == "keep me\n"
    assert not path.is_symlink()


def test_new_file_refuses_an_existing_file_or_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (tmp_path / "link").symlink_to(victim)
    for name in ("link", "victim.txt"):
        with pytest.raises(UserError, match="already exists; mtnlp writes only files it creates"):
            new_file(tmp_path / name)
    assert victim.read_text() == "keep me\n"


# ------------------------------------------------------------------------------ item 18
def test_weights_get_the_permissions_of_the_other_files(checkpointed):
    run, _ = checkpointed
    for folder in (run, run / "checkpoint-3"):
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
        assert modes["model.safetensors"] == 0o644, folder
    assert stat.S_IMODE((run / "config.json").stat().st_mode) == 0o644


# ------------------------------------------------------------------------------ item 19
def test_help_says_each_default_once_and_booleans_are_flags():
    text = " ".join(_Parser(TrainArguments, prog="mtnlp train").format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: all cards) (default" not in text
    assert "(default: bert-base-uncased)" in text
    assert "[--keep-best | --no-keep-best]" in text and "[KEEP_BEST]" not in text
    assert "--keep-best, --keep_best, --no-keep-best, --no_keep_best" in text
    assert "mtnlp[tensorboard]" in text and "mtnlp[wandb]" in text
    assert parse_args(["--keep-best"]).keep_best is True
    assert parse_args(["--keep_best", "--no-keep-best"]).keep_best is False
    assert parse_args([]).keep_best is False
    with pytest.raises(UserError, match="ignored explicit argument"):
        parse_args(["--keep-best=yes"])


def test_config_file_booleans_still_work(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("keep_best: true\nfinetune-each: true\n")
    args = parse_args(["--config", str(config)])
    assert args.keep_best is True and args.finetune_each is True
    assert parse_args(["--config", str(config), "--no-keep-best"]).keep_best is False


def test_a_launch_that_starts_one_process_of_several_is_warned_about(monkeypatch, caplog, tmp_path):
    """`accelerate launch --cpu --num_processes 2` runs ONE process (it sets MASTER_ADDR, no
    WORLD_SIZE); a WORLD_SIZE above the processes accelerate sees is warned about too."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with caplog.at_level(logging.WARNING, logger="mtnlp.training.setup"):
        setup.make_accelerator(parse_args(["--output-dir", str(tmp_path)]))
        reset_accelerate()
        monkeypatch.delenv("MASTER_ADDR")
        setup.warn_lone_process(1)  # a plain run: no warning
        monkeypatch.setenv("WORLD_SIZE", "2")
        setup.warn_lone_process(1)
        setup.warn_lone_process(2)
    messages = [r.getMessage() for r in caplog.records if r.name == "mtnlp.training.setup"]
    assert len(messages) == 2
    assert messages[0].startswith(
        "accelerate launch asked for several processes, but this run is ONE process"
    )
    assert messages[1] == (
        "WORLD_SIZE is 2, but this run has 1 process(es): the launch did not start the "
        "processes it asked for (docs/distributed.md)"
    )


def test_the_write_probe_never_writes_through_a_link(tmp_path):
    from mtnlp.utils.files import WRITE_PROBE, writable_output_dir

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    output = tmp_path / "out"
    output.mkdir()
    (output / WRITE_PROBE.format(pid=os.getpid())).symlink_to(victim)
    writable_output_dir(output)
    assert victim.read_text() == "keep me\n"  # before: truncated through the link
    assert list(output.iterdir()) == []


def test_a_link_at_the_staging_name_is_removed_not_followed(tmp_path):
    from mtnlp.utils.files import atomic_folder, staging_folder

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me\n")
    final = tmp_path / "final"
    staging_folder(final).symlink_to(elsewhere)
    with atomic_folder(final) as staging:
        (staging / "new.txt").write_text("new\n")
    assert (elsewhere / "precious.txt").read_text() == "keep me\n"
    assert [path.name for path in final.iterdir()] == ["new.txt"]


@pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
    reason="a SIGINT handler is installed: the loop leaves Ctrl-C to it",
)
def test_a_real_ctrl_c_mid_step_lets_the_step_finish_and_saves_it(
    tiny, tmp_path, capsys, monkeypatch
):
    """SIGINT arrives inside step 3 (where a run spends its time): the step finishes, is saved,
    and the run stops there."""
    train_step = loop.train_step

    def ctrl_c_in_step_3(run, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(run, step)

    monkeypatch.setattr(loop, "train_step", ctrl_c_in_step_3)
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        command(flags(tiny, output))
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"training interrupted at step 3; to resume from {output}/checkpoint-3, run the same "
        f"command with --resume-from-checkpoint {output}/checkpoint-3"
    )
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
