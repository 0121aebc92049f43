"""`MultiTaskConfig` (the encoder's config plus one metadata dict per task), `MultiTaskOutput`
and `TaskStates` (what one encoder pass gives each task).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import ModelOutput

from mtnlp.utils.errors import UserError


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

    def __post_init__(self, **kwargs: Any) -> None:
        check_task_entries(self.tasks)
        super().__post_init__(**kwargs)

    @property
    def task_names(self) -> list[str]:
        return [task["name"] for task in self.tasks or []]

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


def check_task_entries(tasks: Any) -> None:
    """A config's task list must name each task once, with unique string label names: a
    `UserError` (one line) otherwise, so that a label id never means two labels."""
    if tasks is None:
        return
    if not isinstance(tasks, list) or not all(isinstance(task, dict) for task in tasks):
        raise UserError("config.json: tasks: expected a list of task objects")
    seen: set[str] = set()
    for number, task in enumerate(tasks):
        name = task.get("name")
        if not isinstance(name, str):
            raise UserError(f"config.json: tasks[{number}].name: expected a task name (a string)")
        if name in seen:
            raise UserError(f"config.json: tasks[{number}]: task {name[:40]!r} appears twice")
        seen.add(name)
        labels = task.get("labels")
        if labels is None:
            continue
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise UserError(
                f"config.json: tasks[{number}] ({name[:40]}).labels: expected a list of strings"
            )
        twice = next((label for i, label in enumerate(labels) if label in labels[:i]), None)
        if twice is not None:
            raise UserError(
                f"config.json: tasks[{number}] ({name[:40]}).labels: label {twice[:40]!r} "
                "appears twice"
            )


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
