"""Tensor-factorised task columns (Yang & Hospedales 2017, "Deep Multi-task Representation
Learning: A Tensor Factorisation Approach").

Every task has its own column of the top N layers, as with soft sharing, but a column's linear
layers (attention query, key, value and output, intermediate, output: every `nn.Linear` of a
BERT-like layer) hold no weight of their own. The tasks' weights of one linear layer, stacked
into a (T, d_in, d_out) tensor, are a Tucker factorisation plus a residual shared by all tasks:

    W_t = R + G x1 U_T[t] x2 U_in x3 U_out

with core G (r_T, r_in, r_out), task factor U_T (T, r_T), input factor U_in (d_in, r_in), output
factor U_out (d_out, r_out) and residual R (d_in, d_out, stored transposed as nn.Linear's weight).
A task's own parameters are its row of U_T, its biases and its layer norms; everything else is
shared.

Why the residual: DMTRL initialises the factors by a truncated HOSVD of the stacked weights of
single-task networks; here every slice is the pretrained weight W, and a truncated HOSVD at ranks
below W's rank is only an approximation, so training would start away from the pretrained
function unless r_in and r_out are full (then the factors alone cost more than a copy per task).
With R = W - the HOSVD approximation, every task starts at exactly the pretrained weight at any
rank, the factors still carry the principal part of W (its leading singular subspaces, which the
tasks then reweight through G and U_T), and they get gradient from the first step (a zero-core
delta, as in LoRA, would leave the factors without gradient at the start). R is the part of W
outside those subspaces, trained as in hard sharing. At full ranks R is zero and this is DMTRL's
parameterisation.

The stacked tensor has task-mode rank 1 at the start (all slices equal): the HOSVD's task factor
is 1/sqrt(T) in its first column and an orthonormal completion after it, and only the first
slice of the core is non-zero. A task rank above the number of tasks is allowed (a one-task
fine-tuning stage keeps the trained model's shape) but adds parameters that stay zero.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtnlp.modeling.limits import MAX_TASKS
from mtnlp.modeling.sharing.base import SHARING, SharingStrategy, shape_option
from mtnlp.modeling.sharing.columns import ColumnSharing, ColumnSharingConfig
from mtnlp.utils.errors import UserError
from mtnlp.utils.untrusted import kind_of

logger = logging.getLogger(__name__)

RANK_FLAGS = {
    "rank_task": "--tensor-rank-task",
    "rank_in": "--tensor-rank-in",
    "rank_out": "--tensor-rank-out",
}
"""The rank options and the flags that set them (`mtnlp.training.args`), for the messages."""


@dataclass(frozen=True)
class TensorSharingConfig(ColumnSharingConfig):
    rank_task: int = shape_option(2)  # r_T: task factor columns
    rank_in: int = shape_option(16)  # r_in: input factor columns
    rank_out: int = shape_option(16)  # r_out: output factor columns


# ------------------------------------------------------------------------------ Tucker algebra
def unfold(tensor: Tensor, mode: int) -> Tensor:
    """The mode-`mode` unfolding: that mode's fibres as columns, (size of the mode, the rest)."""
    return tensor.movedim(mode, 0).flatten(1)


