"""`MultiTaskConfig` (the encoder's config plus one metadata dict per task) and
`MultiTaskOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import ModelOutput


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

    @property
    def task_names(self) -> list[str]:
        return [task["name"] for task in self.tasks or []]

    def task(self, name: str) -> dict[str, Any]:
        for task in self.tasks or []:
            if task["name"] == name:
                return task
        raise KeyError(f"no task {name!r} in this model; tasks: {', '.join(self.task_names)}")

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


@dataclass
class MultiTaskOutput(ModelOutput):
    """Output of one task: `loss` (when labels are given) and `logits`."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    # the run's penalties of this training pass (regularizers.py), set by a forward hook
    regularization: Tensor | None = None
