"""One optimizer step, the loop's body: `train_step(run, step)` runs the step's micro-batches
(one task each, a joint group's tasks, or every task), backward through the loss weighting,
averages the gradients DDP does not sync, clips, steps the optimizer and the schedule, and skips
an update whose loss is NaN/inf on any process.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from functools import partial

import torch
from accelerate import Accelerator
from torch import Tensor

from mtnlp.training.state import Run, Schedule, joint_name
from mtnlp.training.weighting import LossWeighting
from mtnlp.utils.errors import UserError

logger = logging.getLogger(__name__)


def train_step(run: Run, step: int) -> list[str]:
    """One optimizer step over `accumulation_steps` micro-batches; returns the tasks of its
    micro-batches, in order."""
    trained: list[tuple[str, Tensor]] = []
    bad: list[str] = []
    for micro in range(run.schedule.accumulation_steps):
        tasks = run.next_tasks()
        with (
            run.accelerator.accumulate(run.model),
            ddp_sync_off(run.accelerator, run.model, run.schedule.syncs_itself),
        ):
            losses = forward(run, tasks)
            penalty = sum(run.successive.penalty(task) for task in tasks)
            # the sharing strategy's penalty; block-sparse heads; adversarial discriminator
            penalty = penalty + run.regularizers.loss(tasks)
            backward(losses, run.weighting, run.accelerator, run.shared, penalty)
            trained.extend((task, loss.detach()) for task, loss in losses.items())
            if run.accelerator.sync_gradients:
                # a NaN/inf loss on any process: every process skips the update
                bad = nonfinite_tasks(trained, run.accelerator)
                if not bad:
                    optimizer_step(run, list(dict.fromkeys(task for task, _ in trained)))
            run.optimizer.zero_grad()
        record_losses(run, losses, step, micro)
    run.state.step = step
    for record in run.regularizers.update(run.unwrapped, step):  # task priors (relationships.py)
        run.state.history.append(record)
    run.state.bad_steps = run.state.bad_steps + 1 if bad else 0
    if bad:
        skip_bad_step(step, bad, run.state.bad_steps, run.schedule.max_bad_steps, run.accelerator)
    elif not run.accelerator.optimizer_step_was_skipped:
        run.scheduler.step()
    return [task for task, _ in trained]


def forward(run: Run, tasks: list[str]) -> dict[str, Tensor]:
    """Each task's loss on its next batch, or a joint group's losses on its next batch; counts
    the distinct examples trained on."""
    if len(tasks) > 1 and not run.schedule.all_tasks:
        return joint_forward(run, tasks)
    losses = {}
    for task in tasks:
        batch = run.streams.next(task)
        run.state.examples += run.streams.count(task, batch["input_ids"].shape[0])
        losses[task] = run.model(task=task, **batch).loss
    return losses


def joint_forward(run: Run, tasks: list[str]) -> dict[str, Tensor]:
    """The losses of a joint group's tasks on the group's next batch, from ONE encoder pass
    (`forward_tasks`, under the run's autocast); an example counts once per task, as in
    separate batches."""
    group = joint_name(tasks)
    batch = dict(run.streams.next(group))
    labels = batch.pop("labels")
    run.state.examples += run.streams.count(group, batch["input_ids"].shape[0]) * len(tasks)
    with run.accelerator.autocast():
        outputs = run.unwrapped.forward_tasks(tasks, labels=labels, **batch)
    return {task: outputs[task].loss for task in tasks}


def optimizer_step(run: Run, tasks: list[str]) -> None:
    """Average what DDP does not, clip, step; then successive regularization snapshots the
    parameters of every task this step trained (all micro-batches, not only the last)."""
    average_gradients(run.unsynced, run.accelerator)
    norm = clip_norm(run.schedule, tasks)
    if norm > 0:  # accelerate unscales fp16 gradients first
        run.accelerator.clip_grad_norm_(run.model.parameters(), norm)
    run.optimizer.step()
    for task in tasks:
        run.successive.update(task)


def clip_norm(schedule: Schedule, tasks: list[str]) -> float:
    """The step's gradient clipping norm (0: none): `--max-grad-norm`, times with
    `--clip-by-depth` the largest depth factor of the tasks the step trained (one task per step
    in JMT's schedule; with several, the deepest one's, whose loss crosses every layer)."""
    if not schedule.clip_scales:
        return schedule.max_grad_norm
    return schedule.max_grad_norm * max(schedule.clip_scales[task] for task in tasks)


def record_losses(run: Run, losses: dict[str, Tensor], step: int, micro: int) -> None:
    """Add a micro-batch's losses to the window and epoch totals; at an epoch's end, feed each
    task's mean epoch loss to the weighting (dwa) and log it."""
    state, schedule = run.state, run.schedule
    for task, loss in losses.items():
        state.loss_sums[task] += loss.detach().float()
        state.task_steps[task] += 1
        state.window_steps[task] += 1
    run.epoch_losses.add(losses)
    if ((step - 1) * schedule.accumulation_steps + micro + 1) % schedule.micro_per_epoch == 0:
        mean_losses = run.epoch_losses.end_epoch(run.accelerator)
        run.weighting.end_epoch(mean_losses)
        state.history.append({"step": step, "train_loss": mean_losses})


def ddp_sync_off(accelerator: Accelerator, model: torch.nn.Module, syncs_itself: bool):
    """all_tasks mode runs one forward pass per task before a single backward, and a joint
    group's pass goes past DDP (the model's `forward_tasks`): DDP's reducer can follow
    neither, so DDP sync is off and `average_gradients` averages instead."""
    return accelerator.no_sync(model) if syncs_itself else contextlib.nullcontext()


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
    (kept out of DDP) and, in all_tasks mode and with joint groups (run under `no_sync`), the
    model's.

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


def nonfinite_tasks(losses: list[tuple[str, torch.Tensor]], accelerator: Accelerator) -> list[str]:
    """The tasks whose loss was NaN/inf in this step on any process (the same list on every
    process, so every process skips the same updates and DDP stays in step)."""
    finite = torch.stack([torch.isfinite(loss.float()) for _, loss in losses]).float()
    if accelerator.num_processes > 1:
        # (processes, micro-batches) -> (micro-batches,): finite only if finite everywhere
        finite = accelerator.gather(finite[None]).amin(0)
    return sorted({task for (task, _), ok in zip(losses, finite.tolist(), strict=True) if not ok})


def skip_bad_step(
    step: int, tasks: list[str], in_a_row: int, limit: int, accelerator: Accelerator
) -> None:
    """Warn about a skipped update; stop once `limit` steps in a row had a non-finite loss."""
    names = ", ".join(tasks)
    if in_a_row >= limit:
        raise UserError(
            f"step {step}: the loss of task {names} was NaN/inf in {in_a_row} steps in a row "
            f"(--max-bad-steps {limit}); training stopped. Lower --learning-rate, check the "
            "data, or resume from an earlier checkpoint"
        )
    if accelerator.is_main_process:
        logger.warning(
            "step %d: the loss of task %s is NaN/inf; this update is skipped (%d in a row, "
            "stopping at --max-bad-steps %d)", step, names, in_a_row, limit,
        )  # fmt: skip