def mode_product(tensor: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """`tensor` x_mode `matrix`: `matrix` (new size, size of the mode) applied along `mode`."""
    return torch.tensordot(matrix, tensor, dims=([1], [mode])).movedim(0, mode)


def tucker_to_tensor(core: Tensor, factors: list[Tensor]) -> Tensor:
    """core x1 factors[0] x2 factors[1] ..."""
    for mode, factor in enumerate(factors):
        core = mode_product(core, factor, mode)
    return core


def truncated_hosvd(tensor: Tensor, ranks: tuple[int, ...]) -> tuple[Tensor, list[Tensor]]:
    """The truncated higher-order SVD (De Lathauwer et al. 2000): factor n is the leading
    `ranks[n]` left singular vectors of the mode-n unfolding (zero columns past the unfolding's
    rank count), the core the tensor projected on the factors. Exact when each rank is at least
    the tensor's multilinear rank in its mode."""
    factors = []
    for mode, rank in enumerate(ranks):
        left = torch.linalg.svd(unfold(tensor, mode), full_matrices=False).U[:, :rank]
        factors.append(F.pad(left, (0, rank - left.shape[1])))
    return tucker_to_tensor(tensor, [factor.T for factor in factors]), factors


def tucker_parameter_count(tasks: int, d_in: int, d_out: int, ranks: tuple[int, int, int]) -> int:
    """Parameters of one factorised linear layer across `tasks` columns: core, the three
    factors, the shared residual and each task's bias."""
    rank_task, rank_in, rank_out = ranks
    core = rank_task * rank_in * rank_out
    factors = tasks * rank_task + d_in * rank_in + d_out * rank_out
    return core + factors + d_in * d_out + tasks * d_out


# ------------------------------------------------------------------------------ modules
class TuckerWeight(nn.Module):
    """The weights of one linear layer in every task column: W_t = R + G x1 U_T[t] x2 U_in x3
    U_out, each task's slice in nn.Linear's (d_out, d_in) layout. Zeros until `factorise`."""

    def __init__(self, tasks: int, d_in: int, d_out: int, ranks: tuple[int, int, int]) -> None:
        super().__init__()
        rank_task, rank_in, rank_out = ranks
        self.core = nn.Parameter(torch.zeros(rank_task, rank_in, rank_out))
        self.task_factor = nn.Parameter(torch.zeros(tasks, rank_task))
        self.input_factor = nn.Parameter(torch.zeros(d_in, rank_in))
        self.output_factor = nn.Parameter(torch.zeros(d_out, rank_out))
        self.residual = nn.Parameter(torch.zeros(d_out, d_in))

    def weight(self, task: int) -> Tensor:
        """Task `task`'s weight, (d_out, d_in)."""
        mixed = torch.einsum("a,aio->oi", self.task_factor[task], self.core)  # (r_out, r_in)
        return self.residual + self.output_factor @ mixed @ self.input_factor.T

    @torch.no_grad()
    def factorise(self, pretrained: Tensor) -> None:
        """Start every task at `pretrained` (d_out, d_in): the truncated HOSVD of the tasks'
        stacked copies, and the residual that the approximation leaves."""
        tasks = self.task_factor.shape[0]
        stacked = pretrained.detach().float().T.expand(tasks, -1, -1)  # (T, d_in, d_out)
        core, factors = truncated_hosvd(stacked, tuple(self.core.shape))
        approximation = tucker_to_tensor(core, factors).mean(0)  # the slices are equal
        for parameter, value in zip(
            (self.core, self.task_factor, self.input_factor, self.output_factor, self.residual),
            (core, *factors, pretrained.float() - approximation.T),
            strict=True,
        ):
            parameter.copy_(value)


class TaskSliceLinear(nn.Module):
    """A task column's linear layer: its weight is the task's slice of a `TuckerWeight` (which
    the strategy registers once, so it is held here outside the module tree), its bias its own."""

    def __init__(self, weights: TuckerWeight, task: int, bias: Tensor | None) -> None:
        super().__init__()
        self.task = task
        self.tucker = (weights,)  # a tuple: not a submodule of every column
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.tucker[0].weight(self.task), self.bias)


