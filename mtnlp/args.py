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
    group_by_length: bool = field(
        default=False,
        metadata=_help(
            "training batches of similar lengths (less padding, faster steps): examples are "
            "shuffled, then sorted by length within mega-batches of 50 batches"
        ),
    )
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
    log_every: int | None = field(
        default=None,
        metadata=_help(
            "log task shares and losses every N steps (default: 50, or steps/20 in shorter runs)"
        ),
    )
    sampler: str = field(
        default="proportional",
        metadata=_help(
            "which task each micro-batch trains: sequential, round_robin, proportional, uniform, "
            "temperature, annealed, specified (see README)"
        ),
    )
    temperature: float = field(
        default=2.0, metadata=_help("temperature sampler: p_i ∝ n_i^(1/T) (1: proportional)")
    )
    examples_cap: int | None = field(
        default=None,
        metadata=_help("cap each task's size at this many examples where sizes set probabilities"),
    )
    weighting: str = field(
        default="static",
        metadata=_help("loss weighting: static, uncertainty, dwa, pcgrad (see README)"),
    )
    weighting_learning_rate: float | None = field(
        default=None,
        metadata=_help("learning rate of learned loss weights (default: --learning-rate)"),
    )
    dwa_temperature: float = field(
        default=2.0, metadata=_help("dwa weighting: softmax temperature")
    )
    batch_mode: str = field(
        default="one_task",
        metadata=_help(
            "one_task: one task per micro-batch (MT-DNN); all_tasks: a batch of every task per "
            "micro-batch (LibMTL; pcgrad needs it)",
            choices=["one_task", "all_tasks"],
        ),
    )
    sharing: str = field(
        default="hard",
        metadata=_help(
            "parameter sharing: hard (one encoder), soft, cross_stitch or sluice (per-task top "
            "layers; see README)"
        ),
    )
    sharing_layers: int = field(
        default=2, metadata=_help("soft/cross_stitch/sluice: top encoder layers each task copies")
    )
    soft_penalty: str = field(
        default="l2",
        metadata=_help("soft: squared L2 distance or trace norm", choices=["l2", "trace"]),
    )
    soft_weight: float = field(default=0.01, metadata=_help("soft: weight of the penalty"))
    sluice_subspaces: int = field(default=2, metadata=_help("sluice: subspaces per layer output"))
    orthogonality_weight: float = field(
        default=1e-4, metadata=_help("sluice: weight of the subspace orthogonality penalty")
    )
    mixing_lr_scale: float = field(
        default=100.0,
        metadata=_help("cross_stitch/sluice: mixing units learn at this x --learning-rate"),
    )
    block_sparse: float = field(
        default=0.0,
        metadata=_help("weight of the l1/lq block-sparse penalty on the task heads (0: off)"),
    )
    block_sparse_q: str = field(
        default="2", metadata=_help("block-sparse: q of the l1/lq norm", choices=["2", "inf"])
    )
    adversarial: float = field(
        default=0.0,
        metadata=_help("gradient-reversal weight of an adversarial task discriminator (0: off)"),
    )
    affinity_every: int | None = field(
        default=None,
        metadata=_help("log task affinity (gradient cosine, lookahead) every N steps"),
    )
    keep_best: bool = field(
        default=False,
        metadata=_help(
            "evaluate every epoch (or --eval-every steps) and save the best dev checkpoint "
            "(mean of each task's first metric) instead of the last"
        ),
    )
    report_to: str = field(
        default="none",
        metadata=_help("accelerate trackers for the logs, e.g. tensorboard (comma-separated)"),
    )
    finetune_each: bool = field(
        default=False,
        metadata=_help(
            "MT-DNN's second stage: then fine-tune each task alone from the multi-task model "
            "(into OUTPUT/finetuned/<task>)"
        ),
    )
    finetune_epochs: float = field(default=3.0, metadata=_help("epochs of each fine-tuning run"))
    finetune_max_steps: int | None = field(
        default=None, metadata=_help("steps of each fine-tuning run (overrides --finetune-epochs)")
    )
    finetune_learning_rate: float | None = field(
        default=None,
        metadata=_help("learning rate of the fine-tuning runs (default: --learning-rate)"),
    )
    label_all_subtokens: bool = field(
        default=False,
        metadata=_help("tagging: label every sub-token of a word, not only the first"),
    )
    checkpoint_every: int | None = field(
        default=None,
        metadata=_help("write a resumable checkpoint every N steps (OUTPUT/checkpoint-<step>)"),
    )
    keep_checkpoints: int | None = field(
        default=None, metadata=_help("keep only the K newest checkpoints (default: all)")
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata=_help("continue a run: a checkpoint folder, or 'latest' (newest in --output-dir)"),
    )
    max_bad_steps: int = field(
        default=10,
        metadata=_help("stop after N consecutive steps whose loss is NaN/inf (each is skipped)"),
    )
    push_to_hub: bool = field(
        default=False,
        metadata=_help("at the end, push the model, tokenizer, cards and a model card to the Hub"),
    )
    hub_model_id: str | None = field(
        default=None, metadata=_help("Hub repository to push to, e.g. your-name/glue-mt")
    )
    hub_private: bool = field(default=False, metadata=_help("create the Hub repository as private"))

    def __post_init__(self) -> None:
        positive = ("batch_size", "eval_batch_size", "gradient_accumulation_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')}: must be positive")
        optional = ("max_steps", "max_train_samples", "max_eval_samples", "eval_every", "log_every")
        reliability = ("checkpoint_every", "keep_checkpoints", "max_bad_steps")
        for name in (*optional, *reliability):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')}: must be positive")
        if self.learning_rate <= 0:
            raise UserError("--learning-rate: must be positive")
        self._check_sampling_and_weighting()
        self._check_sharing_and_regularizers()
        if self.push_to_hub:  # a bad repository id fails now, not after training
            from mtnlp.hub import check_repo_id

            check_repo_id(self.hub_model_id)

    def _check_sampling_and_weighting(self) -> None:
        """Names, options and batch mode of the sampler and weighting, before any data loads."""
        from mtnlp.samplers import SAMPLERS
        from mtnlp.weighting import WEIGHTINGS, check_batch_mode

        for name in ("temperature", "dwa_temperature", "finetune_epochs"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')}: must be positive")
        optional = ("examples_cap", "weighting_learning_rate", "finetune_max_steps")
        for name in (*optional, "finetune_learning_rate"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')}: must be positive")
        if self.batch_mode not in ("one_task", "all_tasks"):
            raise UserError(f"--batch-mode: {self.batch_mode!r}; expected one_task or all_tasks")
        for flag, registry in (("sampler", SAMPLERS), ("weighting", WEIGHTINGS)):
            if getattr(self, flag) not in registry:
                raise UserError(f"--{flag}: {registry.unknown_message(getattr(self, flag))}")
        check_batch_mode(WEIGHTINGS.get(self.weighting), self.batch_mode)

    def _check_sharing_and_regularizers(self) -> None:
        """`--sharing` and its options, block-sparse, adversarial and affinity flags."""
        from mtnlp.sharing import sharing_from_args

        sharing_from_args(self)  # an unknown strategy raises here, before any data loads
        for name in ("soft_weight", "orthogonality_weight", "block_sparse", "adversarial"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')}: must be >= 0")
        for name in ("sharing_layers", "sluice_subspaces", "mixing_lr_scale", "affinity_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')}: must be positive")

    @property
    def sharing_config(self) -> dict | None:
        """`--sharing` and its options, as the model config stores them (None: hard sharing)."""
        from mtnlp.sharing import sharing_from_args

        return sharing_from_args(self)

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
    argv: list[str] | None = None,
    defaults: dict | None = None,
    description: str | None = None,
    prog: str | None = None,
) -> TrainArguments:
    """Parse flags; `--config FILE.yaml` gives defaults, and `defaults` are the recipe's own."""
    parser = HfArgumentParser(TrainArguments, description=description, prog=prog)
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
        raise UserError(
            f"{path}: {unknown[0]}: unknown argument; known: {', '.join(sorted(known))}"
        )
    return data
