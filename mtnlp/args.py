"""The training arguments shared by the recipes and `mtnlp train`.

One dataclass, parsed with transformers' `HfArgumentParser` (every field is a `--flag`, with
dashes or underscores); `--config FILE.yaml` supplies defaults that flags on the command line
override.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from mtnlp.errors import UserError


def _help(text: str, **kwargs) -> dict:
    return {"help": text, **kwargs}


@dataclass
class TrainArguments:
    """Everything a multi-task training run needs to know, with the defaults of MT-DNN."""

    model: str = field(
        default="bert-base-uncased",
        metadata=_help(
            "encoder to start from: a Hub id, a local folder, or 'tiny' (a tiny random BERT "
            "with a WordPiece vocabulary trained on the training text, for smoke runs)"
        ),
    )
    cards: list[str] | None = field(
        default=None,
        metadata=_help("task-card files or folders (default: the recipe's own cards)", nargs="+"),
    )
    tasks: str | None = field(
        default=None, metadata=_help("comma-separated task names to train (default: all cards)")
    )
    data_dir: list[str] | None = field(
        default=None,
        metadata=_help(
            "read the cards' local files under these folders instead of the Hub (first folder "
            "holding a file wins)",
            nargs="+",
        ),
    )
    output_dir: str = field(default="outputs/mtnlp", metadata=_help("where the model goes"))
    overwrite_output_dir: bool = field(
        default=False, metadata=_help("allow writing into an output folder that holds another run")
    )
    epochs: float = field(default=3.0, metadata=_help("passes over the mixed training data"))
    max_steps: int | None = field(
        default=None, metadata=_help("optimizer steps to train (overrides --epochs)")
    )
    batch_size: int = field(default=32, metadata=_help("training batch size per process"))
    eval_batch_size: int = field(default=64, metadata=_help("evaluation batch size per process"))
    learning_rate: float = field(default=5e-5, metadata=_help("peak AdamW learning rate"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay"))
    warmup_ratio: float = field(
        default=0.1, metadata=_help("share of steps with linear warm-up (then linear decay)")
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata=_help("micro-batches per optimizer step")
    )
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm (0: off)"))
    max_train_samples: int | None = field(
        default=None, metadata=_help("use at most this many training examples per task")
    )
    max_eval_samples: int | None = field(
        default=None, metadata=_help("use at most this many dev examples per task")
    )
    seed: int = field(default=42, metadata=_help("seed of Python, NumPy, torch and the sampler"))
    eval_every: int | None = field(
        default=None, metadata=_help("evaluate every N steps (always at the end)")
    )
    log_every: int = field(default=50, metadata=_help("log task shares and losses every N steps"))
    sampler: str = field(
        default="proportional", metadata=_help("which task each step trains (see README)")
    )
    label_all_subtokens: bool = field(
        default=False, metadata=_help("tagging: label every sub-token of a word, not only the first")
    )

    def __post_init__(self) -> None:
        positive = ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')}: must be positive")
        for name in ("max_steps", "max_train_samples", "max_eval_samples", "eval_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')}: must be positive")
        if self.learning_rate <= 0:
            raise UserError("--learning-rate: must be positive")

    @property
    def task_list(self) -> list[str] | None:
        if self.tasks is None:
            return None
        names = [name.strip() for name in self.tasks.split(",") if name.strip()]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise UserError(f"--tasks: {', '.join(duplicates)} named more than once")
        return names

    @property
    def data_dirs(self) -> list[Path] | None:
        return [Path(folder) for folder in self.data_dir] if self.data_dir else None


def parse_args(
    argv: list[str] | None = None, defaults: dict | None = None, description: str | None = None
) -> TrainArguments:
    """Parse flags; `--config FILE.yaml` gives defaults, and `defaults` are the recipe's own."""
    parser = HfArgumentParser(TrainArguments, description=description)
    parser.add_argument("--config", help="YAML file of arguments (flags given here win)")
    known = {f.name for f in fields(TrainArguments)}
    parser.set_defaults(**(defaults or {}))
    argv = sys.argv[1:] if argv is None else argv
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_read_config(pre.config, known))
    namespace = parser.parse_args(argv)
    values = {name: getattr(namespace, name) for name in known}
    return TrainArguments(**values)


def _read_config(path: str, known: set[str]) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"--config: {path}: file not found") from None
    except yaml.YAMLError as error:
        raise UserError(f"--config: {path}: YAML syntax error: {error}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of argument names to values")
    data = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{path}: {unknown[0]}: unknown argument; known: {', '.join(sorted(known))}")
    return data
