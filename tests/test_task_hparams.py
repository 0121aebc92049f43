"""Per-task and per-group hyperparameters (issue 21, item 3): `--head-learning-rate` in the
optimizer's groups (flat, JMT, column sharing; with the scheduler, resume and the fine-tuning
stage) and the cards' `loss_weight`, `class_weights` (a list or `balanced`), `label_smoothing`,
head `dropout` and `finetune: {learning_rate, epochs}`, each checked against the exact value it
must give."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import write_tiny_tasks
from transformers import BertConfig, BertModel

from mtnlp.cards.load import load_cards
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.training import loop, stages
from mtnlp.training.args import TrainArguments, parse_args
from mtnlp.training.setup import balanced_class_weights, make_optimizer
from mtnlp.training.stages import run
from mtnlp.training.weighting import build_weighting
from mtnlp.utils.errors import UserError

from conftest import task_spec

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")  # conftest.py

ENCODER_LR, HEAD_LR = 5e-5, 1e-3


def encoder(layers: int = 2) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertModel(config, add_pooling_layer=False)


def groups_by_name(model: MultiTaskModel, optimizer: torch.optim.Optimizer) -> list[tuple]:
    """Per optimizer group: (lr, weight decay, the names of its parameters, as prefixes)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [
        (group["lr"], group["weight_decay"], sorted({names[id(p)] for p in group["params"]}))
        for group in optimizer.param_groups
    ]


def optimizer_for(model: MultiTaskModel, split: bool = True, **values):
    args = TrainArguments(learning_rate=ENCODER_LR, **values)
    weighting = build_weighting(args.weighting, model.config.task_names)
    return make_optimizer(model, weighting, args, split=split)


def names(model: MultiTaskModel, prefix: str, matrices: bool) -> list[str]:
    """The parameter names under `prefix` with (or without) two or more dimensions."""
    return sorted(
        name
        for name, p in model.named_parameters()
        if name.startswith(prefix) and (p.ndim >= 2) == matrices
    )


# ------------------------------------------------------------------------------ head lr
def test_flat_model_heads_get_the_head_learning_rate():
    specs = [
        task_spec("cls", "classification", ["a", "b"]),
        task_spec("tag", "tagging", ["O", "B"]),
    ]
    model = MultiTaskModel.from_encoder(encoder(), specs)
    groups = groups_by_name(model, optimizer_for(model, head_learning_rate=HEAD_LR))
    assert groups == [
        (ENCODER_LR, 0.01, names(model, "encoder.", True)),
        (ENCODER_LR, 0.0, names(model, "encoder.", False)),
        (HEAD_LR, 0.01, ["heads.cls.out.weight", "heads.tag.out.weight"]),
        (HEAD_LR, 0.0, ["heads.cls.out.bias", "heads.tag.out.bias"]),
    ]
    assert "encoder.embeddings.LayerNorm.weight" in groups[1][2]


def test_without_the_flag_every_group_has_the_learning_rate():
    """Today's behaviour by default: four groups (so a resume may change the head rate), one
    rate."""
    model = MultiTaskModel.from_encoder(encoder(), [task_spec("cls", "classification", ["a", "b"])])
    groups = groups_by_name(model, optimizer_for(model))
    assert [(lr, decay) for lr, decay, _ in groups] == [
        (ENCODER_LR, 0.01), (ENCODER_LR, 0.0), (ENCODER_LR, 0.01), (ENCODER_LR, 0.0),
    ]  # fmt: skip
    assert groups[2][2] == ["heads.cls.out.weight"]


def test_a_checkpoint_from_before_the_flag_keeps_two_groups():
    model = MultiTaskModel.from_encoder(encoder(), [task_spec("cls", "classification", ["a", "b"])])
    groups = groups_by_name(model, optimizer_for(model, split=False))
    assert groups == [
        (ENCODER_LR, 0.01, [*names(model, "encoder.", True), "heads.cls.out.weight"]),
        (ENCODER_LR, 0.0, [*names(model, "encoder.", False), "heads.cls.out.bias"]),
    ]


