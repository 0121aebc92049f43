"""Tiny synthetic tasks and helpers for end-to-end training runs in tests.

`write_tiny_tasks` writes three tasks, one per core head type, as cards + local files: `cls`
(classification, TSV), `reg` (regression on sentence pairs, TSV) and `tag` (tagging, CoNLL).
Small enough for end-to-end runs in seconds, learnable, and with dev splits whose sizes do not
divide the batch size (so gathering across processes must drop the padding duplicates).

Run as a script, `python tests/tiny_runs.py RECIPE ARGS...` runs the recipe instrumented:
- `KILL_DURING_SAVE=<step>`: SIGKILL the process in the middle of writing checkpoint-<step>
  (after accelerate wrote its files, before the folder is renamed);
- `RANK_REPORT=<folder>` (with `OUTPUT=<output dir>`): each rank writes the digest of the weights
  its final evaluation sees to `weights-<rank>.txt`, and every rank but 0 lists the Python-level
  writes it made under the output folder in `writes-<rank>.json`.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import runpy
import signal
import socket
import sys
from pathlib import Path

WORDS = [
    "the", "cat", "dog", "sat", "ran", "on", "a", "mat", "park",
    "big", "small", "red", "blue", "fast", "slow", "happy", "sad",
]  # fmt: skip
NAMES = ["alice", "bob", "carol", "dave"]

CARDS = {
    "cls": """name: cls
type: classification
source:
  local:
    format: tsv
    files: {train: cls/train.tsv, validation: cls/dev.tsv}
inputs: [sentence]
labels: [neg, pos]
metrics: [accuracy]
max_length: 32
""",
    "reg": """name: reg
type: regression
source:
  local:
    format: tsv
    files: {train: reg/train.tsv, validation: reg/dev.tsv}
inputs: [sentence1, sentence2]
label_column: score
metrics: [pearson]
max_length: 32
""",
    "tag": """name: tag
type: tagging
source:
  local:
    format: conll
    files: {train: tag/train.txt, validation: tag/dev.txt}
    column_names: [tokens, tags]
inputs: [tokens]
label_column: tags
labels: [O, B-PER]
metrics: [seqeval]
max_length: 32
""",
}


def _sentence(rng: random.Random) -> list[str]:
    return [rng.choice(WORDS + NAMES) for _ in range(rng.randint(3, 8))]


def _write_split(root: Path, split: str, size: int, rng: random.Random) -> None:
    cls_rows, reg_rows, tag_blocks = ["sentence\tlabel"], ["sentence1\tsentence2\tscore"], []
    for _ in range(size):
        words = _sentence(rng)
        cls_rows.append(f"{' '.join(words)}\t{'pos' if 'happy' in words else 'neg'}")
        other = _sentence(rng)
        score = 5.0 * len(set(words) & set(other)) / len(set(words) | set(other))
        reg_rows.append(f"{' '.join(words)}\t{' '.join(other)}\t{score:.2f}")
        tag_blocks.append("\n".join(f"{w}\t{'B-PER' if w in NAMES else 'O'}" for w in words))
    file = "dev" if split == "validation" else split
    (root / "cls" / f"{file}.tsv").write_text("\n".join(cls_rows) + "\n", encoding="utf-8")
    (root / "reg" / f"{file}.tsv").write_text("\n".join(reg_rows) + "\n", encoding="utf-8")
    (root / "tag" / f"{file}.txt").write_text("\n\n".join(tag_blocks) + "\n", encoding="utf-8")


def write_tiny_tasks(root: Path, train_size: int = 40, dev_size: int = 13) -> tuple[Path, Path]:
    """Write the cards and data under `root`; return (cards folder, data folder)."""
    cards, data = root / "cards", root / "data"
    cards.mkdir(parents=True)
    for task in CARDS:
        (data / task).mkdir(parents=True)
    for name, text in CARDS.items():
        (cards / f"{name}.yaml").write_text(text, encoding="utf-8")
    rng = random.Random(0)
    _write_split(data, "train", train_size, rng)
    _write_split(data, "validation", dev_size, rng)
    return cards, data


def reset_accelerate() -> None:
    """Forget accelerate's process-wide singletons, so an in-process run starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def free_port() -> int:
    """A TCP port nobody listens on now, for `--main_process_port` (tests may run side by side)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weights_digest(model) -> str:
    """SHA-256 of a model's state dict (names and exact values)."""
    import hashlib

    state, sha = model.state_dict(), hashlib.sha256()
    for name in sorted(state):
        sha.update(name.encode() + state[name].detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def save_tiny_model(folder: Path, cards: Path, tasks: list[str] | None = None) -> Path:
    """Save an untrained tiny model of the cards under `cards` (or of `tasks` among them), with
    its tokenizer and cards, into `folder`, as training saves a run; return `folder`."""
    import torch

    from mtnlp.artifacts.run_folder import save_run
    from mtnlp.cards.load import load_cards
    from mtnlp.modeling.model import MultiTaskModel
    from mtnlp.modeling.tiny import tiny_bert, train_wordpiece

    chosen = load_cards([cards], tasks)
    tokenizer = train_wordpiece([" ".join(WORDS), " ".join(NAMES)], vocab_size=100)
    torch.manual_seed(0)
    specs = [card.model_spec() for card in chosen]
    model = MultiTaskModel.from_encoder(tiny_bert(tokenizer), specs)
    save_run(folder, model, tokenizer, chosen, {}, [], {})
    return folder


# ------------------------------------------------------------------------------ launcher
WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.move"}


def _kill_during_save(step: str) -> None:
    from accelerate import Accelerator

    save_state = Accelerator.save_state

    def save_then_die(self, output_dir=None, **kwargs):
        result = save_state(self, output_dir, **kwargs)
        if str(output_dir).endswith(f".checkpoint-{step}.tmp"):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    Accelerator.save_state = save_then_die


def _report_ranks(report: Path, output: str) -> None:
    """Record each rank's final weights digest and, off rank 0, its writes under `output`."""
    from mtnlp.training import callbacks

    rank, writes = int(os.environ.get("RANK", "0")), []
    evaluate = callbacks.evaluate

    def recording_evaluate(model, loaders, cards, accelerator):
        digest = weights_digest(accelerator.unwrap_model(model))
        (report / f"weights-{rank}.txt").write_text(digest)
        return evaluate(model, loaders, cards, accelerator)

    def audit(event: str, args: tuple) -> None:
        # Python-level writes only: torch.save's zip writer and safetensors write from C++/Rust,
        # but every save path also makes folders, renames or JSON files, which show here
        path = args[0] if args else None
        if not isinstance(path, (str, os.PathLike)):
            return
        if event == "open":
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if mode else flags & (os.O_WRONLY | os.O_RDWR)
        else:  # creating a folder that exists is no write
            writing = event in WRITE_EVENTS and not (event == "os.mkdir" and os.path.isdir(path))
        if writing and os.path.realpath(path).startswith(output):
            writes.append(os.path.relpath(os.path.realpath(path), output))

    callbacks.evaluate = recording_evaluate
    if rank:
        sys.addaudithook(audit)
        atexit.register(lambda: (report / f"writes-{rank}.json").write_text(json.dumps(writes)))


if __name__ == "__main__":
    if os.environ.get("KILL_DURING_SAVE"):
        _kill_during_save(os.environ["KILL_DURING_SAVE"])
    if os.environ.get("RANK_REPORT"):
        _report_ranks(Path(os.environ["RANK_REPORT"]), os.path.realpath(os.environ["OUTPUT"]))
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
