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
import time
from collections.abc import Sequence
from pathlib import Path

from mtnlp.artifacts.run_folder import public_arguments, save_run
from mtnlp.cards.schema import TaskCard
from mtnlp.hub.card import write_model_card
from mtnlp.hub.push import push_to_hub
from mtnlp.training.args import TrainArguments
from mtnlp.training.callbacks import Callback, CallbackList, Results, evaluate_run
from mtnlp.training.checkpointing import check_finite, full_state_dict, resume
from mtnlp.training.setup import build_run, default_callbacks, make_accelerator
from mtnlp.training.state import Run
from mtnlp.training.step import train_step
from mtnlp.utils.errors import UserError
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
        with run.regularizers.hooked(run.unwrapped):
            hooks.on_train_begin(run)
            run.started = time.perf_counter()
            for step in range(run.state.step + 1, run.schedule.total_steps + 1):
                tasks = train_step(run, step)
                hooks.on_step_end(run, step, tasks)
                if run.should_stop:
                    break
            run.train_seconds = time.perf_counter() - run.started
            results = hooks.on_train_end(run, evaluate_run(run))
        return finish(run, results)


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