def test_jmt_task_layers_and_label_embeddings_get_the_head_learning_rate():
    layer = {
        "type": "bilstm", "hidden_size": 8, "num_heads": None, "shortcut": True,
        "label_embeddings": True, "label_embedding_size": 4, "dropout": 0.0,
    }  # fmt: skip
    specs = [
        task_spec("pos", "tagging", ["A", "B"], layer=1),
        task_spec("ner", "tagging", ["O", "B"], stack_on="pos", task_layer=layer),
    ]
    model = MultiTaskModel.from_encoder(encoder(), specs)
    groups = groups_by_name(model, optimizer_for(model, head_learning_rate=HEAD_LR))
    new_matrices = [*names(model, "heads.", True), *names(model, "task_layers.", True)]
    new_vectors = [*names(model, "heads.", False), *names(model, "task_layers.", False)]
    assert any("label_embedding" in name for name in new_matrices)
    assert groups == [
        (ENCODER_LR, 0.01, names(model, "encoder.", True)),
        (ENCODER_LR, 0.0, names(model, "encoder.", False)),
        (HEAD_LR, 0.01, sorted(new_matrices)),
        (HEAD_LR, 0.0, sorted(new_vectors)),
    ]
    every = {name for _, _, group in groups for name in group}
    assert every == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("strategy", ["soft", "cross_stitch"])
def test_task_columns_are_pretrained_and_mixing_units_keep_their_scale(strategy):
    """Columns copy the encoder's top layers: the encoder's rate; cross-stitch units: their own
    group at --mixing-lr-scale x --learning-rate, whatever the head rate."""
    specs = [
        task_spec("cls", "classification", ["a", "b"]),
        task_spec("tag", "tagging", ["O", "B"]),
    ]
    sharing = {"name": strategy, "layers": 1}
    model = MultiTaskModel.from_encoder(encoder(), specs, sharing=sharing)
    optimizer = optimizer_for(model, head_learning_rate=HEAD_LR, sharing=strategy, sharing_layers=1)
    groups = groups_by_name(model, optimizer)
    pretrained = [*names(model, "encoder.", True), *names(model, "sharing.column.", True)]
    pretrained_vectors = [
        *names(model, "encoder.", False),
        *names(model, "sharing.column.", False),
    ]
    assert names(model, "sharing.column.", True)  # the columns are there
    assert groups[:4] == [
        (ENCODER_LR, 0.01, sorted(pretrained)),
        (ENCODER_LR, 0.0, sorted(pretrained_vectors)),
        (HEAD_LR, 0.01, ["heads.cls.out.weight", "heads.tag.out.weight"]),
        (HEAD_LR, 0.0, ["heads.cls.out.bias", "heads.tag.out.bias"]),
    ]  # fmt: skip
    mixing = [(100 * ENCODER_LR, 0.0, ["sharing.stitch"])] if strategy == "cross_stitch" else []
    assert groups[4:] == mixing


def test_learned_loss_weights_keep_their_rate():
    model = MultiTaskModel.from_encoder(encoder(), [task_spec("cls", "classification", ["a", "b"])])
    args = TrainArguments(
        learning_rate=ENCODER_LR, head_learning_rate=HEAD_LR, weighting="uncertainty",
        weighting_learning_rate=0.5,
    )  # fmt: skip
    weighting = build_weighting("uncertainty", ["cls"])
    optimizer = make_optimizer(model, weighting, args)
    assert [group["lr"] for group in optimizer.param_groups] == [
        ENCODER_LR, ENCODER_LR, HEAD_LR, HEAD_LR, 0.5,
    ]  # fmt: skip
    assert optimizer.param_groups[4]["params"] == [weighting.log_variances]


def test_the_flag_is_a_positive_number():
    assert parse_args(["--head-learning-rate", "1e-3"]).head_learning_rate == 1e-3
    assert parse_args([]).head_learning_rate is None
    with pytest.raises(UserError, match=r"^--head-learning-rate: must be positive, got 0$"):
        parse_args(["--head-learning-rate", "0"])


# ------------------------------------------------------------------------------ in the loop
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_tasks(tmp_path_factory.mktemp("tiny"), train_size=16, dev_size=4)


