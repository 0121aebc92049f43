"""`MultiTaskConfig` (the encoder's config plus one metadata dict per task), `MultiTaskOutput`
and `TaskStates` (what one encoder pass gives each task).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import ModelOutput

from mtnlp.modeling.limits import (
    MAX_HEAD_SIZE,
    MAX_LABELS,
    MAX_LAYERS,
    MAX_TASK_LENGTH,
    MAX_TASKS,
    TASK_PART_SIZES,
    check_size,
)
from mtnlp.modeling.lora import check_lora_entry
from mtnlp.utils.errors import UserError
from mtnlp.utils.files import file_name_problem
from mtnlp.utils.untrusted import clip, kind_of


class MultiTaskConfig(PreTrainedConfig):
    """Config of a multi-task model: the encoder's config plus one metadata dict per task."""

    model_type = "mtnlp"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "encoder": SubConfigSpec(config_class=AutoConfig, model_type="bert")
    }

    encoder: PreTrainedConfig | dict | None = None
    tasks: list[dict[str, Any]] | None = None
    # parameter-sharing strategy and its options, e.g. {"name": "soft", "layers": 2} (sharing.py);
    # None: hard sharing
    sharing: dict[str, Any] | None = None
    # the LoRA adapter on the encoder (lora.py: rank, alpha, dropout, target modules, scope);
    # None: no adapter
    lora: dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        check_task_entries(self.tasks)
        check_lora_entry(self.lora, "config.json")
        super().__post_init__(**kwargs)

    @property
    def task_names(self) -> list[str]:
        return [task["name"] for task in self.tasks or []]

    @property
    def main_task_names(self) -> list[str]:
        """The tasks that are not auxiliary: the pipeline's and the model card's by default."""
        return [task["name"] for task in main_tasks(self.tasks or [])]

    def task(self, name: str) -> dict[str, Any]:
        for task in self.tasks or []:
            if task["name"] == name:
                return task
        raise KeyError(f"no task {name!r} in this model; tasks: {', '.join(self.task_names)}")

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None):
        """The encoder's config: the text settings transformers reads or updates (`vocab_size` in
        `resize_token_embeddings`, `initializer_range`, ...) are the encoder's."""
        if isinstance(self.encoder, PreTrainedConfig):
            return self.encoder
        return super().get_text_config(decoder=decoder, encoder=encoder)

    def label_maps(self) -> dict[str, dict[str, dict]]:
        """Per task with label names: `id2label` and `label2id` (what `label_maps.json` holds, for
        readers that do not use mtnlp)."""
        return {
            task["name"]: {
                "id2label": dict(enumerate(task["labels"])),
                "label2id": {label: i for i, label in enumerate(task["labels"])},
            }
            for task in self.tasks or []
            if task.get("labels")
        }


AUXILIARY = "auxiliary"  # a task's `role` (its card's): trained, but no main task of the model


def is_auxiliary(task: Mapping[str, Any]) -> bool:
    """Whether a task entry (a card's `model_spec()`) is an auxiliary task: trained, but left
    out of model selection, the mean dev score and default task lists."""
    return task.get("role") == AUXILIARY


def main_tasks(tasks: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The task entries that are not auxiliary (`is_auxiliary`), in order."""
    return [task for task in tasks if not is_auxiliary(task)]


def check_task_entries(tasks: Any, where: str = "config.json") -> None:
    """A config's task list (untrusted: a downloaded config.json) must name each task once, by
    a name that can be a file name (`file_name_problem`), with unique string label names (so a
    label id never means two labels) and sizes within the limits of `limits.py`; a `UserError`
    (one line, `where` naming the file) otherwise."""
    if tasks is None:
        return
    if not isinstance(tasks, list) or not all(isinstance(task, dict) for task in tasks):
        raise UserError(f"{where}: tasks: expected a list of task objects")
    if len(tasks) > MAX_TASKS:
        raise UserError(
            f"{where}: tasks: {len(tasks)} tasks, more than a model may have ({MAX_TASKS})"
        )
    seen: set[str] = set()
    for number, task in enumerate(tasks):
        name = task.get("name")
        if problem := file_name_problem(name):
            raise UserError(f"{where}: tasks[{number}].name: {problem}")
        if name in seen:
            raise UserError(f"{where}: tasks[{number}]: task {name!r} appears twice")
        seen.add(name)
        check_task_sizes(task, where, f"tasks[{number}] ({name})")


def check_task_sizes(task: dict[str, Any], where: str, field: str) -> None:
    """One task's labels (unique strings, at most `MAX_LABELS`), `max_length`, `layer` and the
    sizes of its head and task layer; `field` names the task in errors."""
    labels = task.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise UserError(f"{where}: {field}.labels: expected a list of strings")
        if len(labels) > MAX_LABELS:
            raise UserError(
                f"{where}: {field}.labels: {len(labels)} labels, more than a task may have "
                f"({MAX_LABELS})"
            )
        seen: set[str] = set()
        for label in labels:
            if label in seen:
                raise UserError(f"{where}: {field}.labels: label {clip(label)!r} appears twice")
            seen.add(label)
    if task.get("max_length") is not None:
        check_size(task["max_length"], 1, MAX_TASK_LENGTH, where, f"{field}.max_length")
    if "layer" in task:
        check_size(task["layer"], -MAX_LAYERS, MAX_LAYERS, where, f"{field}.layer")
    for part, sizes in TASK_PART_SIZES.items():
        options = task.get(part)
        if options is None:
            continue
        if not isinstance(options, dict):
            raise UserError(f"{where}: {field}.{part}: expected an object, got {kind_of(options)}")
        for size in sizes:
            if options.get(size) is not None:
                check_size(options[size], 1, MAX_HEAD_SIZE, where, f"{field}.{part}.{size}")


@dataclass
class MultiTaskOutput(ModelOutput):
    """Output of one task: `loss` (when labels are given) and `logits`; with
    `output_hidden_states=True` / `output_attentions=True`, the hidden states (embeddings first)
    and attention weights of the encoder layers on the way to the layer the task's head reads."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    # the run's penalties of this training pass (regularizers.py), set by a forward hook
    regularization: Tensor | None = None


@dataclass
class TaskStates:
    """One encoder pass, per task that reads the encoder: `states`, what its head (or task layer)
    reads; `hidden_states`, the hidden states on the way there (embeddings, then each layer up to
    the one it reads; a column task's top layers are its column's); `attentions`, those layers'
    attention weights (only when asked for, and only from attention implementations that give
    them, e.g. `eager`)."""

    states: dict[str, Tensor]
    hidden_states: dict[str, tuple[Tensor, ...]] = field(default_factory=dict)
    attentions: dict[str, tuple[Tensor, ...]] = field(default_factory=dict)
