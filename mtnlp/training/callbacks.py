"""The loop's periodic actions as callbacks, and the `Callback` base users extend.

The loop calls `on_train_begin`, then `on_step_end` after every optimizer step, and
`on_train_end` with the final dev metrics; evaluation broadcasts `on_evaluate`, a checkpoint
`on_save`, Ctrl-C `on_interrupt` (before the loop saves the current step). The built-in
callbacks run in this order (each "every N steps" is one visible decision in its
`on_step_end`):

1. `ProgressCallback`: the progress bar, and every `log_every` steps a window record of each
   task's share, loss and weight (train_log.jsonl, trackers).
2. `EvaluationCallback`: every `eval_every` steps the dev metrics; with `keep_best`, the best
   dev weights (restored at the end). Its state is checkpointed under `keep_best`.
3. `AffinityCallback`: every `every` steps task affinity (gradient cosine, lookahead).
4. `CheckpointCallback`: every `every` steps a resumable checkpoint (after evaluation, so the
   keep-best state is in it).
5. `OnStep(fn)`: `fn(step, tasks)` after each step (benchmarks time the loop with it).

A callback whose state must survive a resume returns it from `state_dict()` and is checkpointed
under its `name` (see `state.RunState`). Example, early stopping on a task's main metric:

    class EarlyStopping(Callback):
        name = "early_stopping"

        def __init__(self, task, metric, patience=3):
            self.task, self.metric, self.patience = task, metric, patience
            self.best, self.bad = float("-inf"), 0

        def on_evaluate(self, run, step, metrics):
            score = metrics[self.task][self.metric]
            self.best, self.bad = (score, 0) if score > self.best else (self.best, self.bad + 1)
            run.should_stop = self.bad >= self.patience

    mtnlp.train(args, cards, callbacks=[EarlyStopping("rte", "accuracy")])
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, LoggerType, get_available_trackers
from torch import Tensor
from tqdm.auto import tqdm

from mtnlp.inference.evaluate import evaluate
from mtnlp.training.affinity import measure_affinity
from mtnlp.training.checkpointing import check_finite, save_checkpoint
from mtnlp.training.selection import BestCheckpoint, MainMetrics
from mtnlp.training.state import Run
from mtnlp.training.weighting import LossWeighting
from mtnlp.utils.errors import UserError

Results = dict[str, dict[str, float]]


class Callback:
    """A training-loop hook; every method is optional. A callback whose state must survive a
    resume returns it from `state_dict()` (None: nothing to save) and is checkpointed under its
    `name`."""

    name: ClassVar[str] = ""

    def on_train_begin(self, run: Run) -> None:
        """Before the first step (after a resume, before its first step)."""

    def on_step_end(self, run: Run, step: int, tasks: list[str]) -> None:
        """After optimizer step `step`, which trained `tasks` (one per micro-batch)."""

    def on_evaluate(self, run: Run, step: int, metrics: Results) -> None:
        """After an evaluation on the dev splits during training."""

    def on_save(self, run: Run, step: int, checkpoint: Path) -> None:
        """After `checkpoint` was written."""

    def on_train_end(self, run: Run, results: Results) -> Results:
        """After the last step, with the final dev metrics; returns the results to keep."""
        return results

    def on_interrupt(self, run: Run) -> None:
        """After Ctrl-C, before the loop saves the current step: release what `on_train_begin`
        took (a progress bar, a file)."""

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


class CallbackList:
    """The run's callbacks in order; registers those with state in the run's `RunState`."""

    def __init__(self, run: Run, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if callback.state_dict() is not None:
                run.run_state.add(callback.name or type(callback).__name__, callback)
        run.callbacks = self

    def on_train_begin(self, run: Run) -> None:
        for callback in self.callbacks:
            callback.on_train_begin(run)

    def on_step_end(self, run: Run, step: int, tasks: list[str]) -> None:
        for callback in self.callbacks:
            callback.on_step_end(run, step, tasks)

    def on_evaluate(self, run: Run, step: int, metrics: Results) -> None:
        for callback in self.callbacks:
            callback.on_evaluate(run, step, metrics)

    def on_save(self, run: Run, step: int, checkpoint: Path) -> None:
        for callback in self.callbacks:
            callback.on_save(run, step, checkpoint)

    def on_train_end(self, run: Run, results: Results) -> Results:
        for callback in self.callbacks:
            results = callback.on_train_end(run, results)
        return results

    def on_interrupt(self, run: Run) -> None:
        for callback in self.callbacks:
            callback.on_interrupt(run)


def evaluate_run(run: Run) -> Results:
    """The dev metrics of every task of the run (every process takes part)."""
    return evaluate(run.model, run.eval_loaders, run.cards_by_name, run.accelerator)


class ProgressCallback(Callback):
    """The progress bar; every `log_every` steps (and at the last) a window record: each task's
    share of the window's micro-batches, mean loss and loss weight."""

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every
        self.bar: Any = None

    def on_train_begin(self, run: Run) -> None:
        main = run.accelerator.is_main_process
        self.bar = tqdm(
            total=run.schedule.total_steps,
            initial=run.state.step,
            desc="training",
            disable=not main,
        )

    def on_step_end(self, run: Run, step: int, tasks: list[str]) -> None:
        self.bar.update(1)
        if step % self.log_every == 0 or step == run.schedule.total_steps:
            state = run.state
            record = window_record(
                step, state.loss_sums, state.window_steps, run.weighting, run.accelerator
            )
            state.history.append(record)
            run.accelerator.log(tracker_values(record), step=step)
            self.bar.set_postfix(
                {
                    task: f"{loss:.3f} s{record['share'][task]:.2f} w{record['weight'][task]:.2f}"
                    for task, loss in record["loss"].items()
                }
            )
            for value in state.loss_sums.values():
                value.zero_()
            state.window_steps = dict.fromkeys(state.window_steps, 0)

    def on_train_end(self, run: Run, results: Results) -> Results:
        self.bar.close()
        return results

    def on_interrupt(self, run: Run) -> None:
        if self.bar is not None:
            self.bar.close()


