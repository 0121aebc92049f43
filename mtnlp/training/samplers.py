"""Task samplers: which task each training step (micro-batch) uses.

An epoch is `sum(task_sizes)` draws, the MT-DNN convention (Liu et al. 2019). All randomness comes
from a `numpy.random.Generator` seeded with `seed`, and `state_dict()` holds the draw counter and
the generator state, so every process draws the same sequence and a resumed run continues it
exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from mtnlp.utils.errors import UserError
from mtnlp.utils.registry import Registry

SAMPLERS: Registry[type[TaskSampler]] = Registry("sampler")


class TaskSampler:
    """Base class: subclasses pick the task of draw number `self.draws` in `_choose`.

    `task_sizes` is the number of training batches per task, in task order; `examples_cap` caps
    each size where sizes set probabilities (as jiant does), so one huge task cannot swamp the rest.
    `task_levels` ranks tasks from low to high in a hierarchy (the `ordered` sampler's order; ties
    in task order; a task without a level ranks lowest).
    """

    def __init__(
        self,
        task_sizes: dict[str, int],
        *,
        seed: int = 0,
        sampling_weights: dict[str, float] | None = None,
        num_epochs: int = 1,
        temperature: float = 2.0,
        examples_cap: int | None = None,
        task_levels: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        if not task_sizes:
            raise UserError("sampler: no training tasks (task_sizes is empty)")
        for name, size in task_sizes.items():
            if size <= 0:
                raise UserError(f"sampler: task {name!r} has {size} training batches; need > 0")
        if num_epochs < 1:
            raise UserError(f"sampler: num_epochs must be >= 1, got {num_epochs}")
        if temperature <= 0:
            raise UserError(f"sampler: temperature must be > 0, got {temperature}")
        if examples_cap is not None and examples_cap <= 0:
            raise UserError(f"sampler: examples_cap must be > 0, got {examples_cap}")
        self.tasks = list(task_sizes)
        self.task_sizes = dict(task_sizes)
        capped = [min(size, examples_cap or size) for size in task_sizes.values()]
        self.capped_sizes = np.array(capped, dtype=float)
        self.sampling_weights = sampling_weights
        self.num_epochs = num_epochs
        self.temperature = temperature
        self.task_levels = dict(task_levels or {})
        self.draws = 0
        self.rng = np.random.default_rng(seed)

    @property
    def epoch_length(self) -> int:
        """Draws in one epoch: the total number of training batches."""
        return sum(self.task_sizes.values())

    @property
    def epoch(self) -> int:
        """Index (0-based) of the epoch the next draw belongs to."""
        return self.draws // self.epoch_length

    def next_task(self) -> str:
        task = self._choose()
        self.draws += 1
        return task

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return self.next_task()

    def probabilities(self) -> dict[str, float]:
        """Probability of each task for the current epoch (long-run shares for fixed orders)."""
        return dict(zip(self.tasks, self._probabilities().tolist(), strict=True))

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: the tasks, the draw counter and the generator state."""
        return {"tasks": list(self.tasks), "draws": self.draws, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["tasks"] != self.tasks:
            raise UserError(
                f"sampler state is for tasks {state['tasks']}, but this run trains {self.tasks}"
            )
        self.draws = state["draws"]
        self.rng.bit_generator.state = state["rng"]

    def _choose(self) -> str:
        raise NotImplementedError

    def _probabilities(self) -> np.ndarray:
        raise NotImplementedError


class StochasticSampler(TaskSampler):
    """Draws each step's task independently from `_weights()`, normalized."""

    def _choose(self) -> str:
        return self.tasks[self.rng.choice(len(self.tasks), p=self._probabilities())]

    def _probabilities(self) -> np.ndarray:
        weights = self._weights()
        return weights / weights.sum()

    def _weights(self) -> np.ndarray:
        raise NotImplementedError


@SAMPLERS.register("sequential")
class SequentialSampler(TaskSampler):
    """All of the first task's batches, then all of the second's, ... in every epoch."""

    def epoch_order(self) -> list[str]:
        """The tasks in the order an epoch trains them."""
        return self.tasks

    def _choose(self) -> str:
        order = self.epoch_order()
        position = self.draws % self.epoch_length
        ends = np.cumsum([self.task_sizes[name] for name in order])
        return order[int(np.searchsorted(ends, position, side="right"))]

    def _probabilities(self) -> np.ndarray:
        sizes = np.array(list(self.task_sizes.values()), dtype=float)
        return sizes / sizes.sum()

    def tasks_past(self, draws: int) -> list[str]:
        """The tasks that the first `draws` draws of a run never reach (a budget shorter than an
        epoch stops before the later tasks' turns)."""
        order = self.epoch_order()
        starts = np.cumsum([0] + [self.task_sizes[name] for name in order[:-1]])
        return [name for name, start in zip(order, starts, strict=True) if start >= draws]


@SAMPLERS.register("ordered")
class OrderedSampler(SequentialSampler):
    """`sequential` with the tasks from low to high in the hierarchy (Hashimoto et al. 2017, "A
    Joint Many-Task Model", Sec. 4: in each epoch every task is trained in turn, lowest first).

    The order is `task_levels` (set up by training: the number of tasks a task stacks on, then the
    encoder layer it reads), ties in task order; without levels it is `sequential`.
    """

    def epoch_order(self) -> list[str]:
        rank = {name: index for index, name in enumerate(self.tasks)}
        return sorted(self.tasks, key=lambda name: (self.task_levels.get(name, ()), rank[name]))


@SAMPLERS.register("round_robin")
class RoundRobinSampler(TaskSampler):
    """One batch of each task in turn: t1, t2, t3, t1, ...

    Every task gets the same number of steps, so within an epoch a task with fewer batches than
    `epoch_length / num_tasks` is revisited more often than it has batches: its batches cycle.
    """

    def _choose(self) -> str:
        return self.tasks[self.draws % len(self.tasks)]

    def _probabilities(self) -> np.ndarray:
        return np.full(len(self.tasks), 1 / len(self.tasks))


@SAMPLERS.register("proportional")
class ProportionalSampler(StochasticSampler):
    """p_i ∝ n_i, the MT-DNN default (Liu et al. 2019, "Multi-Task Deep Neural Networks...")."""

    def _weights(self) -> np.ndarray:
        return self.capped_sizes


@SAMPLERS.register("uniform")
class UniformSampler(StochasticSampler):
    """p_i = 1/K: every task equally often, whatever its size."""

    def _weights(self) -> np.ndarray:
        return np.ones(len(self.tasks))


@SAMPLERS.register("temperature")
class TemperatureSampler(StochasticSampler):
    """p_i ∝ n_i^(1/T) (Arivazhagan et al. 2019): T=1 is proportional, T→∞ uniform."""

    def _weights(self) -> np.ndarray:
        return self.capped_sizes ** (1 / self.temperature)


@SAMPLERS.register("annealed")
class AnnealedSampler(StochasticSampler):
    """p_i ∝ n_i^α with α = 1 - 0.8 (e-1)/(E-1) (Stickland & Murray 2019, "BERT and PALs").

    Starts proportional (α=1) and ends closer to uniform (α=0.2) at epoch E = num_epochs; epochs
    past E keep α=0.2.
    """

    def alpha(self) -> float:
        if self.num_epochs == 1:
            return 1.0
        epoch = min(self.epoch + 1, self.num_epochs)
        return 1 - 0.8 * (epoch - 1) / (self.num_epochs - 1)

    def _weights(self) -> np.ndarray:
        return self.capped_sizes ** self.alpha()


@SAMPLERS.register("specified")
class SpecifiedSampler(StochasticSampler):
    """p_i ∝ sampling_weights[i], weights the user gives (e.g. the cards' `sampling_weight`)."""

    def __init__(self, task_sizes: dict[str, int], **options: Any) -> None:
        super().__init__(task_sizes, **options)
        weights = self.sampling_weights or {}
        missing = [name for name in self.tasks if name not in weights]
        unknown = [name for name in weights if name not in self.task_sizes]
        if missing or unknown:
            raise UserError(
                f"sampler 'specified' needs a sampling weight for every task: "
                f"missing {missing}, unknown {unknown}"
            )
        self.weights = np.array([weights[name] for name in self.tasks], dtype=float)
        if (self.weights < 0).any() or self.weights.sum() <= 0:
            raise UserError(
                f"sampler 'specified': sampling weights must be >= 0 and not all 0, got {weights}"
            )

    def _weights(self) -> np.ndarray:
        return self.weights


def build_sampler(name: str, task_sizes: dict[str, int], **options: Any) -> TaskSampler:
    """The sampler registered as `name`; `options` are `TaskSampler`'s keyword arguments."""
    return SAMPLERS.get(name)(task_sizes, **options)
