"""Task heads: one registered head class per task type.

A head turns the encoder's hidden states into task logits, computes its loss and decodes
predictions (what the metrics compare). Heads see the task's metadata as a plain dict (the
`model_spec()` of its card, stored in the model config), so a saved model rebuilds every head
without the card files.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtnlp.utils.errors import UserError
from mtnlp.utils.registry import Registry

HEADS: Registry[type[TaskHead]] = Registry("task type")

IGNORE_INDEX = -100  # label id that the losses skip (padding, non-first sub-tokens)


class TaskHead(nn.Module):
    """Base class: `forward(hidden, mask, labels) -> (logits, loss or None)`."""

    needs_labels: ClassVar[bool] = True  # the card must list label names
    token_level: ClassVar[bool] = False  # one prediction per token rather than per input
    # transformers' `config.problem_type` of the head's task (its plain transformers export)
    problem_type: ClassVar[str | None] = None

    def __init__(self, task: dict[str, Any], hidden_size: int) -> None:
        super().__init__()
        self.task = task
        self.dropout = nn.Dropout(task["head"]["dropout"])
        # from the config, not the weights file (a model saved without them loads as before)
        self.class_weights, self.label_smoothing = (
            loss_options(task) if self.needs_labels else (None, 0.0)
        )

    def class_weight_tensor(self, device: torch.device) -> Tensor | None:
        """The class weights as a float32 tensor on `device` (None: unweighted)."""
        if self.class_weights is None:
            return None
        return torch.tensor(self.class_weights, dtype=torch.float32, device=device)

    def cross_entropy(self, logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy in float32 with the task's class weights and label smoothing (torch's
        definitions: the mean divides by the summed weights of the targets)."""
        return nn.functional.cross_entropy(
            logits.float(),
            labels,
            weight=self.class_weight_tensor(logits.device),
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
            label_smoothing=self.label_smoothing,
        )

    def forward(
        self, hidden: Tensor, attention_mask: Tensor, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def decode(self, logits: Tensor) -> Tensor:
        """Predictions from logits: class ids, values or tag ids."""
        raise NotImplementedError

    def plain_layers(self) -> list[nn.Linear]:
        """The head's linear layers in the order they apply, for a plain transformers head to hold
        (`MultiTaskModel.task_model`: transformers' sequence classification heads read the first
        token, its token classification heads every token); a `ValueError` saying why when no
        such head computes what this one does."""
        raise ValueError(f"a {type(self).__name__} has no plain transformers counterpart")


class PooledHead(TaskHead):
    """Sentence-level head: pool the tokens, optional tanh layer, then an output layer."""

    num_outputs: int

    def __init__(self, task: dict[str, Any], hidden_size: int) -> None:
        super().__init__(task, hidden_size)
        options = task["head"]
        self.pooling = options["pooling"]
        inner = options["hidden_size"]
        self.dense = nn.Linear(hidden_size, inner) if inner else None
        self.out = nn.Linear(inner or hidden_size, self.outputs(task))

    @staticmethod
    def outputs(task: dict[str, Any]) -> int:
        raise NotImplementedError

    def pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        # hidden: (batch, tokens, hidden) -> (batch, hidden)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, tokens, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def plain_layers(self) -> list[nn.Linear]:
        if self.pooling != "cls":
            raise ValueError(
                f"its head pools the tokens by {self.pooling} (head.pooling), while transformers' "
                "sequence classification heads read the first token"
            )
        return [self.dense, self.out] if self.dense is not None else [self.out]

    def project(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.dropout(self.pool(hidden, attention_mask))
        if self.dense is not None:
            x = self.dropout(torch.tanh(self.dense(x)))
        return self.out(x)


def loss_options(task: dict[str, Any]) -> tuple[list[float] | None, float]:
    """The class weights (None: unweighted) and label smoothing of a task with labels, from
    its `loss` entry (absent: plain cross-entropy). config.json is untrusted input: a value that
    does not fit is a `UserError` naming the task and the field."""
    options = task.get("loss") or {}
    where = f"task {task['name']}: loss"
    if not isinstance(options, dict):
        raise UserError(f"{where}: expected an object of class_weights and label_smoothing")
    weights, smoothing = options.get("class_weights"), options.get("label_smoothing", 0.0)
    if type(smoothing) not in (int, float) or not 0 <= smoothing < 1:
        raise UserError(f"{where}.label_smoothing: expected a number in [0, 1)")
    if weights is None:
        return None, float(smoothing)
    if weights == "balanced":
        raise UserError(
            f"{where}.class_weights: 'balanced' is computed from the training data; training "
            "puts the weights in its place"
        )
    count = len(task["labels"])
    if (
        not isinstance(weights, list)
        or len(weights) != count
        or not all(type(w) in (int, float) and math.isfinite(w) and w > 0 for w in weights)
    ):
        raise UserError(f"{where}.class_weights: expected {count} positive numbers, one per label")
    return [float(weight) for weight in weights], float(smoothing)


@HEADS.register("classification")
class ClassificationHead(PooledHead):
    """Single-label classification of a sentence or sentence pair (cross-entropy)."""

    problem_type = "single_label_classification"

    @staticmethod
    def outputs(task: dict[str, Any]) -> int:
        return len(task["labels"])

    def forward(self, hidden, attention_mask, labels=None):
        logits = self.project(hidden, attention_mask)  # (batch, num_labels)
        loss = None
        if labels is not None:
            loss = self.cross_entropy(logits, labels)
        return logits, loss

    def decode(self, logits: Tensor) -> Tensor:
        return logits.argmax(-1)


@HEADS.register("regression")
class RegressionHead(PooledHead):
    """A real-valued score for a sentence or pair, e.g. STS-B similarity (mean squared error)."""

    needs_labels = False
    problem_type = "regression"

    @staticmethod
    def outputs(task: dict[str, Any]) -> int:
        return 1

    def forward(self, hidden, attention_mask, labels=None):
        logits = self.project(hidden, attention_mask).squeeze(-1)  # (batch,)
        loss = None
        if labels is not None:
            loss = nn.functional.mse_loss(logits.float(), labels.float())
        return logits, loss

    def decode(self, logits: Tensor) -> Tensor:
        """The predicted values, clipped to the card's `range` where it gives one."""
        values = logits.float()
        bounds = self.task.get("range")
        return values if bounds is None else values.clamp(min=bounds[0], max=bounds[1])


@HEADS.register("tagging")
class TaggingHead(TaskHead):
    """One label per token (POS, chunking, NER); label id -100 marks tokens without a label."""

    token_level = True

    def __init__(self, task: dict[str, Any], hidden_size: int) -> None:
        super().__init__(task, hidden_size)
        self.out = nn.Linear(hidden_size, len(task["labels"]))

    def forward(self, hidden, attention_mask, labels=None):
        logits = self.out(self.dropout(hidden))  # (batch, tokens, num_labels)
        loss = None
        if labels is not None:
            # (batch * tokens, num_labels) against (batch * tokens,): torch's mean (over the
            # labelled tokens, or their summed class weights), except that a batch whose tokens
            # are all ignored gives a zero loss (not NaN), still connected to the graph.
            labels = labels.flatten()
            total = self.cross_entropy(logits.flatten(0, 1), labels, reduction="sum")
            labelled = labels != IGNORE_INDEX
            weights = self.class_weight_tensor(logits.device)
            if weights is None:
                loss = total / labelled.sum().clamp(min=1)
            else:
                weights = weights[labels.clamp(min=0)] * labelled
                loss = total / weights.sum().clamp(min=torch.finfo(torch.float32).tiny)
        return logits, loss

    def decode(self, logits: Tensor) -> Tensor:
        return logits.argmax(-1)

    def plain_layers(self) -> list[nn.Linear]:
        return [self.out]
