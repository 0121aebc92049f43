"""What a run is and what of it survives a resume.

`Run` is everything the loop works with, built once by `setup.build_run`; the step, the callbacks
and checkpointing take it. `TrainState` is the loop's position and running totals, `EpochLosses`
the epoch's per-task losses, and `RunState` the ONE object registered for checkpointing: a keyed
dict of every resumable component's state (schedule, sampler, weighting, loop, epoch losses,
regularizers, callbacks such as keep-best), so a missing or extra entry is named by what it holds
and adding a component never shifts the others.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from mtnlp.cards.schema import TaskCard
from mtnlp.training.regularizers import RunRegularizers, SuccessiveRegularizer
from mtnlp.training.weighting import LossWeighting
from mtnlp.utils.errors import UserError


class Stateful(Protocol):
    """What a checkpointed component has, as torch modules and accelerate's objects do."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class TrainState:
    """The training loop's position and running totals, registered for checkpointing.

    `streams` knows the data position (per task: epoch, batches taken, shuffling-generator state
    at the epoch start); the totals make the logs of a resumed run continue where they stopped.
    Loss sums stay tensors on the device (no sync per step) and are saved as floats.
    """

    def __init__(self, tasks: Sequence[str], streams: Any, device: torch.device) -> None:
        self.streams = streams
        self.step = 0
        self.bad_steps = 0  # consecutive steps with a non-finite loss
        self.examples = 0
        self.task_steps = dict.fromkeys(tasks, 0)
        self.window_steps = dict.fromkeys(tasks, 0)
        self.loss_sums = {task: torch.zeros((), device=device) for task in tasks}
        self.history: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "bad_steps": self.bad_steps,
            "examples": self.examples,
            "task_steps": dict(self.task_steps),
            "window_steps": dict(self.window_steps),
            "loss_sums": {task: float(value) for task, value in self.loss_sums.items()},
            "history": list(self.history),
            "streams": self.streams.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.bad_steps = state["bad_steps"]
        self.examples = state["examples"]
        self.task_steps = dict(state["task_steps"])
        self.window_steps = dict(state["window_steps"])
        for task, value in state["loss_sums"].items():
            self.loss_sums[task].fill_(value)
        self.history = list(state["history"])
        self.streams.load_state_dict(state["streams"])


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


# entry name -> what it holds (errors name it); the order is the legacy positional layout's
# (`custom_checkpoint_<i>.pkl` of checkpoints written before the keyed state), for its reader
ENTRIES = {
    "schedule": "learning-rate schedule",
    "sampler": "task sampler",
    "weighting": "loss weighting",
    "loop": "loop state",
    "epoch_losses": "epoch losses",
    "regularizers": "block-sparse / adversarial regularizers",
    "keep_best": "--keep-best tracker",
    "successive": "successive regularization snapshots",
    "relationship_prior": "task covariance of --relationship-prior",
    "task_clusters": "task clusters of --task-clusters",
}
FORMAT_KEY = "format"  # marks the keyed layout; a legacy checkpoint's first file has no such key


