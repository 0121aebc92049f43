"""One task of a multi-task model as a plain transformers model (`MultiTaskModel.task_model`).

A task maps onto the `AutoModelForSequenceClassification` / `AutoModelForTokenClassification`
class of the encoder's config when that class computes exactly what the task's path computes:
the encoder as the task sees it (a soft-sharing task's top layers are its column; a task that
reads a lower layer gets the encoder cut at that layer), then a head with the same linear layers
in the same order (BERT: pooler dense + tanh, then the classifier, for a `cls` head with a dense
layer; RoBERTa: its classification head's dense + tanh and output layer; any token
classification head of dropout + one linear layer). The weights are copied, and the result is
checked against the multi-task model on a probe batch, so a head that looks alike but computes
otherwise (DistilBERT's ReLU, ELECTRA's GELU) is refused rather than exported wrong.

Imports only torch, transformers and mtnlp's modeling-side modules.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING,
)

from mtnlp.modeling.auto import PIPELINE_TASK
from mtnlp.modeling.heads import TaskHead
from mtnlp.modeling.hierarchy import find_layer_list
from mtnlp.utils.errors import UserError

if TYPE_CHECKING:
    from mtnlp.modeling.model import MultiTaskModel

ALTERNATIVES = (
    f'predict it with mtnlp.MultiTaskPipeline or transformers.pipeline("{PIPELINE_TASK}", '
    "model=...)"
)
PROBE_SHAPE = (2, 8)  # the probe batch: 2 inputs of 8 tokens, the second padded after 5


class NoPlainModel(UserError):
    """A task whose head or layout no plain transformers model computes: says why, and what to
    use instead."""

    def __init__(self, task: str, why: str) -> None:
        super().__init__(f"task {task}: {why}; {ALTERNATIVES}")


def single_task_model(model: MultiTaskModel, task: str) -> PreTrainedModel:
    """The task's plain transformers model with the multi-task model's weights (unchecked: see
    `check_same_logits`), in eval mode, on the model's device and dtype."""
    if task not in model.config.task_names:
        raise UserError(
            f"task {task!r}: not a task of this model (tasks: {', '.join(model.config.task_names)})"
        )
    spec, head = model.config.task(task), model.heads[task]
    if model.config.lora:
        raise NoPlainModel(
            task,
            "its encoder carries a LoRA adapter (--peft lora), which a plain transformers model "
            "lacks",
        )
    if task in model.task_layers:
        raise NoPlainModel(
            task,
            f"a {spec['task_layer']['type']} task layer (JMT, task_layer) sits between the "
            "encoder and its head, which no transformers model has",
        )
    if model.sharing.columns and model.sharing.mixes_tasks:
        raise NoPlainModel(
            task,
            f"{model.sharing.name} sharing mixes its top layers with the other tasks', which no "
            "single-task model computes",
        )
    try:
        layers = head.plain_layers()
    except ValueError as error:
        raise NoPlainModel(task, str(error)) from None
    depth = model.layer_index(task)
    config = plain_config(model.config.encoder, spec, head, layers, depth)
    mapping = (
        MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING
        if head.token_level
        else MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
    )
    if type(config) not in mapping:
        kind = "token" if head.token_level else "sequence"
        raise NoPlainModel(task, f"transformers has no {config.model_type} {kind} classifier")
    plain = mapping[type(config)](config).to(device=model.device, dtype=model.dtype)
    state = task_encoder_state(model, task, depth)
    unexpected = plain.base_model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise NoPlainModel(
            task,
            f"{type(plain).__name__}'s encoder lacks weights of the task's "
            f"({', '.join(sorted(unexpected)[:3])})",
        )
    copy_head(task, plain, {f"{plain.base_model_prefix}.{name}" for name in state}, layers)
    return plain.eval()


def plain_config(
    encoder: PreTrainedConfig,
    spec: dict[str, Any],
    head: TaskHead,
    layers: list[nn.Linear],
    depth: int,
) -> PreTrainedConfig:
    """The encoder's config as a single-task model's: `depth` layers, the task's labels
    (`id2label` / `label2id`; a regression score: one label), `problem_type`, head dropout."""
    config = copy.deepcopy(encoder)
    config.num_hidden_layers = depth
    labels = spec.get("labels")
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
    else:
        config.num_labels = layers[-1].out_features
    config.problem_type = head.problem_type
    if hasattr(config, "classifier_dropout"):
        config.classifier_dropout = spec["head"]["dropout"]
    return config


