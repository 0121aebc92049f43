"""How the training loop mixes tasks: which tasks a micro-batch holds, how their losses become
one backward pass, and the per-task statistics that are logged and fed back to the weighting.

Two batch modes: `one_task` draws one task per micro-batch from the sampler (MT-DNN, Liu et al.
2019); `all_tasks` takes a batch of every task per micro-batch (LibMTL, Lin & Zhang 2023), which
gradient-based weightings such as PCGrad need. Every process makes the same choices, and every
value fed back to the weighting is averaged over processes, so all ranks stay identical.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, LoggerType, get_available_trackers
from accelerate.utils import DistributedType
from torch import Tensor

from mtnlp.args import TrainArguments
from mtnlp.cards import TaskCard
from mtnlp.errors import UserError
from mtnlp.samplers import TaskSampler, build_sampler
from mtnlp.weighting import LossWeighting

# distributed set-ups whose engine owns gradient sync and the optimizer's parameters
ENGINE_TYPES = (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM)


def epoch_length(batch_mode: str, task_sizes: dict[str, int]) -> int:
    """Micro-batches in one epoch: every task's batches once (`one_task`, MT-DNN), or as many as
    the largest task has (`all_tasks`, LibMTL; smaller tasks cycle)."""
    sizes = task_sizes.values()
    return sum(sizes) if batch_mode == "one_task" else max(sizes)


def build_task_sampler(
    args: TrainArguments,
    task_sizes: dict[str, int],
    cards: Sequence[TaskCard],
    num_epochs: int,
    num_processes: int,
) -> TaskSampler:
    """The `--sampler` over `task_sizes` (batches per process); `--examples-cap` N examples are
    N / (batch size x processes) batches per process."""
    cap = args.examples_cap
    return build_sampler(
        args.sampler,
        task_sizes,
        seed=args.seed,
        sampling_weights={card.name: card.sampling_weight for card in cards},
        num_epochs=num_epochs,
        temperature=args.temperature,
        examples_cap=math.ceil(cap / (args.batch_size * num_processes)) if cap else None,
    )


def check_distributed(
    args: TrainArguments, weighting: LossWeighting, accelerator: Accelerator
) -> None:
    """The all_tasks mode and learned loss weights sync gradients themselves: DDP only."""
    if accelerator.distributed_type not in ENGINE_TYPES:
        return
    engine = accelerator.distributed_type.value
    if args.batch_mode == "all_tasks":
        raise UserError(f"--batch-mode all_tasks: not supported with {engine} (use DDP)")
    if any(True for _ in weighting.parameters()):
        raise UserError(f"--weighting {args.weighting}: learned weights need DDP, not {engine}")


def ddp_sync_off(accelerator: Accelerator, model: torch.nn.Module, all_tasks: bool):
    """all_tasks mode runs one forward pass per task before a single backward, which DDP's
    reducer cannot follow: DDP sync is off and `average_gradients` averages instead."""
    return accelerator.no_sync(model) if all_tasks else contextlib.nullcontext()


def backward(
    losses: dict[str, Tensor],
    weighting: LossWeighting,
    accelerator: Accelerator,
    shared_parameters: list[torch.nn.Parameter],
    penalty: Tensor | float = 0.0,
) -> None:
    """Backward for the tasks of a micro-batch through `accelerator.backward` (loss scaling,
    gradient accumulation): of the weighted loss plus `penalty` (a regularizer, unweighted), or
    for a gradient-based weighting its surgery on the shared parameters, then the penalty's."""
    if not weighting.gradient_based:
        accelerator.backward(weighting.combine(losses) + penalty)
        return
    reduce = partial(accelerator.reduce, reduction="mean")
    scaler = accelerator.scaler  # fp16: per-task gradients are taken at the scaler's scale
    weighting.backward(
        losses,
        shared_parameters,
        accelerator.backward,
        reduce_fn=reduce,
        loss_scale=scaler.get_scale() if scaler is not None else 1.0,
    )
    if isinstance(penalty, Tensor) and penalty.requires_grad:
        accelerator.backward(penalty)


