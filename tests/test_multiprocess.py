"""Two processes (gloo, on CPU) under each engine CI can run, launched with the committed
accelerate configurations (recipes/accelerate/, docs/distributed.md).

DDP (`ddp_multi_gpu.yaml`): every head type trains without hanging, both ranks end with
identical weights, the dev metrics equal one process evaluating those weights on the same data,
and only the main process writes the run's files. FSDP (`fsdp_cpu.yaml`, FSDP2 over gloo):
checkpoints hold each process's shard, a run resumed from one ends exactly like the
uninterrupted run, and the saved model is the whole trained model. Engines and launches that
cannot run are one `error:` line.

mtnlp runs the processes of a launch on CPU when the machine has no GPU (accelerate would start
each alone); `ACCELERATE_USE_CPU=1` keeps them on CPU on a machine that has one.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tiny_runs import free_port, reset_accelerate, weights_digest, write_tiny_tasks
from transformers import AutoTokenizer

from mtnlp.cards.load import load_cards
from mtnlp.data.loaders import make_dataloader
from mtnlp.data.tokenize import load_task
from mtnlp.inference.evaluate import evaluate
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.training.args import parse_args
from mtnlp.training.loop import train
from mtnlp.training.mixing import check_distributed
from mtnlp.training.setup import make_accelerator
from mtnlp.training.weighting import build_weighting
from mtnlp.utils.errors import UserError

from conftest import REPO, TRAINING_TIMEOUT, run_command

CONFIGS = REPO / "recipes" / "accelerate"


def run_flags(cards: Path, data: Path, output: Path, *extra: str, every: int = 6) -> list[str]:
    """The tiny run every launch here trains: 12 steps, a checkpoint `every` steps."""
    return [
        "--model", "tiny", "--cards", str(cards), "--data-dir", str(data),
        "--output-dir", str(output), "--max-steps", "12", "--batch-size", "4",
        "--eval-batch-size", "4", "--learning-rate", "3e-3", "--checkpoint-every", str(every),
        "--log-every", "4", *extra,
    ]  # fmt: skip


def launch(config: str, flags: list[str], **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file recipes/accelerate/<config>` of the instrumented recipe
    (tests/tiny_runs.py) on 2 CPU processes."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(CONFIGS / config), "--main_process_port", str(free_port()), "--monitor_interval",
        "1", str(REPO / "tests" / "tiny_runs.py"), str(REPO / "recipes" / "glue_mt.py"), *flags,
    ]  # fmt: skip
    environment = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **env}
    # a hang (a collective some rank never joins) ends in the timeout
    return run_command(command, timeout=TRAINING_TIMEOUT, env=environment)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    cards, data = write_tiny_tasks(root)
    (root / "report").mkdir()
    output = root / "out"
    report = {"RANK_REPORT": str(root / "report"), "OUTPUT": str(output)}  # tiny_runs.py
    result = launch("ddp_multi_gpu.yaml", run_flags(cards, data, output), **report)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, cards, data, output


def test_trains_on_two_processes_with_identical_weights(two_process_run):
    root, _, _, output = two_process_run
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["steps"] == 12 and sum(summary["task_steps"].values()) == 12
    assert all(summary["task_steps"][task] > 0 for task in ("cls", "reg", "tag"))
    rank0, rank1 = ((root / "report" / f"weights-{r}.txt").read_text() for r in (0, 1))
    assert rank0 == rank1
    # the saved model is the trained one
    assert weights_digest(MultiTaskModel.from_pretrained(output)) == rank0


def test_only_the_main_process_writes(two_process_run):
    root, _, _, output = two_process_run
    # rank 1 made no Python-level write under the output folder (every save path makes some:
    # folders, renames, JSON); accelerate's checkpoint layout still has each process save its
    # own RNG states, through torch's C++ file writer
    assert json.loads((root / "report" / "writes-1.json").read_text()) == []
    assert {p.name for p in (output / "checkpoint-12").iterdir()} >= {
        "random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "checkpoint.json",
    }  # fmt: skip


def one_process_metrics(output: Path, data: Path) -> dict[str, dict[str, float]]:
    """The dev metrics of the model saved in `output`, evaluated by one process."""
    reset_accelerate()
    try:
        accelerator = Accelerator(cpu=True)
        cards = {card.name: card for card in load_cards([output / "cards"])}
        tokenizer = AutoTokenizer.from_pretrained(output)
        loaders = {
            name: {
                split: accelerator.prepare(
                    make_dataloader(card, dataset, tokenizer, 4, shuffle=False)
                )
                for split, dataset in load_task(card, tokenizer, [data], train=False).evals.items()
            }
            for name, card in cards.items()
        }
        model = accelerator.prepare(MultiTaskModel.from_pretrained(output))
        with torch.no_grad():
            return evaluate(model, loaders, cards, accelerator)
    finally:
        reset_accelerate()


def assert_same_metrics(one_process: dict, two_processes: dict) -> None:
    assert set(one_process) == set(two_processes) == {"cls", "reg", "tag"}
    for task, metrics in one_process.items():
        assert two_processes[task] == pytest.approx(metrics, abs=1e-5), task


def test_metrics_match_one_process(two_process_run):
    """gather_for_metrics must count each dev example exactly once: 13 examples in batches of
    4 per process leave a last global batch that accelerate pads with duplicates."""
    _, _, data, output = two_process_run
    two_processes = json.loads((output / "eval_results.json").read_text())
    assert_same_metrics(one_process_metrics(output, data), two_processes)


def test_finetune_each_runs_both_stages_on_two_processes(tmp_path):
    """MT-DNN's second stage after a 2-process first stage: the first stage leaves the process
    group open for it (only `stages.run` ends it), and each task's fine-tuned model is saved."""
    cards, data = write_tiny_tasks(tmp_path)
    output = tmp_path / "out"
    extra = ["--finetune-each", "--finetune-max-steps", "2"]
    result = launch("ddp_multi_gpu.yaml", [*run_flags(cards, data, output), *extra])
    assert result.returncode == 0, result.stderr[-4000:]
    table = json.loads((output / "finetune_results.json").read_text())
    assert set(table) == {"cls", "reg", "tag"}
    for task in table:
        summary = json.loads((output / "finetuned" / task / "train_summary.json").read_text())
        assert summary["steps"] == 2 and summary["num_processes"] == 2


