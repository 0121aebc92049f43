"""Penalties that tie the tasks' own parameters to each other through a learned or given task
structure: a task-relationship prior and task-clustering regularization.

Both work on the stacked task parameters W (T x D): row t is task t's head weights over the
shared encoder features (`regularizers.head_feature_weights`, flattened), which must have the same
shape in every task: classification heads with as many labels, or sentence heads with the same
`head.hidden_size` (then the hidden layer's weights). The per-task columns of `--sharing soft |
cross_stitch | sluice` are not covered.

- Task-relationship prior (`--relationship-prior LAMBDA`, Long & Wang 2015/2017, "Learning
  Multiple Tasks with Deep Relationship Networks", arXiv 1506.02117): a matrix-normal prior over W
  with a task covariance Omega (T x T), whose negative log adds LAMBDA x tr(W^T Omega^-1 W) to the
  loss, so tasks that Omega finds related are pulled toward each other. Omega starts at I / T and
  every `--relationship-update-every` steps takes the closed form that minimises the objective
  given W (Zhang & Yeung 2010, "A Convex Formulation for Learning Task Relationships in
  Multi-Task Learning", as used by Long & Wang): Omega = (W W^T + eps I)^(1/2) / tr(...), the
  ridge eps (`RIDGE` x the mean squared row norm) keeping it invertible.
- Task clustering (`--task-clusters K|cards`; Evgeniou & Pontil 2004, "Regularized Multi-Task
  Learning"; Jacob, Bach & Vert 2009, "Clustered Multi-Task Learning: a Convex Formulation"):
  eps_M x T ||w_mean||^2 + eps_B x sum_c n_c ||w_c - w_mean||^2 + eps_W x sum_c sum_{t in c}
  ||w_t - w_c||^2 (mean norm, between-cluster and within-cluster variance; the three sum to
  ||W||^2 when the eps are equal). The clusters are the cards' `cluster` fields, or K found by
  k-means on the rows of W at the start and every `--cluster-update-every` steps (seeded by
  `--seed`, so every process and every rerun finds the same); the log records them after step 1
  and after each update.

Their state (Omega; the learned clusters) is checkpointed, so a resumed run continues exactly.
Several processes (DDP): W is the same on every process, so each computes the same penalty and
the same updates and nothing is exchanged; the penalty joins the model's forward output
(`RunRegularizers`), so DDP syncs the gradients of every head it reaches. Sharded parameters
(FSDP, DeepSpeed) are refused (`mixing.check_distributed`). Each update is a record of the run's
log (`RELATIONSHIPS_KEY`, `CLUSTERS_KEY`), which the run folder writes as JSON and the report draws.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtnlp.artifacts.report import CLUSTERS_KEY, RELATIONSHIPS_KEY
from mtnlp.training.regularizers import head_feature_weights
from mtnlp.utils.errors import UserError

logger = logging.getLogger(__name__)

RIDGE = 1e-4  # Omega's ridge, relative to the mean squared norm of W's rows
KMEANS_ITERATIONS = 100

Matrix = dict[str, dict[str, float]]  # row task -> column task -> value


def task_parameter_rows(model: nn.Module, flag: str) -> tuple[list[str], Tensor]:
    """The tasks and their stacked head weights W (T x D, one flattened head weight per row);
    a `UserError` naming `flag` when fewer than two heads read the encoder or their shapes
    differ."""
    weights = head_feature_weights(model)
    if len(weights) < 2:
        raise UserError(f"{flag}: needs two or more tasks whose heads read the encoder")
    shapes = {task: tuple(weight.shape) for task, weight in weights.items()}
    first, *others = shapes
    for task in others:
        if shapes[task] != shapes[first]:
            raise UserError(
                f"{flag}: the heads of {first} ({' x '.join(map(str, shapes[first]))}) and "
                f"{task} ({' x '.join(map(str, shapes[task]))}) differ in shape; give the tasks "
                "heads of one shape (sentence tasks: the same head.hidden_size in their cards)"
            )
    return list(weights), torch.stack([weight.flatten() for weight in weights.values()])


def relationship_penalty(rows: Tensor, omega_inverse: Tensor) -> Tensor:
    """tr(W^T Omega^-1 W) = sum_ij (Omega^-1)_ij <w_i, w_j>, for W = `rows` (T x D)."""
    rows = rows.float()
    return (omega_inverse.to(rows) * (rows @ rows.T)).sum()


@torch.no_grad()
def task_covariance(rows: Tensor, ridge: float = RIDGE) -> Tensor:
    """The closed-form task covariance (W W^T + eps I)^(1/2) / tr((W W^T + eps I)^(1/2)), in
    float64 on the CPU, with eps = `ridge` x the mean squared row norm (at least `ridge`)."""
    rows = rows.detach().to("cpu", torch.float64)
    gram = rows @ rows.T
    eps = ridge * max(float(gram.diagonal().mean()), 1.0)
    values, vectors = torch.linalg.eigh(gram + eps * torch.eye(len(gram), dtype=gram.dtype))
    root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    return root / root.trace()


def as_correlations(covariance: Tensor) -> Tensor:
    """The correlation matrix of a covariance: C_ij = Omega_ij / sqrt(Omega_ii Omega_jj)."""
    scale = covariance.diagonal().sqrt()
    return covariance / (scale[:, None] * scale[None, :])


def _as_dict(tasks: list[str], matrix: Tensor) -> Matrix:
    return {
        i: {j: round(float(v), 6) for j, v in zip(tasks, row, strict=True)}
        for i, row in zip(tasks, matrix, strict=True)
    }


class TaskRelationshipPrior:
    """LAMBDA x tr(W^T Omega^-1 W) on the stacked task heads W, with the task covariance Omega
    updated in closed form every `update_every` steps (see the module). `state_dict` is Omega."""

    name = "relationship_prior"

    def __init__(self, model: nn.Module, weight: float, update_every: int) -> None:
        self.tasks, _ = task_parameter_rows(model, "--relationship-prior")
        self.weight, self.update_every = weight, update_every
        count = len(self.tasks)
        self.set_covariance(torch.eye(count, dtype=torch.float64) / count)

    def set_covariance(self, covariance: Tensor) -> None:
        self.covariance = covariance.to("cpu", torch.float64)
        self.inverse = torch.linalg.inv(self.covariance).float()

    def penalty(self, model: nn.Module) -> Tensor:
        _, rows = task_parameter_rows(model, "--relationship-prior")
        if self.inverse.device != rows.device:
            self.inverse = self.inverse.to(rows.device)
        return self.weight * relationship_penalty(rows, self.inverse)

    def update(self, model: nn.Module, step: int) -> list[dict[str, Any]]:
        """Every `update_every` steps: Omega from the current heads; returns its log record."""
        if step % self.update_every:
            return []
        _, rows = task_parameter_rows(model, "--relationship-prior")
        self.set_covariance(task_covariance(rows))
        record = {
            "covariance": _as_dict(self.tasks, self.covariance),
            "correlation": _as_dict(self.tasks, as_correlations(self.covariance)),
        }
        return [{"step": step, RELATIONSHIPS_KEY: record}]

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "covariance": self.covariance.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.set_covariance(state["covariance"])


def kmeans(rows: Tensor, k: int, seed: int) -> list[int]:
    """Each row's cluster (0..k-1, numbered in the order of the rows) by Lloyd's k-means with a
    k-means++ start drawn from a generator seeded with `seed`: the same rows and seed give the
    same clusters. A cluster left empty takes the row farthest from its own centre."""
    points = rows.detach().to("cpu", torch.float64)
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    while len(chosen) < k:
        nearest = torch.cdist(points, points[chosen]).min(dim=1).values.square()
        if nearest.sum() > 0:
            chosen.append(int(torch.multinomial(nearest, 1, generator=generator)))
        else:  # every row is already a centre's copy
            chosen.append(next(i for i in range(len(points)) if i not in chosen))
    centres = points[chosen].clone()
    assignment = torch.full((len(points),), -1)
    for _ in range(KMEANS_ITERATIONS):
        distances = torch.cdist(points, centres)
        new = distances.argmin(dim=1)  # ties: the lowest cluster
        for cluster in range(k):
            if not (new == cluster).any():
                farthest = int(distances.gather(1, new[:, None]).squeeze(1).argmax())
                new[farthest] = cluster
        if torch.equal(new, assignment):
            break
        assignment = new
        centres = torch.stack([points[assignment == c].mean(dim=0) for c in range(k)])
    order = list(dict.fromkeys(assignment.tolist()))  # clusters in the order of their first row
    return [order.index(cluster) for cluster in assignment.tolist()]


def cluster_penalty(
    rows: Tensor, clusters: Sequence[int], mean: float, between: float, within: float
) -> Tensor:
    """`mean` x T ||w_mean||^2 + `between` x sum_c n_c ||w_c - w_mean||^2 + `within` x
    sum_c sum_{t in c} ||w_t - w_c||^2 for W = `rows` (T x D), task t in cluster `clusters[t]`."""
    rows = rows.float()
    centre = rows.mean(dim=0)
    total = mean * len(rows) * centre.square().sum()
    labels = torch.tensor(clusters, device=rows.device)
    for cluster in sorted(set(clusters)):
        members = rows[labels == cluster]
        cluster_centre = members.mean(dim=0)
        total = total + between * len(members) * (cluster_centre - centre).square().sum()
        total = total + within * (members - cluster_centre).square().sum()
    return total


def parse_task_clusters(value: str) -> int | str:
    """`--task-clusters`: a number of clusters, or 'cards'."""
    if value == "cards":
        return value
    if not value.isdigit() or int(value) < 1:
        shown = value if len(value) <= 20 else f"{value[:20]}..."
        raise UserError(
            f"--task-clusters: expected a number of clusters (1 or more) or 'cards', got {shown!r}"
        )
    return int(value)


class TaskClustering:
    """The clustered multi-task penalty (see the module) on the stacked task heads, with the
    clusters of the cards (`given`: task -> cluster name) or `k` learned by k-means every
    `update_every` steps. `state_dict` is the clusters."""

    name = "task_clusters"

    def __init__(
        self,
        model: nn.Module,
        weights: tuple[float, float, float],
        *,
        given: Mapping[str, str] | None = None,
        k: int | None = None,
        update_every: int = 10,
        seed: int = 0,
    ) -> None:
        self.tasks, rows = task_parameter_rows(model, "--task-clusters")
        self.weights, self.k, self.update_every, self.seed = weights, k, update_every, seed
        if given is not None:
            self.names = list(dict.fromkeys(given[task] for task in self.tasks))
            self.clusters = [self.names.index(given[task]) for task in self.tasks]
        else:
            if k is None or k > len(self.tasks):
                raise UserError(
                    f"--task-clusters: {k} clusters for {len(self.tasks)} tasks; at most "
                    f"{len(self.tasks)}"
                )
            self.names = [f"cluster{number + 1}" for number in range(k)]
            self.clusters = kmeans(rows, k, seed)

    def penalty(self, model: nn.Module) -> Tensor:
        _, rows = task_parameter_rows(model, "--task-clusters")
        return cluster_penalty(rows, self.clusters, *self.weights)

    def members(self) -> dict[str, list[str]]:
        """Cluster name -> its tasks."""
        return {
            name: [task for task, c in zip(self.tasks, self.clusters, strict=True) if c == number]
            for number, name in enumerate(self.names)
        }

    def update(self, model: nn.Module, step: int) -> list[dict[str, Any]]:
        """Every `update_every` steps, k-means again when learned; after step 1 and each of
        those, returns the clusters' record."""
        due = step % self.update_every == 0
        if not (due or step == 1):
            return []
        if due and self.k is not None:
            _, rows = task_parameter_rows(model, "--task-clusters")
            self.clusters = kmeans(rows, self.k, self.seed)
        members = self.members()
        logger.info(
            "task clusters at step %d: %s",
            step,
            "; ".join(f"{name}: {', '.join(tasks)}" for name, tasks in members.items() if tasks),
        )
        return [{"step": step, CLUSTERS_KEY: {"clusters": members}}]

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "clusters": list(self.clusters)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.clusters = list(state["clusters"])
