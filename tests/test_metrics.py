"""Offline metrics against hand-computed values."""

from __future__ import annotations

import math
from types import SimpleNamespace
from unittest import mock

import pytest

from mtnlp.metrics import METRICS, check_metric_name, compute_metrics, load_evaluate_module
from mtnlp.utils.errors import UserError


def test_accuracy_and_f1_by_hand():
    predictions, references = [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]
    # tp=2, fp=1, fn=1 -> precision 2/3, recall 2/3, f1 2/3; 3 of 5 correct
    assert compute_metrics(["accuracy", "f1"], predictions, references) == pytest.approx(
        {"accuracy": 0.6, "f1": 2 / 3}
    )


def test_matthews_by_hand():
    predictions, references = [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]
    tp, tn, fp, fn = 2, 1, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    result = compute_metrics(["matthews_correlation"], predictions, references)
    assert result["matthews_correlation"] == pytest.approx(expected)  # 1/6


def test_pearson_spearman_by_hand():
    predictions, references = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    # centred: x = (-1.5, -.5, .5, 1.5), y = (-1.5, .5, -.5, 1.5): sum xy = 4, sum x^2 = sum y^2 = 5
    result = compute_metrics(["pearson", "spearmanr"], predictions, references)
    assert result == pytest.approx({"pearson": 0.8, "spearmanr": 0.8})
    assert compute_metrics(["pearson"], [1.0, 1.0], [0.0, 1.0]) == {"pearson": 0.0}


def test_seqeval_strict_entities_by_hand():
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predictions = [["B-PER", "I-PER", "O", "B-ORG"], ["I-ORG", "O"]]
    # gold entities: PER, LOC, ORG; predicted: PER (correct), ORG (wrong type); the lone I-ORG is
    # not an entity in strict IOB2 -> precision 1/2, recall 1/3, f1 = 2PR/(P+R) = 0.4
    result = compute_metrics(["seqeval"], predictions, references)
    assert result["overall_precision"] == pytest.approx(0.5)
    assert result["overall_recall"] == pytest.approx(1 / 3)
    assert result["overall_f1"] == pytest.approx(0.4)
    assert result["overall_accuracy"] == pytest.approx(4 / 6)


def test_chunking_is_ranked_by_chunk_f1(data_dir):
    """CoNLL-2003 chunking's card names chunk F1 (seqeval over IOB2 chunks) as its main metric,
    not word accuracy; the shipped files are IOB2: no chunk starts with I-."""
    from mtnlp.cards.load import load_card
    from mtnlp.data.read import load_raw
    from mtnlp.metrics import main_score

    from conftest import REPO

    card = load_card(REPO / "tasks" / "conll2003" / "chunk.yaml")
    assert card.main_metric == "overall_f1"  # named in the card, not left to the default's order
    references = [["B-NP", "I-NP", "B-VP", "B-PP", "B-NP", "O"]]
    predictions = [["B-NP", "I-NP", "B-VP", "B-NP", "I-NP", "O"]]
    # gold chunks NP VP PP NP, predicted NP VP NP(3-4): 2 right -> P 2/3, R 1/2, F1 4/7; 4/6 tags
    results = compute_metrics(card.metrics, predictions, references)
    assert results["accuracy"] == pytest.approx(4 / 6)
    assert main_score(results, card.resolved_main_metric(), "chunk") == pytest.approx(4 / 7)
    for split, data in load_raw(card, ["validation", "test"], [data_dir / "conll2003"]).items():
        for tags in data["chunk_tags"]:
            for before, tag in zip(["O", *tags[:-1]], tags, strict=True):
                assert not tag.startswith("I-") or before[2:] == tag[2:], (split, tags)


def test_unknown_metric_lists_known_names():
    with pytest.raises(ValueError, match="unknown metric 'acc'; known: accuracy, f1, f1_macro, "):
        check_metric_name("acc")
    check_metric_name("evaluate-metric/bleu")  # Hub ids go to evaluate.load at evaluation time
    assert {"accuracy", "f1", "matthews_correlation", "pearson", "spearmanr"} <= set(
        METRICS.names()
    )


@pytest.fixture
def fresh_metric_modules():
    """No evaluate module cached from another test, and none left for the next."""
    load_evaluate_module.cache_clear()
    yield
    load_evaluate_module.cache_clear()


def test_an_evaluate_module_loads_once_per_process(fresh_metric_modules, monkeypatch):
    module = SimpleNamespace(compute=mock.Mock(return_value={"custom": 0.5, "counts": [1, 2]}))
    load = mock.Mock(side_effect=[ConnectionError("no network"), module])
    monkeypatch.setattr("evaluate.load", load)
    with pytest.raises(UserError, match=r"'someone/metric': evaluate\.load failed: no network"):
        compute_metrics(["someone/metric"], [1], [1])
    for _ in range(3):  # e.g. every --eval-every steps: loaded at the first, then reused
        assert compute_metrics(["someone/metric", "accuracy"], [1], [1]) == {
            "custom": 0.5,
            "accuracy": 1.0,
        }
    assert load.call_args_list == [mock.call("someone/metric")] * 2  # a failure is not cached
    assert module.compute.call_count == 3