def average_gradients(parameters: Iterable[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Average `.grad` over processes, for parameters DDP does not sync: the loss weighting's
    (kept out of DDP) and, in all_tasks mode (several forwards per backward, run under
    `no_sync`), the model's.

    As in one process, a parameter that no process gave a gradient (a head or task layer unused
    in this step) keeps `grad=None`, so AdamW skips it: no weight decay, no momentum step. Which
    parameters have a gradient is agreed first (a flag per parameter, summed over processes); a
    gradient that only some processes have counts as zero on the others."""
    if accelerator.num_processes == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], device=params[0].device)
    touched = accelerator.reduce(has_grad.float(), reduction="sum").tolist()
    params = [p for p, count in zip(params, touched, strict=True) if count > 0]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = accelerator.reduce(torch.cat([p.grad.flatten() for p in params]), reduction="mean")
    for p, grad in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad.copy_(grad.view_as(p))


def window_record(
    step: int,
    loss_sums: dict[str, Tensor],
    window_steps: dict[str, int],
    weighting: LossWeighting,
    accelerator: Accelerator,
) -> dict[str, Any]:
    """The log record of a window: each task's share of its micro-batches, its mean unweighted
    loss (averaged over processes) and its current loss weight."""
    sums = accelerator.reduce(torch.stack(list(loss_sums.values())), reduction="mean").tolist()
    sums = dict(zip(loss_sums, sums, strict=True))
    total = sum(window_steps.values()) or 1
    return {
        "step": step,
        "loss": {task: sums[task] / count for task, count in window_steps.items() if count},
        "share": {task: count / total for task, count in window_steps.items()},
        "weight": weighting.weights(),
    }


class EpochLosses:
    """Each task's unweighted training loss over the current epoch, for `weighting.end_epoch`
    (dwa). Registered for checkpointing, so a resumed epoch keeps what it had summed."""

    def __init__(self, tasks: Sequence[str], device: torch.device) -> None:
        self.tasks = list(tasks)
        self.totals = torch.zeros(2, len(self.tasks), device=device)  # (loss sum, count) per task

    def add(self, losses: dict[str, Tensor]) -> None:
        for task, loss in losses.items():
            index = self.tasks.index(task)
            self.totals[0, index] += loss.detach().float()
            self.totals[1, index] += 1

    def end_epoch(self, accelerator: Accelerator) -> dict[str, float]:
        """Each task's mean loss over the epoch and over processes (tasks that had a batch)."""
        sums, counts = accelerator.reduce(self.totals, reduction="sum").tolist()
        self.totals.zero_()
        return {task: s / c for task, s, c in zip(self.tasks, sums, counts, strict=True) if c}

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "totals": self.totals.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals.copy_(torch.tensor(state["totals"]))


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """A log record flattened for accelerate's trackers: `loss/rte`, `share/rte`, `eval/rte/f1`."""
    values = {}
    for key in ("loss", "share", "weight"):
        values.update({f"{key}/{task}": value for task, value in record.get(key, {}).items()})
    for task, metrics in record.get("eval", {}).items():
        values.update({f"eval/{task}/{name}": value for name, value in metrics.items()})
    return values


def trackers(report_to: str) -> list[str] | None:
    """`--report-to` as accelerate's `log_with`: None for 'none'; a tracker that accelerate does
    not know or whose package is missing is a `UserError` (accelerate would skip it silently)."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    if names in ([], ["none"]):
        return None
    builtin = {kind.value for kind in LoggerType}
    installed = {getattr(kind, "value", kind) for kind in get_available_trackers()}
    installed |= set(LOGGER_TYPE_TO_CLASS) - builtin  # registered with register_tracker_class
    for name in names:
        if name not in builtin | installed:
            known = ", ".join(sorted(builtin | installed))
            raise UserError(f"--report-to: unknown tracker {name!r}; known: {known}")
        if name not in installed and name != "all":
            raise UserError(f"--report-to: {name}: its package is not installed")
    return names


def tracker_config(args: TrainArguments) -> dict[str, Any]:
    """The arguments as tracker hyper-parameters (TensorBoard takes only scalars and strings)."""
    simple = (int, float, str, bool)
    return {k: v if isinstance(v, simple) else str(v) for k, v in vars(args).items()}
