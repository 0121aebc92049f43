"""Column strategies: every task gets its own copy of the top encoder layers (soft sharing,
cross-stitch, sluice), and their penalties."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask

from mtnlp.modeling.config import TaskStates
from mtnlp.modeling.sharing.base import SHARING, SharingConfig, SharingStrategy, shape_option
from mtnlp.utils.errors import UserError


# ------------------------------------------------------------------------------ penalties
def l2_distance_penalty(stacked: Tensor) -> Tensor:
    """Sum over task pairs of the squared L2 distance of one parameter (Duong et al. 2015).

    `stacked`: (tasks, ...) one parameter of every task. Uses
    sum_{t<s} ||W_t - W_s||^2 = T * sum_t ||W_t - mean_t W||^2.
    """
    return stacked.shape[0] * (stacked - stacked.mean(0)).pow(2).sum()


def trace_norm_penalty(stacked: Tensor) -> Tensor:
    """Trace (nuclear) norm of the tasks' flattened parameters as rows, (tasks, numel): the sum
    of its singular values, low when the tasks' parameters are close to a common subspace (Yang &
    Hospedales 2017)."""
    return torch.linalg.svdvals(stacked.flatten(1).float()).sum()


def orthogonality_penalty(subspaces: Tensor) -> Tensor:
    """Sum over pairs of subspaces of ||G_a^T G_b / n||_F^2 (Ruder et al. 2019, normalized by the
    number of tokens n so that its weight does not depend on the batch size).

    `subspaces`: (tokens, K, d), the K subspaces of one layer output of one task.
    """
    n = subspaces.shape[0]
    gram = torch.einsum("nad,nbe->abde", subspaces, subspaces) / n  # (K, K, d, d): G_a^T G_b / n
    pairs = torch.triu_indices(subspaces.shape[1], subspaces.shape[1], offset=1)
    return gram[pairs[0], pairs[1]].pow(2).sum()


SOFT_PENALTIES = {"l2": l2_distance_penalty, "trace": trace_norm_penalty}


@dataclass(frozen=True)
class ColumnSharingConfig(SharingConfig):
    layers: int = shape_option(2)  # top encoder layers each task copies


@dataclass(frozen=True)
class SoftSharingConfig(ColumnSharingConfig):
    penalty: Literal["l2", "trace"] = "l2"  # squared L2 distance or trace norm
    weight: float = 0.01  # weight of the penalty


@dataclass(frozen=True)
class CrossStitchSharingConfig(ColumnSharingConfig):
    init: float = 0.9  # diagonal of the units at the start
    lr_scale: float = 100.0  # the units learn at this x the learning rate


@dataclass(frozen=True)
class SluiceSharingConfig(ColumnSharingConfig):
    subspaces: int = shape_option(2)  # subspaces per layer output
    orthogonality_weight: float = 1e-4  # weight of the subspace orthogonality penalty
    init: float = 0.9  # diagonal of the alphas at the start
    lr_scale: float = 100.0  # alphas and betas learn at this x the learning rate


def bert_layers(encoder: nn.Module, strategy: str) -> nn.ModuleList:
    """The encoder's transformer layers, if the encoder is BERT-like: `encoder.embeddings`, then
    `encoder.encoder.layer[i]`, each a function of (hidden states, attention mask) only."""
    stack = getattr(encoder, "encoder", None)
    layers = getattr(stack, "layer", None)
    parts = {name.split(".")[0] for name, _ in encoder.named_parameters()}
    plain = (
        hasattr(encoder, "embeddings")
        and isinstance(layers, nn.ModuleList)
        and len(layers) == encoder.config.num_hidden_layers
        # nothing between or beside them (e.g. ELECTRA's embedding projection, DeBERTa's
        # relative-position embeddings)
        and parts <= {"embeddings", "encoder", "pooler"}
        and sum(p.numel() for p in stack.parameters())
        == sum(p.numel() for p in layers.parameters())
    )
    if not plain:
        raise UserError(
            f"--sharing {strategy}: needs a BERT-like encoder (encoder.embeddings, then "
            f"encoder.encoder.layer[i] one after the other); {type(encoder).__name__} is built "
            "otherwise; use --sharing hard"
        )
    return layers


class ColumnSharing(SharingStrategy):
    """A shared bottom (embeddings and the first L - N layers, run once) and per-task columns of
    the top N layers. A task whose `layer` is in the bottom reads the shared states."""

    columns = True
    mixes_tasks: ClassVar[bool] = False  # every task's column runs on every batch
    config_class: ClassVar[type[SharingConfig]] = ColumnSharingConfig
    config: ColumnSharingConfig

    def __init__(self, encoder: nn.Module, tasks: list[str], options: dict[str, Any]) -> None:
        super().__init__(encoder, tasks, options)
        layers = bert_layers(encoder, self.name)
        count = self.config.layers
        if not isinstance(count, int) or not 1 <= count <= len(layers):
            raise UserError(
                f"--sharing-layers: {count} is not a number of top layers of this encoder "
                f"(1..{len(layers)})"
            )
        self.bottom = len(layers) - count
        self.shared_output = SharedOutput()
        # copies of the top layers that keep the encoder's config object (not a copy of it), so
        # that what changes it later (`set_attn_implementation`) reaches the columns too
        self.column = nn.ModuleDict(
            {
                task: copy.deepcopy(layers[self.bottom :], {id(encoder.config): encoder.config})
                for task in self.tasks
            }
        )

    def load_from_encoder(self, encoder: nn.Module) -> None:
        top = bert_layers(encoder, self.name)[self.bottom :].state_dict()
        for column in self.column.values():
            column.load_state_dict(top)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The parameters that start from the pretrained top layers (`load_from_encoder`) and
        train as the encoder's: the task columns."""
        return list(self.column.parameters())

    def inherit(self, trained: SharingStrategy) -> None:
        """A task the trained model knows keeps its trained column (from a hard-sharing model,
        columns start from its encoder's top layers, as `load_from_encoder` did)."""
        super().inherit(trained)
        if trained.columns:
            for task in self.tasks:
                if task in trained.tasks:
                    self.column[task].load_state_dict(trained.column[task].state_dict())

    def encode(
        self,
        encoder: nn.Module,
        layers: dict[str, int],
        inputs: dict[str, Tensor],
        attentions: bool = False,
    ) -> TaskStates:
        """Per task, the states at its layer (0 = embeddings, L = its column's top) and the hidden
        states on the way there (its column's for the top layers; with `attentions`, their
        attention weights too): the embeddings and the shared layers run once, layer by layer,
        then the task columns."""
        embedding_inputs = ("input_ids", "token_type_ids", "position_ids", "inputs_embeds")
        x = encoder.embeddings(**{k: v for k, v in inputs.items() if k in embedding_inputs})
        token_mask = inputs.get("attention_mask")
        if token_mask is None:
            token_mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        mask = create_bidirectional_mask(
            config=encoder.config, inputs_embeds=x, attention_mask=token_mask
        )
        bottom = list(encoder.encoder.layer[: self.bottom])
        columns = {task: list(self.column[task]) for task in layers}
        run = bottom + [layer for column in columns.values() for layer in column]
        with recorded_attentions(encoder, run, attentions) as weights:
            states = [x]  # embeddings, then each shared layer's output
            for layer in bottom:
                states.append(_layer_output(layer(states[-1], mask)))
            states[-1] = self.shared_output(states[-1], attention_mask=token_mask)
            depths = {task: i - self.bottom for task, i in layers.items() if i > self.bottom}
            outputs, history = self.run_columns(states[-1], mask, depths, token_mask)
        result = TaskStates(states={})
        for task, index in layers.items():
            depth = max(index - self.bottom, 0)
            path = states[: index + 1] + [history[d][task] for d in range(1, depth + 1)]
            result.states[task] = outputs[task] if depth else path[-1]
            result.hidden_states[task] = tuple(path)
            run = bottom[:index] + columns[task][:depth]
            result.attentions[task] = tuple(weights[layer] for layer in run if layer in weights)
        return result

    def run_columns(
        self, shared: Tensor, mask: Tensor | None, depths: dict[str, int], token_mask: Tensor
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """What each head reads from its column at its depth (1..N), from the shared states, and
        the states of every column layer run (per depth, the shared output first)."""
        active = self.tasks if self.mixes_tasks else list(depths)
        states = {task: shared for task in active}
        outputs: dict[str, Tensor] = {}
        history = [states]  # per depth: every active task's states
        for depth in range(1, max([0, *depths.values()]) + 1):
            states = {
                task: _layer_output(self.column[task][depth - 1](states[task], mask))
                for task in active
            }
            states = self.mix(depth, states, token_mask)
            history.append(states)
            outputs.update({task: states[task] for task, d in depths.items() if d == depth})
        return self.head_inputs(outputs, history, depths), history

    def mix(self, depth: int, states: dict[str, Tensor], token_mask: Tensor) -> dict[str, Tensor]:
        """Combine the tasks' outputs of column layer `depth` (independent columns: unchanged)."""
        return states

    def head_inputs(
        self,
        outputs: dict[str, Tensor],
        history: list[dict[str, Tensor]],
        depths: dict[str, int],
    ) -> dict[str, Tensor]:
        """What each head reads, given every layer's states (sluice mixes them)."""
        return outputs


def _layer_output(output: Tensor | tuple[Tensor, ...]) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def attention_recorder(encoder: nn.Module) -> tuple[type[nn.Module], int]:
    """The module class whose output holds the encoder's attention weights, and its index there:
    where transformers records `attentions` for the encoder (`_can_record_outputs`)."""
    spec = (getattr(encoder, "_can_record_outputs", None) or {}).get("attentions")
    if isinstance(spec, type):
        return spec, 1
    if isinstance(getattr(spec, "target_class", None), type):  # an OutputRecorder
        return spec.target_class, spec.index
    raise UserError(
        f"output_attentions: {type(encoder).__name__} does not say which of its modules give "
        "attention weights; with column sharing, ask for hidden states only"
    )


@contextmanager
def recorded_attentions(
    encoder: nn.Module, layers: list[nn.Module], enabled: bool
) -> Iterator[dict[nn.Module, Tensor]]:
    """While inside (when `enabled`), the attention weights of each of `layers` that runs, keyed
    by the layer; a layer whose attention implementation gives none (`sdpa`) has no entry, as in
    transformers' own outputs."""
    weights: dict[nn.Module, Tensor] = {}
    if not enabled:
        yield weights
        return
    target, index = attention_recorder(encoder)

    def keeper(layer: nn.Module) -> Callable[..., None]:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            value = output[index] if isinstance(output, tuple) else None
            if value is not None:
                weights[layer] = value

        return keep

    handles = [
        module.register_forward_hook(keeper(layer))
        for layer in layers
        for module in layer.modules()
        if isinstance(module, target)
    ]
    try:
        yield weights
    finally:
        for handle in handles:
            handle.remove()


class SharedOutput(nn.Module):
    """Identity on the shared bottom's output: marks the shared representation, so that a
    training-time component (the adversarial discriminator) can read it with a forward hook."""

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        return hidden


@SHARING.register("soft")
class SoftSharing(ColumnSharing):
    """Independent task columns tied by a penalty between corresponding parameters: `l2`
    (Duong et al. 2015) or `trace` (Yang & Hospedales 2017), times `weight`."""

    name = "soft"
    config_class = SoftSharingConfig
    config: SoftSharingConfig

    def __init__(self, encoder: nn.Module, tasks: list[str], options: dict[str, Any]) -> None:
        super().__init__(encoder, tasks, options)
        if self.config.penalty not in SOFT_PENALTIES:
            raise UserError(
                f"--soft-penalty: {self.config.penalty!r}; expected {' or '.join(SOFT_PENALTIES)}"
            )

    def regularization_loss(self) -> Tensor | float:
        if len(self.tasks) < 2 or not self.config.weight:
            return 0.0
        penalty = SOFT_PENALTIES[self.config.penalty]
        named = [dict(self.column[task].named_parameters()) for task in self.tasks]
        total = sum(
            penalty(torch.stack([parameters[name] for parameters in named])) for name in named[0]
        )
        return self.config.weight * total


def near_identity(size: int, diagonal: float) -> Tensor:
    """A (size, size) mixing matrix: `diagonal` on the diagonal, the rest of each row spread
    evenly (rows sum to 1; Misra et al. 2016 start two tasks at 0.9 / 0.1)."""
    if size == 1:
        return torch.ones(1, 1)
    off = (1.0 - diagonal) / (size - 1)
    return torch.full((size, size), off) + (diagonal - off) * torch.eye(size)


def carry_mixing(
    start: Tensor, trained: Tensor, tasks: list[str], trained_tasks: list[str], block: int = 1
) -> Tensor:
    """Mixing matrices for `tasks`, (layers, T * block, T * block) like `start`, from trained ones
    over `trained_tasks`, each entry a (block x block) block (sluice's subspaces; 1: cross-stitch).

    Entries between tasks both know are kept. A task's draw from a task this model lacks (its
    column is gone) is added to its draw from itself: the missing states are replaced by the
    task's own. That keeps the task's outputs exactly while the columns agree (as they do at the
    start, and nearly so when mixing ties them), where dropping the draw would scale them by the
    diagonal alone (about 0.9). So MT-DNN's one-task fine-tuning stage starts with the sum of the
    task's trained row. Entries with a task the trained model lacks keep their `start`.
    """
    layers, size, old_size = start.shape[0], len(tasks), len(trained_tasks)
    old = trained.detach().view(layers, old_size, block, old_size, block)
    new = start.detach().clone().view(layers, size, block, size, block)
    kept = [task for task in tasks if task in trained_tasks]
    gone = [i for i, task in enumerate(trained_tasks) if task not in tasks]
    for task in kept:
        row, old_row = tasks.index(task), trained_tasks.index(task)
        for other in kept:
            new[:, row, :, tasks.index(other)] = old[:, old_row, :, trained_tasks.index(other)]
        new[:, row, :, row] += old[:, old_row][:, :, gone].sum(2)
    return new.view_as(start)


@SHARING.register("cross_stitch")
class CrossStitchSharing(ColumnSharing):
    """Task columns joined after each layer by a cross-stitch unit (Misra et al. 2016): task t's
    next input is sum_s A[t, s] h_s, with A a learned T x T matrix per layer, initialized with
    `init` on the diagonal; A trains at `lr_scale` x the learning rate (Misra et al.: faster)."""

    name = "cross_stitch"
    mixes_tasks = True
    config_class = CrossStitchSharingConfig
    config: CrossStitchSharingConfig

    def __init__(self, encoder: nn.Module, tasks: list[str], options: dict[str, Any]) -> None:
        super().__init__(encoder, tasks, options)
        start = near_identity(len(self.tasks), self.config.init)
        count = self.config.layers
        self.stitch = nn.Parameter(start.repeat(count, 1, 1))  # (layers, tasks, tasks)

    def mix(self, depth: int, states: dict[str, Tensor], token_mask: Tensor) -> dict[str, Tensor]:
        stacked = torch.stack([states[task] for task in self.tasks])  # (T, batch, tokens, hidden)
        mixed = torch.einsum("ts,sbnh->tbnh", self.stitch[depth - 1].to(stacked.dtype), stacked)
        return dict(zip(self.tasks, mixed.unbind(0), strict=True))

    @torch.no_grad()
    def inherit(self, trained: SharingStrategy) -> None:
        """The units between the tasks both know, with what a task drew from tasks this model
        lacks folded into its own entry (`carry_mixing`): with one task, the 1 x 1 unit is the
        sum of the task's trained row."""
        super().inherit(trained)
        if isinstance(trained, CrossStitchSharing):
            self.stitch.copy_(carry_mixing(self.stitch, trained.stitch, self.tasks, trained.tasks))

    def mixing_parameters(self) -> list[nn.Parameter]:
        return [self.stitch]


@SHARING.register("sluice")
class SluiceSharing(ColumnSharing):
    """Sluice networks (Ruder et al. 2019). Each column layer's output is split into `subspaces`
    equal parts; a learned (T*K) x (T*K) alpha matrix per layer mixes every task's subspaces
    (initialized near identity, subspace k with subspace k); each task's head reads a learned
    beta-weighted sum of its states over the layers (shared bottom output, then each column
    layer; initialized to the top layer); `orthogonality_weight` x the subspace orthogonality
    penalty of the layer outputs is the regularization loss (unweighted, it is about 1e3 for
    MiniLM with 3 tasks and 2 column layers: the default weight makes it about 0.1)."""

    name = "sluice"
    mixes_tasks = True
    config_class = SluiceSharingConfig
    config: SluiceSharingConfig

    def __init__(self, encoder: nn.Module, tasks: list[str], options: dict[str, Any]) -> None:
        super().__init__(encoder, tasks, options)
        subspaces, hidden = self.config.subspaces, encoder.config.hidden_size
        if not isinstance(subspaces, int) or subspaces < 1 or hidden % subspaces:
            raise UserError(
                f"--sluice-subspaces: {subspaces} does not divide the hidden size {hidden}"
            )
        count, size = self.config.layers, len(self.tasks)
        # task-level near-identity, subspace k mixing only with subspace k at the start
        start = torch.kron(near_identity(size, self.config.init), torch.eye(subspaces))
        self.alpha = nn.Parameter(start.repeat(count, 1, 1))  # (layers, T*K, T*K)
        beta = torch.zeros(size, count + 1)
        beta[:, -1] = 1.0
        self.beta = nn.Parameter(beta)  # (tasks, layers + 1): shared output, column layers
        self._penalty: Tensor | float = 0.0

    def mix(self, depth: int, states: dict[str, Tensor], token_mask: Tensor) -> dict[str, Tensor]:
        k = self.config.subspaces
        stacked = torch.stack([states[task] for task in self.tasks])  # (T, batch, tokens, hidden)
        t, b, n, h = stacked.shape
        parts = stacked.view(t, b, n, k, h // k)  # (T, batch, tokens, K, hidden / K)
        if self.training and torch.is_grad_enabled() and self.config.orthogonality_weight:
            real = parts[:, token_mask.bool()]  # (T, real tokens, K, hidden / K)
            self._penalty = self._penalty + sum(orthogonality_penalty(g.float()) for g in real)
        flat = parts.permute(0, 3, 1, 2, 4).reshape(t * k, b, n, h // k)  # (T*K, b, n, h/K)
        mixed = torch.einsum("ij,jbnd->ibnd", self.alpha[depth - 1].to(flat.dtype), flat)
        mixed = mixed.view(t, k, b, n, h // k).permute(0, 2, 3, 1, 4).reshape(t, b, n, h)
        return dict(zip(self.tasks, mixed.unbind(0), strict=True))

    def head_inputs(
        self,
        outputs: dict[str, Tensor],
        history: list[dict[str, Tensor]],
        depths: dict[str, int],
    ) -> dict[str, Tensor]:
        for task, depth in depths.items():
            if depth == self.config.layers:  # the top: every layer's states are in history
                beta = self.beta[self.tasks.index(task)]
                outputs[task] = sum(
                    w.to(s[task].dtype) * s[task] for w, s in zip(beta, history, strict=True)
                )
        return outputs

    def regularization_loss(self) -> Tensor | float:
        penalty, self._penalty = self._penalty, 0.0
        return self.config.orthogonality_weight * penalty

    @torch.no_grad()
    def inherit(self, trained: SharingStrategy) -> None:
        """Alphas as cross-stitch units of K x K blocks (`carry_mixing`: with one task, alpha is
        the sum of the task's row of blocks); a task the trained model knows keeps its betas."""
        super().inherit(trained)
        if isinstance(trained, SluiceSharing):
            k = self.config.subspaces
            self.alpha.copy_(carry_mixing(self.alpha, trained.alpha, self.tasks, trained.tasks, k))
            for task in self.tasks:
                if task in trained.tasks:
                    self.beta[self.tasks.index(task)] = trained.beta[trained.tasks.index(task)]

    def mixing_parameters(self) -> list[nn.Parameter]:
        return [self.alpha, self.beta]
