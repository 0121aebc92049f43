"""Loss weightings: how the losses of the tasks in one step become the loss to minimize.

Loss-based weightings (`static`, `uncertainty`, `dwa`) implement `combine(losses)`; the trainer
backpropagates its result. The gradient-based `pcgrad` changes the gradients themselves and
implements `backward(losses, shared_parameters, backward_fn)` instead. Every weighting works on
the losses times the cards' `loss_weight` (`static_weights`): static weighs by them alone, the
others weigh the scaled losses their own way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtnlp.utils.errors import UserError
from mtnlp.utils.registry import Registry

WEIGHTINGS: Registry[type[LossWeighting]] = Registry("loss weighting")


class LossWeighting(nn.Module):
    """Base class: `combine(losses)` sums one weighted term per task present in the step, of its
    loss times the task's loss weight (`static_weights`, the cards' `loss_weight`; default 1).

    Terms are computed in float32 with autocast off, so bf16/fp16 training gets an exact sum.
    Learned weights are `nn.Parameter`s (the optimizer must include them) and other state is kept
    in buffers, so `state_dict()` / `load_state_dict()` restore a weighting exactly.
    """

    name: ClassVar[str]
    requires_all_tasks: ClassVar[bool] = False  # needs the losses of every task in each step
    gradient_based: ClassVar[bool] = False  # trains through `backward`, not `combine`

    def __init__(
        self,
        task_names: list[str],
        *,
        task_types: dict[str, str] | None = None,
        static_weights: dict[str, float] | None = None,
        dwa_temperature: float = 2.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not task_names:
            raise UserError("loss weighting: no tasks")
        unknown = sorted(set(static_weights or {}) - set(task_names))
        if unknown:
            raise UserError(f"loss weighting: static weights for unknown tasks {unknown}")
        if dwa_temperature <= 0:
            raise UserError(f"loss weighting: dwa_temperature must be > 0, got {dwa_temperature}")
        self.task_names = list(task_names)
        self.index = {name: i for i, name in enumerate(self.task_names)}
        self.task_types = dict(task_types or {})
        self.static_weights = dict(static_weights or {})
        self.dwa_temperature = dwa_temperature
        self.seed = seed

    def combine(self, losses: dict[str, Tensor]) -> Tensor:
        """The scalar total loss (float32) from the losses of the tasks in this step."""
        if not losses:
            raise ValueError("combine() needs the loss of at least one task")
        device_type = next(iter(losses.values())).device.type
        with torch.autocast(device_type, enabled=False):
            terms = [self._weighted(name, self.scaled(name, loss)) for name, loss in losses.items()]
        return torch.stack(terms).sum()

    def scaled(self, name: str, loss: Tensor) -> Tensor:
        """A task's loss (float32) times its loss weight."""
        return self.loss_weight(name) * loss.float()

    def loss_weight(self, name: str) -> Tensor | float:
        """The task's loss weight (the card's `loss_weight`)."""
        return self.static_weights.get(name, 1.0)

    def weights(self) -> dict[str, float]:
        """The current effective weight of each task (the loss weight included), for logging."""
        raise NotImplementedError

    def end_epoch(self, mean_losses: dict[str, float]) -> None:
        """Called after each training epoch with each task's mean (unweighted) training loss."""

    def _weighted(self, name: str, loss: Tensor) -> Tensor:
        raise NotImplementedError


@WEIGHTINGS.register("static")
class StaticWeighting(LossWeighting):
    """Fixed weights: Σ_t w_t L_t with w_t from `static_weights` (default 1), as in MT-DNN. The
    weights are part of its state (a resumed run keeps the checkpoint's)."""

    name = "static"

    def __init__(self, task_names: list[str], **options: Any) -> None:
        super().__init__(task_names, **options)
        values = [self.static_weights.get(name, 1.0) for name in self.task_names]
        self.register_buffer("static", torch.tensor(values, dtype=torch.float32))

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.static.tolist(), strict=True))

    def loss_weight(self, name: str) -> Tensor:
        return self.static[self.index[name]]

    def _weighted(self, name: str, loss: Tensor) -> Tensor:
        return loss


