"""Metrics by evaluate's names, computed offline (scikit-learn, scipy, seqeval).

The standard metrics never touch the network. Each is registered with what card validation and
model selection need to know: the result names it returns, the task types it fits (and whether
it needs exactly two labels), and whether greater is better. Any other name a card gives is
resolved through `evaluate.load` at evaluation time: a Hub id such as `evaluate-metric/bleu` or a
local module path. Every metric returns a dict of floats, keyed by evaluate's result names.

A task's dev results are ranked by one number, `main_score`, over its main metric (the card's
`main_metric`, by default the one its benchmark reports, see `default_main_metric`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtnlp.utils.errors import UserError
from mtnlp.utils.registry import Registry

MetricFn = Callable[[Sequence[Any], Sequence[Any]], dict[str, float]]


@dataclass(frozen=True)
class Metric:
    """An offline metric and the facts about it that cards and model selection rely on."""

    compute: MetricFn
    keys: tuple[str, ...]  # the result names it returns
    task_types: tuple[str, ...]  # the task types whose predictions it scores
    binary: bool = False  # scores exactly two labels (positive class = label id 1)
    multiclass_variants: tuple[str, ...] = ()  # a binary metric's counterparts for more labels
    greater_is_better: bool = True
    evaluate_id: str | None = None  # evaluate's (and the Hub's) id, where it differs from ours
    alias_of: str | None = None  # evaluate's name for one of ours: accepted, never suggested

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
        return self.compute(predictions, references)


METRICS: Registry[Metric] = Registry("metric")


def register_metric(
    name: str, task_types: Iterable[str], keys: Iterable[str] | None = None, **facts: Any
) -> Callable[[MetricFn], MetricFn]:
    """Decorator: register a metric function as `name` with its facts (see `Metric`); its result
    names default to `(name,)`."""

    def add(function: MetricFn) -> MetricFn:
        keys_ = tuple(keys) if keys is not None else (name,)
        METRICS.register(name)(Metric(function, keys_, tuple(task_types), **facts))
        return function

    return add


@register_metric("accuracy", ["classification", "tagging"])
def accuracy(predictions, references):
    """Share of exact matches (token-level for tagging: every word counts once)."""
    predictions, references = _flat(predictions), _flat(references)
    return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}


@register_metric(
    "f1", ["classification"], binary=True, multiclass_variants=("f1_macro", "f1_micro")
)
def f1(predictions, references):
    """Binary F1 of the positive class (label id 1), as GLUE reports for MRPC and QQP."""
    from sklearn.metrics import f1_score

    return {"f1": float(f1_score(references, predictions, zero_division=0.0))}


@register_metric("f1_macro", ["classification", "tagging"], evaluate_id="f1")
def f1_macro(predictions, references):
    """Unweighted mean of the per-label F1 scores (each label present in the gold or predicted
    labels counts once; per word for tagging)."""
    return {"f1_macro": _multiclass_f1(predictions, references, "macro")}


@register_metric("f1_micro", ["classification", "tagging"], evaluate_id="f1")
def f1_micro(predictions, references):
    """F1 over all decisions pooled; equals accuracy for single-label classification."""
    return {"f1_micro": _multiclass_f1(predictions, references, "micro")}


def _multiclass_f1(predictions, references, average: str) -> float:
    from sklearn.metrics import f1_score

    references, predictions = _flat(references), _flat(predictions)
    return float(f1_score(references, predictions, average=average, zero_division=0.0))


@register_metric("matthews_correlation", ["classification"])
def matthews_correlation(predictions, references):
    """Matthews correlation coefficient (CoLA; also defined for more than two labels)."""
    from sklearn.metrics import matthews_corrcoef

    return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}


@register_metric("pearson", ["regression"], evaluate_id="pearsonr")
def pearson(predictions, references):
    """Pearson correlation of predicted and gold scores (STS-B)."""
    from scipy.stats import pearsonr as pearson_r

    return {"pearson": _correlation(pearson_r, predictions, references)}


@register_metric("pearsonr", ["regression"], alias_of="pearson")
def pearsonr(predictions, references):
    """`pearson` under evaluate's name (its result is named `pearsonr`, as evaluate's is)."""
    return {"pearsonr": pearson(predictions, references)["pearson"]}


@register_metric("spearmanr", ["regression"])
def spearmanr(predictions, references):
    """Spearman rank correlation of predicted and gold scores (STS-B)."""
    from scipy.stats import spearmanr as spearman

    return {"spearmanr": _correlation(spearman, predictions, references)}


SEQEVAL_KEYS = ("overall_precision", "overall_recall", "overall_f1", "overall_accuracy")


@register_metric("seqeval", ["tagging"], SEQEVAL_KEYS)
def seqeval(predictions, references, scheme: str = "IOB2"):
    """Entity-level precision, recall and F1 over tag sequences (seqeval, strict mode: an entity
    counts only with the exact tags of `scheme`; IOB2 for `seqeval`, the scheme named in the metric
    for `seqeval_iob1`, `seqeval_ioe1`, `seqeval_ioe2`, `seqeval_iobes` (BIOES), `seqeval_bilou`).

    Inputs are lists of tag-name lists. Returns evaluate's `overall_*` names.
    """
    from seqeval import scheme as schemes
    from seqeval.metrics import f1_score, precision_score, recall_score

    kwargs = {"mode": "strict", "scheme": getattr(schemes, scheme), "zero_division": 0}
    return {
        "overall_precision": float(precision_score(references, predictions, **kwargs)),
        "overall_recall": float(recall_score(references, predictions, **kwargs)),
        "overall_f1": float(f1_score(references, predictions, **kwargs)),
        "overall_accuracy": accuracy(predictions, references)["accuracy"],
    }


for _scheme in ("IOB1", "IOE1", "IOE2", "IOBES", "BILOU"):
    register_metric(f"seqeval_{_scheme.lower()}", ["tagging"], SEQEVAL_KEYS, evaluate_id="seqeval")(
        functools.partial(seqeval, scheme=_scheme)
    )


def _flat(values: Sequence[Any]) -> list[Any]:
    """Tag sequences (lists of lists) become one list of tags; flat lists stay as they are."""
    if len(values) and isinstance(values[0], (list, tuple)):
        return [item for sequence in values for item in sequence]
    return list(values)


def _correlation(function, predictions, references) -> float:
    predictions, references = np.asarray(predictions, float), np.asarray(references, float)
    if predictions.std() == 0 or references.std() == 0:
        return 0.0  # undefined for a constant input; report no correlation instead of NaN
    return float(function(predictions, references)[0])


def is_evaluate_module(name: str) -> bool:
    """A name for `evaluate.load`: a Hub id (`owner/name`) or a local path that exists."""
    return "/" in name or Path(name).exists()


def check_metric_name(name: str) -> None:
    """Raise `ValueError` for a name that is neither offline-known nor an evaluate module."""
    if name not in METRICS and not is_evaluate_module(name):
        raise ValueError(
            f"{METRICS.unknown_message(name)} (or an evaluate Hub id like "
            "'evaluate-metric/bleu', or a local metric script path)"
        )


def compute_metrics(
    names: Sequence[str], predictions: Sequence[Any], references: Sequence[Any]
) -> dict[str, float]:
    """All `names` on one prediction set, merged into one dict of floats."""
    results: dict[str, float] = {}
    for name in names:
        if name in METRICS:
            results.update(METRICS.get(name)(predictions, references))
        else:
            results.update(_evaluate_module(name, predictions, references))
    return results


@functools.cache
def load_evaluate_module(name: str) -> Any:
    """`evaluate.load(name)`, once per name and process: evaluation every N steps reuses the
    module instead of loading (and maybe downloading) it again. A failed load is not cached."""
    import evaluate

    try:
        return evaluate.load(name)
    except Exception as error:  # evaluate raises many types for a missing module or no network
        raise UserError(f"metric {name!r}: evaluate.load failed: {error}") from None


def _evaluate_module(name: str, predictions, references) -> dict[str, float]:
    module = load_evaluate_module(name)
    scores = module.compute(predictions=predictions, references=references)
    return {key: float(value) for key, value in scores.items() if np.isscalar(value)}


# ------------------------------------------------------------------------------ card checks
def check_metric_fits(name: str, task: str, task_type: str, num_labels: int | None) -> None:
    """Raise `ValueError` if registered metric `name` cannot score task `task` of `task_type`
    with `num_labels` labels. Evaluate modules pass: nothing is known of them before they run."""
    if name not in METRICS:
        return
    metric = METRICS.get(name)
    fitting = [
        other
        for other in METRICS.names()
        if _fits(other, task_type, num_labels) and not METRICS.get(other).alias_of
    ]
    if task_type not in metric.task_types:
        raise ValueError(
            f"{name!r} scores {' or '.join(metric.task_types)} tasks, not {task_type}; "
            f"use {_either(fitting)}"
        )
    if metric.binary and num_labels != 2:
        raise ValueError(
            f"{name!r} is a binary metric (positive class = the second label) and task {task} "
            f"has {num_labels} labels; use {_either(list(metric.multiclass_variants) or fitting)}"
        )


def _fits(name: str, task_type: str, num_labels: int | None) -> bool:
    metric = METRICS.get(name)
    return task_type in metric.task_types and (not metric.binary or num_labels == 2)


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def result_keys(names: Sequence[str]) -> list[str]:
    """The result names the registered metrics among `names` return, in order."""
    return [key for name in names if name in METRICS for key in METRICS.get(name).keys]


# ------------------------------------------------------------------------------ main metric
def default_main_metric(metrics: Sequence[str]) -> list[str] | None:
    """The main metric of a card that names none, from the results of its `metrics`: entity F1
    (`overall_f1`) for tagging with seqeval, `f1` for binary tasks that list it,
    `matthews_correlation` (CoLA), the mean of `pearson` and `spearmanr` (STS-B), else
    `accuracy`, else the first result; None (the first result at evaluation) when every metric
    is an evaluate module."""
    keys = result_keys(metrics)
    correlations = (["pearson", "spearmanr"], ["pearsonr", "spearmanr"])
    for preferred in (["overall_f1"], ["f1"], ["matthews_correlation"], *correlations):
        if set(preferred) <= set(keys):
            return preferred
    if "accuracy" in keys:
        return ["accuracy"]
    return keys[:1] or None


def task_main_metric(task: Mapping[str, Any]) -> list[str] | None:
    """The main metric of a task's model metadata (a card's `model_spec()`); metadata saved
    before cards had `main_metric` gets the default for its metrics."""
    return task.get("main_metric") or default_main_metric(task["metrics"])


def greater_is_better(key: str) -> bool:
    """Whether a larger value of result `key` is better, as its metric is registered (an
    evaluate module's results are taken as greater-is-better)."""
    owners = [METRICS.get(name) for name in METRICS.names() if key in METRICS.get(name).keys]
    return owners[0].greater_is_better if owners else True


def main_score(results: Mapping[str, float], main_metric: Sequence[str] | None, task: str) -> float:
    """The one number that ranks task `task`'s dev results (model selection, the report's dev
    curve): the mean of its main metric's values, each negated where smaller is better; with no
    main metric, its first result. NaN if a value is NaN or there are no results."""
    if not main_metric:
        return float(next(iter(results.values()), math.nan))
    missing = [key for key in main_metric if key not in results]
    if missing:  # only an evaluate module's result names are unknown before it runs
        raise UserError(
            f"task {task}: main_metric: {missing[0]!r} is not among its dev results "
            f"({', '.join(results)})"
        )
    values = [results[key] if greater_is_better(key) else -results[key] for key in main_metric]
    return sum(values) / len(values)


def evaluate_id(name: str) -> str | None:
    """A card's metric as evaluate and the Hub name it (`pearson` -> `pearsonr`, `seqeval_iob1`
    -> `seqeval`, `evaluate-metric/bleu` -> `bleu`, another Hub id as it is); None for a local
    metric script, which has no public id."""
    if name in METRICS:
        return METRICS.get(name).evaluate_id or name
    if name.startswith((".", "/", "~")) or name.endswith(".py") or Path(name).exists():
        return None
    return name.removeprefix("evaluate-metric/")


def result_evaluate_id(key: str) -> str:
    """The evaluate id of the metric that returns result `key` (`overall_f1` -> `seqeval`,
    `f1_macro` -> `f1`); an evaluate module's result keeps its own name."""
    owners = [name for name in METRICS.names() if key in METRICS.get(name).keys]
    return evaluate_id(owners[0]) if owners else key


def main_metrics(tasks: Iterable[Mapping[str, Any]]) -> dict[str, list[str] | None]:
    """Task name -> main metric, for tasks' model metadata (`model_spec()` dicts)."""
    return {task["name"]: task_main_metric(task) for task in tasks}
