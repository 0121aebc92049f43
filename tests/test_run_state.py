"""The keyed checkpoint state (`RunState`): named entries, refusals that name what a checkpoint
holds or lacks, the legacy positional layout still resumed, and the callback API around it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_runs import reset_accelerate, write_tiny_tasks

from mtnlp import Callback, load_cards, train
from mtnlp.training.args import parse_args
from mtnlp.training.state import RunState
from mtnlp.utils.errors import UserError

LEGACY = Path(__file__).parent / "fixtures" / "legacy_run"


class Counter:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny tasks exactly as the legacy fixture was trained on (write_tiny_tasks' defaults)."""
    return write_tiny_tasks(tmp_path_factory.mktemp("tiny"))


def run_flags(tiny: tuple[Path, Path], output: Path, *extra: str) -> list[str]:
    cards, data = tiny
    return [
        "--model", "tiny", "--cards", str(cards), "--data-dir", str(data), "--tasks", "cls,tag",
        "--output-dir", str(output), "--max-steps", "8", "--batch-size", "8", "--seed", "7",
        *extra,
    ]  # fmt: skip


def run(argv: list[str], cards=None, callbacks=()) -> dict:
    args = parse_args(argv)
    return train(args, cards or load_cards(args.cards, args.task_list), callbacks)


# ------------------------------------------------------------------------------ unit
def test_entries_are_saved_and_loaded_by_name():
    saved = RunState()
    saved.add("sampler", Counter(3))
    saved.add("keep_best", Counter(5))
    state = saved.state_dict()
    assert state == {"format": 2, "sampler": {"value": 3}, "keep_best": {"value": 5}}

    loaded = RunState()
    sampler, best = Counter(), Counter()
    loaded.add("keep_best", best)  # registration order does not matter, names do
    loaded.add("sampler", sampler)
    loaded.load_state_dict(state)
    assert (sampler.value, best.value) == (3, 5)


def test_a_missing_or_extra_entry_is_named_by_what_it_holds():
    saved = RunState()
    saved.add("sampler", Counter())
    saved.add("keep_best", Counter())
    other = RunState()
    other.where = "ckpt"
    other.add("sampler", Counter())
    other.add("successive", Counter())
    with pytest.raises(UserError) as error:
        other.load_state_dict(saved.state_dict())
    assert str(error.value) == (
        "--resume-from-checkpoint: ckpt: holds no successive regularization snapshots (it was "
        "written without it), so the run cannot continue exactly; resume with the options it "
        "was written with"
    )
    fewer = RunState()
    fewer.where = "ckpt"
    fewer.add("sampler", Counter())
    with pytest.raises(UserError, match="ckpt: holds the --keep-best tracker, which this run"):
        fewer.load_state_dict(saved.state_dict())


def test_two_components_under_one_name_are_a_bug():
    state = RunState()
    state.add("sampler", Counter())
    with pytest.raises(ValueError, match="two resumable components named 'sampler'"):
        state.add("sampler", Counter())


# ------------------------------------------------------------------------------ end to end
def test_a_legacy_positional_checkpoint_resumes_exactly(tiny, tmp_path):
    """checkpoint-4 was written before the keyed state (tests/fixtures/legacy_run/README.md):
    resumed today, the run ends where the uninterrupted run of that code ended."""
    output = tmp_path / "out"
    shutil.copytree(LEGACY / "checkpoint-4", output / "checkpoint-4")
    assert (output / "checkpoint-4" / "custom_checkpoint_5.pkl").is_file()  # positional
    flags = run_flags(tiny, output, "--keep-best", "--eval-every", "2", "--checkpoint-every", "4")
    results = run([*flags, "--resume-from-checkpoint", "latest"])
    expected = json.loads((LEGACY / "uninterrupted_eval_results.json").read_text())
    assert results.keys() == expected.keys()
    for task, metrics in expected.items():
        assert results[task] == pytest.approx(metrics, abs=1e-6), task
    saved = torch.load(output / "checkpoint-8" / "custom_checkpoint_0.pkl", weights_only=True)
    assert not (output / "checkpoint-8" / "custom_checkpoint_1.pkl").exists()  # now keyed
    assert list(saved) == [
        "format", "schedule", "sampler", "weighting", "loop", "epoch_losses", "keep_best",
    ]  # fmt: skip


def test_a_legacy_checkpoint_of_other_options_is_refused_by_count(tiny, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(LEGACY / "checkpoint-4", output / "checkpoint-4")
    with pytest.raises(UserError, match="holds 6 saved states, this run has 5"):
        run([*run_flags(tiny, output), "--resume-from-checkpoint", "latest"])


def test_keep_best_checkpoint_resumed_with_successive_regularization_is_refused(tiny, tmp_path):
    """The positional layout loaded the keep-best tracker into the successive regularizer (same
    count of files) and ended in a traceback; the keyed state names the difference."""
    cards, _ = tiny
    tag = next(card for card in load_cards([cards]) if card.name == "tag")
    stacked = tag.replace(name="tag2", stack_on="tag", task_layer={"type": "bilstm"})
    output = tmp_path / "out"
    flags = [*run_flags(tiny, output, "--checkpoint-every", "4"), "--tasks", "tag,tag2"]
    run([*flags, "--keep-best", "--max-steps", "4"], [tag, stacked])
    reset_accelerate()
    pulled = stacked.replace(successive_regularization=0.1)
    with pytest.raises(UserError) as error:
        run([*flags, "--resume-from-checkpoint", "latest"], [tag, pulled])
    assert str(error.value) == (
        f"--resume-from-checkpoint: {output}/checkpoint-4: holds no successive regularization "
        "snapshots (it was written without it), so the run cannot continue exactly; resume "
        "with the options it was written with"
    )


class EarlyStopping(Callback):
    """The documented example: stop when a task's main metric has not improved for a while."""

    name = "early_stopping"

    def __init__(self, task: str, metric: str, patience: int) -> None:
        self.task, self.metric, self.patience = task, metric, patience
        self.best, self.bad, self.seen = float("-inf"), 0, []

    def on_evaluate(self, run, step, metrics):
        self.seen.append(step)
        score = metrics[self.task][self.metric]
        self.best, self.bad = (score, 0) if score > self.best else (self.best, self.bad + 1)
        run.should_stop = self.bad >= self.patience

    def state_dict(self):
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state):
        self.best, self.bad = state["best"], state["bad"]


def test_callbacks_see_evaluations_and_can_stop_training(tiny, tmp_path, monkeypatch):
    from mtnlp.training import callbacks

    scores = iter([0.5, 0.4, 0.3, 0.9, 0.9])  # no improvement after step 2: stop at step 6
    monkeypatch.setattr(callbacks, "evaluate", lambda *args: {"cls": {"accuracy": next(scores)}})
    stopper = EarlyStopping("cls", "accuracy", patience=2)
    output = tmp_path / "out"
    flags = [*run_flags(tiny, output, "--eval-every", "2", "--checkpoint-every", "4")]
    run([*flags, "--tasks", "cls"], callbacks=[stopper])
    summary = json.loads((output / "train_summary.json").read_text())
    assert stopper.seen == [2, 4, 6] and summary["steps"] == 6
    saved = torch.load(output / "checkpoint-4" / "custom_checkpoint_0.pkl", weights_only=True)
    assert saved["early_stopping"] == {"best": 0.5, "bad": 1}  # a callback's state, by name