@WEIGHTINGS.register("uncertainty")
class UncertaintyWeighting(LossWeighting):
    """Learned homoscedastic uncertainty (Kendall, Gal & Cipolla 2018, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics").

    Each task learns s_t = log σ_t² (init 0). A regression loss L (times the task's loss weight)
    becomes 0.5·exp(-s)·L + 0.5·s, a classification or tagging loss exp(-s)·L + 0.5·s: a noisy
    task learns a large σ and so a small weight, while the 0.5·s term keeps σ from growing
    without bound.
    """

    name = "uncertainty"

    def __init__(self, task_names: list[str], **options: Any) -> None:
        super().__init__(task_names, **options)
        self.log_variances = nn.Parameter(torch.zeros(len(self.task_names)))

    def weights(self) -> dict[str, float]:
        precisions = torch.exp(-self.log_variances.detach().float()).tolist()
        return {
            name: self._scale(name) * precision * self.loss_weight(name)
            for name, precision in zip(self.task_names, precisions, strict=True)
        }

    def _scale(self, name: str) -> float:
        return 0.5 if self.task_types.get(name) == "regression" else 1.0

    def _weighted(self, name: str, loss: Tensor) -> Tensor:
        log_variance = self.log_variances[self.index[name]].float()
        return self._scale(name) * torch.exp(-log_variance) * loss + 0.5 * log_variance


