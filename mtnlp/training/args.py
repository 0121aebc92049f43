"""The training arguments shared by the recipes and `mtnlp train`.

One strict pydantic dataclass, parsed with transformers' `HfArgumentParser` (every field is a
`--flag`, with dashes or underscores); `--config FILE.yaml` supplies defaults that flags on the
command line override. Every value, from a flag, a config file or code, is checked against its
field's type and bounds by pydantic (strictly: no string for a number, no 10.7 for an integer,
finite floats), one error line per bad value, naming the flag or the config file and key.

The sharing strategies (`mtnlp.modeling.sharing`) name options, not flags: the mapping between
the two, and the flag wording of their errors, live here.
"""

from __future__ import annotations

import argparse
import functools
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass
from transformers import HfArgumentParser

from mtnlp.utils.errors import OneLineArgumentErrors, UserError
from mtnlp.utils.values import (
    NonNegativeNumber,
    Paths,
    PositiveInt,
    PositiveNumber,
    Seed,
    Share,
    problem_words,
    word_from_yaml,
)
from mtnlp.utils.yaml_files import load_yaml

if typing.TYPE_CHECKING:
    from mtnlp.modeling.sharing import SharingMismatch


def flag(name: str) -> str:
    """The command-line flag of a field: `--max-steps` for `max_steps`."""
    return f"--{name.replace('_', '-')}"


def _help(text: str, **kwargs) -> dict:
    return {"help": text, **kwargs}


