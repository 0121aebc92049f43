"""Task hierarchies: low supervision and joint many-task (JMT) layering.

Low supervision (Søgaard & Goldberg 2016, "Deep multi-task learning with low level tasks
supervised at lower layers"): a card's `layer` picks the encoder layer its head reads.
`truncated_encoder` lets the model run the encoder only as deep as the deepest layer a batch's
tasks read, so a low task's loss never reaches the layers above it.

Joint many-task layering (Hashimoto et al. 2017, "A Joint Many-Task Model"): a task that
`stack_on`s another has its own task layer (BiLSTM or transformer layer, `TASK_LAYERS`) whose
input per token joins the encoder's hidden states at the task's layer (shortcut connection), the
lower task's task-layer output and the label embedding of the lower task's predicted label
distribution (softmax(logits) x a learned label-embedding matrix). Successive regularization
(`SuccessiveRegularizer`) pulls the parameters a task shares with the task below it toward their
values after that task's latest update: delta * ||theta - theta'||^2.

Imports only torch and mtnlp's modeling-side modules (a saved model stays loadable).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mtnlp.utils.errors import UserError
from mtnlp.utils.registry import Registry

try:
    from transformers.utils.output_capturing import (
        maybe_install_capturing_hooks as install_recording_hooks,
    )
except ImportError:  # transformers releases that hook the modules anew on every call

    def install_recording_hooks(model: nn.Module) -> None:
        pass


TASK_LAYERS: Registry[type[nn.Module]] = Registry("task layer type")


def stack_chain(specs: Mapping[str, dict[str, Any]], task: str) -> list[str]:
    """`task` and the tasks it stacks on, lowest first (e.g. pos, chunk, ner for ner)."""
    chain = [task]
    while (lower := specs[chain[-1]].get("stack_on")) is not None:
        if lower in chain:
            raise ValueError(
                f"task {task}: stack_on forms a cycle ({' -> '.join([*chain, lower])})"
            )
        chain.append(lower)
    return chain[::-1]


def with_dependencies(specs: Mapping[str, dict[str, Any]], tasks: list[str]) -> list[str]:
    """The requested tasks plus every task they stack on, each after the tasks below it."""
    order: list[str] = []
    for task in tasks:
        order.extend(name for name in stack_chain(specs, task) if name not in order)
    return order


def reads_encoder(spec: dict[str, Any]) -> bool:
    """Whether a task reads encoder hidden states itself (a stacked task: only by its shortcut)."""
    layer = spec.get("task_layer")
    return spec.get("stack_on") is None or layer is None or layer["shortcut"]


def uses_label_embeddings(spec: dict[str, Any]) -> bool:
    layer = spec.get("task_layer")
    return spec.get("stack_on") is not None and layer is not None and layer["label_embeddings"]


def check_stacking(specs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Problems of a set of tasks' stacking as (task, field, message); empty when it is sound."""
    by_name = {spec["name"]: spec for spec in specs}
    problems = []
    for spec in specs:
        lower = spec.get("stack_on")
        if lower is None:
            continue
        if lower not in by_name:
            known = ", ".join(by_name)
            problems.append(
                (spec["name"], "stack_on", f"no task {lower!r} among the tasks ({known})")
            )
            continue
        try:
            stack_chain(by_name, spec["name"])
        except ValueError as error:
            problems.append((spec["name"], "stack_on", str(error).split(": ", 1)[1]))
            continue
        if uses_label_embeddings(spec) and not by_name[lower].get("labels"):
            problems.append(
                (
                    spec["name"],
                    "task_layer.label_embeddings",
                    f"task {lower!r} has no labels to embed; set label_embeddings: false",
                )
            )
    return problems