# ------------------------------------------------------------------------------ FSDP
@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """An FSDP run of 12 steps with --keep-best, and one resumed from its checkpoint-4 (into a
    fresh output folder). At step 4 the cls head has had no step yet: its optimizer state must
    still be in the checkpoint (`start_optimizer_state`)."""
    root = tmp_path_factory.mktemp("fsdp")
    cards, data = write_tiny_tasks(root)
    whole, resumed = root / "whole", root / "resumed"
    extra = ["--keep-best", "--eval-every", "4"]  # best weights: whole, in the checkpoints
    result = launch("fsdp_cpu.yaml", run_flags(cards, data, whole, *extra, every=4))
    assert result.returncode == 0, result.stderr[-4000:]
    extra += ["--resume-from-checkpoint", str(whole / "checkpoint-4")]
    result = launch("fsdp_cpu.yaml", run_flags(cards, data, resumed, *extra, every=4))
    assert result.returncode == 0, result.stderr[-4000:]
    return cards, data, whole, resumed


def test_fsdp_checkpoints_hold_each_process_shard(fsdp_runs):
    _, _, whole, _ = fsdp_runs
    summary = json.loads((whole / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 12
    assert all(summary["task_steps"][task] > 0 for task in ("cls", "reg", "tag"))
    checkpoint = whole / "checkpoint-4"
    assert not (checkpoint / "model.safetensors").exists()  # FSDP's sharded layout instead
    shards = {path.name for path in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")}
    assert shards == {"__0_0.distcp", "__1_0.distcp"}


def test_fsdp_saves_the_whole_trained_model(fsdp_runs):
    """The final save gathers every shard: the saved model loads strictly and one process
    evaluating it gets the metrics the two processes measured on the trained shards."""
    _, data, whole, _ = fsdp_runs
    two_processes = json.loads((whole / "eval_results.json").read_text())
    assert_same_metrics(one_process_metrics(whole, data), two_processes)


def test_fsdp_resumed_run_ends_like_the_uninterrupted_one(fsdp_runs):
    _, _, whole, resumed = fsdp_runs
    summary = json.loads((resumed / "train_summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-4" and summary["steps"] == 12
    digests = [weights_digest(MultiTaskModel.from_pretrained(out)) for out in (whole, resumed)]
    assert digests[0] == digests[1]
    results = [json.loads((out / "eval_results.json").read_text()) for out in (whole, resumed)]
    assert results[0] == results[1]


def test_fsdp_checkpoint_resumes_only_under_fsdp(fsdp_runs, tmp_path, fresh_accelerate):
    cards, data, whole, _ = fsdp_runs
    checkpoint = whole / "checkpoint-4"
    flags = run_flags(cards, data, tmp_path / "out", "--resume-from-checkpoint", str(checkpoint))
    with pytest.raises(UserError, match=f"{checkpoint}: written under FSDP; resume it with"):
        train(parse_args(flags), load_cards([cards]))


# ------------------------------------------------------------------------------ refused
def test_fsdp_settings_accelerate_refuses_on_cpu_are_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "true")  # accelerate config's default
    reset_accelerate()
    try:
        with pytest.raises(UserError, match=r"accelerate: .*sync_module_states.*fsdp_cpu\.yaml"):
            make_accelerator(parse_args(["--output-dir", str(tmp_path)]))
    finally:
        reset_accelerate()


def test_deepspeed_without_a_gpu_is_one_line(monkeypatch, tmp_path):
    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="DeepSpeed needs GPUs, and this machine has none"):
        make_accelerator(parse_args(["--output-dir", str(tmp_path)]))


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"affinity": True}, "--affinity-every: task affinity needs DDP, not FSDP"),
        ({"adversarial": True}, "--adversarial: the task discriminator needs DDP, not FSDP"),
        ({"successive": "ner.yaml"}, "ner.yaml: successive_regularization: needs DDP, not FSDP"),
    ],
)
def test_what_needs_whole_weights_is_refused_under_fsdp(options, error):
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    static = build_weighting("static", ["a"], task_types={"a": "classification"})
    with pytest.raises(UserError, match=f"^{re.escape(error)}$"):
        check_distributed(fsdp, False, static, "static", **options)
