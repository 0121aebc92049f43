"""End to end: every sampler and every loss weighting trains in the real loop (tiny model, a few
steps, synthetic TSV tasks), the batch modes, logging to trackers, flags and config files, and
MT-DNN's two-stage recipe (`--finetune-each`)."""

from __future__ import annotations

import json
import random
import runpy
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from accelerate.tracking import GeneralTracker, get_available_trackers, register_tracker_class

from mtnlp.modeling.model import MultiTaskModel
from mtnlp.training.args import parse_args
from mtnlp.training.callbacks import trackers
from mtnlp.training.loop import train
from mtnlp.training.mixing import build_task_sampler, epoch_length
from mtnlp.training.samplers import SAMPLERS
from mtnlp.training.selection import BestCheckpoint, dev_score
from mtnlp.training.stages import FINETUNED, MULTI_TASK, markdown_table
from mtnlp.training.weighting import WEIGHTINGS
from mtnlp.utils.errors import UserError

from conftest import REPO, TINY_TASKS

WORDS = ["the", "a", "cat", "dog", "film", "plot", "good", "bad", "great", "red", "blue"]
TASKS = ["sent", "score"]  # a classification and a regression task


def _write_task(root: Path, task: str, rng: random.Random, sizes: dict[str, int]) -> None:
    folder = root / "data" / task
    folder.mkdir(parents=True)
    for split, size in sizes.items():
        rows = ["sentence\tlabel"]
        for _ in range(size):
            words = rng.choices(WORDS, k=6)
            if task == "sent":
                label = "pos" if {"good", "great"} & set(words) else "neg"
            else:
                label = str(float(words.count("red") + words.count("blue")))
            rows.append(" ".join(words) + "\t" + label)
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    head = "type: classification\nlabels: [neg, pos]\nmetrics: [accuracy]\n"
    if task == "score":
        head = "type: regression\nmetrics: [pearson]\n"
    (root / "cards" / f"{task}.yaml").write_text(
        f"name: {task}\n{head}inputs: [sentence]\nsource:\n  local:\n    format: tsv\n"
        f"    files: {{train: {task}/train.tsv, validation: {task}/dev.tsv}}\n"
    )


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """Two tiny TSV tasks and their cards: 32 training and 16 dev examples each."""
    root = tmp_path_factory.mktemp("synthetic")
    (root / "cards").mkdir()
    rng = random.Random(0)
    for task in TASKS:
        _write_task(root, task, rng, {"train": 32, "dev": 16})
    return root


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(autouse=True)
def no_report_plots(monkeypatch):
    """The training report's plots (tested elsewhere) take seconds per run; not needed here."""
    monkeypatch.setattr(
        "mtnlp.artifacts.run_folder.write_report", lambda *args, **kwargs: None, raising=False
    )


def run_args(synthetic: Path, output: Path, *flags: str) -> list[str]:
    return [
        "--model", "tiny", "--cards", str(synthetic / "cards"), "--data-dir",
        str(synthetic / "data"), "--max-steps", "3", "--batch-size", "8", "--log-every", "1",
        "--learning-rate", "1e-3", "--output-dir", str(output), *flags,
    ]  # fmt: skip


def tiny_run(synthetic: Path, output: Path, *flags: str) -> tuple[dict, list[dict]]:
    """Train in-process; return the run's summary and its train_log.jsonl records."""
    from mtnlp.cards.load import load_cards

    args = parse_args(run_args(synthetic, output, *flags))
    train(args, load_cards(args.cards))
    summary = json.loads((output / "train_summary.json").read_text())
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return summary, log


# ------------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("name", SAMPLERS.names())
def test_each_sampler_trains(synthetic, tmp_path, name):
    summary, log = tiny_run(synthetic, tmp_path / "out", "--sampler", name)
    steps = summary["task_steps"]
    assert sum(steps.values()) == 3 and summary["steps"] == 3
    if name == "sequential":  # the 4 batches of the first card (score.yaml) come first
        assert steps == {"score": 3, "sent": 0}
    if name == "round_robin":
        assert steps == {"score": 2, "sent": 1}
    windows = [record for record in log if "share" in record]
    assert len(windows) == 3
    for record in windows:  # one micro-batch per step: one task has the whole share
        assert sorted(record["share"].values()) == [0.0, 1.0]
        assert set(record["loss"]) == {t for t, share in record["share"].items() if share}
        assert record["weight"] == {"sent": 1.0, "score": 1.0}
    assert set(json.loads((tmp_path / "out" / "eval_results.json").read_text())) == set(TASKS)


def test_epoch_length_per_batch_mode():
    assert epoch_length("one_task", {"a": 4, "b": 10}) == 14
    assert epoch_length("all_tasks", {"a": 4, "b": 10}) == 10


