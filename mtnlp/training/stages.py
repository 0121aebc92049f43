"""MT-DNN's two stages: multi-task learning, then (`--finetune-each`) each task fine-tuned
alone from the shared model (Liu et al. 2019, "Multi-Task Deep Neural Networks for Natural
Language Understanding"), and the comparison of both stages' dev metrics.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from accelerate import PartialState

from mtnlp.artifacts.run_folder import FINETUNED_DIR, RESULTS_JSON, RESULTS_MARKDOWN
from mtnlp.cards.load import check_main_task, load_cards
from mtnlp.cards.schema import AUXILIARY, FinetuneOptions, TaskCard
from mtnlp.hub.card import write_model_card
from mtnlp.hub.push import push_to_hub
from mtnlp.training.args import TrainArguments
from mtnlp.training.loop import train
from mtnlp.utils.files import output_lock, write_file

MULTI_TASK = "multi-task"


FINETUNED = "multi-task + fine-tune"


Results = dict[str, dict[str, float]]


def stage_arguments(args: TrainArguments, card: TaskCard) -> TrainArguments:
    """The arguments of one task's fine-tuning run: from the multi-task model in
    `args.output_dir`, on that task alone, with the fine-tuning schedule (the card's `finetune`
    settings over `--finetune-epochs` / `--finetune-learning-rate`; `--finetune-max-steps`
    overrides both epochs), keeping the best dev checkpoint. Multi-task options (sampling,
    weighting, batch mode) do not apply to one task, nor does `--head-learning-rate`: the heads
    were trained in the first stage, and the whole model trains at the stage's learning rate."""
    output_dir = Path(args.output_dir)
    own = card.finetune or FinetuneOptions()
    return dataclasses.replace(
        args,
        model=str(output_dir),
        tasks=card.name,
        output_dir=str(output_dir / FINETUNED_DIR / card.name),
        epochs=own.epochs or args.finetune_epochs,
        max_steps=args.finetune_max_steps,
        learning_rate=own.learning_rate or args.finetune_learning_rate or args.learning_rate,
        head_learning_rate=None,
        sampler="sequential",
        examples_cap=None,
        weighting="static",
        batch_mode="one_task",
        keep_best=True,
        finetune_each=False,
        push_to_hub=False,  # the multi-task model is pushed once, after the stages
        resume_from_checkpoint=None,
    )


def finetune_each(
    args: TrainArguments, cards: Sequence[TaskCard], multi_task: Results
) -> dict[str, dict[str, dict[str, float]]]:
    """Fine-tune every main task of `cards` alone (an auxiliary task only helps the others
    learn); return and write the table task -> stage -> metrics (`multi_task` holds the
    multi-task stage's dev metrics)."""
    table = {}
    for card in (card for card in cards if card.role != AUXILIARY):
        # alone, a task has no other to be weighed against: its loss_weight would only scale
        # the loss (and so the gradient clipping)
        finetuned = train(stage_arguments(args, card), [card.replace(loss_weight=1.0)])
        table[card.name] = {MULTI_TASK: multi_task[card.name], FINETUNED: finetuned[card.name]}
    if PartialState().is_main_process:
        output_dir = Path(args.output_dir)
        write_file(output_dir / RESULTS_JSON, json.dumps(table, indent=2) + "\n")
        write_file(output_dir / RESULTS_MARKDOWN, markdown_table(table))
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


def run(args: TrainArguments, default_cards: Sequence[str | Path] = ()) -> Results:
    """Load the cards named by the arguments (or the defaults) and train; with
    `--finetune-each`, then fine-tune each task alone from the result (MT-DNN's two stages) and
    push the multi-task model once, after both stages (`--push-to-hub`). The process group of a
    multi-process launch is ended once, after the last stage."""
    cards = load_cards(args.cards or default_cards, args.task_list)
    check_main_task(cards)
    try:
        if not args.finetune_each:
            return train(args, cards)
        return both_stages(args, cards)
    finally:
        if PartialState._shared_state:  # accelerate's state exists: a stage has started
            PartialState().destroy_process_group()


def both_stages(args: TrainArguments, cards: Sequence[TaskCard]) -> Results:
    """The multi-task stage, then each task fine-tuned alone; one push after both."""
    results = train(dataclasses.replace(args, push_to_hub=False), cards)
    # the fine-tuning runs read the multi-task model from the folder and write their table
    # into it: hold its lock (train() has set up accelerate's process state)
    output_dir = Path(args.output_dir)
    with output_lock(output_dir, PartialState().is_main_process):
        finetune_each(args, cards, results)
        if PartialState().is_main_process:
            write_model_card(output_dir, args.hub_model_id)  # now naming the fine-tuned models
            if args.push_to_hub:
                push_to_hub(output_dir, args.hub_model_id, private=args.hub_private or None)
    return results