class EvaluationCallback(Callback):
    """Dev metrics every `eval_every` steps (the last step's evaluation is the loop's final one);
    with `main_metrics` (`--keep-best`), the weights of the best mean main score, restored at the
    end unless the final evaluation is the best."""

    name = "keep_best"

    def __init__(self, eval_every: int | None, main_metrics: MainMetrics | None = None) -> None:
        self.eval_every = eval_every
        self.best = BestCheckpoint(main_metrics) if main_metrics is not None else None

    def on_step_end(self, run: Run, step: int, tasks: list[str]) -> None:
        if self.eval_every and step % self.eval_every == 0 and step != run.schedule.total_steps:
            metrics = evaluate_run(run)
            run.state.history.append({"step": step, "eval": metrics})
            run.accelerator.log(tracker_values({"eval": metrics}), step=step)
            if run.accelerator.is_main_process:  # a line of its own, above the progress bar
                tqdm.write(f"step {step}: {json.dumps(metrics)}")
            if self.best is not None:
                self.best.update(step, metrics, run.unwrapped)
            run.callbacks.on_evaluate(run, step, metrics)

    def on_train_end(self, run: Run, results: Results) -> Results:
        step = run.state.step
        run.state.history.append({"step": step, "eval": results})
        run.accelerator.log(tracker_values({"eval": results}), step=step)
        if self.best is None:
            return results
        if not self.best.update(step, results, run.unwrapped):
            results = self.best.restore(run.unwrapped)  # the best dev checkpoint
        run.best_step = self.best.step
        return results

    def state_dict(self) -> dict[str, Any] | None:
        return self.best.state_dict() if self.best is not None else None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best.load_state_dict(state)


class AffinityCallback(Callback):
    """Task affinity every `every` steps on fixed probe batches (`training/affinity.py`)."""

    def __init__(self, every: int, probes: dict[str, dict[str, Tensor]], lr: float) -> None:
        self.every, self.probes, self.lr = every, probes, lr

    def on_step_end(self, run: Run, step: int, tasks: list[str]) -> None:
        if step % self.every == 0:
            affinity = measure_affinity(run.unwrapped, self.probes, self.lr)
            run.state.history.append({"step": step, "affinity": affinity})


class CheckpointCallback(Callback):
    """A resumable checkpoint every `every` steps, keeping the newest `keep`; `arguments` (the
    run's flags) go to checkpoint.json for the checks of a resumed run."""

    def __init__(self, every: int, keep: int | None, arguments: dict[str, Any]) -> None:
        self.every, self.keep, self.arguments = every, keep, arguments

    def on_step_end(self, run: Run, step: int, tasks: list[str]) -> None:
        if step % self.every == 0:
            check_finite(step, run.unwrapped, run.weighting)
            path = save_checkpoint(
                run.accelerator,
                run.output_dir,
                step,
                run.specs,
                self.keep,
                run.tokenizer,
                self.arguments,
            )
            run.callbacks.on_save(run, step, path)


class OnStep(Callback):
    """`fn(step, tasks)` after each optimizer step."""

    def __init__(self, fn: Callable[[int, list[str]], None]) -> None:
        self.fn = fn

    def on_step_end(self, run: Run, step: int, tasks: list[str]) -> None:
        self.fn(step, tasks)


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
            extra = (
                f" (pip install 'mtnlp[{name}]', or pip install {name})"
                if name in ("tensorboard", "wandb")
                else ""
            )
            raise UserError(f"--report-to: {name}: its package is not installed{extra}")
    return names


def default_log_every(total_steps: int) -> int:
    """Every 50 steps, or often enough for 20 points on the curves of a shorter run."""
    return max(1, min(50, total_steps // 20))