def test_examples_cap_is_converted_to_batches_of_all_processes():
    # 40 examples = ceil(40 / (8 per batch * 2 processes)) = 3 batches per process
    sampler = build_task_sampler(
        "proportional",
        {"a": 2, "b": 100},
        seed=42,
        sampling_weights={"a": 1.0, "b": 1.0},
        num_epochs=1,
        temperature=2.0,
        examples_cap=40,
        examples_per_batch=8 * 2,
    )
    assert sampler.capped_sizes.tolist() == [2.0, 3.0]
    assert sampler.probabilities() == pytest.approx({"a": 0.4, "b": 0.6})


# ------------------------------------------------------------------------------ weightings
WEIGHTING_FLAGS = {
    "static": [],
    "uncertainty": ["--weighting-learning-rate", "0.5"],
    # batches of 16: an all_tasks epoch is 2 micro-batches, so 4 steps end 2 epochs
    "dwa": ["--batch-mode", "all_tasks", "--batch-size", "16", "--max-steps", "4"],
    "pcgrad": ["--batch-mode", "all_tasks", "--gradient-accumulation-steps", "2"],
}


def test_every_weighting_is_tested():
    assert sorted(WEIGHTING_FLAGS) == WEIGHTINGS.names()


@pytest.mark.parametrize("name", sorted(WEIGHTING_FLAGS))
def test_each_weighting_trains(synthetic, tmp_path, name):
    flags = ["--weighting", name, "--sampler", "round_robin", *WEIGHTING_FLAGS[name]]
    summary, log = tiny_run(synthetic, tmp_path / "out", *flags)
    weights = summary["loss_weights"]
    windows = [record for record in log if "share" in record]
    assert windows[-1]["weight"] == weights
    if name == "static":
        assert weights == {"sent": 1.0, "score": 1.0}
    if name == "uncertainty":  # learned: moved away from exp(0)·(1 or 0.5 for regression)
        assert abs(weights["sent"] - 1.0) > 0.1 and abs(weights["score"] - 0.5) > 0.05
    if name in ("dwa", "pcgrad"):  # all_tasks: every task in every micro-batch
        accumulation = 2 if name == "pcgrad" else 1
        assert summary["task_steps"] == dict.fromkeys(TASKS, summary["steps"] * accumulation)
        assert all(record["share"] == {"sent": 0.5, "score": 0.5} for record in windows)
    if name == "dwa":  # two epoch ends: weights from the loss ratios, summing to K
        epochs = [record["train_loss"] for record in log if "train_loss" in record]
        assert len(epochs) == 2
        ratios = {t: epochs[1][t] / epochs[0][t] for t in TASKS}
        expected = torch.softmax(torch.tensor([ratios[t] for t in TASKS]) / 2.0, 0) * 2
        assert [weights[t] for t in TASKS] == pytest.approx(expected.tolist(), rel=1e-4)


def test_pcgrad_needs_all_tasks_through_the_recipe(synthetic, tmp_path, monkeypatch, capsys):
    recipe = REPO / "recipes" / "glue_mt.py"
    argv = [str(recipe), *run_args(synthetic, tmp_path / "out", "--weighting", "pcgrad")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(recipe), run_name="__main__")
    assert exit_info.value.code == 2
    assert "loss weighting 'pcgrad' needs --batch-mode all_tasks" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ flags
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--sampler", "nope"],
            "--sampler: unknown sampler 'nope'; known: annealed, ordered, proportional",
        ),
        (["--weighting", "nope"], "--weighting: unknown loss weighting 'nope'; known: dwa, pcgrad"),
        (["--temperature", "0"], "--temperature: must be positive"),
        (["--examples-cap", "0"], "--examples-cap: must be positive"),
    ],
)
def test_bad_flags(flags, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parse_args(flags)


def test_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "sampler: temperature\ntemperature: 3\nexamples-cap: 5000\nweighting: pcgrad\n"
        "batch_mode: all_tasks\nfinetune_each: true\nfinetune_learning_rate: 2.0e-5\n"
    )
    args = parse_args(["--config", str(config), "--temperature", "4"])  # the flag wins
    assert (args.sampler, args.temperature, args.examples_cap) == ("temperature", 4.0, 5000)
    assert (args.weighting, args.batch_mode) == ("pcgrad", "all_tasks")
    assert args.finetune_each and args.finetune_learning_rate == 2e-5
    config.write_text("weighting: pcgrad\n")  # checked for config files too
    with pytest.raises(UserError, match="needs --batch-mode all_tasks"):
        parse_args(["--config", str(config)])


# ------------------------------------------------------------------------------ trackers
class MemoryTracker(GeneralTracker):
    """An accelerate tracker that keeps what it is given (for this test)."""

    name = "mtnlp_test_memory"
    requires_logging_directory = False
    logged: ClassVar[list[tuple[int | None, dict]]] = []
    config: ClassVar[dict] = {}

    def __init__(self, run_name: str, **kwargs) -> None:
        super().__init__()

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        MemoryTracker.config = values

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        MemoryTracker.logged.append((step, values))