# ------------------------------------------------------------------------------ the strategy
@SHARING.register("tensor")
class TensorSharing(ColumnSharing):
    """Task columns whose linear layers are slices of a Tucker-factorised weight tensor shared by
    the tasks (Yang & Hospedales 2017), plus a shared residual; each task keeps its row of the
    task factor, its biases and its layer norms. Starts at the pretrained function exactly."""

    name = "tensor"
    config_class = TensorSharingConfig
    config: TensorSharingConfig
    top_layer_parameters: int  # of the encoder's top `layers` layers, one copy

    def __init__(self, encoder: nn.Module, tasks: list[str], options: dict[str, Any]) -> None:
        super().__init__(encoder, tasks, options)
        top = encoder.encoder.layer[self.bottom :]  # named as in each column
        linears = [name for name, module in top.named_modules() if isinstance(module, nn.Linear)]
        modules = [top.get_submodule(name) for name in linears]
        ranks = self.ranks
        check_ranks(ranks, [m.in_features for m in modules], [m.out_features for m in modules])
        self.top_layer_parameters = sum(p.numel() for p in top.parameters())
        self.factors = nn.ModuleDict(
            {
                key(name): TuckerWeight(len(self.tasks), m.in_features, m.out_features, ranks)
                for name, m in zip(linears, modules, strict=True)
            }
        )
        for index, task in enumerate(self.tasks):
            column = self.column[task]
            for name in linears:
                parent, _, child = name.rpartition(".")
                bias = column.get_submodule(name).bias
                sliced = TaskSliceLinear(self.factors[key(name)], index, bias)
                setattr(column.get_submodule(parent), child, sliced)

    @property
    def ranks(self) -> tuple[int, int, int]:
        return self.config.rank_task, self.config.rank_in, self.config.rank_out

    def load_from_encoder(self, encoder: nn.Module) -> None:
        """Columns start as the pretrained top layers: layer norms and biases copied, each linear
        layer's weights factorised (`TuckerWeight.factorise`)."""
        top = encoder.encoder.layer[self.bottom :]
        for name, module in top.named_modules():
            if isinstance(module, nn.Linear):
                self.factors[key(name)].factorise(module.weight)
        state = top.state_dict()
        for column in self.column.values():
            column.load_state_dict({name: state[name] for name in column.state_dict()})
        counts = self.parameter_counts()
        logger.info(
            "--sharing tensor: %s parameters in the top %d layers (hard sharing: %s, full "
            "columns: %s)",
            f"{counts['tensor']:,}", self.config.layers, f"{counts['hard']:,}",
            f"{counts['columns']:,}",
        )  # fmt: skip

    @torch.no_grad()
    def inherit(self, trained: SharingStrategy) -> None:
        """A task the trained model knows keeps its biases, layer norms and row of the task
        factor; the shared factors and residuals are the trained ones; a new task's row is the
        mean of the trained tasks' rows (it starts at their average weights)."""
        super().inherit(trained)
        if not isinstance(trained, TensorSharing):
            return  # a hard-sharing model: the factorised encoder top, as load_from_encoder did
        for name, weights in self.factors.items():
            old = trained.factors[name]
            for part in ("core", "input_factor", "output_factor", "residual"):
                getattr(weights, part).copy_(getattr(old, part))
            for index, task in enumerate(self.tasks):
                if task in trained.tasks:
                    row = old.task_factor[trained.tasks.index(task)]
                else:
                    row = old.task_factor.mean(0)
                weights.task_factor[index] = row

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return [*super().pretrained_parameters(), *self.factors.parameters()]

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the top `layers` layers: `hard` (one copy, as hard sharing keeps them),
        `columns` (one copy per task, as soft sharing) and `tensor` (this strategy's)."""
        return {
            "hard": self.top_layer_parameters,
            "columns": len(self.tasks) * self.top_layer_parameters,
            "tensor": sum(p.numel() for p in self.parameters()),
        }


def key(name: str) -> str:
    """A column module's dotted name as a `ModuleDict` key (`0.attention.self.query` ->
    `0-attention-self-query`)."""
    return name.replace(".", "-")


def check_ranks(ranks: tuple[int, int, int], inputs: list[int], outputs: list[int]) -> None:
    """Each rank an integer from 1 to its mode's size (the task rank: up to MAX_TASKS), before
    any factor is allocated; a `UserError` naming the flag otherwise."""
    limits = {
        "the largest number of tasks": MAX_TASKS,
        "the smallest input size of the factorised layers": min(inputs),
        "the smallest output size of the factorised layers": min(outputs),
    }
    for flag, rank, (size, limit) in zip(RANK_FLAGS.values(), ranks, limits.items(), strict=True):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise UserError(f"{flag}: expected a positive integer, got {kind_of(rank)}")
        if rank > limit:
            raise UserError(f"{flag}: {kind_of(rank)} is above {size} ({limit})")
