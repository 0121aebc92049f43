"""The multi-task training loop on accelerate (MT-DNN: one task per micro-batch).

`train()` reads top to bottom like accelerate's examples: the accelerator, the output folder's
lock, `build_run` (setup.py), resume (checkpointing.py), the step loop calling `train_step`
(step.py) and the callbacks (callbacks.py: logs, evaluation, affinity, checkpoints), the final
evaluation, and `finish`: the run folder (model, tokenizer, cards, metrics, logs, report, model
card) and the push. Mixed precision and the number of processes come from `accelerate launch`.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mtnlp.artifacts.run_folder import TRAIN_LOG, LiveLog, public_arguments, save_run
from mtnlp.cards.schema import TaskCard
from mtnlp.hub.card import write_model_card
from mtnlp.hub.push import push_to_hub
from mtnlp.training.args import TrainArguments
from mtnlp.training.callbacks import Callback, CallbackList, Results, evaluate_run
from mtnlp.training.checkpointing import (
    check_finite,
    full_state_dict,
    list_checkpoints,
    resume,
    save_checkpoint,
)
from mtnlp.training.setup import build_run, default_callbacks, make_accelerator
from mtnlp.training.state import Run
from mtnlp.training.step import train_step
from mtnlp.utils.errors import Interrupted, UserError
from mtnlp.utils.files import output_lock

logger = logging.getLogger(__name__)


def train(
    args: TrainArguments, cards: Sequence[TaskCard], callbacks: Sequence[Callback] = ()
) -> Results:
    """Train one shared encoder on `cards`; return the final dev metrics per task.

    `callbacks` run after the built-in ones (see `mtnlp.training.callbacks.Callback`)."""
    if not cards:
        raise UserError("no tasks to train: give task cards with --cards / --tasks")
    accelerator = make_accelerator(args)
    with output_lock(Path(args.output_dir), accelerator.is_main_process):
        run = build_run(args, cards, accelerator)
        hooks = CallbackList(run, [*default_callbacks(run, args), *callbacks])
        resume(run)
        consistent = True  # whether model, optimizer and state agree on `run.state.step`
        try:
            with run.regularizers.hooked(run.unwrapped), follow_log(run):
                hooks.on_train_begin(run)
                run.started = time.perf_counter()
                with ctrl_c_between_steps(run.accelerator.num_processes) as ctrl_c:
                    for step in range(run.state.step + 1, run.schedule.total_steps + 1):
                        consistent = False  # mid-step: the update may be half done
                        tasks = train_step(run, step)
                        consistent = True
                        if ctrl_c():
                            raise KeyboardInterrupt
                        hooks.on_step_end(run, step, tasks)
                        if run.should_stop or ctrl_c():
                            break
                    if ctrl_c():
                        raise KeyboardInterrupt
                run.train_seconds = time.perf_counter() - run.started
                results = hooks.on_train_end(run, evaluate_run(run))
        except KeyboardInterrupt:
            hooks.on_interrupt(run)
            raise Interrupted(interrupted(run, consistent)) from None
        return finish(run, results)


@contextmanager
def ctrl_c_between_steps(num_processes: int) -> Iterator[Callable[[], bool]]:
    """In one process, a first Ctrl-C lets the current step finish (then the loop stops and saves
    it); a second stops at once. Yields whether Ctrl-C was pressed. Elsewhere (several processes,
    which could not stop at the same step; not the main thread; a SIGINT handler of the caller's)
    Ctrl-C is left as it is."""
    if (
        num_processes != 1
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield lambda: False
        return
    pressed: list[bool] = []

    def on_ctrl_c(signum: int, frame: object) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)
        logger.warning("Ctrl-C: stopping after this step (press it again to stop at once)")

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def follow_log(run: Run) -> Iterator[None]:
    """`train_log.jsonl` written as training goes (main process): the records so far (a resumed
    run's too), then each new one, flushed, so `tail -f` follows the run."""
    if not run.accelerator.is_main_process:
        yield
        return
    with LiveLog(run.output_dir / TRAIN_LOG, run.state.history) as log:
        run.state.history = log
        try:
            yield
        finally:
            run.state.history = list(log)


def interrupted(run: Run, consistent: bool) -> str:
    """After Ctrl-C: save a checkpoint of the current step when model, optimizer and state agree
    on it (one process: several cannot be made to save together once interrupted); the message
    names the checkpoint to resume from and how."""
    step = run.state.step
    saved = list_checkpoints(run.output_dir)
    checkpoint = next((path for path in saved if path.name == f"checkpoint-{step}"), None)
    if checkpoint is None and consistent and run.accelerator.num_processes == 1 and step > 0:
        try:
            check_finite(step, run.unwrapped, run.weighting)
            checkpoint = save_checkpoint(
                run.accelerator, run.output_dir, step, run.specs, None, run.tokenizer,
                run.arguments,
            )  # fmt: skip
        except UserError as error:
            logger.warning("not saving a checkpoint at step %d: %s", step, error)
    if checkpoint is None and saved:
        checkpoint = saved[-1]
    if checkpoint is None:
        return f"training interrupted at step {step}; no checkpoint to resume from"
    return (
        f"training interrupted at step {step}; to resume from {checkpoint}, run the same "
        f"command with --resume-from-checkpoint {checkpoint}"
    )


def finish(run: Run, results: Results) -> Results:
    """Refuse non-finite weights, write the run folder (main process) with its model card, push
    it with `--push-to-hub`, print the summary, end the trackers."""
    accelerator, state = run.accelerator, run.state
    check_finite(state.step, run.unwrapped, run.weighting)
    session_examples = state.examples - run.start_examples  # since the start or the resume
    summary = {
        "steps": state.step,
        "resumed_from": run.resume_from.name if run.resume_from is not None else None,
        "train_seconds": round(run.train_seconds, 2),
        "train_examples": state.examples,
        "examples_per_second": round(session_examples / max(run.train_seconds, 1e-9), 2),
        "task_steps": state.task_steps,
        "loss_weights": run.weighting.weights(),
        "best_step": run.best_step,
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
    }
    weights = full_state_dict(accelerator, run.model)  # FSDP: gathered from every process
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_run(
            run.output_dir,
            run.unwrapped,
            run.tokenizer,
            run.cards,
            results,
            state.history,
            {"args": public_arguments(run.arguments), **summary},
            state_dict=weights,
        )
        write_model_card(run.output_dir, run.publishing.hub_model_id)
        logger.info("saved to %s", run.output_dir)
        if run.publishing.push_to_hub:
            push_to_hub(
                run.output_dir, run.publishing.hub_model_id, private=run.publishing.private or None
            )
    accelerator.print(json.dumps({"eval": results, **summary}, indent=2))
    for tracker in accelerator.trackers:  # not end_training(): a next stage (--finetune-each)
        tracker.finish()  # still needs the process group; stages.run() ends it
    return results
