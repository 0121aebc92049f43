"""`MultiTaskConfig` and `MultiTaskModel`: one shared encoder, one head per task (MT-DNN).

Liu et al. 2019, "Multi-Task Deep Neural Networks for Natural Language Understanding". The
encoder is any Hugging Face `AutoModel` encoder, stored as a sub-config; tasks are plain JSON
metadata (the `model_spec()` of each card), so `from_pretrained` rebuilds every head from the
config alone. This module imports only torch, transformers and mtnlp's modeling-side modules.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import ModelOutput
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from mtnlp.heads import HEADS


class MultiTaskConfig(PreTrainedConfig):
    """Config of a multi-task model: the encoder's config plus one metadata dict per task."""

    model_type = "mtnlp"
    sub_configs_defaults = {"encoder": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    encoder: PreTrainedConfig | dict | None = None
    tasks: list[dict[str, Any]] | None = None

    @property
    def task_names(self) -> list[str]:
        return [task["name"] for task in self.tasks or []]

    def task(self, name: str) -> dict[str, Any]:
        for task in self.tasks or []:
            if task["name"] == name:
                return task
        raise KeyError(f"no task {name!r} in this model; tasks: {', '.join(self.task_names)}")


@dataclass
class MultiTaskOutput(ModelOutput):
    """Output of one task: `loss` (when labels are given) and `logits`."""

    loss: Tensor | None = None
    logits: Tensor | None = None


def _build_encoder(config: PreTrainedConfig) -> PreTrainedModel:
    """An encoder from its config, without the pooler that the heads never use."""
    model_class = MODEL_MAPPING[type(config)]
    kwargs = {}
    if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    return model_class(config, **kwargs)


class MultiTaskModel(PreTrainedModel):
    """A shared encoder with a `ModuleDict` of task heads.

    `model(task="rte", input_ids=..., attention_mask=..., labels=...)` runs one task;
    `model.forward_tasks(["sst2", "cola"], input_ids=...)` runs several heads on one encoder pass.
    Build a new model with `from_encoder` (pretrained encoder weights) and reload a trained one
    with `from_pretrained`.
    """

    config_class = MultiTaskConfig
    base_model_prefix = "mtnlp"
    supports_gradient_checkpointing = True

    def __init__(self, config: MultiTaskConfig) -> None:
        super().__init__(config)
        self.encoder = _build_encoder(config.encoder)
        hidden_size = config.encoder.hidden_size
        self.heads = nn.ModuleDict(
            {task["name"]: HEADS.get(task["type"])(task, hidden_size) for task in config.tasks or []}
        )
        self.post_init()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_encoder(
        cls, encoder: str | PreTrainedModel, tasks: list[dict[str, Any]], **load_kwargs: Any
    ) -> MultiTaskModel:
        """A new model whose encoder holds pretrained weights and whose heads are fresh.

        `encoder` is a Hub id, a local folder, or an already built encoder model; `tasks` are
        the cards' `model_spec()` dicts. Every encoder weight must load (strict), so a typo in a
        checkpoint name can never leave the encoder silently random.
        """
        if not isinstance(encoder, PreTrainedModel):
            encoder = AutoModel.from_pretrained(encoder, **load_kwargs)
        model = cls(MultiTaskConfig(encoder=encoder.config.to_dict(), tasks=tasks))
        state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("pooler.")}
        model.encoder.load_state_dict(state, strict=True)
        return model

    def _init_weights(self, module: nn.Module) -> None:
        """Heads start like the encoder's own layers: normal(0, initializer_range), zero bias."""
        std = getattr(self.config.encoder, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------- forward
    def _layer_index(self, task: str) -> int:
        """Index into the encoder's hidden states (0 = embeddings, L = last layer)."""
        layer = self.config.task(task).get("layer", -1)
        num_layers = self.config.encoder.num_hidden_layers
        return layer if layer >= 0 else num_layers + 1 + layer

    def encode(self, tasks: list[str], **inputs: Tensor) -> dict[str, Tensor]:
        """Run the encoder once; return, per task, the hidden states its head reads."""
        layers = {task: self._layer_index(task) for task in tasks}
        last = self.config.encoder.num_hidden_layers
        need_all = any(index != last for index in layers.values())
        outputs = self.encoder(**inputs, output_hidden_states=need_all, return_dict=True)
        if not need_all:
            return dict.fromkeys(tasks, outputs.last_hidden_state)
        return {task: outputs.hidden_states[index] for task, index in layers.items()}

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        task: str | None = None,
        **kwargs: Any,
    ) -> MultiTaskOutput:
        """Logits (and loss when `labels` is given) of one task."""
        if task is None:
            raise ValueError(f"pass task=...; this model's tasks: {', '.join(self.config.task_names)}")
        return self.forward_tasks(
            [task], input_ids, attention_mask, token_type_ids, {task: labels}, **kwargs
        )[task]

    def forward_tasks(
        self,
        tasks: list[str],
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: dict[str, Tensor | None] | None = None,
        **kwargs: Any,
    ) -> dict[str, MultiTaskOutput]:
        """Several tasks on the same inputs with one encoder pass."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encode(tasks, **inputs)
        labels = labels or {}
        results = {}
        for task in tasks:
            logits, loss = self.heads[task](hidden[task], attention_mask, labels.get(task))
            results[task] = MultiTaskOutput(loss=loss, logits=logits)
        return results