def find_layer_list(encoder: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The encoder's list of transformer layers (e.g. BERT's `encoder.layer`) and its name."""
    count = encoder.config.num_hidden_layers
    for name, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    return None


@contextlib.contextmanager
def truncated_encoder(encoder: nn.Module, depth: int) -> Iterator[None]:
    """Within the block the encoder runs only its first `depth` layers (all when it cannot)."""
    if depth >= encoder.config.num_hidden_layers:  # the full encoder: nothing to look up
        yield
        return
    found = find_layer_list(encoder)
    if found is None or depth >= len(found[1]):
        yield
        return
    name, layers = found
    # transformers records hidden states and attentions through hooks that it installs once, on
    # the modules in place at the first call that asks for them: install them on every layer
    install_recording_hooks(encoder)
    parent_name, _, attribute = name.rpartition(".")
    parent = encoder.get_submodule(parent_name)
    setattr(parent, attribute, nn.ModuleList(list(layers)[:depth]))
    try:
        yield
    finally:
        setattr(parent, attribute, layers)


@TASK_LAYERS.register("bilstm")
class BiLSTMLayer(nn.Module):
    """A bidirectional LSTM over the tokens (JMT's task layer); `output_size` over both directions.

    Sequences are packed by length, so padding never changes a real token's output; inputs must
    be right-padded.
    """

    def __init__(self, input_size: int, output_size: int, options: dict[str, Any]) -> None:
        super().__init__()
        if output_size % 2:
            raise ValueError(f"a bilstm task layer needs an even hidden_size, got {output_size}")
        self.rnn = nn.LSTM(input_size, output_size // 2, batch_first=True, bidirectional=True)

    def forward(self, x: Tensor, attention_mask: Tensor) -> Tensor:
        lengths = attention_mask.sum(1)  # (batch,)
        positions = torch.arange(x.shape[1], device=x.device)
        if not torch.equal(attention_mask.bool(), positions < lengths.unsqueeze(1)):
            raise ValueError("a bilstm task layer needs right-padded inputs (padding_side='right')")
        self.rnn.flatten_parameters()
        packed = pack_padded_sequence(
            x, lengths.cpu().clamp(min=1), batch_first=True, enforce_sorted=False
        )
        output, _ = self.rnn(packed)
        output, _ = pad_packed_sequence(output, batch_first=True, total_length=x.shape[1])
        return output  # (batch, tokens, output_size)


@TASK_LAYERS.register("transformer")
class TransformerTaskLayer(nn.Module):
    """A projection to `output_size` and one transformer encoder layer (self-attention over the
    sentence; 64 dimensions per head unless `num_heads` is given)."""

    def __init__(self, input_size: int, output_size: int, options: dict[str, Any]) -> None:
        super().__init__()
        heads = options.get("num_heads") or (output_size // 64 if output_size % 64 == 0 else 1)
        if output_size % heads:
            raise ValueError(
                f"task layer hidden_size {output_size} is not divisible by {heads} heads"
            )
        self.project = nn.Linear(input_size, output_size)
        self.layer = nn.TransformerEncoderLayer(
            output_size,
            heads,
            dim_feedforward=4 * output_size,
            dropout=options["dropout"],
            activation="gelu",
            batch_first=True,
        )

    def forward(self, x: Tensor, attention_mask: Tensor) -> Tensor:
        return self.layer(self.project(x), src_key_padding_mask=~attention_mask.bool())


class TaskLayer(nn.Module):
    """A task's own layer between the encoder and its head (Hashimoto et al. 2017).

    Input per token: [encoder states at the task's layer (shortcut; always for an unstacked task);
    the lower task's task-layer output; the label embedding of the lower task's predicted
    distribution], fed to the configured `TASK_LAYERS` layer.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        hidden_size: int,
        lower_size: int | None = None,
        lower_labels: int | None = None,
    ) -> None:
        super().__init__()
        options = spec["task_layer"]
        self.shortcut = reads_encoder(spec)
        self.label_embedding = (
            nn.Linear(lower_labels, options["label_embedding_size"], bias=False)
            if uses_label_embeddings(spec)
            else None
        )
        input_size = (hidden_size if self.shortcut else 0) + (lower_size or 0)
        if self.label_embedding is not None:
            input_size += options["label_embedding_size"]
        self.output_size = options["hidden_size"] or hidden_size
        self.dropout = nn.Dropout(options["dropout"])
        self.layer = TASK_LAYERS.get(options["type"])(input_size, self.output_size, options)

    def forward(
        self,
        hidden: Tensor | None,
        attention_mask: Tensor,
        lower_states: Tensor | None = None,
        lower_logits: Tensor | None = None,
    ) -> Tensor:
        parts = [hidden] if self.shortcut else []
        if lower_states is not None:
            parts.append(lower_states)
        if self.label_embedding is not None:
            probabilities = lower_logits.float().softmax(-1).to(lower_states.dtype)
            if probabilities.dim() == 2:  # sentence-level lower task: (batch, labels) per token
                probabilities = probabilities.unsqueeze(1).expand(-1, attention_mask.shape[1], -1)
            parts.append(self.label_embedding(probabilities))  # (batch, tokens, embedding size)
        x = self.dropout(torch.cat(parts, dim=-1))
        return self.layer(x, attention_mask)


def build_task_layers(
    specs: list[dict[str, Any]], hidden_size: int
) -> tuple[nn.ModuleDict, dict[str, int]]:
    """Task layers of the tasks that have one, and the input size of every task's head; a
    `UserError` when the tasks' stacking is not sound (a model folder's config.json is input)."""
    problems = check_stacking(specs)
    if problems:
        raise UserError(
            "; ".join(f"task {task}: {field}: {message}" for task, field, message in problems)
        )
    by_name = {spec["name"]: spec for spec in specs}
    layers = nn.ModuleDict()
    sizes: dict[str, int] = {}
    for name in with_dependencies(by_name, list(by_name)):
        spec = by_name[name]
        if spec.get("task_layer") is None:
            sizes[name] = hidden_size
            continue
        lower = spec.get("stack_on")
        lower_labels = by_name[lower].get("labels") if lower else None
        layer = TaskLayer(
            spec,
            hidden_size,
            lower_size=sizes[lower] if lower else None,
            lower_labels=len(lower_labels) if lower_labels else None,
        )
        layers[name] = layer
        sizes[name] = layer.output_size
    return layers, sizes
