"""Task affinity diagnostics: which tasks help each other during training, and which conflict.

Every `--affinity-every` steps, on a fixed probe batch per task (its first training batch in file
order) with dropout off, two T x T matrices over the shared encoder's parameters theta_s:

- `gradient_cosine[i][j]`: cosine similarity of the gradients of task i's and task j's losses
  (negative: the tasks pull the shared encoder in conflicting directions; symmetric).
- `lookahead[i][j]`: the inter-task affinity of Fifty et al. 2021 ("Efficiently Identifying Task
  Groupings for Multi-Task Learning"), Z_{i->j} = 1 - L_j(theta_s - lr * grad L_i) / L_j(theta_s):
  the relative change of task j's loss after an SGD lookahead step on task i's loss with the
  peak `--learning-rate` (constant, so records of different steps compare; positive: a step on
  i helps j).

The records go to `train_log.jsonl` (`{"step", "affinity": {...}}`); their mean over the run is
drawn as a heat map, `plots/affinity.png` in the output folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtnlp.artifacts.affinity import Matrix, _as_dict
from mtnlp.cards.schema import TaskCard
from mtnlp.data.loaders import make_dataloader
from mtnlp.data.tokenize import TaskData


def probe_batches(
    cards: Sequence[TaskCard],
    data: Mapping[str, TaskData],
    tokenizer: Any,
    batch_size: int,
    device: torch.device,
) -> dict[str, dict[str, Tensor]]:
    """Each task's first `batch_size` training examples (file order) as one batch on `device`."""
    probes = {}
    for card in cards:
        train = data[card.name].train
        subset = train.select(range(min(batch_size, len(train))))
        batch = next(iter(make_dataloader(card, subset, tokenizer, batch_size, shuffle=False)))
        probes[card.name] = {key: value.to(device) for key, value in batch.items()}
    return probes


def _shared_gradient(
    model: nn.Module, task: str, batch: dict[str, Tensor], shared: list[nn.Parameter]
) -> tuple[Tensor, list[Tensor]]:
    """Task loss on its batch and its gradient on `shared` (zeros where the loss does not reach)."""
    loss = model(task=task, **batch).loss.float()
    grads = torch.autograd.grad(loss, shared, allow_unused=True)
    zeros_for_unused = [
        torch.zeros_like(p) if g is None else g for p, g in zip(shared, grads, strict=True)
    ]
    return loss.detach(), zeros_for_unused


def measure_affinity(
    model: nn.Module, probes: Mapping[str, dict[str, Tensor]], learning_rate: float
) -> dict[str, Matrix]:
    """Both affinity matrices of the (unwrapped) model on the probe batches; the model's
    parameters and train/eval mode are left as they were."""
    tasks = list(probes)
    shared = [p for p in model.encoder.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    losses, grads = {}, {}
    for task in tasks:
        losses[task], grads[task] = _shared_gradient(model, task, probes[task], shared)
    flat = torch.stack([torch.cat([g.flatten().float() for g in grads[t]]) for t in tasks])
    unit = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)  # (tasks, shared parameters)
    cosine = (unit @ unit.T).tolist()
    lookahead: list[list[float]] = []
    backup = [p.detach().clone() for p in shared]
    with torch.no_grad():
        for i in tasks:
            for parameter, grad in zip(shared, grads[i], strict=True):  # the lookahead step
                parameter.sub_(learning_rate * grad)
            after = [model(task=j, **probes[j]).loss.float() for j in tasks]
            lookahead.append([float(1 - a / losses[j]) for a, j in zip(after, tasks, strict=True)])
            for parameter, value in zip(shared, backup, strict=True):
                parameter.copy_(value)
    model.train(was_training)
    return {
        "gradient_cosine": _as_dict(tasks, cosine),
        "lookahead": _as_dict(tasks, lookahead),
    }
