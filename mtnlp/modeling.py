"""`MultiTaskConfig` and `MultiTaskModel`: one shared encoder, one head per task (MT-DNN).

Liu et al. 2019, "Multi-Task Deep Neural Networks for Natural Language Understanding". The
encoder is any Hugging Face `AutoModel` encoder, stored as a sub-config; tasks are plain JSON
metadata (the `model_spec()` of each card), so `from_pretrained` rebuilds every head from the
config alone. Loading is safetensors only and strict. This module imports only torch, safetensors,
transformers and mtnlp's modeling-side modules.
"""

from __future__ import annotations

import inspect
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import ModelOutput
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from mtnlp.errors import UserError
from mtnlp.heads import HEADS
from mtnlp.hierarchy import build_task_layers, reads_encoder, truncated_encoder, with_dependencies
from mtnlp.sharing import build_sharing, resolve_sharing


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


@dataclass
class MultiTaskOutput(ModelOutput):
    """Output of one task: `loss` (when labels are given) and `logits`."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    # the run's penalties of this training pass (regularizers.py), set by a forward hook
    regularization: Tensor | None = None


def check_weight_files(folder: Path) -> None:
    """A `UserError` unless `folder` holds safetensors weights whose every file opens whole.

    mtnlp never unpickles a `pytorch_model.bin` (unpickling can run code), and a truncated or
    garbled file must not reach a loader, whose error would be a traceback.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors weights (mtnlp never unpickles models)")
    for path in files:
        try:
            with safe_open(path, framework="pt"):  # reads the header, checks the file's length
                pass
        except (SafetensorError, OSError) as error:
            raise UserError(f"{path}: not a complete safetensors file ({error})") from None


def _check_loaded(name: str, info: dict[str, Any]) -> None:
    """Every weight of the model came from the file and every weight of the file found its place;
    else a `UserError` naming the first keys of each kind."""
    kinds = {
        "missing": info["missing_keys"],
        "unexpected": info["unexpected_keys"],
        "other shape": {key for key, *_shapes in info["mismatched_keys"]},
    }
    problems = [
        f"{kind}: {', '.join(sorted(keys)[:3])}{', ...' if len(keys) > 3 else ''}"
        for kind, keys in kinds.items()
        if keys
    ]
    if problems:
        raise UserError(
            f"{name}: the weights do not fit the tasks of its config.json ({'; '.join(problems)})"
        )


def _not_a_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


