"""End to end: `accelerate launch recipes/glue_mt.py --model tiny` trains, evaluates and saves a
model that reloads with every head."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import mtnlp

from conftest import QUICK_TIMEOUT, REPO, TRAINING_TIMEOUT, run_command

TASKS = ["sst2", "mrpc", "stsb"]


def launch(
    *args: str, accelerate: bool = True, timeout: float = TRAINING_TIMEOUT
) -> subprocess.CompletedProcess:
    """The recipe under `accelerate launch --quiet` (quiet: the launcher exits 1 when its script
    fails instead of raising its own traceback), or run directly with `accelerate=False`."""
    launcher = [
        "-m", "accelerate.commands.launch", "--quiet", "--cpu", "--num_processes", "1",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip
    recipe = str(REPO / "recipes" / "glue_mt.py")
    command = [sys.executable, *(launcher if accelerate else []), recipe, *args]
    return run_command(command, timeout=timeout)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("glue_mt") / "run"
    result = launch(
        "--model", "tiny", "--data-dir", str(data_dir / "glue"), "--tasks", ",".join(TASKS),
        "--max-steps", "150", "--max-train-samples", "48", "--max-eval-samples", "32",
        "--batch-size", "8", "--learning-rate", "3e-3", "--log-every", "25",
        "--output-dir", str(output), "--seed", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def test_outputs_written(trained):
    results = json.loads((trained / "eval_results.json").read_text())
    assert set(results) == set(TASKS)
    assert set(results["mrpc"]) == {"accuracy", "f1"}
    assert set(results["stsb"]) == {"pearson", "spearmanr"}
    assert all(0.0 <= results[t]["accuracy"] <= 1.0 for t in ("sst2", "mrpc"))
    assert sorted(p.name for p in (trained / "cards").iterdir()) == [
        f"{t}.yaml" for t in sorted(TASKS)
    ]
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["steps"] == 150 and sum(summary["task_steps"].values()) == 150


def test_training_loss_falls(trained):
    records = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    windows = [r["loss"] for r in records if "loss" in r]
    assert len(windows) == 6
    for task in TASKS:  # memorising 48 examples per task: every loss must drop clearly
        first = next(w[task] for w in windows if task in w)
        last = next(w[task] for w in reversed(windows) if task in w)
        assert last < 0.5 * first, (task, first, last)


def test_saved_model_reloads_and_predicts(trained):
    model = AutoModel.from_pretrained(trained).eval()
    assert isinstance(model, mtnlp.MultiTaskModel)
    assert model.config.task_names == TASKS
    tokenizer = AutoTokenizer.from_pretrained(trained)
    inputs = tokenizer(["a gripping film", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        outputs = model.forward_tasks(TASKS, **inputs)
    assert outputs["sst2"].logits.shape == (2, 2)
    assert outputs["stsb"].logits.shape == (2,)


@pytest.mark.parametrize("accelerate", [True, False], ids=["accelerate-launch", "python"])
def test_user_error_exits_2_without_traceback(data_dir, tmp_path, accelerate):
    result = launch(
        "--model", "tiny", "--data-dir", str(data_dir / "glue"), "--tasks", "rte,nope",
        "--output-dir", str(tmp_path / "out"), accelerate=accelerate, timeout=QUICK_TIMEOUT,
    )  # fmt: skip
    # the recipe exits 2; accelerate's launcher turns any failure of its script into exit 1
    assert result.returncode == (1 if accelerate else 2)
    assert "error: --tasks: no card for nope; available: cola, mnli, mrpc" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
