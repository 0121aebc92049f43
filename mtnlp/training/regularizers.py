"""Run-level regularizers that the trainer adds to the loss: block-sparse task heads and an
adversarial task discriminator.

- Block-sparse regularization (`--block-sparse LAMBDA`, `--block-sparse-q 2|inf`): the l1/lq
  mixed norm over the rows of the stacked task-head weight matrix, whose row i holds every task's
  weights on encoder feature i, so that the tasks select a shared small set of features (Argyriou
  et al. 2007, "Multi-Task Feature Learning", q = 2; Obozinski et al. 2010, "Joint covariate
  selection and joint subspace selection for multiple classification problems", q = inf).
- Adversarial auxiliary task (`--adversarial LAMBDA`): a discriminator predicts from the shared
  representation which task a batch comes from, behind a gradient reversal layer that scales the
  gradient reaching the encoder by -LAMBDA, so the shared encoder learns task-invariant features
  (Ganin & Lempitsky 2015, "Unsupervised Domain Adaptation by Backpropagation"; Liu, Qiu & Huang
  2017, "Adversarial Multi-task Learning for Text Classification"). The shared representation is
  the output of the shared encoder: its top for hard sharing, the shared bottom for the column
  strategies of `sharing.py`.

Both are training-time only: nothing here is saved with the model.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mtnlp.modeling.hierarchy import (
    find_layer_list,
    reads_encoder,
    stack_chain,
    uses_label_embeddings,
)
from mtnlp.utils.errors import UserError

BLOCK_SPARSE_Q = {"2": 2.0, "inf": float("inf")}


def mixed_norm(weights: Tensor, q: float, dim: int = 1) -> Tensor:
    """The l1/lq mixed norm of `weights`: the lq norms along `dim` (by default, of the rows
    sum_i ||W[i, :]||_q), summed."""
    return torch.linalg.vector_norm(weights.float(), ord=q, dim=dim).sum()


def head_feature_weights(model: nn.Module) -> dict[str, Tensor]:
    """Per task, the weight of its head's first linear layer over the encoder features,
    (outputs, features). Heads that read other features (a JMT task layer) are left out."""
    hidden_size = model.config.encoder.hidden_size
    weights = {}
    for task, head in model.heads.items():
        first = next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
        if first is not None and first.in_features == hidden_size and task not in model.task_layers:
            weights[task] = first.weight
    return weights


def block_sparse_penalty(model: nn.Module, q: float) -> Tensor:
    """The mixed norm over features of the stacked head weights: the lq norm of each feature's
    weights in every head, summed over the features."""
    stacked = torch.cat(list(head_feature_weights(model).values()))  # (sum of outputs, features)
    return mixed_norm(stacked, q, dim=0)


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -scale (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def reverse_gradient(x: Tensor, scale: float = 1.0) -> Tensor:
    """`x` unchanged, but the gradient flowing back through it is multiplied by -`scale`."""
    return _GradientReversal.apply(x, scale)


class TaskDiscriminator(nn.Module):
    """A linear task classifier on the mean-pooled shared representation, behind a gradient
    reversal layer of scale `weight` (Liu et al. 2017: D(s) = softmax(U s + b))."""

    def __init__(self, hidden_size: int, tasks: list[str], weight: float) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.weight = weight
        self.out = nn.Linear(hidden_size, len(self.tasks))

    def forward(self, hidden: Tensor, attention_mask: Tensor | None, task: str) -> Tensor:
        """The discriminator's cross-entropy on a batch of `task` (hidden: (batch, tokens, h))."""
        hidden = reverse_gradient(hidden, self.weight)
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, tokens, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (batch, h)
        logits = self.out(pooled).float()  # (batch, tasks)
        target = torch.full((logits.shape[0],), self.tasks.index(task), device=logits.device)
        return nn.functional.cross_entropy(logits, target)


PENALTY_KEY = "regularization"


class TaskPrior(Protocol):
    """A penalty on the task parameters with state updated between steps
    (`relationships.TaskRelationshipPrior`, `relationships.TaskClustering`)."""

    name: str

    def penalty(self, model: nn.Module) -> Tensor: ...

    def update(self, model: nn.Module, step: int) -> list[dict[str, Any]]: ...


