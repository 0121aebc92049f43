"""Auxiliary tasks as a role (issue 17, item 5): `role: auxiliary` tasks are trained and logged
but never select the model, are skipped by `--finetune-each`, left out of the mean dev score,
the pipeline's default tasks and the model card's results; derived cards (quantisation
smoothing) learn another card's target again as bins or as a regression."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import ModelCard
from tiny_runs import write_tiny_tasks

from mtnlp import load_cards
from mtnlp.artifacts.run_folder import save_run
from mtnlp.cards.load import parse_card
from mtnlp.data.labels import bin_of, encode_label
from mtnlp.data.tokenize import with_training_range
from mtnlp.hub.card import model_card
from mtnlp.inference.pipeline import MultiTaskPipeline
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.tiny import tiny_bert
from mtnlp.training import stages
from mtnlp.training.args import parse_args
from mtnlp.training.selection import BestCheckpoint, dev_score, selection_metrics

from conftest import task_spec

HUB = {"hub": {"path": "nyu-mll/glue", "name": "stsb"}}
STSB = {
    "name": "stsb",
    "type": "regression",
    "source": HUB,
    "inputs": ["sentence1", "sentence2"],
    "range": [0, 5],
    "metrics": ["pearson", "spearmanr"],
    "max_length": 64,
}
GRADED = {
    "name": "stars",
    "type": "classification",
    "source": {"hub": {"path": "some/reviews"}},
    "inputs": ["text"],
    "label_column": "rating",
    "labels": ["bad", "fair", "good"],
    "metrics": ["accuracy"],
}
SPECS = [
    task_spec("main", "classification", ["neg", "pos"]),
    task_spec("pair", "regression", metrics=["pearson", "spearmanr"]),
    task_spec("aux", "classification", ["0", "1"], role="auxiliary"),
]


def write_cards(folder: Path, cards: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in cards.items():
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return folder


def loaded(tmp_path: Path, *derived: str) -> dict:
    """The stsb and stars cards plus the `derived` card texts, loaded together, by name."""
    import yaml

    texts = {"stsb": yaml.safe_dump(STSB), "stars": yaml.safe_dump(GRADED)}
    texts.update({f"derived{i}": text for i, text in enumerate(derived)})
    return {card.name: card for card in load_cards([write_cards(tmp_path / "cards", texts)])}


# ------------------------------------------------------------------------------ the role
def test_role_defaults_to_main_and_reaches_the_model_spec_when_auxiliary():
    main = parse_card(STSB, "stsb.yaml")
    auxiliary = parse_card({**STSB, "role": "auxiliary"}, "stsb.yaml")
    assert main.role == "main" and "role" not in main.model_spec()  # config.json as before
    assert auxiliary.model_spec()["role"] == "auxiliary"


def test_keep_best_ignores_an_auxiliary_tasks_better_score():
    metrics = selection_metrics(SPECS)
    assert list(metrics) == ["main", "pair"]
    best = BestCheckpoint(metrics)
    model = torch.nn.Linear(1, 1)
    first = {"main": {"accuracy": 0.5}, "pair": {"pearson": 0.2, "spearmanr": 0.4}}
    assert best.update(1, {**first, "aux": {"accuracy": 0.1}}, model)
    worse = {"main": {"accuracy": 0.4}, "pair": {"pearson": 0.2, "spearmanr": 0.4}}
    assert not best.update(2, {**worse, "aux": {"accuracy": 1.0}}, model)  # aux would win
    assert best.step == 1 and best.score == pytest.approx(0.4)


def test_the_mean_dev_score_leaves_auxiliary_tasks_out():
    results = {
        "main": {"accuracy": 0.6},
        "pair": {"pearson": 0.2, "spearmanr": 0.4},
        "aux": {"accuracy": 1.0},
    }
    assert dev_score(results, selection_metrics(SPECS)) == pytest.approx(0.45)  # not 0.633


def test_finetune_each_skips_auxiliary_tasks(tmp_path, monkeypatch):
    trained = []

    def fake_train(args, cards):
        trained.append([card.name for card in cards])
        return {card.name: {"accuracy": 0.9} for card in cards}

    monkeypatch.setattr(stages, "train", fake_train)
    main = parse_card(GRADED, "stars.yaml")
    aux = parse_card({**STSB, "role": "auxiliary"}, "stsb.yaml")
    (tmp_path / "out").mkdir()
    args = parse_args(["--model", "tiny", "--output-dir", str(tmp_path / "out")])
    multi_task = {"stars": {"accuracy": 0.5}, "stsb": {"pearson": 0.1}}
    table = stages.finetune_each(args, [main, aux], multi_task)
    assert trained == [["stars"]]
    assert table == {
        "stars": {stages.MULTI_TASK: {"accuracy": 0.5}, stages.FINETUNED: {"accuracy": 0.9}}
    }


@pytest.fixture
def model(tiny_tokenizer):
    torch.manual_seed(0)
    return MultiTaskModel.from_encoder(tiny_bert(tiny_tokenizer), SPECS).eval()


def test_pipeline_runs_main_tasks_by_default_and_auxiliary_ones_when_named(model, tiny_tokenizer):
    pipeline = MultiTaskPipeline(model, tiny_tokenizer)
    assert pipeline.tasks == ["main", "pair", "aux"]  # the saved model keeps every head
    assert list(pipeline("the cat sat")) == ["main", "pair"]
    assert list(pipeline("the cat sat", tasks=["aux", "main"])) == ["aux", "main"]


def test_model_card_results_and_usage_leave_auxiliary_tasks_out(model, tiny_tokenizer, tmp_path):
    cards = [
        parse_card({**GRADED, "name": "main", "labels": ["neg", "pos"]}, "main.yaml"),
        parse_card({**STSB, "name": "pair"}, "pair.yaml"),
        parse_card({**GRADED, "name": "aux", "labels": ["0", "1"], "role": "auxiliary"}, "a"),
    ]
    results = {"main": {"accuracy": 0.5}, "pair": {"pearson": 0.25}, "aux": {"accuracy": 0.75}}
    save_run(tmp_path, model, tiny_tokenizer, cards, results, [], {})
    card = ModelCard(model_card(model.config, "me/aux", tmp_path))
    evals = card.data.eval_results
    assert [(e.task_name, e.metric_name, e.metric_value) for e in evals] == [
        ("main", "accuracy", 0.5),
        ("pair", "pearson", 0.25),
    ]
    assert "| aux | classification (auxiliary) |" in card.text


# ------------------------------------------------------------------------------ derived cards
def test_a_derived_card_inherits_its_parents_data_and_is_auxiliary(tmp_path):
    cards = loaded(
        tmp_path,
        "name: stsb_bins\nderive: {from: stsb, kind: bins, bins: 5}\n",
        "name: stars_value\nrole: main\nderive: {from: stars, kind: regression}\n",
    )
    bins, value = cards["stsb_bins"], cards["stars_value"]
    assert (bins.type, bins.role, bins.labels) == ("classification", "auxiliary", list("01234"))
    assert (bins.source, bins.inputs, bins.max_length) == (cards["stsb"].source, STSB["inputs"], 64)
    assert bins.derive.range == [0, 5] and bins.metrics == ["accuracy"]  # the parent's range
    assert (value.type, value.role, value.label_column) == ("regression", "main", "rating")
    assert value.derive.labels == ["bad", "fair", "good"]
    assert value.metrics == ["pearson", "spearmanr"]


@pytest.mark.parametrize(
    ("score", "expected"),
    [(0.0, 0), (0.99, 0), (1.0, 1), (2.5, 2), (3.0, 3), (4.99, 4), (5.0, 4), (-1.0, 0), (7.0, 4)],
)
def test_bins_of_known_scores_and_edges(score, expected):
    assert bin_of(score, 0.0, 5.0, 5) == expected


def test_derived_bins_and_regression_labels_are_exact(tmp_path):
    cards = loaded(
        tmp_path,
        "name: stsb_bins\nderive: {from: stsb, kind: bins, bins: 4, range: [1, 3]}\n",
        "name: stars_value\nderive: {from: stars, kind: regression}\n",
    )
    bins, value = cards["stsb_bins"], cards["stars_value"]
    scores = ["1.0", 1.49, 1.5, "2.2", 2.5, 3, 0.0, 4.5]
    assert [encode_label(bins, s, "row") for s in scores] == [0, 0, 1, 2, 3, 3, 0, 3]
    targets = [encode_label(value, label, "row") for label in ["bad", "fair", "good", 2]]
    assert targets == [0.0, 1.0, 2.0, 2.0]
    assert all(isinstance(target, float) for target in targets)


def test_bin_edges_without_a_range_come_from_the_training_split(tmp_path):
    cards = loaded(tmp_path, "name: stsb_bins\nderive: {from: stsb, kind: bins, bins: 2}\n")
    card = cards["stsb_bins"].replace(derive={"from": "stsb", "kind": "bins", "bins": 2})
    assert card.derive.range is None
    train = datasets.Dataset.from_dict({"label": [2.0, 4.0, 3.5, 2.5]})
    ranged = with_training_range(card, train, None)
    assert ranged.derive.range == [2.0, 4.0]
    assert [encode_label(ranged, s, "row") for s in [2.0, 2.99, 3.0, 4.0]] == [0, 0, 1, 1]
    assert encode_label(card, 3.0, "row") is None  # checked, but no bin before the range is known


def test_training_with_derived_auxiliary_cards_runs(tmp_path, fresh_accelerate):
    cards, data = write_tiny_tasks(tmp_path / "tiny", train_size=12, dev_size=5)
    (cards / "reg_bins.yaml").write_text(
        "name: reg_bins\nderive: {from: reg, kind: bins, bins: 3}\n"
    )
    (cards / "cls_value.yaml").write_text(
        "name: cls_value\nderive: {from: cls, kind: regression}\n"
    )
    output = tmp_path / "out"
    argv = [
        "--model", "tiny", "--cards", str(cards), "--data-dir", str(data), "--tasks",
        "cls,reg_bins,cls_value", "--output-dir", str(output), "--batch-size", "4",
        "--max-steps", "3", "--keep-best", "--eval-every", "1",
    ]  # fmt: skip
    results = stages.run(parse_args(argv))
    assert list(results) == ["cls", "reg_bins", "cls_value"]  # trained and evaluated
    assert set(results["cls_value"]) == {"pearson", "spearmanr"}
    tasks = json.loads((output / "config.json").read_text())["tasks"]
    assert [task.get("role") for task in tasks] == [None, "auxiliary", "auxiliary"]
    saved = {card.name: card for card in load_cards([output / "cards"])}  # reloads alone
    assert saved["reg_bins"].derive.kind == "bins" and saved["reg_bins"].labels == ["0", "1", "2"]
    rows = (data / "reg" / "train.tsv").read_text().splitlines()[1:]
    scores = [float(row.rsplit("\t", 1)[1]) for row in rows]
    assert saved["reg_bins"].derive.range == [min(scores), max(scores)]  # the bins it learned
    # predict --split writes the main tasks' files by default, an auxiliary task's when named
    from mtnlp.cli import main

    predictions = tmp_path / "predictions"
    common = [str(output), "--split", "validation", "--data-dir", str(data)]
    main(["predict", *common, "--output-dir", str(predictions)])
    assert sorted(path.name for path in predictions.glob("*.tsv")) == ["cls.tsv"]
    main(["predict", *common, "--output-dir", str(tmp_path / "aux"), "--tasks", "reg_bins"])
    assert sorted(path.name for path in (tmp_path / "aux").glob("*.tsv")) == ["reg_bins.tsv"]
