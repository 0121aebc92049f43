"""Metrics by evaluate's names, computed offline (scikit-learn, scipy, seqeval).

The standard metrics never touch the network. Any other name a card gives is resolved through
`evaluate.load` at evaluation time: a Hub id such as `evaluate-metric/bleu` or a local module
path. Every metric returns a dict of floats, keyed by evaluate's result names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtnlp.errors import UserError
from mtnlp.registry import Registry

MetricFn = Callable[[Sequence[Any], Sequence[Any]], dict[str, float]]
METRICS: Registry[MetricFn] = Registry("metric")


@METRICS.register("accuracy")
def accuracy(predictions, references):
    """Share of exact matches (token-level for tagging: every word counts once)."""
    predictions, references = _flat(predictions), _flat(references)
    return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}


@METRICS.register("f1")
def f1(predictions, references):
    """Binary F1 of the positive class (label id 1), as GLUE reports for MRPC and QQP."""
    from sklearn.metrics import f1_score

    return {"f1": float(f1_score(references, predictions, zero_division=0.0))}


@METRICS.register("matthews_correlation")
def matthews_correlation(predictions, references):
    """Matthews correlation coefficient (CoLA)."""
    from sklearn.metrics import matthews_corrcoef

    return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}


@METRICS.register("pearson")
def pearson(predictions, references):
    """Pearson correlation of predicted and gold scores (STS-B)."""
    from scipy.stats import pearsonr

    return {"pearson": _correlation(pearsonr, predictions, references)}


@METRICS.register("spearmanr")
def spearmanr(predictions, references):
    """Spearman rank correlation of predicted and gold scores (STS-B)."""
    from scipy.stats import spearmanr as spearman

    return {"spearmanr": _correlation(spearman, predictions, references)}


@METRICS.register("seqeval")
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
    METRICS.register(f"seqeval_{_scheme.lower()}")(functools.partial(seqeval, scheme=_scheme))


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


def _evaluate_module(name: str, predictions, references) -> dict[str, float]:
    import evaluate

    try:
        module = evaluate.load(name)
    except Exception as error:  # evaluate raises many types for a missing module or no network
        raise UserError(f"metric {name!r}: evaluate.load failed: {error}") from None
    scores = module.compute(predictions=predictions, references=references)
    return {key: float(value) for key, value in scores.items() if np.isscalar(value)}