@dataclass(config=ConfigDict(strict=True, extra="forbid"))
class TrainArguments:
    """Everything a multi-task training run needs to know, with the defaults of MT-DNN.

    A strict pydantic dataclass: every value given, in code, by `dataclasses.replace` or from the
    parser, is checked against its field's type and bounds (no string for a number, no 10.7 for
    an integer, finite floats; an int for a float field becomes a float); each bad value is one
    line of a `UserError` naming its flag."""

    model: str = field(
        default="bert-base-uncased",
        metadata=_help(
            "encoder to start from: a Hub id, a local folder, or 'tiny' (a tiny random BERT "
            "with a WordPiece vocabulary trained on the training text, for smoke runs)"
        ),
    )
    cards: Paths | None = field(
        default=None,
        metadata=_help("task-card files or folders (default: the recipe's own cards)", nargs="+"),
    )
    tasks: str | None = field(
        default=None, metadata=_help("comma-separated task names to train (default: all cards)")
    )
    data_dir: Paths | None = field(
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
    epochs: PositiveNumber = field(
        default=3.0, metadata=_help("passes over the mixed training data")
    )
    max_steps: PositiveInt | None = field(
        default=None, metadata=_help("optimizer steps to train (overrides --epochs)")
    )
    batch_size: PositiveInt = field(default=32, metadata=_help("training batch size per process"))
    eval_batch_size: PositiveInt = field(
        default=64, metadata=_help("evaluation batch size per process")
    )
    group_by_length: bool = field(
        default=False,
        metadata=_help(
            "training batches of similar lengths (less padding, faster steps): examples are "
            "shuffled, then sorted by length within mega-batches of 50 batches"
        ),
    )
    learning_rate: PositiveNumber = field(default=5e-5, metadata=_help("peak AdamW learning rate"))
    head_learning_rate: PositiveNumber | None = field(
        default=None,
        metadata=_help(
            "peak learning rate of the parameters that do not come from the pretrained encoder: "
            "heads, task layers, label embeddings, the adversarial discriminator (default: "
            "--learning-rate; see docs/training.md)"
        ),
    )
    weight_decay: NonNegativeNumber = field(default=0.01, metadata=_help("AdamW weight decay"))
    warmup_ratio: Share = field(
        default=0.1, metadata=_help("share of steps with linear warm-up (then linear decay)")
    )
    gradient_accumulation_steps: PositiveInt = field(
        default=1, metadata=_help("micro-batches per optimizer step")
    )
    max_grad_norm: NonNegativeNumber = field(
        default=1.0, metadata=_help("gradient clipping norm (0: off)")
    )
    clip_by_depth: bool = field(
        default=False,
        metadata=_help(
            "clip each step at --max-grad-norm x min(3, depth of its task's stack), Hashimoto "
            "et al. 2017's min(3, depth) (see docs/hierarchies.md)"
        ),
    )
    max_train_samples: PositiveInt | None = field(
        default=None, metadata=_help("use at most this many training examples per task")
    )
    max_eval_samples: PositiveInt | None = field(
        default=None, metadata=_help("use at most this many dev examples per task")
    )
    seed: Seed = field(default=42, metadata=_help("seed of Python, NumPy, torch and the sampler"))
    eval_every: PositiveInt | None = field(
        default=None, metadata=_help("evaluate every N steps (always at the end)")
    )
    log_every: PositiveInt | None = field(
        default=None,
        metadata=_help(
            "log task shares and losses every N steps (default: 50, or steps/20 in shorter runs)"
        ),
    )
    sampler: str = field(
        default="proportional",
        metadata=_help(
            "which task each micro-batch trains: sequential, ordered, round_robin, proportional, "
            "uniform, temperature, annealed, specified (see docs/sampling.md)"
        ),
    )
    temperature: PositiveNumber = field(
        default=2.0, metadata=_help("temperature sampler: p_i ∝ n_i^(1/T) (1: proportional)")
    )
    examples_cap: PositiveInt | None = field(
        default=None,
        metadata=_help("cap each task's size at this many examples where sizes set probabilities"),
    )
    weighting: str = field(
        default="static",
        metadata=_help("loss weighting: static, uncertainty, dwa, pcgrad (see docs/sampling.md)"),
    )
    weighting_learning_rate: PositiveNumber | None = field(
        default=None,
        metadata=_help("learning rate of learned loss weights (default: --learning-rate)"),
    )
    dwa_temperature: PositiveNumber = field(
        default=2.0, metadata=_help("dwa weighting: softmax temperature")
    )
    batch_mode: Literal["one_task", "all_tasks", "joint"] = field(
        default="one_task",
        metadata=_help(
            "one_task: one task per micro-batch (MT-DNN); all_tasks: a batch of every task per "
            "micro-batch (LibMTL; pcgrad needs it); joint: one_task, but tasks that read the same "
            "inputs share each batch and one encoder pass (docs/sampling.md)"
        ),
    )
    peft: Literal["lora"] | None = field(
        default=None,
        metadata=_help(
            "parameter-efficient training: lora freezes the encoder and trains a LoRA adapter on "
            "it with the heads (needs pip install 'mtnlp[peft]'; see docs/peft.md)"
        ),
    )
    lora_r: PositiveInt = field(default=8, metadata=_help("--peft lora: the adapter's rank"))
    lora_alpha: PositiveInt = field(
        default=16, metadata=_help("--peft lora: scaling numerator (the update is alpha/r x BA)")
    )
    lora_dropout: Share = field(
        default=0.1, metadata=_help("--peft lora: dropout on the adapter's input")
    )
    lora_target_modules: str | None = field(
        default=None,
        metadata=_help(
            "--peft lora: comma-separated encoder modules to adapt (default: peft's for the "
            "encoder type, e.g. query,value for BERT)"
        ),
    )
    peft_scope: Literal["shared", "per_task"] = field(
        default="shared",
        metadata=_help("--peft lora: shared (one adapter for all tasks; per_task: not yet)"),
    )
    sharing: str = field(
        default="hard",
        metadata=_help(
            "parameter sharing: hard (one encoder), soft, cross_stitch, sluice or tensor "
            "(per-task top layers; see docs/sharing.md)"
        ),
    )
    sharing_layers: PositiveInt = field(
        default=2, metadata=_help("column strategies: top encoder layers each task copies")
    )
    soft_penalty: Literal["l2", "trace"] = field(
        default="l2",
        metadata=_help("soft: squared L2 distance or trace norm"),
    )
    soft_weight: NonNegativeNumber = field(
        default=0.01, metadata=_help("soft: weight of the penalty")
    )
    sluice_subspaces: PositiveInt = field(
        default=2, metadata=_help("sluice: subspaces per layer output")
    )
    orthogonality_weight: NonNegativeNumber = field(
        default=1e-4, metadata=_help("sluice: weight of the subspace orthogonality penalty")
    )
    mixing_lr_scale: PositiveNumber = field(
        default=100.0,
        metadata=_help("cross_stitch/sluice: mixing units learn at this x --learning-rate"),
    )
    tensor_rank_task: PositiveInt = field(
        default=2, metadata=_help("tensor: rank of the Tucker factorisation's task mode")
    )
    tensor_rank_in: PositiveInt = field(
        default=16, metadata=_help("tensor: rank of its input mode (at most the hidden size)")
    )
    tensor_rank_out: PositiveInt = field(
        default=16, metadata=_help("tensor: rank of its output mode (at most the hidden size)")
    )
    block_sparse: NonNegativeNumber = field(
        default=0.0,
        metadata=_help("weight of the l1/lq block-sparse penalty on the task heads (0: off)"),
    )
    block_sparse_q: Annotated[Literal["2", "inf"], BeforeValidator(word_from_yaml)] = field(
        default="2", metadata=_help("block-sparse: q of the l1/lq norm")
    )
    adversarial: NonNegativeNumber = field(
        default=0.0,
        metadata=_help("gradient-reversal weight of an adversarial task discriminator (0: off)"),
    )
    relationship_prior: NonNegativeNumber = field(
        default=0.0,
        metadata=_help(
            "weight of a matrix-normal prior tr(W^T Omega^-1 W) on the stacked task heads with a "
            "learned task covariance Omega (deep relationship networks; 0: off)"
        ),
    )
    relationship_update_every: PositiveInt = field(
        default=10, metadata=_help("relationship prior: update Omega every N steps")
    )
    task_clusters: Annotated[str | None, BeforeValidator(word_from_yaml)] = field(
        default=None,
        metadata=_help(
            "task clustering penalty on the task heads: K clusters learned by k-means, or "
            "'cards' (each card's cluster field)"
        ),
    )
    cluster_mean_weight: NonNegativeNumber = field(
        default=1e-4, metadata=_help("task clusters: weight of the mean task's squared norm")
    )
    cluster_between_weight: NonNegativeNumber = field(
        default=1e-4, metadata=_help("task clusters: weight of the between-cluster variance")
    )
    cluster_within_weight: NonNegativeNumber = field(
        default=1e-3, metadata=_help("task clusters: weight of the within-cluster variance")
    )
    cluster_update_every: PositiveInt = field(
        default=10, metadata=_help("task clusters K: k-means again every N steps")
    )
    affinity_every: PositiveInt | None = field(
        default=None,
        metadata=_help("log task affinity (gradient cosine, lookahead) every N steps"),
    )
    keep_best: bool = field(
        default=False,
        metadata=_help(
            "evaluate every epoch (or --eval-every steps) and save the best dev checkpoint "
            "(mean of each task's main metric) instead of the last"
        ),
    )
    report_to: str = field(
        default="none",
        metadata=_help(
            "accelerate trackers for the logs, comma-separated: tensorboard (the extra "
            "mtnlp[tensorboard], or the tensorboard package) or wandb (mtnlp[wandb], or wandb); "
            "none: off"
        ),
    )
    finetune_each: bool = field(
        default=False,
        metadata=_help(
            "MT-DNN's second stage: then fine-tune each task alone from the multi-task model "
            "(into OUTPUT/finetuned/<task>)"
        ),
    )
    finetune_epochs: PositiveNumber = field(
        default=3.0, metadata=_help("epochs of each fine-tuning run")
    )
    finetune_max_steps: PositiveInt | None = field(
        default=None, metadata=_help("steps of each fine-tuning run (overrides --finetune-epochs)")
    )
    finetune_learning_rate: PositiveNumber | None = field(
        default=None,
        metadata=_help("learning rate of the fine-tuning runs (default: --learning-rate)"),
    )
    label_all_subtokens: bool = field(
        default=False,
        metadata=_help("tagging: label every sub-token of a word, not only the first"),
    )
    checkpoint_every: PositiveInt | None = field(
        default=None,
        metadata=_help("write a resumable checkpoint every N steps (OUTPUT/checkpoint-<step>)"),
    )
    keep_checkpoints: PositiveInt | None = field(
        default=None, metadata=_help("keep only the K newest checkpoints (default: all)")
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata=_help("continue a run: a checkpoint folder, or 'latest' (newest in --output-dir)"),
    )
    max_bad_steps: PositiveInt = field(
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
    license: str | None = field(
        default=None,
        metadata=_help(
            "the model card's license, a Hub id such as apache-2.0 (default: the encoder's)"
        ),
    )
    language: Paths | None = field(
        default=None,
        metadata=_help(
            "the model card's languages, ISO 639 codes (default: the encoder's)", nargs="+"
        ),
    )

    @model_validator(mode="wrap")
    @classmethod
    def _one_line_per_bad_value(cls, values: Any, handler: Callable[[Any], Any]) -> Any:
        """pydantic's errors in the words of the flags: `--epochs: must be positive, got 0`."""
        try:
            return handler(values)
        except ValidationError as error:
            if any(p["type"].startswith("unexpected_") for p in error.errors()):
                raise TypeError(f"TrainArguments: {error}") from None  # a bug, as a dataclass
            raise UserError(_problems(error, flag)) from None

    def __post_init__(self) -> None:  # after the values are checked
        self._check_sampling_and_weighting()
        if self.clip_by_depth and self.max_grad_norm == 0:
            raise UserError("--clip-by-depth: needs --max-grad-norm > 0 (0 turns clipping off)")
        sharing_from_args(self)  # an unknown strategy raises here, before any data loads
        self._check_peft()
        from mtnlp.hub.card import check_languages, check_license

        check_license(self.license, "--license")  # the card's metadata fails now, not at the end
        check_languages(self.language, "--language")
        if self.push_to_hub:  # a bad repository id fails now, not after training
            from mtnlp.hub.push import check_repo_id

            check_repo_id(self.hub_model_id)

    def _check_sampling_and_weighting(self) -> None:
        """Names of the sampler and weighting and the weighting's batch mode, before any data
        loads."""
        from mtnlp.training.samplers import SAMPLERS
        from mtnlp.training.weighting import WEIGHTINGS, check_batch_mode

        for name, registry in (("sampler", SAMPLERS), ("weighting", WEIGHTINGS)):
            if getattr(self, name) not in registry:
                raise UserError(f"{flag(name)}: {registry.unknown_message(getattr(self, name))}")
        check_batch_mode(WEIGHTINGS.get(self.weighting), self.batch_mode)

    def _check_peft(self) -> None:
        """`--peft` before any data loads: peft installed, a supported scope, hard sharing, no
        fine-tuning stage."""
        if self.peft is None:
            return
        from mtnlp.modeling.lora import import_peft

        if self.peft_scope == "per_task":
            raise UserError("--peft-scope per_task: not yet supported (use shared)")
        if self.sharing != "hard":
            raise UserError(f"--peft {self.peft}: needs --sharing hard, got {self.sharing}")
        if self.finetune_each:
            raise UserError(f"--peft {self.peft}: --finetune-each is not supported with it yet")
        import_peft()

    @property
    def lora_modules(self) -> list[str] | None:
        """`--lora-target-modules` as a list (None: peft's defaults for the encoder)."""
        if self.lora_target_modules is None:
            return None
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]

    @property
    def sharing_config(self) -> dict | None:
        """`--sharing` and its options, as the model config stores them (None: hard sharing)."""
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


# ------------------------------------------------------------------------------ sharing flags
# flag (field of TrainArguments) -> option of the sharing strategies that have it
# (mtnlp.modeling.sharing: the model layer names options, never flags)
SHARING_FLAG_OPTIONS = {
    "sharing_layers": "layers",
    "soft_penalty": "penalty",
    "soft_weight": "weight",
    "sluice_subspaces": "subspaces",
    "orthogonality_weight": "orthogonality_weight",
    "mixing_lr_scale": "lr_scale",
    "tensor_rank_task": "rank_task",
    "tensor_rank_in": "rank_in",
    "tensor_rank_out": "rank_out",
}


def sharing_from_args(args: TrainArguments) -> dict[str, Any] | None:
    """The model's sharing config from the run flags (`--sharing`, `--sharing-layers`, ...), every
    option filled in as the model config stores it (None: hard sharing)."""
    from mtnlp.modeling.sharing import SHARING, resolve_sharing

    if args.sharing not in SHARING:
        raise UserError(f"--sharing: {SHARING.unknown_message(args.sharing)}")
    strategy = SHARING.get(args.sharing)
    names = strategy.config_class.option_names()
    options = {
        option: getattr(args, field_name)
        for field_name, option in SHARING_FLAG_OPTIONS.items()
        if option in names
    }
    return resolve_sharing({"name": strategy.name, **options})


def sharing_flags(config: dict[str, Any]) -> str:
    """The flags that choose a sharing config's strategy and shape, e.g. `--sharing soft
    --sharing-layers 2` (`config`: `{"name": ..., options}`)."""
    from mtnlp.modeling.sharing import SHARING

    flag_of = {option: field_name for field_name, option in SHARING_FLAG_OPTIONS.items()}
    shape = SHARING.get(config["name"]).config_class.shape_options()
    shape_flags = [f"{flag(flag_of[option])} {config[option]}" for option in shape]
    return " ".join([f"--sharing {config['name']}", *shape_flags])


def sharing_mismatch_error(error: SharingMismatch) -> UserError:
    """A trained model's sharing that does not fit this run's, in the words of the flags (the
    model layer's `SharingMismatch` names options). Raise it where the model is built:
    `except SharingMismatch as error: raise sharing_mismatch_error(error) from None`."""
    return UserError(
        f"--sharing: --model was trained with {sharing_flags(error.trained)}, this run asks for "
        f"{sharing_flags(error.requested)}; give the same flags to keep its task columns"
    )


# ------------------------------------------------------------------------------ parsing
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`(default: X)` after a flag's help, unless the help already says its default or there is
    none to say (None; False of an on/off flag)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, _OnOff):
            return ", ".join([*action.option_strings, *action.negatives])
        return super()._format_action_invocation(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class _Parser(OneLineArgumentErrors, HfArgumentParser):
    """transformers' dataclass parser; a flag that does not parse is one `error:` line; an on/off
    field is a flag (`--keep-best` / `--no-keep-best`; a config file gives true or false)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, formatter_class=_HelpFormatter, **kwargs)

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: Any) -> None:
        if field.type is not bool:
            HfArgumentParser._parse_dataclass_field(parser, field)
            return
        action = parser.add_argument(
            *dict.fromkeys([flag(field.name), f"--{field.name}"]),  # both spellings, as others
            action=_OnOff,
            default=field.default,
            help=field.metadata.get("help"),
        )
        for negative in action.negatives:  # parsed, listed in --help, not a flag of its own
            parser._option_string_actions[negative] = action


class _OnOff(argparse.Action):
    """An on/off flag: `--keep-best` sets it, `--no-keep-best` clears it (each also with
    underscores, as every flag). The negative spellings are not option strings of their own, so
    the flag reference names the field once."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.negatives = [f"--no{'_' if '_' in o else '-'}{o[2:]}" for o in option_strings]

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, option_string not in self.negatives)

    def format_usage(self) -> str:
        return f"{self.option_strings[0]} | {self.negatives[0]}"