@contextmanager
def _quiet_load_report():
    """Mute transformers' table of unfitting weights: `_check_loaded` turns it into the error."""
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_not_a_load_report)
    try:
        yield
    finally:
        logger.removeFilter(_not_a_load_report)


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
        self._check_layers()
        # JMT task layers (Hashimoto et al. 2017) of stacked tasks; heads read their outputs
        self.task_layers, head_sizes = build_task_layers(
            config.tasks or [], config.encoder.hidden_size
        )
        self.sharing = build_sharing(config.sharing, self.encoder, config.task_names)
        self.heads = nn.ModuleDict(
            {
                task["name"]: HEADS.get(task["type"])(task, head_sizes[task["name"]])
                for task in config.tasks or []
            }
        )
        self.post_init()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_encoder(
        cls,
        encoder: str | PreTrainedModel,
        tasks: list[dict[str, Any]],
        sharing: dict[str, Any] | None = None,
        **load_kwargs: Any,
    ) -> MultiTaskModel:
        """A new model whose encoder holds pretrained weights and whose heads are fresh.

        `encoder` is a Hub id, a local folder, or an already built encoder model; `tasks` are
        the cards' `model_spec()` dicts; `sharing` the sharing strategy (sharing.py). Every
        encoder weight must load (strict), so a typo in a checkpoint name can never leave the
        encoder silently random.
        """
        if not isinstance(encoder, PreTrainedModel):
            encoder = AutoModel.from_pretrained(encoder, **load_kwargs)
        config = MultiTaskConfig(
            encoder=encoder.config.to_dict(), tasks=tasks, sharing=resolve_sharing(sharing)
        )
        model = cls(config)
        state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("pooler.")}
        model.encoder.load_state_dict(state, strict=True)
        model.sharing.load_from_encoder(model.encoder)  # task columns start pretrained
        return model

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any
    ) -> MultiTaskModel:
        """A trained model from a folder or Hub id: safetensors only, and strict.

        transformers would unpickle a `pytorch_model.bin` and load weights that do not fit the
        config (other tasks, other head shapes) with a printed report, leaving them random. Here
        each of these is a `UserError` naming the folder: no safetensors weights, a truncated
        file, tasks in config.json that cannot be built (a `stack_on` cycle, a layer the encoder
        lacks), missing, unexpected or mismatched weights. (`AutoModel.from_pretrained` comes
        here too.)
        """
        name = str(pretrained_model_name_or_path)
        if Path(name).is_dir():
            check_weight_files(Path(name))
        loading_info = kwargs.pop("output_loading_info", False)
        kwargs.update(use_safetensors=True, ignore_mismatched_sizes=True)  # checked below
        try:
            with _quiet_load_report():
                model, info = super().from_pretrained(
                    pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
                )
        except UserError as error:  # raised by __init__: the config's tasks do not build
            raise UserError(f"{Path(name) / 'config.json'}: {error}") from None
        _check_loaded(name, info)
        return (model, info) if loading_info else model

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Push the encoder, every head, the label maps and a model card naming every task (pass
        `tokenizer=` and the training `run_dir=` to add the tokenizer, cards and dev metrics);
        see `mtnlp.hub.push_to_hub`. Replaces transformers' push, whose card knows no tasks."""
        from mtnlp.hub import push_to_hub  # huggingface_hub and cards only: no data or training

        return push_to_hub(self, repo_id, **kwargs)

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

    def regularization_loss(self) -> Tensor | float:
        """The sharing strategy's penalty for the training loss: soft sharing's parameter
        distance, sluice's subspace orthogonality of the latest training forward passes (0 for
        hard sharing and cross-stitch)."""
        return self.sharing.regularization_loss()

    # ---------------------------------------------------------------- forward
    def layer_index(self, task: str) -> int:
        """Index into the encoder's hidden states (0 = embeddings, L = last layer)."""
        layer = self.config.task(task).get("layer", -1)
        num_layers = self.config.encoder.num_hidden_layers
        return layer if layer >= 0 else num_layers + 1 + layer

    def _check_layers(self) -> None:
        """Every task's `layer` must name one of the encoder's hidden states."""
        num_layers = self.config.encoder.num_hidden_layers
        for task in self.config.tasks or []:
            if not 0 <= self.layer_index(task["name"]) <= num_layers:
                raise UserError(
                    f"task {task['name']}: layer: {task.get('layer')} is not a layer of this "
                    f"encoder (0..{num_layers}, or -{num_layers + 1}..-1 counting from the top)"
                )

    def task_order(self, tasks: list[str]) -> list[str]:
        """`tasks` plus the tasks they stack on, each after the tasks below it."""
        specs = {name: self.config.task(name) for name in self.config.task_names}
        for task in tasks:
            self.config.task(task)  # an unknown task: KeyError naming the model's tasks
        return with_dependencies(specs, tasks)

    def encode(self, tasks: list[str], **inputs: Tensor) -> dict[str, Tensor]:
        """Run the encoder once, only as deep as the deepest layer that `tasks` and the tasks they
        stack on read (low supervision: layers above it get no work and no gradient); return, per
        task that reads the encoder, the hidden states of its layer."""
        layers = {
            task: self.layer_index(task)
            for task in self.task_order(tasks)
            if reads_encoder(self.config.task(task))
        }
        if self.sharing.columns:  # per-task top layers (soft, cross_stitch, sluice)
            return self.sharing.encode(self.encoder, layers, inputs)
        depth = max(layers.values())
        need_all = any(index != depth for index in layers.values())
        with truncated_encoder(self.encoder, depth):
            outputs = self.encoder(**inputs, output_hidden_states=need_all, return_dict=True)
        return {
            task: outputs.last_hidden_state if index == depth else outputs.hidden_states[index]
            for task, index in layers.items()
        }

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
            raise ValueError(
                f"pass task=...; this model's tasks: {', '.join(self.config.task_names)}"
            )
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
        states: dict[str, Tensor] = {}
        logits: dict[str, Tensor] = {}
        losses: dict[str, Tensor | None] = {}
        for task in self.task_order(tasks):  # a stacked task after the tasks below it
            states[task] = self._task_states(task, hidden, states, logits, attention_mask)
            logits[task], losses[task] = self.heads[task](
                states[task], attention_mask, labels.get(task) if task in tasks else None
            )
        return {task: MultiTaskOutput(loss=losses[task], logits=logits[task]) for task in tasks}

    def _task_states(
        self,
        task: str,
        hidden: dict[str, Tensor],
        states: dict[str, Tensor],
        logits: dict[str, Tensor],
        attention_mask: Tensor,
    ) -> Tensor:
        """What the task's head reads: encoder states, or its task layer's output (JMT)."""
        if task not in self.task_layers:
            return hidden[task]
        lower = self.config.task(task).get("stack_on")
        return self.task_layers[task](
            hidden.get(task), attention_mask, states.get(lower), logits.get(lower)
        )