@WEIGHTINGS.register("dwa")
class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison 2019, "End-to-End Multi-Task Learning with
    Attention").

    In epoch e, w_t = K·softmax(r/T)_t with r_t = L_t(e-1) / L_t(e-2), the ratio of the task's mean
    training losses over the last two epochs: a task whose loss falls slowly gets more weight.
    Weights are 1 until `end_epoch` has been called twice. A task missing from `mean_losses` (no
    batch that epoch) keeps its previous mean loss.
    """

    name = "dwa"

    def __init__(self, task_names: list[str], **options: Any) -> None:
        super().__init__(task_names, **options)
        self.register_buffer("recent_losses", torch.ones(2, len(self.task_names)))
        self.register_buffer("epochs_seen", torch.tensor(0))

    def end_epoch(self, mean_losses: dict[str, float]) -> None:
        latest = self.recent_losses[1].clone()
        for name, loss in mean_losses.items():
            latest[self.index[name]] = loss
        self.recent_losses.copy_(torch.stack([self.recent_losses[1], latest]))
        self.epochs_seen += 1

    def weights(self) -> dict[str, float]:
        vector = self._weight_vector().tolist()
        return {
            name: weight * self.loss_weight(name)
            for name, weight in zip(self.task_names, vector, strict=True)
        }

    def _weight_vector(self) -> Tensor:
        if self.epochs_seen < 2:
            return torch.ones_like(self.recent_losses[1])
        ratios = self.recent_losses[1] / self.recent_losses[0].clamp_min(1e-12)
        return len(self.task_names) * torch.softmax(ratios / self.dwa_temperature, dim=0)

    def _weighted(self, name: str, loss: Tensor) -> Tensor:
        return self._weight_vector()[self.index[name]] * loss


def project_conflicting(grads: list[Tensor], order: Sequence[int]) -> list[Tensor]:
    """PCGrad's projection (Yu et al. 2020, Algorithm 1) of flat per-task gradients.

    For each g_i, for j in `order` (j ≠ i): if g_i·g_j < 0 then g_i ← g_i − (g_i·g_j)/‖g_j‖² g_j,
    where g_i is the partly projected gradient and g_j the original one.
    """
    projected = []
    for i, grad in enumerate(grads):
        for j in order:
            if j == i:
                continue
            dot = torch.dot(grad, grads[j])
            if dot < 0:
                grad = grad - dot / torch.dot(grads[j], grads[j]) * grads[j]
        projected.append(grad)
    return projected


@WEIGHTINGS.register("pcgrad")
class PCGrad(LossWeighting):
    """Gradient surgery (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning").

    On the shared parameters, each task's gradient loses its component along every other task's
    gradient it conflicts with (negative dot product), in a random task order, and the projected
    gradients are summed; task-specific parameters get their ordinary gradients. It compares the
    gradients of several tasks in one step, so it needs the all_tasks batch mode. `combine` is
    the sum of the loss-weighted losses, for logging and evaluation.
    """

    name = "pcgrad"
    requires_all_tasks = True
    gradient_based = True

    def __init__(self, task_names: list[str], **options: Any) -> None:
        super().__init__(task_names, **options)
        self.generator = torch.Generator().manual_seed(self.seed)

    def weights(self) -> dict[str, float]:
        return {name: float(self.loss_weight(name)) for name in self.task_names}

    def _weighted(self, name: str, loss: Tensor) -> Tensor:
        return loss

    def backward(
        self,
        losses: dict[str, Tensor],
        shared_parameters: list[nn.Parameter],
        backward_fn: Callable[[Tensor], Any] = Tensor.backward,
        reduce_fn: Callable[[Tensor], Tensor] | None = None,
        loss_scale: float = 1.0,
    ) -> Tensor:
        """Accumulate PCGrad gradients into `.grad` through `backward_fn`; returns the summed loss.

        `backward_fn` (e.g. `accelerator.backward`) runs once, on a surrogate loss whose gradient
        is the plain sum on every parameter plus (projected sum − plain sum) on the shared ones,
        so its loss scaling, gradient accumulation and gradient sync apply to the whole gradient.
        Under several processes, `reduce_fn` averages each task's gradient over them first, so
        every rank projects the same (global) gradients and, once the ranks' gradients are
        averaged, the shared parameters get exactly the projected sum of the global gradients.
        `loss_scale` is the fp16 gradient scaler's current scale: each task's gradient is taken
        of the scaled loss (so small fp16 gradients do not underflow, as in the ordinary
        backward) and unscaled in float32; an overflow makes the surrogate's gradients
        non-finite, and the scaler then skips the step as it does for any other.
        """
        shared = [parameter for parameter in shared_parameters if parameter.requires_grad]
        total = self.combine(losses)
        grads = [
            self._flat_grad(self.scaled(name, loss), shared, loss_scale)
            for name, loss in losses.items()
        ]
        if reduce_fn is not None:
            grads = [reduce_fn(grad) for grad in grads]
        order = torch.randperm(len(grads), generator=self.generator).tolist()
        projected = torch.stack(project_conflicting(grads, order)).sum(0)
        corrections = (projected - torch.stack(grads).sum(0)).split([p.numel() for p in shared])
        with torch.autocast(total.device.type, enabled=False):
            surrogate = total + sum(
                (p * c.view_as(p).to(p.dtype)).sum()
                for p, c in zip(shared, corrections, strict=True)
            )
        backward_fn(surrogate)
        return total.detach()

    @staticmethod
    def _flat_grad(loss: Tensor, shared: list[nn.Parameter], loss_scale: float = 1.0) -> Tensor:
        """d loss / d shared as one float32 vector, computed on `loss * loss_scale`."""
        grads = torch.autograd.grad(
            loss.float() * loss_scale, shared, retain_graph=True, allow_unused=True
        )
        flat = torch.cat(
            [
                torch.zeros(p.numel(), device=p.device) if g is None else g.float().flatten()
                for p, g in zip(shared, grads, strict=True)
            ]
        )
        return flat / loss_scale

    def get_extra_state(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])


def build_weighting(name: str, task_names: list[str], **options: Any) -> LossWeighting:
    """The weighting registered as `name`; `options` are `LossWeighting`'s keyword arguments."""
    return WEIGHTINGS.get(name)(task_names, **options)


def check_batch_mode(weighting: LossWeighting, batch_mode: str) -> None:
    """Raise a `UserError` if the weighting cannot work with this `--batch-mode`."""
    if weighting.requires_all_tasks and batch_mode != "all_tasks":
        raise UserError(
            f"loss weighting {weighting.name!r} needs --batch-mode all_tasks "
            "(it compares the gradients of several tasks in one step)"
        )