def task_encoder_state(model: MultiTaskModel, task: str, depth: int) -> dict[str, Tensor]:
    """The encoder's weights as `task` sees them: a column task's top layers are its column's,
    and only the first `depth` layers are kept."""
    state = model.encoder.state_dict()
    if not model.sharing.columns and depth >= model.config.encoder.num_hidden_layers:
        return state
    found = find_layer_list(model.encoder)
    if found is None:
        raise NoPlainModel(
            task, f"it reads layer {depth} of an encoder that mtnlp cannot cut below the top"
        )
    prefix = f"{found[0]}."
    if model.sharing.columns:  # soft sharing: the task's column is its top layers
        bottom = model.sharing.bottom
        for name, value in model.sharing.column[task].state_dict().items():
            index, rest = name.split(".", 1)
            state[f"{prefix}{bottom + int(index)}.{rest}"] = value
    return {
        name: value
        for name, value in state.items()
        if not name.startswith(prefix) or int(name[len(prefix) :].split(".")[0]) < depth
    }


def copy_head(task: str, plain: PreTrainedModel, loaded: set[str], layers: list[nn.Linear]) -> None:
    """Copy the task head's `layers` into the weights of `plain` that its encoder does not hold
    (`loaded`), which must be linear layers of the same shapes in the same order."""
    rest = [name for name in plain.state_dict() if name not in loaded]
    targets = [
        (name, module)
        for name, module in plain.named_modules()
        if isinstance(module, nn.Linear) and f"{name}.weight" in rest
    ]
    covered = {f"{name}.{p}" for name, module in targets for p, _ in module.named_parameters()}
    fits = set(rest) == covered and [_shape(m) for _, m in targets] == list(map(_shape, layers))
    if not fits:
        theirs = ", ".join(f"{name}: {_describe(m)}" for name, m in targets) or "none"
        extra = sorted(set(rest) - covered)
        if extra:
            theirs += f"; other weights: {', '.join(extra[:3])}"
        hint = ""
        if len(targets) == len(layers) + 1 and not extra:  # e.g. BERT's pooler: a dense layer
            hint = f" (a card's head.hidden_size: {targets[0][1].out_features} adds a dense layer)"
        raise NoPlainModel(
            task,
            f"its head's layers ({', '.join(map(_describe, layers))}) do not fit "
            f"{type(plain).__name__}'s ({theirs}){hint}",
        )
    with torch.no_grad():
        for (_, target), source in zip(targets, layers, strict=True):
            target.weight.copy_(source.weight)
            if source.bias is not None:
                target.bias.copy_(source.bias)


def _shape(layer: nn.Linear) -> tuple[int, int, bool]:
    return layer.in_features, layer.out_features, layer.bias is not None


def _describe(layer: nn.Linear) -> str:
    return f"Linear({layer.in_features}, {layer.out_features})"


def probe_inputs(config: PreTrainedConfig, device: torch.device) -> dict[str, Tensor]:
    """A fixed random batch to compare two models' logits: `PROBE_SHAPE` token ids, the second
    input right-padded."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, PROBE_SHAPE, generator=generator)
    mask = torch.ones(PROBE_SHAPE, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def check_same_logits(
    task: str, plain: PreTrainedModel, probe: dict[str, Tensor], expected: Tensor
) -> None:
    """A `NoPlainModel` unless `plain` gives the task's logits `expected` on `probe` (another
    activation or pooling in a head of the same shapes shows here)."""
    with torch.no_grad():
        actual = plain(**probe).logits.view_as(expected)
    precise = expected.dtype in (torch.float32, torch.float64)
    tolerance = 1e-5 if precise else 2e-2
    if not torch.allclose(actual, expected, rtol=tolerance, atol=tolerance):
        difference = (actual - expected).abs().max().item()
        raise NoPlainModel(
            task,
            f"{type(plain).__name__} computes other logits than the task's head (by up to "
            f"{difference:.2g} on a probe batch: another activation or pooling)",
        )
