"""Shared fixtures: where the real data lives, tiny tokenizers and tiny multi-task models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MTNLP_DATA_DIR", REPO.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

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
