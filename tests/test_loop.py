"""The loop's pieces and the bugs the redesign fixed: each test fails on the code before it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_runs import write_tiny_tasks

from mtnlp import load_cards
from mtnlp.training import loop, stages
from mtnlp.training.args import parse_args
from mtnlp.training.loop import train
from mtnlp.training.mixing import TaskStreams

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_tasks(tmp_path_factory.mktemp("tiny"), train_size=16, dev_size=5)


def flags(tiny: tuple[Path, Path], output: Path, tasks: str, *extra: str) -> list[str]:
    cards, data = tiny
    return [
        "--model", "tiny", "--cards", str(cards), "--data-dir", str(data), "--tasks", tasks,
        "--output-dir", str(output), "--batch-size", "4", "--max-steps", "2", *extra,
    ]  # fmt: skip


class Loader:
    """A loader of `size` examples in batches of `rows` (one process's share)."""

    def __init__(self, size: int, rows: int) -> None:
        self.dataset = list(range(size))
        self.rows = rows

    def __iter__(self):
        for _ in range(-(-len(self.dataset) // (2 * self.rows))):  # batches per process
            yield {"input_ids": torch.zeros(self.rows, 3)}


def test_padded_duplicates_of_an_uneven_last_batch_are_not_counted():
    """5 examples on 2 processes, 2 rows each: accelerate pads the second batch with
    duplicates, so it trains on 1 new example, not 4 (examples_per_second counted 8)."""
    streams = TaskStreams({"a": Loader(size=5, rows=2)}, num_processes=2)
    counts = []
    for _ in range(3):  # the third batch starts the next epoch
        batch = streams.next("a")
        counts.append(streams.count("a", batch["input_ids"].shape[0]))
    assert counts == [4, 1, 4]
    assert streams.state_dict()["seen"] == {"a": 4}


def test_successive_snapshots_follow_every_micro_batch_of_a_step(tiny, tmp_path):
    """With gradient accumulation, the lower task trained in the first micro-batch of a step
    must be snapshotted too (before: only the last micro-batch's tasks were)."""
    cards, _ = tiny
    tag = next(card for card in load_cards([cards]) if card.name == "tag")
    upper = tag.replace(
        name="tag2", stack_on="tag", task_layer={"type": "bilstm"}, successive_regularization=0.1
    )
    output = tmp_path / "out"
    argv = flags(tiny, output, "tag,tag2", "--sampler", "round_robin", "--max-steps", "1")
    args = parse_args([*argv, "--gradient-accumulation-steps", "2", "--checkpoint-every", "1"])
    train(args, [tag, upper])  # the step's micro-batches: tag, then tag2
    saved = torch.load(output / "checkpoint-1" / "custom_checkpoint_0.pkl", weights_only=True)
    assert list(saved["successive"]) == ["tag"]  # pulled toward tag's update of this step
    assert all(value.isfinite().all() for value in saved["successive"]["tag"].values())


def test_finetune_each_pushes_once_the_multi_task_model(tiny, tmp_path, monkeypatch):
    """Every stage used to push to the same repository, which ended with the last task's model."""
    pushed = []

    def recording_push(folder, repo_id, **kwargs):
        pushed.append((Path(folder), repo_id))

    monkeypatch.setattr(stages, "push_to_hub", recording_push)
    monkeypatch.setattr(loop, "push_to_hub", recording_push)
    output = tmp_path / "out"
    argv = flags(tiny, output, "cls,reg", "--finetune-each", "--finetune-max-steps", "1")
    stages.run(parse_args([*argv, "--push-to-hub", "--hub-model-id", "me/tiny-mt"]))
    assert pushed == [(output, "me/tiny-mt")]
    card = (output / "README.md").read_text()
    assert "finetuned/cls" in card and "finetuned/reg" in card  # where the stages' models are


def test_the_summary_names_no_local_folder(tiny, tmp_path):
    """train_summary.json is pushed: absolute paths of the machine it ran on stay out of it."""
    output = tmp_path / "out"
    args = parse_args(flags(tiny, output, "cls"))
    train(args, load_cards(args.cards, args.task_list))
    text = (output / "train_summary.json").read_text()
    assert str(tmp_path) not in text
    summary = json.loads(text)["args"]
    assert summary["output_dir"] == "out" and summary["cards"] == ["cards"]
    assert summary["model"] == "tiny" and summary["sampler"] == "proportional"
