"""How the loop mixes tasks: the epoch's length per batch mode, the task sampler, the
distributed engines each mode supports, and an endless stream of batches per task.

Three batch modes: `one_task` draws one task per micro-batch from the sampler (MT-DNN, Liu et al.
2019); `all_tasks` takes a batch of every task per micro-batch (LibMTL, Lin & Zhang 2023), which
gradient-based weightings such as PCGrad need; `joint` is `one_task` where tasks that read the
same inputs (CoNLL-2003 POS, chunk, NER) form one group, drawn as one task, whose batches carry
every grouped task's labels through one encoder pass. Every process makes the same choices.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.utils import DistributedType
from datasets import Dataset
from torch.utils.data import DataLoader

from mtnlp.cards.schema import TaskCard
from mtnlp.data.labels import row_place
from mtnlp.data.loaders import first_different_row
from mtnlp.data.read import describe_source
from mtnlp.training.samplers import TaskSampler, build_sampler
from mtnlp.training.weighting import LossWeighting
from mtnlp.utils.errors import UserError

# distributed set-ups whose engine owns gradient sync and the optimizer's parameters
ENGINE_TYPES = (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM)


def epoch_length(batch_mode: str, task_sizes: dict[str, int]) -> int:
    """Micro-batches in one epoch: every task's batches once (`one_task`, MT-DNN; `joint`, where
    a group of tasks with the same inputs is one task), or as many as the largest task has
    (`all_tasks`, LibMTL; smaller tasks cycle)."""
    sizes = task_sizes.values()
    return max(sizes) if batch_mode == "all_tasks" else sum(sizes)


def joint_groups(
    cards: Sequence[TaskCard], train_sets: dict[str, Dataset], data_dirs: Sequence[Path] | None
) -> list[list[str]]:
    """The groups of two or more tasks whose tokenized training inputs are the same row by row
    (compared, not assumed from the cards), in card order; tasks in no group are left out.

    Two cards that read the same source, split and input columns but tokenize to different
    inputs (e.g. another `max_length`) are refused, naming the first row that differs."""
    groups: list[list[TaskCard]] = []
    for card in cards:
        for group in groups:
            row = first_different_row(train_sets[group[0].name], train_sets[card.name])
            if row is None:
                group.append(card)
                break
            if same_source(group[0], card):
                raise UserError(
                    f"--batch-mode joint: {group[0].where} and {card.where} read the same "
                    f"training inputs, but their tokenized inputs differ at "
                    f"{training_row(card, row, data_dirs)} (same max_length?); use --batch-mode "
                    "one_task to train them in separate batches"
                )
        else:
            groups.append([card])
    return [[card.name for card in group] for group in groups if len(group) > 1]


def check_joint(
    *, adversarial: bool, block_sparse: bool, sharing: str | None, task_priors: Sequence[str] = ()
) -> None:
    """What a joint group cannot serve: its one pass trains several tasks through the model's
    `forward_tasks`, which the forward hooks of the task discriminator, the block-sparse
    penalty, the task priors (`task_priors`: their flags) and a sharing strategy's penalty
    (`sharing`: its name, if it has one) do not see."""
    refused = {
        "--adversarial": adversarial,
        "--block-sparse": block_sparse,
        **dict.fromkeys(task_priors, True),
        f"--sharing {sharing}": sharing is not None,
    }
    for flag, asked in refused.items():
        if asked:
            raise UserError(
                f"--batch-mode joint: not with {flag} (it needs one task per encoder pass); use "
                "--batch-mode one_task"
            )


def same_source(card: TaskCard, other: TaskCard) -> bool:
    """Whether two cards read the same training split and input columns of the same data."""
    return (card.source, card.train_split, card.inputs) == (
        other.source,
        other.train_split,
        other.inputs,
    )


def training_row(card: TaskCard, row: int, data_dirs: Sequence[Path] | None) -> str:
    """Where training example `row` (0-based) of `card` is: file and line, or example number."""
    where = describe_source(card, card.train_split, data_dirs)
    local = card.source.local.for_split(card.train_split) if Path(where).is_file() else None
    try:
        return row_place(where, row, local)
    except IndexError:  # past the end of the file: the other card has more rows
        return f"{where}: example {row + 1}"


def build_task_sampler(
    name: str,
    task_sizes: dict[str, int],
    *,
    seed: int,
    sampling_weights: dict[str, float | None],
    num_epochs: int,
    temperature: float,
    examples_cap: int | None,
    examples_per_batch: int,
    task_levels: dict[str, tuple[int, ...]] | None = None,
) -> TaskSampler:
    """The sampler `name` over `task_sizes` (batches per process); an `examples_cap` of N examples
    is N / `examples_per_batch` (batch size x processes) batches per process; `task_levels` rank
    the tasks for the `ordered` sampler."""
    return build_sampler(
        name,
        task_sizes,
        seed=seed,
        sampling_weights=sampling_weights,
        num_epochs=num_epochs,
        temperature=temperature,
        examples_cap=math.ceil(examples_cap / examples_per_batch) if examples_cap else None,
        task_levels=task_levels,
    )


def check_distributed(
    accelerator: Accelerator,
    all_tasks: bool,
    weighting: LossWeighting,
    weighting_name: str,
    *,
    joint: bool = False,
    affinity: bool = False,
    adversarial: bool = False,
    successive: str | None = None,
    task_priors: Sequence[str] = (),
) -> None:
    """What needs whole weights in every process: the all_tasks and joint modes and learned
    loss weights (they sync gradients themselves), task affinity (lookahead steps on the model's
    weights), the adversarial discriminator (trained outside the model), successive
    regularization (snapshots of the weights; `successive`: the card that asks for it) and the
    task priors on the stacked heads (`task_priors`: their flags): DDP only."""
    if accelerator.distributed_type not in ENGINE_TYPES:
        return
    engine = accelerator.distributed_type.value
    if all_tasks:
        raise UserError(f"--batch-mode all_tasks: not supported with {engine} (use DDP)")
    if joint:
        raise UserError(f"--batch-mode joint: not supported with {engine} (use DDP)")
    if any(True for _ in weighting.parameters()):
        raise UserError(f"--weighting {weighting_name}: learned weights need DDP, not {engine}")
    if affinity:
        raise UserError(f"--affinity-every: task affinity needs DDP, not {engine}")
    if adversarial:
        raise UserError(f"--adversarial: the task discriminator needs DDP, not {engine}")
    if successive:
        raise UserError(f"{successive}: successive_regularization: needs DDP, not {engine}")
    if task_priors:
        raise UserError(
            f"{task_priors[0]}: needs whole task heads in every process (DDP), not {engine}"
        )


class TaskStreams:
    """An endless stream of batches per task: a task's loader restarts (reshuffled) at its end.

    The position (per task: epoch, batches taken from it, and its shuffling generator's state at
    the epoch start) is a `state_dict`: a resumed run replays the epoch's order and skips the
    batches already trained on (`skip_first_batches`, which loads none of them).
    """

    def __init__(self, loaders: dict[str, DataLoader], num_processes: int = 1) -> None:
        self.loaders = loaders
        self.num_processes = num_processes
        self.epochs = dict.fromkeys(loaders, 0)
        self.taken = dict.fromkeys(loaders, 0)
        self.seen = dict.fromkeys(loaders, 0)  # examples (all processes) of the task's epoch
        self.epoch_rng: dict[str, torch.Tensor | None] = {}
        self.iterators = {task: self._start(task, loader) for task, loader in loaders.items()}

    def _start(self, task: str, loader: DataLoader) -> Iterator:
        generator = getattr(self.loaders[task], "generator", None)
        self.epoch_rng[task] = None if generator is None else generator.get_state()
        return iter(loader)

    def next(self, task: str) -> dict[str, torch.Tensor]:
        """The task's next batch (on this process); a new epoch of its loader at its end."""
        try:
            batch = next(self.iterators[task])
        except StopIteration:
            self.epochs[task] += 1
            self.taken[task] = self.seen[task] = 0
            loader = self.loaders[task]
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.epochs[task])
            self.iterators[task] = self._start(task, loader)
            batch = next(self.iterators[task])
        self.taken[task] += 1
        return batch

    def count(self, task: str, rows: int) -> int:
        """How many distinct examples the task's latest batch, `rows` on each process, trained on
        all processes together: the last batch of an epoch, padded by accelerate with duplicates
        so that every process has one, counts only the examples that were left."""
        examples = min(rows * self.num_processes, len(self.loaders[task].dataset) - self.seen[task])
        self.seen[task] += examples
        return examples

    def state_dict(self) -> dict[str, Any]:
        return {
            "epochs": dict(self.epochs),
            "taken": dict(self.taken),
            "seen": dict(self.seen),
            "epoch_rng": dict(self.epoch_rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for task, loader in self.loaders.items():
            self.epochs[task], self.taken[task] = state["epochs"][task], state["taken"][task]
            self.seen[task] = state.get("seen", {}).get(task, 0)  # absent in older checkpoints
            self.epoch_rng[task] = state["epoch_rng"][task]
            if self.epoch_rng[task] is not None:
                loader.generator.set_state(self.epoch_rng[task])
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.epochs[task])
            skipped = skip_first_batches(loader, self.taken[task]) if self.taken[task] else loader
            self.iterators[task] = iter(skipped)