class RunState:
    """Every resumable component of a run under a name, registered with
    `accelerator.register_for_checkpointing` as one object (`custom_checkpoint_0.pkl`).

    `state_dict()` is `{"format": 2, "schedule": ..., "sampler": ..., <callback name>: ...}`.
    Loading checks the names first: a checkpoint written with other options (`--keep-best`,
    `--block-sparse`, successive regularization) is refused naming the entry, never loaded into
    the wrong object. (A legacy checkpoint, one file per component, never comes here:
    `checkpointing.load_checkpoint` registers its components one by one while it loads.)
    """

    VERSION = 2

    def __init__(self) -> None:
        self.entries: dict[str, Stateful] = {}
        self.where = "the checkpoint"  # set by checkpointing before a load, for error messages

    def add(self, name: str, component: Stateful) -> None:
        if name in self.entries:
            raise ValueError(f"two resumable components named {name!r}")
        self.entries[name] = component

    def describe(self, name: str) -> str:
        return ENTRIES.get(name, f"{name} callback")

    def state_dict(self) -> dict[str, Any]:
        return {FORMAT_KEY: self.VERSION} | {
            name: component.state_dict() for name, component in self.entries.items()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load each entry's state after checking that the names match this run's."""
        self.check_names(state)
        for name, component in self.entries.items():
            component.load_state_dict(state[name])

    def check_names(self, state: Mapping[str, Any]) -> None:
        """A checkpoint's entries must be this run's: a missing or extra one is refused, named
        by what it holds."""
        state = {name: value for name, value in state.items() if name != FORMAT_KEY}
        for name in self.entries:
            if name not in state:
                raise UserError(
                    f"--resume-from-checkpoint: {self.where}: holds no {self.describe(name)} "
                    "(it was written without it), so the run cannot continue exactly; resume "
                    "with the options it was written with"
                )
        for name in state:
            if name not in self.entries:
                raise UserError(
                    f"--resume-from-checkpoint: {self.where}: holds the {self.describe(name)}, "
                    "which this run does not have; resume with the options it was written with "
                    "(--keep-best, --block-sparse, --adversarial, successive_regularization)"
                )


def joint_name(tasks: Sequence[str]) -> str:
    """A joint group's name, as the sampler, the data streams and the logs know it: its tasks
    joined by '+', e.g. 'pos+chunk+ner' (task names never hold a '+')."""
    return "+".join(tasks)


@dataclass(frozen=True)
class Schedule:
    """The run's numbers, fixed at set-up: optimizer steps in all and per epoch, micro-batches per
    epoch, and the options of one step."""

    total_steps: int
    steps_per_epoch: int
    micro_per_epoch: int
    accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    # --clip-by-depth: task -> factor of max_grad_norm (min(3, stack depth)); empty: one norm
    clip_scales: dict[str, float] = field(default_factory=dict)
    max_bad_steps: int = 10
    all_tasks: bool = False  # every task in each micro-batch (LibMTL) instead of one (MT-DNN)
    # --batch-mode joint: sampler name of a group ("pos+chunk+ner") -> its tasks, which share
    # each of the group's micro-batches and its one encoder pass
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def syncs_itself(self) -> bool:
        """Whether the step averages the model's gradients itself, not DDP: all_tasks (several
        forwards per backward) and joint groups (a forward DDP does not see)."""
        return self.all_tasks or bool(self.groups)


@dataclass(frozen=True)
class Publishing:
    """Where the finished run's model card points and whether the run is pushed."""

    hub_model_id: str | None = None
    push_to_hub: bool = False
    private: bool = False


@dataclass
class Run:
    """Everything the loop works with, built by `setup.build_run`: the accelerate objects, the
    data streams, the mixing components and the schedule. Components take what they need from it
    as explicit values; nothing below `setup` reads the run's arguments."""

    accelerator: Accelerator
    model: nn.Module  # as prepared by accelerate (DDP-wrapped on several processes)
    tokenizer: Any
    cards: list[TaskCard]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: Any  # TaskSampler
    streams: Any  # mixing.TaskStreams
    weighting: LossWeighting
    regularizers: RunRegularizers
    successive: SuccessiveRegularizer
    eval_loaders: dict[str, dict[str, Any]]
    data: dict[str, Any]  # task -> TaskData (affinity probes)
    state: TrainState
    epoch_losses: EpochLosses
    run_state: RunState
    output_dir: Path
    schedule: Schedule
    shared: list[nn.Parameter] = field(default_factory=list)  # the encoder's (pcgrad surgery)
    # parameters whose gradients DDP does not average: the loss weights', the adversarial
    # discriminator's and, when `schedule.syncs_itself` (all_tasks, joint groups), the model's
    unsynced: list[nn.Parameter] = field(default_factory=list)
    specs: list[dict[str, Any]] = field(default_factory=list)
    resume_from: Path | None = None  # the checkpoint to continue
    overwrite_output_dir: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)  # the run's flags, for checkpoints
    publishing: Publishing = field(default_factory=Publishing)
    best_step: int | None = None  # the step of the weights kept (--keep-best)
    callbacks: Any = None  # the CallbackList, set by the loop (callbacks broadcast on_evaluate)
    should_stop: bool = False  # a callback may end training early (e.g. early stopping)
    started: float = field(default_factory=time.perf_counter)
    start_examples: int = 0
    train_seconds: float = 0.0

    @property
    def unwrapped(self) -> nn.Module:
        """The model itself, without the DDP wrapper."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def task_names(self) -> list[str]:
        return [card.name for card in self.cards]

    @property
    def cards_by_name(self) -> dict[str, TaskCard]:
        return {card.name: card for card in self.cards}

    def next_tasks(self) -> list[str]:
        """The tasks of the next micro-batch: every task (all_tasks), or the sampler's pick: a
        task or a joint group's tasks."""
        if self.schedule.all_tasks:
            return self.task_names
        picked = self.sampler.next_task()
        return list(self.schedule.groups.get(picked, (picked,)))
