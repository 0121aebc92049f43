"""Model selection: keep the weights of the evaluation with the best dev score.

Used by `--keep-best` and by MT-DNN's fine-tuning stage ("best dev checkpoint kept"). The score
is the mean over the main tasks of each task's main score (`metrics.main_score`: its card's main
metric, oriented so that greater is better); auxiliary tasks (`role: auxiliary`) are trained and
evaluated but never select the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from mtnlp.metrics import main_metrics as metrics_of_tasks
from mtnlp.metrics import main_score
from mtnlp.modeling.config import main_tasks

MainMetrics = Mapping[str, Sequence[str] | None]  # task -> main metric (`task_main_metric`)


def selection_metrics(tasks: Iterable[Mapping[str, Any]]) -> dict[str, list[str] | None]:
    """Task -> main metric of the tasks that select the model: the main tasks among `tasks`
    (`model_spec()` dicts), not the auxiliary ones."""
    return metrics_of_tasks(main_tasks(tasks))


def dev_score(results: dict[str, dict[str, float]], main_metrics: MainMetrics) -> float:
    """Mean over the tasks of `main_metrics` of each task's main score (NaN if any is NaN); the
    results of other tasks (auxiliary ones) do not count."""
    scores = [
        main_score(v, main_metrics[task], task)
        for task, v in results.items()
        if v and task in main_metrics
    ]
    return sum(scores) / len(scores) if scores else math.nan


class BestCheckpoint:
    """A CPU copy of the model's weights at its best dev score so far (the first one if every
    score is NaN), to restore before saving. Registered for checkpointing (`state_dict`), so a
    resumed run keeps the best evaluation of the steps before its checkpoint."""

    def __init__(self, main_metrics: MainMetrics) -> None:
        self.main_metrics = main_metrics
        self.score = -math.inf
        self.step: int | None = None
        self.results: dict[str, dict[str, float]] | None = None
        self.state: dict[str, Tensor] | None = None

    def update(self, step: int, results: dict[str, dict[str, float]], model: nn.Module) -> bool:
        """Remember `model`'s weights if `results` beat the best so far; True if they did."""
        score = dev_score(results, self.main_metrics)
        if self.state is not None and not score > self.score:
            return False
        self.score = -math.inf if math.isnan(score) else score
        self.step, self.results = step, results
        # whole weights (under FSDP every process gathers the shards), the same in every
        # process, so the main process's checkpoint of this state resumes every process
        self.state = {
            name: (value.full_tensor() if isinstance(value, DTensor) else value)
            .detach()
            .to("cpu", copy=True)
            for name, value in model.state_dict().items()
        }
        return True

    def restore(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """Load the best weights into `model` (under FSDP, each process its shard); return their
        dev results."""
        if self.state is None:
            raise RuntimeError("no checkpoint to restore: update() was never called")
        weights = {
            name: distribute_tensor(
                self.state[name].to(value.device), value.device_mesh, value.placements
            )
            if isinstance(value, DTensor)
            else self.state[name]
            for name, value in model.state_dict().items()
        }
        model.load_state_dict(weights)
        return self.results

    def state_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "step": self.step,
            "results": self.results,
            "state": self.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.score, self.step = state["score"], state["step"]
        self.results, self.state = state["results"], state["state"]
