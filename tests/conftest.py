"""Shared fixtures: where the real data lives, tiny tokenizers and tiny multi-task models; how
the tests start subprocesses (`run_command`, `start_command`) and how long they wait."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MTNLP_DATA_DIR", REPO.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The subprocesses of the tests (the CLI, the recipes, `accelerate launch`). A timeout is there to
# end a hang, never a healthy run on a loaded machine: on 2 cores shared with other work a start
# that imports torch (5 s alone) has taken over 120 s.
QUICK_TIMEOUT = 600  # s: start-up, an argument or user error, one model's load and predictions
TRAINING_TIMEOUT = 1200  # s: a tiny training run (checkpoints, evaluation, 2 processes)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def offline_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test's subprocess: this one, `OFFLINE`, then `env`."""
    return {**os.environ, **OFFLINE, **(env or {})}


def run_command(
    command: list[str],
    *,
    timeout: float = QUICK_TIMEOUT,
    env: dict[str, str] | None = None,
    **kwargs,
) -> subprocess.CompletedProcess[str]:
    """`command` run to its end in `offline_env(env)`, its output captured as text."""
    return subprocess.run(
        command, capture_output=True, text=True, env=offline_env(env), timeout=timeout, **kwargs
    )


def start_command(
    command: list[str], *, env: dict[str, str] | None = None, **kwargs
) -> subprocess.Popen[str]:
    """`command` started now in `offline_env(env)`, to run beside others (`communicate(...,
    timeout=...)` waits for it), its input and output through text pipes."""
    pipe = subprocess.PIPE
    return subprocess.Popen(
        command, stdin=pipe, stdout=pipe, stderr=pipe, text=True, env=offline_env(env), **kwargs
    )


TINY_TEXT = [
    "the cat sat on the mat",
    "a dog runs in the park",
    "stocks fell sharply in early trading",
    "the company said profits rose",
    "unbelievably good film with great actors",
    "terrible plot and boring dialogue",
] * 5


def task_spec(name: str, type: str, labels: list[str] | None = None, **extra) -> dict:
    """A task's model metadata, as a card's `model_spec()` would give it."""
    spec = {
        "name": name,
        "type": type,
        "labels": labels,
        "layer": -1,
        "head": {"dropout": 0.0, "pooling": "cls", "hidden_size": None},
        "inputs": ["sentence"],
        "metrics": ["accuracy"],
    }
    spec.update(extra)
    return spec


TINY_TASKS = [
    task_spec("cls", "classification", ["neg", "pos"]),
    task_spec("reg", "regression"),
    task_spec("tag", "tagging", ["O", "B-X", "I-X"]),
]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data not found at {DATA_DIR} (set MTNLP_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from mtnlp.modeling.tiny import train_wordpiece

    return train_wordpiece(TINY_TEXT, vocab_size=200)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A fresh tiny model with one head of each core type (seeded, eval mode)."""
    import torch

    from mtnlp.modeling.model import MultiTaskModel
    from mtnlp.modeling.tiny import tiny_bert

    torch.manual_seed(0)
    return MultiTaskModel.from_encoder(tiny_bert(tiny_tokenizer), TINY_TASKS).eval()


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: tiny tensors and LSTMs gain nothing from more, and
    on a few shared cores extra threads oversubscribe them (10-30x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate(monkeypatch):
    """Clean accelerate singletons around an in-process training run; no report plots (slow, and
    tested in test_report.py)."""
    from tiny_runs import reset_accelerate

    from mtnlp.artifacts import run_folder

    monkeypatch.setattr(run_folder, "write_report", lambda *args, **kwargs: None)
    reset_accelerate()
    yield
    reset_accelerate()