def flags(tiny: tuple[Path, Path], output: Path, *extra: str) -> list[str]:
    cards, data = tiny
    return [
        "--model", "tiny", "--cards", str(cards), "--data-dir", str(data), "--tasks", "cls,tag",
        "--output-dir", str(output), "--batch-size", "8", "--seed", "3", *extra,
    ]  # fmt: skip


@pytest.fixture
def runs(monkeypatch) -> list:
    """Every `Run` the loop builds in the test, in order."""
    built, build_run = [], loop.build_run

    def keep(*args, **kwargs):
        built.append(build_run(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(loop, "build_run", keep)
    return built


def peak_rates(run) -> list[float]:
    """Each group's peak learning rate (the schedule's base)."""
    return list(run.scheduler.base_lrs)


def test_every_group_follows_the_linear_schedule_and_resumes_with_a_new_head_rate(
    tiny, tmp_path, runs, caplog
):
    output = tmp_path / "out"
    base = flags(
        tiny, output, "--max-steps", "4", "--warmup-ratio", "0.5", "--checkpoint-every", "2"
    )
    run(parse_args([*base, "--head-learning-rate", "1e-3"]))
    first = runs[0]
    assert peak_rates(first) == [5e-5, 5e-5, 1e-3, 1e-3]
    # after 4 of 4 steps (2 of warm-up), the linear schedule is at 0 in every group
    assert [group["lr"] for group in first.optimizer.param_groups] == [0.0] * 4
    shutil.rmtree(output / "checkpoint-4")
    with caplog.at_level(logging.WARNING):
        run(
            parse_args(
                [*base, "--head-learning-rate", "2e-3", "--resume-from-checkpoint", "latest"]
            )
        )
    assert "--head-learning-rate 0.001; this run has --head-learning-rate 0.002" in caplog.text
    # the checkpoint's optimizer and schedule state keep its rates, as for --learning-rate
    assert peak_rates(runs[1]) == [5e-5, 5e-5, 1e-3, 1e-3]


def test_finetune_settings_of_a_card_reach_its_stage(tiny, tmp_path, runs):
    """cls: `finetune: {learning_rate: 1e-4, epochs: 2}`; tag: the flags'. The stage trains the
    whole model at its one rate (--head-learning-rate is the multi-task stage's)."""
    cards, data = tiny
    folder = tmp_path / "cards"
    shutil.copytree(cards, folder)
    card = folder / "cls.yaml"
    card.write_text(card.read_text() + "finetune: {learning_rate: 1.0e-4, epochs: 2}\n")
    args = flags((folder, data), tmp_path / "out", "--max-steps", "2", "--finetune-each",
                 "--finetune-epochs", "1", "--finetune-learning-rate", "3e-5",
                 "--head-learning-rate", "1e-3")  # fmt: skip
    run(parse_args(args))
    multi, cls, tag = runs
    assert peak_rates(multi) == [5e-5, 5e-5, 1e-3, 1e-3]
    assert peak_rates(cls) == [1e-4] * 4 and peak_rates(tag) == [3e-5] * 4
    # 16 examples in batches of 8: 2 steps an epoch
    assert (cls.schedule.total_steps, tag.schedule.total_steps) == (4, 2)
    assert [c.name for c in cls.cards] == ["cls"] and cls.weighting.weights() == {"cls": 1.0}


def test_finetune_max_steps_overrides_a_cards_epochs(tiny):
    (card,) = load_cards([tiny[0] / "cls.yaml"])
    card = card.replace(finetune={"epochs": 5})
    args = TrainArguments(output_dir="out", finetune_max_steps=3)
    stage = stages.stage_arguments(args, card)
    assert (stage.epochs, stage.max_steps, stage.learning_rate) == (5.0, 3, 5e-5)


# ------------------------------------------------------------------------------ the losses
def tiny_heads(**loss) -> MultiTaskModel:
    specs = [
        task_spec("cls", "classification", ["a", "b", "c"], loss=loss or None),
        task_spec("tag", "tagging", ["O", "B", "I"], loss=loss or None),
    ]
    return MultiTaskModel.from_encoder(encoder(), specs).eval()


def batch(tokens: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"input_ids": torch.randint(1, 50, (3, tokens)), "attention_mask": torch.ones(3, tokens)}


def test_class_weights_give_the_weighted_cross_entropy():
    weights = [1.0, 2.0, 0.5]
    inputs, labels = batch(), torch.tensor([0, 1, 1])
    output = tiny_heads(class_weights=weights)(task="cls", labels=labels, **inputs)
    expected = torch.nn.functional.cross_entropy(
        output.logits, labels, weight=torch.tensor(weights)
    )
    # by hand: sum of w_y * -log p_y over the sum of w_y
    log_p = output.logits.log_softmax(-1)[torch.arange(3), labels]
    by_hand = -(torch.tensor([1.0, 2.0, 2.0]) * log_p).sum() / 5.0
    assert output.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert output.loss.item() == pytest.approx(by_hand.item(), abs=1e-6)
    plain = tiny_heads()(task="cls", labels=labels, **inputs).loss
    assert plain.item() != pytest.approx(output.loss.item(), abs=1e-4)


def test_tagging_class_weights_skip_the_ignored_tokens():
    weights = [0.5, 3.0, 1.0]
    inputs = batch()
    labels = torch.tensor([[0, 1, -100, 2, 0], [-100, -100, 1, 1, 0], [2, 2, 0, -100, -100]])
    output = tiny_heads(class_weights=weights, label_smoothing=0.2)(
        task="tag", labels=labels, **inputs
    )
    expected = torch.nn.functional.cross_entropy(
        output.logits.flatten(0, 1), labels.flatten(), weight=torch.tensor(weights),
        label_smoothing=0.2,
    )  # fmt: skip
    assert output.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    ignored = torch.full_like(labels, -100)  # no labelled token: zero, not NaN
    assert tiny_heads(class_weights=weights)(task="tag", labels=ignored, **inputs).loss == 0


def test_label_smoothing_is_torchs():
    inputs, labels = batch(), torch.tensor([2, 0, 1])
    output = tiny_heads(label_smoothing=0.1)(task="cls", labels=labels, **inputs)
    expected = torch.nn.functional.cross_entropy(output.logits, labels, label_smoothing=0.1)
    assert output.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    plain = torch.nn.functional.cross_entropy(output.logits, labels)
    assert output.loss.item() != pytest.approx(plain.item(), abs=1e-4)


def test_card_loss_options_and_dropout_reach_the_saved_model(tiny, tmp_path):
    """Through `card.model_spec()` into config.json: a saved model computes its loss again."""
    (card,) = load_cards([tiny[0] / "cls.yaml"])
    card = card.replace(head={"dropout": 0.3}, class_weights=[1.0, 2.0], label_smoothing=0.1)
    model = MultiTaskModel.from_encoder(encoder(), [card.model_spec()]).eval()
    model.save_pretrained(tmp_path)
    (task,) = json.loads((tmp_path / "config.json").read_text())["tasks"]
    assert task["loss"] == {"class_weights": [1.0, 2.0], "label_smoothing": 0.1}
    assert task["head"]["dropout"] == 0.3
    loaded = MultiTaskModel.from_pretrained(tmp_path).eval()
    head = loaded.heads["cls"]
    assert (head.class_weights, head.label_smoothing, head.dropout.p) == ([1.0, 2.0], 0.1, 0.3)
    inputs, labels = batch(), torch.tensor([0, 1, 1])
    expected = model(task="cls", labels=labels, **inputs)
    weighted = torch.nn.functional.cross_entropy(
        expected.logits, labels, weight=torch.tensor([1.0, 2.0]), label_smoothing=0.1
    )
    assert expected.loss.item() == pytest.approx(weighted.item(), abs=1e-6)
    assert loaded(task="cls", labels=labels, **inputs).loss.item() == pytest.approx(
        expected.loss.item(), abs=1e-6
    )


def test_balanced_weights_are_sklearns(tiny):
    """n / (k * n_c): 6 labels, counts 3, 2, 1 -> 6/9, 6/6, 6/3 (sklearn's numbers)."""
    (card,) = load_cards([tiny[0] / "tag.yaml"])
    card = card.replace(labels=["O", "B", "I"], class_weights="balanced")
    tokens = [[0, 0, -100, 1], [2, -100], [1, 0]]
    assert balanced_class_weights(card, tokens) == pytest.approx([6 / 9, 1.0, 2.0])
    utils = pytest.importorskip("sklearn.utils")
    flat = [0, 0, 1, 2, 1, 0]
    expected = utils.compute_class_weight("balanced", classes=np.arange(3), y=np.array(flat))
    assert balanced_class_weights(card, tokens) == pytest.approx(expected.tolist())
    (cls,) = load_cards([tiny[0] / "cls.yaml"])
    assert balanced_class_weights(cls, [0, 0, 0, 1]) == pytest.approx([4 / 6, 2.0])


def test_balanced_weights_reach_the_trained_model(tiny, tmp_path, runs):
    cards, data = tiny
    folder = tmp_path / "cards"
    shutil.copytree(cards, folder)
    card = folder / "cls.yaml"
    card.write_text(card.read_text() + "class_weights: balanced\nlabel_smoothing: 0.1\n")
    output = tmp_path / "out"
    run(parse_args(flags((folder, data), output, "--max-steps", "1")))
    labels = runs[0].data["cls"].train["labels"]
    positives = sum(labels)
    expected = [16 / (2 * (16 - positives)), 16 / (2 * positives)]
    config = json.loads((output / "config.json").read_text())
    loss = config["tasks"][0]["loss"]
    assert loss["class_weights"] == pytest.approx(expected) and loss["label_smoothing"] == 0.1
    assert expected == pytest.approx([16 / 22, 1.6])  # the tiny data's 11 neg, 5 pos
    assert runs[0].specs[0]["loss"]["class_weights"] == "balanced"  # the card's, for resumes


# ------------------------------------------------------------------------------ loss_weight
def test_loss_weight_scales_the_tasks_loss_under_every_weighting():
    losses = {"a": torch.tensor(3.0), "b": torch.tensor(5.0)}
    static = build_weighting("static", ["a", "b"], static_weights={"a": 2.0})
    assert static.combine(losses).item() == pytest.approx(2 * 3 + 5)
    dwa = build_weighting("dwa", ["a", "b"], static_weights={"a": 2.0})
    assert dwa.combine(losses).item() == pytest.approx(2 * 3 + 5)
    assert dwa.weights() == {"a": 2.0, "b": 1.0}
    uncertainty = build_weighting(
        "uncertainty", ["a", "b"], static_weights={"a": 2.0}, task_types={"b": "regression"}
    )
    assert uncertainty.combine(losses).item() == pytest.approx(2 * 3 + 0.5 * 5)
    pcgrad = build_weighting("pcgrad", ["a", "b"], static_weights={"a": 2.0})
    assert pcgrad.combine(losses).item() == pytest.approx(2 * 3 + 5)


def test_pcgrad_projects_the_weighted_gradients():
    """Two tasks whose gradients do not conflict: the shared gradient is the sum of
    loss_weight x gradient."""
    shared = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    pcgrad = build_weighting("pcgrad", ["a", "b"], static_weights={"a": 3.0})
    losses = {"a": shared.sum(), "b": (shared * torch.tensor([1.0, 0.0])).sum()}
    pcgrad.backward(losses, [shared])
    assert shared.grad.tolist() == [3.0 + 1.0, 3.0]


@pytest.mark.parametrize("weighting_name", ["dwa", "uncertainty"])
def test_loss_weight_scales_the_trained_loss_exactly(tiny, weighting_name):
    """On a tiny model: the step's loss with loss_weight 2.5 is 2.5 x the task's loss under
    weightings of their own (at the start: dwa's weight 1, uncertainty's exp(-0) + 0)."""
    cards = {card.name: card for card in load_cards([tiny[0]])}
    weighted = cards["cls"].replace(loss_weight=2.5)
    weighting = build_weighting(
        weighting_name, ["cls"], static_weights={"cls": weighted.loss_weight}
    )
    model = MultiTaskModel.from_encoder(encoder(), [weighted.model_spec()]).eval()
    inputs, labels = batch(), torch.tensor([0, 1, 1])
    loss = model(task="cls", labels=labels, **inputs).loss
    assert weighting.combine({"cls": loss}).item() == pytest.approx(2.5 * loss.item(), rel=1e-6)