def test_logs_reach_accelerate_trackers(synthetic, tmp_path):
    register_tracker_class(MemoryTracker)
    flags = ["--report-to", MemoryTracker.name, "--log-every", "2", "--weighting", "uncertainty"]
    tiny_run(synthetic, tmp_path / "out", *flags)
    assert MemoryTracker.config["weighting"] == "uncertainty"
    steps = [step for step, _ in MemoryTracker.logged]
    assert steps == [2, 3, 3]  # windows at steps 2 and 3, then the final evaluation
    window = MemoryTracker.logged[0][1]
    assert {"share/sent", "share/score", "weight/sent", "weight/score"} <= set(window)
    assert window["share/sent"] + window["share/score"] == pytest.approx(1.0)
    assert set(MemoryTracker.logged[-1][1]) == {"eval/sent/accuracy", "eval/score/pearson"}


def test_report_to_names_are_checked():
    assert trackers("none") is None
    with pytest.raises(UserError, match="--report-to: unknown tracker 'nope'; known: "):
        trackers("nope")
    if "tensorboard" not in [str(kind.value) for kind in get_available_trackers()]:
        with pytest.raises(UserError, match="tensorboard: its package is not installed"):
            trackers("tensorboard")


# ------------------------------------------------------------------------------ two stages
def test_finetune_each_through_the_recipe(synthetic, tmp_path, monkeypatch):
    recipe = REPO / "recipes" / "glue_mt.py"
    output = tmp_path / "out"
    flags = ["--finetune-each", "--finetune-max-steps", "2", "--eval-every", "1"]
    monkeypatch.setattr(sys, "argv", [str(recipe), *run_args(synthetic, output, *flags)])
    runpy.run_path(str(recipe), run_name="__main__")
    table = json.loads((output / "finetune_results.json").read_text())
    assert set(table) == set(TASKS)
    multi_task = json.loads((output / "eval_results.json").read_text())
    for task in TASKS:
        folder = output / "finetuned" / task
        assert table[task][MULTI_TASK] == multi_task[task]
        assert (
            table[task][FINETUNED] == json.loads((folder / "eval_results.json").read_text())[task]
        )
        assert MultiTaskModel.from_pretrained(folder).config.task_names == [task]
        summary = json.loads((folder / "train_summary.json").read_text())
        assert summary["steps"] == 2 and summary["best_step"] in (1, 2)
    rows = (output / "finetune_results.md").read_text().splitlines()
    assert rows[0] == "| task | metric | multi-task | multi-task + fine-tune | gain |"
    assert len(rows) == 2 + len(TASKS)


def test_markdown_table_gain():
    table = {"rte": {MULTI_TASK: {"accuracy": 0.6}, FINETUNED: {"accuracy": 0.65}}}
    assert (
        markdown_table(table).splitlines()[-1] == "| rte | accuracy | 0.6000 | 0.6500 | +0.0500 |"
    )


def test_initial_model_from_a_multi_task_model(tiny_model):
    reg, extra = TINY_TASKS[1], {**TINY_TASKS[0], "name": "new"}
    model = MultiTaskModel.from_multitask(tiny_model, [reg, extra])
    assert model.config.task_names == ["reg", "new"]
    assert torch.equal(model.heads["reg"].out.weight, tiny_model.heads["reg"].out.weight)
    embeddings = model.encoder.embeddings.word_embeddings.weight
    assert torch.equal(embeddings, tiny_model.encoder.embeddings.word_embeddings.weight)
    with pytest.raises(UserError, match="task cls was trained with another type or labels"):
        MultiTaskModel.from_multitask(tiny_model, [{**TINY_TASKS[0], "labels": ["a", "b", "c"]}])


def test_best_checkpoint_restores_the_best_weights():
    layer = torch.nn.Linear(2, 1)
    best = BestCheckpoint({"a": ["accuracy"], "b": ["f1"]})
    layer.weight.data.fill_(1.0)
    assert best.update(1, {"a": {"accuracy": 0.7}, "b": {"f1": 0.5}}, layer)
    layer.weight.data.fill_(2.0)
    assert not best.update(2, {"a": {"accuracy": 0.6}, "b": {"f1": 0.5}}, layer)
    assert best.restore(layer) == {"a": {"accuracy": 0.7}, "b": {"f1": 0.5}}
    assert best.step == 1 and layer.weight.tolist() == [[1.0, 1.0]]
    results = {"a": {"accuracy": 0.7, "f1": 0.1}, "b": {"f1": 0.5}}
    assert dev_score(results, {"a": ["accuracy"], "b": ["f1"]}) == pytest.approx(0.6)
    assert dev_score(results, {"a": ["f1"], "b": ["f1"]}) == pytest.approx(0.3)  # a's main: f1
