"""Two processes (gloo, on CPU) train every head type without hanging, end with identical weights
on both ranks, report the same dev metrics as one process evaluating those weights on the same
data, and only the main process writes the run's files.

accelerate's `launch --cpu --num_processes 2` starts one process (its CPU launcher spreads only
through mpirun); `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu` starts them via torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from tiny_runs import free_port, reset_accelerate, weights_digest, write_tiny_tasks
from transformers import AutoTokenizer

from mtnlp.cards.load import load_cards
from mtnlp.data.loaders import make_dataloader
from mtnlp.data.tokenize import load_task
from mtnlp.inference.evaluate import evaluate
from mtnlp.modeling.model import MultiTaskModel

from conftest import REPO


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    cards, data = write_tiny_tasks(root)
    (root / "report").mkdir()
    output = root / "out"
    env = {
        **os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "RANK_REPORT": str(root / "report"),
        "OUTPUT": str(output),
    }  # fmt: skip
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "--monitor_interval", "1",
        str(REPO / "tests" / "tiny_runs.py"), str(REPO / "recipes" / "glue_mt.py"),
        "--model", "tiny", "--cards", str(cards), "--data-dir", str(data),
        "--output-dir", str(output), "--max-steps", "12", "--batch-size", "4",
        "--eval-batch-size", "4", "--learning-rate", "3e-3", "--checkpoint-every", "6",
        "--log-every", "4",
    ]  # fmt: skip
    # a hang (a collective some rank never joins) ends in the timeout
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
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


def test_metrics_match_one_process(two_process_run):
    """gather_for_metrics must count each dev example exactly once: 13 examples in batches of
    4 per process leave a last global batch that accelerate pads with duplicates."""
    _, _, data, output = two_process_run
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
            one_process = evaluate(model, loaders, cards, accelerator)
    finally:
        reset_accelerate()
    two_processes = json.loads((output / "eval_results.json").read_text())
    assert set(one_process) == set(two_processes) == {"cls", "reg", "tag"}
    for task, metrics in one_process.items():
        assert two_processes[task] == pytest.approx(metrics, abs=1e-5), task
