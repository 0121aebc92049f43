"""MT-DNN's two-stage recipe: after multi-task learning, fine-tune each task alone from the
shared model (Liu et al. 2019, "Multi-Task Deep Neural Networks for Natural Language
Understanding"), and compare the dev metrics of both stages.

Each task's run is an ordinary `train()` from the multi-task model folder (its encoder and that
task's head), with `--finetune-epochs` / `--finetune-max-steps` / `--finetune-learning-rate`, and
keeps its best dev checkpoint; it is saved in `OUTPUT/finetuned/<task>/`. The comparison goes to
`OUTPUT/finetune_results.json` and, as a Markdown table, `OUTPUT/finetune_results.md`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from accelerate import PartialState

from mtnlp.args import TrainArguments
from mtnlp.cards import TaskCard
from mtnlp.training import train

FINETUNED_DIR = "finetuned"
RESULTS_JSON = "finetune_results.json"
RESULTS_MARKDOWN = "finetune_results.md"
MULTI_TASK = "multi-task"
FINETUNED = "multi-task + fine-tune"

Results = dict[str, dict[str, float]]


def stage_arguments(args: TrainArguments, task: str) -> TrainArguments:
    """The arguments of one task's fine-tuning run: from the multi-task model in
    `args.output_dir`, on that task alone, with the fine-tuning schedule, keeping the best dev
    checkpoint. Multi-task options (sampling, weighting, batch mode) do not apply to one task."""
    output_dir = Path(args.output_dir)
    return dataclasses.replace(
        args,
        model=str(output_dir),
        tasks=task,
        output_dir=str(output_dir / FINETUNED_DIR / task),
        epochs=args.finetune_epochs,
        max_steps=args.finetune_max_steps,
        learning_rate=args.finetune_learning_rate or args.learning_rate,
        sampler="sequential",
        examples_cap=None,
        weighting="static",
        batch_mode="one_task",
        keep_best=True,
        finetune_each=False,
        resume_from_checkpoint=None,
    )


def finetune_each(
    args: TrainArguments, cards: Sequence[TaskCard], multi_task: Results
) -> dict[str, dict[str, dict[str, float]]]:
    """Fine-tune every task of `cards` alone; return and write the table task -> stage -> metrics
    (`multi_task` holds the multi-task stage's dev metrics)."""
    table = {}
    for card in cards:
        finetuned = train(stage_arguments(args, card.name), [card])
        table[card.name] = {MULTI_TASK: multi_task[card.name], FINETUNED: finetuned[card.name]}
    if PartialState().is_main_process:
        output_dir = Path(args.output_dir)
        (output_dir / RESULTS_JSON).write_text(json.dumps(table, indent=2) + "\n")
        (output_dir / RESULTS_MARKDOWN).write_text(markdown_table(table))
    return table


def markdown_table(table: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per task and dev metric: both stages and the fine-tuning gain."""
    lines = [
        f"| task | metric | {MULTI_TASK} | {FINETUNED} | gain |",
        "|---|---|---|---|---|",
    ]
    for task, stages in table.items():
        for metric, before in stages[MULTI_TASK].items():
            after = stages[FINETUNED][metric]
            lines.append(
                f"| {task} | {metric} | {before:.4f} | {after:.4f} | {after - before:+.4f} |"
            )
    return "\n".join(lines) + "\n"