def parse_args(
    argv: list[str] | None = None,
    defaults: dict | None = None,
    description: str | None = None,
    prog: str | None = None,
) -> TrainArguments:
    """Parse flags; `--config FILE.yaml` gives defaults, and `defaults` are the recipe's own."""
    parser = _Parser(TrainArguments, description=description, prog=prog)
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
    """A config file's arguments, checked (the file and key name each bad value); the file is
    read with bounded work (`load_yaml`)."""
    data = load_yaml(path, where=f"--config: {path}", what="YAML file") or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of argument names to values")
    written = {str(key).replace("-", "_"): key for key in data}  # field name -> key as written
    unknown = sorted(set(written) - known)
    if unknown:
        raise UserError(
            f"{path}: {unknown[0]}: unknown argument; known: {', '.join(sorted(known))}"
        )
    values = {name: data[key] for name, key in written.items()}
    return validate_values(values, lambda name: f"{path}: {written[name]}")


@functools.cache
def _field_adapters() -> dict[str, TypeAdapter]:
    """A pydantic validator per TrainArguments field, from its annotated type (with bounds)."""
    hints = typing.get_type_hints(TrainArguments, include_extras=True)
    return {f.name: TypeAdapter(hints[f.name]) for f in fields(TrainArguments)}


def validate_values(values: dict[str, Any], source: Callable[[str], str]) -> dict[str, Any]:
    """`values` (field name -> value) checked strictly against TrainArguments' field types and
    bounds; return them converted (an int for a float field becomes a float). Every bad value
    is one line of the `UserError`, `source(name)` naming where it came from (the flag, or the
    config file and key)."""
    adapters = _field_adapters()
    checked, problems = {}, []
    for name, value in values.items():
        try:
            checked[name] = adapters[name].validate_python(value, strict=True)
        except ValidationError as error:
            problems.append(f"{source(name)}: {problem_words(error.errors()[0])}")
    if problems:
        raise UserError("\n".join(problems))
    return checked


def _problems(error: ValidationError, source: Callable[[str], str]) -> str:
    """A TrainArguments validation error, one line per bad field (its first problem), in field
    order, `source(name)` naming the field."""
    names = [f.name for f in fields(TrainArguments)]
    first: dict[str, dict[str, Any]] = {}
    for problem in error.errors():
        name, *item = problem["loc"]  # a field's name, or its position if given by position
        name = names[name] if isinstance(name, int) else str(name)
        first.setdefault(name, {**problem, "loc": tuple(item)})
    return "\n".join(f"{source(name)}: {problem_words(problem)}" for name, problem in first.items())