class RunRegularizers(nn.Module):
    """What the trainer adds to each micro-batch's loss besides the task losses: the sharing
    strategy's penalty (`MultiTaskModel.regularization_loss`), block_sparse x the head mixed
    norm, the task priors' penalties (`relationships.py`; their `update` after each step) and the
    adversarial discriminator's loss on the shared representation.

    Inside `hooked(model)`, call `loss(tasks)` after the training forward passes of the
    micro-batch's `tasks` (in that order, through `model(task=...)`). Forward hooks collect the
    terms while the model trains: the penalties are computed inside the model's forward call and
    also returned in its output (`output["regularization"]`), so that DDP, which looks for the
    parameters a step uses in the forward outputs, syncs the gradients of every parameter they
    reach (e.g. the columns and heads of tasks absent from the batch). The penalties of several
    passes are averaged.
    The discriminator's parameters are this module's; it does nothing with fewer than two tasks.
    """

    def __init__(
        self,
        model: nn.Module,
        block_sparse: float = 0.0,
        q: str = "2",
        adversarial: float = 0.0,
        priors: Sequence[TaskPrior] = (),
    ) -> None:
        super().__init__()
        self.priors = list(priors)
        if q not in BLOCK_SPARSE_Q:
            raise UserError(f"--block-sparse-q: {q!r}; expected 2 or inf")
        if block_sparse < 0 or adversarial < 0:
            raise UserError("--block-sparse / --adversarial: must be >= 0")
        self.block_sparse, self.q = block_sparse, BLOCK_SPARSE_Q[q]
        tasks = model.config.task_names
        self.discriminator = None
        self._penalties: list[Tensor] = []
        self._captured: list[tuple[Tensor, Tensor | None]] = []
        if adversarial > 0 and len(tasks) > 1:
            hidden_size = model.config.encoder.hidden_size
            self.discriminator = TaskDiscriminator(hidden_size, tasks, adversarial)

    @contextlib.contextmanager
    def hooked(self, model: nn.Module) -> Iterator[None]:
        """Collect the terms from `model`'s training forward passes while inside: forward hooks
        on the model (its penalties) and, with a discriminator, on the shared representation
        (the encoder's output, or the shared bottom's, sharing.py); removed on leaving."""
        handles = [model.register_forward_hook(self._penalize)]
        if self.discriminator is not None:
            shared = model.sharing.shared_output if model.sharing.columns else model.encoder
            handles.append(shared.register_forward_hook(self._capture, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._penalties, self._captured = [], []

    def _penalize(self, model: nn.Module, args: Any, output: Any) -> None:
        if not (model.training and torch.is_grad_enabled()):
            return
        penalty = model.regularization_loss()
        if self.block_sparse > 0:
            penalty = penalty + self.block_sparse * block_sparse_penalty(model, self.q)
        for prior in self.priors:
            penalty = penalty + prior.penalty(model)
        if isinstance(penalty, Tensor):
            output[PENALTY_KEY] = penalty
            self._penalties.append(penalty)

    def _capture(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if module.training and torch.is_grad_enabled():
            hidden = getattr(output, "last_hidden_state", output)
            self._captured.append((hidden, kwargs.get("attention_mask")))

    def update(self, model: nn.Module, step: int) -> list[dict[str, Any]]:
        """After optimizer step `step`: the task priors' updates; their records for the log."""
        return [record for prior in self.priors for record in prior.update(model, step)]

    def loss(self, tasks: list[str]) -> Tensor | float:
        """The mean penalty of the latest `len(tasks)` training passes plus the discriminator's
        loss on each of them; what was collected is then dropped."""
        count = len(tasks)
        penalties, self._penalties = self._penalties[len(self._penalties) - count :], []
        captured, self._captured = self._captured[len(self._captured) - count :], []
        total: Tensor | float = sum(penalties) / len(penalties) if penalties else 0.0
        if self.discriminator is not None:
            for task, (hidden, mask) in zip(tasks, captured, strict=True):
                total = total + self.discriminator(hidden, mask, task)
        return total


def trained_parameter_names(model: nn.Module, task: str) -> set[str]:
    """Names of the parameters `task`'s loss reaches: the encoder's embeddings and its layers up to
    the deepest layer read in the task's stack, the stack's task layers, the task's head, and the
    heads of lower tasks whose predictions feed a label embedding."""
    specs = {spec["name"]: spec for spec in model.config.tasks}
    chain = stack_chain(specs, task)
    depth = max(model.layer_index(name) for name in chain if reads_encoder(specs[name]))
    found = find_layer_list(model.encoder)
    prefix = f"{found[0]}." if found is not None else None
    names = {
        f"encoder.{name}"
        for name, _ in model.encoder.named_parameters()
        # outside the layer list (embeddings), or in one of the first `depth` layers
        if prefix is None
        or not name.startswith(prefix)
        or int(name[len(prefix) :].split(".")[0]) < depth
    }
    modules = {f"heads.{task}": model.heads[task]}
    for lower, upper in itertools.pairwise(chain):
        if uses_label_embeddings(specs[upper]):
            modules[f"heads.{lower}"] = model.heads[lower]
    for name in chain:
        if name in model.task_layers:
            modules[f"task_layers.{name}"] = model.task_layers[name]
    for prefix_name, module in modules.items():
        names.update(f"{prefix_name}.{name}" for name, _ in module.named_parameters())
    return names


def successive_penalty(
    parameters: Mapping[str, Tensor], snapshot: Mapping[str, Tensor], delta: float
) -> Tensor:
    """delta * sum over parameters of ||theta - theta'||^2 (Hashimoto et al. 2017, eq. 5-7)."""
    total = sum(((value - snapshot[name]) ** 2).sum() for name, value in parameters.items())
    return delta * total


class SuccessiveRegularizer:
    """Successive regularization for stacked tasks (Hashimoto et al. 2017).

    While a task with `successive_regularization: delta > 0` trains, the parameters it shares with
    the task it stacks on are pulled toward their values right after that lower task's latest
    optimizer step. Call `penalty(task)` to add to the task's loss before backward, and
    `update(task)` after each optimizer step of `task` (it takes the snapshot). The snapshots are
    its `state_dict` (registered for checkpointing: a resumed run pulls toward the same values).
    """

    def __init__(self, model: nn.Module, deltas: Mapping[str, float]) -> None:
        specs = {spec["name"]: spec for spec in model.config.tasks}
        self.deltas = {task: delta for task, delta in deltas.items() if delta > 0}
        self.lower: dict[str, str] = {}
        for task in self.deltas:
            if specs[task].get("stack_on") is None:
                raise ValueError(f"task {task}: successive regularization needs stack_on")
            self.lower[task] = specs[task]["stack_on"]
        self.parameters = dict(model.named_parameters())
        self.shared = {
            task: sorted(
                trained_parameter_names(model, task) & trained_parameter_names(model, lower)
            )
            for task, lower in self.lower.items()
        }
        self.snapshots: dict[str, dict[str, Tensor]] = {}

    def penalty(self, task: str) -> Tensor | float:
        """The task's penalty (0 before the lower task's first update, or when delta is 0)."""
        snapshot = self.snapshots.get(self.lower.get(task, ""))
        if snapshot is None:
            return 0.0
        current = {name: self.parameters[name] for name in self.shared[task]}
        return successive_penalty(current, snapshot, self.deltas[task])

    @torch.no_grad()
    def update(self, task: str) -> None:
        """Snapshot the parameters that tasks stacked on `task` are pulled toward."""
        names = {
            name
            for upper, lower in self.lower.items()
            if lower == task
            for name in self.shared[upper]
        }
        if not names:
            return
        snapshot = self.snapshots.setdefault(task, {})
        for name in names:
            value = self.parameters[name].detach()
            if name in snapshot:
                snapshot[name].copy_(value)
            else:
                snapshot[name] = value.clone()

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {task: dict(snapshot) for task, snapshot in self.snapshots.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        self.snapshots = {
            task: {name: value.to(self.parameters[name].device) for name, value in snapshot.items()}
            for task, snapshot in state.items()
        }
