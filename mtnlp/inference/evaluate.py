"""Dev metrics of a model on its cards' dev splits, gathered from every process exactly once
(used by the training loop and by `mtnlp evaluate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from mtnlp.cards.schema import TaskCard
from mtnlp.inference.pipeline import eval_mode
from mtnlp.metrics import METRICS, compute_metrics
from mtnlp.modeling.heads import HEADS, IGNORE_INDEX
from mtnlp.utils.errors import UserError


def evaluate(
    model: torch.nn.Module,
    eval_loaders: dict[str, dict[str, DataLoader]],
    cards: dict[str, TaskCard],
    accelerator: Accelerator,
) -> dict[str, dict[str, float]]:
    """Dev metrics per task: the first dev split under the metric names, further dev splits as
    `<metric>_<split>` (e.g. MNLI's `accuracy_validation_mismatched`). The model runs in eval
    mode and is left in the mode it had (training mode in the loop, eval mode in `mtnlp
    evaluate`)."""
    results: dict[str, dict[str, float]] = {}
    with eval_mode(model):
        for task, loaders in eval_loaders.items():
            card = cards[task]
            results[task] = {}
            for index, (split, loader) in enumerate(loaders.items()):
                predictions, references = gather_predictions(model, task, loader, card, accelerator)
                scores = compute_metrics(card.metrics, predictions, references)
                suffix = "" if index == 0 else f"_{split}"
                results[task].update({f"{name}{suffix}": value for name, value in scores.items()})
    return results


@torch.no_grad()
def gather_predictions(
    model: torch.nn.Module, task: str, loader: DataLoader, card: TaskCard, accelerator: Accelerator
) -> tuple[list, list]:
    """Predictions and references of one dev split, gathered from every process exactly once."""
    head = accelerator.unwrap_model(model).heads[task]
    token_level = HEADS.get(card.type).token_level
    predictions: list = []
    references: list = []
    for batch in loader:
        labels = batch.pop("labels")
        output = model(task=task, **batch)
        decoded = head.decode(output.logits)
        if token_level:  # sequences differ in length across processes: pad before gathering
            decoded = accelerator.pad_across_processes(decoded, dim=1, pad_index=IGNORE_INDEX)
            labels = accelerator.pad_across_processes(labels, dim=1, pad_index=IGNORE_INDEX)
        decoded, labels = accelerator.gather_for_metrics((decoded, labels))
        if token_level:
            for row_pred, row_gold in zip(decoded.tolist(), labels.tolist(), strict=True):
                kept = [
                    (p, g) for p, g in zip(row_pred, row_gold, strict=True) if g != IGNORE_INDEX
                ]
                predictions.append([card.labels[p] for p, _ in kept])
                references.append([card.labels[g] for _, g in kept])
        else:
            predictions.extend(
                decoded.float().tolist() if card.type == "regression" else decoded.tolist()
            )
            references.extend(labels.tolist())
    return predictions, references


def cards_for_split(
    cards: Sequence[TaskCard], split: str, data_dirs: Sequence[object] | None
) -> list[TaskCard]:
    """`mtnlp evaluate --split NAME`: the cards scoring split NAME (or, for a card without it,
    its splits NAME_*, as `predict --split` reads them) instead of their dev splits, e.g. SICK's
    labelled test set. A card without such a split is a `UserError` naming its file."""
    from mtnlp.inference.submission import card_splits

    chosen = []
    for card in cards:
        local = bool(data_dirs) and card.source.local is not None  # as load_raw decides
        chosen.append(card.replace(eval_splits=card_splits(card, split, local)))
    return chosen


def check_custom_metrics(cards: Sequence[TaskCard], allowed: bool) -> None:
    """Refuse metric names that are not built in unless `--allow-custom-metrics`: `evaluate.load`
    downloads and runs them as code, and evaluating a model (its own `cards/`, maybe fetched from
    the Hub) must never run code that came with it."""
    if allowed:
        return
    for card in cards:
        for name in card.metrics:
            if name not in METRICS:
                raise UserError(
                    f"{card.where}: metrics: {name!r} is not a built-in metric; loading it would "
                    "run code from evaluate.load; pass --allow-custom-metrics to allow it"
                )
