"""Task hierarchies: low supervision (layer isolation, depth-limited encoding) and JMT stacking
(task layers, label embeddings, successive regularization), on tiny in-process models."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from mtnlp.cards.load import load_cards, parse_card
from mtnlp.modeling.hierarchy import check_stacking, with_dependencies
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.training.regularizers import (
    SuccessiveRegularizer,
    successive_penalty,
    trained_parameter_names,
)
from mtnlp.utils.errors import UserError

from conftest import task_spec

BATCH, TOKENS, LAYERS = 2, 6, 4
POS, CHUNK, NER = ["A", "B", "C"], ["O", "B-NP", "I-NP"], ["O", "B-PER", "I-PER", "B-LOC"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def task_layer(**options) -> dict:
    return {
        "type": "bilstm", "hidden_size": None, "num_heads": None, "shortcut": True,
        "label_embeddings": True, "label_embedding_size": 8, "dropout": 0.0, **options,
    }  # fmt: skip


def jmt_specs(layer_type: str = "bilstm", label_embeddings: bool = True) -> list[dict]:
    """pos (layer 1) -> chunk (layer 2, stacked) -> ner (top, stacked), as the jmt layout."""
    options = {"type": layer_type, "label_embeddings": label_embeddings}
    return [
        task_spec("pos", "tagging", POS, layer=1),
        task_spec(
            "chunk", "tagging", CHUNK, layer=2, stack_on="pos", task_layer=task_layer(**options)
        ),
        task_spec("ner", "tagging", NER, stack_on="chunk", task_layer=task_layer(**options)),
    ]


def build(specs: list[dict], seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return MultiTaskModel.from_encoder(BertModel(config, add_pooling_layer=False), specs).eval()


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[1, 4:] = 0  # the second sentence is shorter (right padding)
    return {"input_ids": torch.randint(1, 50, (BATCH, TOKENS)), "attention_mask": mask}


def tag_labels(num_labels: int) -> torch.Tensor:
    return torch.randint(0, num_labels, (BATCH, TOKENS))


def grad_layers(model: MultiTaskModel) -> dict[int, bool]:
    """Encoder layer index -> whether any of its parameters has a gradient."""
    return {
        index: any(p.grad is not None for p in layer.parameters())
        for index, layer in enumerate(model.encoder.encoder.layer)
    }


# ------------------------------------------------------------------------------ low supervision
def test_low_task_gradient_stops_at_its_layer(inputs):
    model = build([task_spec("pos", "tagging", POS, layer=2), task_spec("ner", "tagging", NER)])
    model(task="pos", labels=tag_labels(3), **inputs).loss.backward()
    assert grad_layers(model) == {0: True, 1: True, 2: False, 3: False}
    assert model.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trained_parameter_names(model, "pos")


def test_encoder_runs_only_as_deep_as_needed(inputs):
    model = build([task_spec("pos", "tagging", POS, layer=2), task_spec("ner", "tagging", NER)])
    calls: list[int] = []
    for index, layer in enumerate(model.encoder.encoder.layer):
        layer.register_forward_hook(lambda *_, index=index: calls.append(index))
    alone = model(task="pos", **inputs).logits
    assert calls == [0, 1]
    calls.clear()
    both = model.forward_tasks(["pos", "ner"], **inputs)
    assert calls == [0, 1, 2, 3]  # one pass for both tasks
    torch.testing.assert_close(both["pos"].logits, alone)
    assert len(model.encoder.encoder.layer) == LAYERS  # the full encoder is back after the pass


def test_layer_counts_from_the_top_and_range_is_checked(inputs):
    model = build(
        [task_spec("a", "tagging", POS, layer=-3), task_spec("b", "tagging", POS, layer=2)]
    )
    assert model.layer_index("a") == model.layer_index("b") == 2
    with pytest.raises(UserError, match=r"task a: layer: 5 is not a layer of this encoder \(0..4"):
        build([task_spec("a", "tagging", POS, layer=5)])


# ------------------------------------------------------------------------------ JMT stacking
def test_stacked_task_computes_lower_tasks_first(inputs):
    model = build(jmt_specs())
    assert with_dependencies({s["name"]: s for s in jmt_specs()}, ["ner"]) == [
        "pos",
        "chunk",
        "ner",
    ]
    alone = model.forward_tasks(["ner"], **inputs)
    assert list(alone) == ["ner"] and alone["ner"].logits.shape == (BATCH, TOKENS, len(NER))
    together = model.forward_tasks(["ner", "pos", "chunk"], **inputs)
    torch.testing.assert_close(together["ner"].logits, alone["ner"].logits)


@pytest.mark.parametrize("layer_type", ["bilstm", "transformer"])
def test_lower_head_reaches_upper_logits_through_label_embeddings(inputs, layer_type):
    model = build(jmt_specs(layer_type))
    before = model(task="ner", **inputs).logits
    with torch.no_grad():
        model.heads["chunk"].out.weight.add_(torch.randn_like(model.heads["chunk"].out.weight))
    assert not torch.allclose(model(task="ner", **inputs).logits, before, atol=1e-4)


@pytest.mark.parametrize("layer_type", ["bilstm", "transformer"])
def test_without_label_embeddings_lower_head_is_not_read(inputs, layer_type):
    model = build(jmt_specs(layer_type, label_embeddings=False))
    assert model.task_layers["ner"].label_embedding is None
    before = model(task="ner", **inputs).logits
    with torch.no_grad():
        model.heads["chunk"].out.weight.add_(torch.randn_like(model.heads["chunk"].out.weight))
    torch.testing.assert_close(model(task="ner", **inputs).logits, before)
    with torch.no_grad():  # the lower task's task layer still feeds the upper task
        for parameter in model.task_layers["chunk"].parameters():
            parameter.add_(torch.randn_like(parameter))
    assert not torch.allclose(model(task="ner", **inputs).logits, before, atol=1e-4)


def test_upper_loss_trains_the_stack_below(inputs):
    model = build(jmt_specs())
    model.train()
    model(task="chunk", labels=tag_labels(len(CHUNK)), **inputs).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trained_parameter_names(model, "chunk")
    assert {"heads.pos.out.weight", "task_layers.chunk.label_embedding.weight"} <= with_grad
    assert not any(name.startswith(("heads.ner", "task_layers.ner")) for name in with_grad)
    assert grad_layers(model) == {0: True, 1: True, 2: False, 3: False}


def test_bilstm_task_layer_ignores_padding(inputs):
    model = build(jmt_specs())
    batch = model(task="ner", **inputs).logits
    short = {key: value[1:, :4] for key, value in inputs.items()}
    torch.testing.assert_close(model(task="ner", **short).logits[0], batch[1, :4])


def test_left_padding_is_refused_by_bilstm(inputs):
    model = build(jmt_specs())
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        model(task="ner", **inputs)


def test_stacking_problems_are_named():
    specs = [
        task_spec("a", "tagging", POS, stack_on="zzz", task_layer=task_layer()),
        task_spec("b", "tagging", POS, stack_on="c", task_layer=task_layer()),
        task_spec("c", "tagging", POS, stack_on="b", task_layer=task_layer()),
        task_spec("r", "regression"),
        task_spec("d", "tagging", POS, stack_on="r", task_layer=task_layer()),
    ]
    problems = check_stacking(specs)
    assert problems[0] == ("a", "stack_on", "no task 'zzz' among the tasks (a, b, c, r, d)")
    assert problems[1] == ("b", "stack_on", "stack_on forms a cycle (b -> c -> b)")
    message = "task 'r' has no labels to embed; set label_embeddings: false"
    assert problems[3] == ("d", "task_layer.label_embeddings", message)
    with pytest.raises(UserError, match="task a: stack_on: no task 'zzz'"):
        build(specs[:1])


# ------------------------------------------------------------------------------ cards
def card_data(name: str, **fields) -> dict:
    return {
        "name": name, "type": "tagging", "inputs": ["tokens"], "label_column": "tags",
        "labels": ["O", "B-X"], "metrics": ["seqeval"],
        "source": {"local": {"format": "conll", "column_names": ["tokens", "tags"],
                             "files": {"train": "t.txt", "validation": "d.txt"}}},
        **fields,
    }  # fmt: skip


def test_card_hierarchy_fields_and_defaults():
    card = parse_card(card_data("chunk", stack_on="pos", successive_regularization=0.01), "c.yaml")
    spec = card.model_spec()
    assert spec["stack_on"] == "pos" and spec["task_layer"]["type"] == "bilstm"
    assert spec["task_layer"]["label_embeddings"] and spec["task_layer"]["shortcut"]
    assert parse_card(card_data("pos"), "p.yaml").model_spec()["task_layer"] is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"successive_regularization": 0.1}, "x.yaml: successive_regularization: needs stack_on"),
        ({"stack_on": "ner"}, "x.yaml: stack_on: a task cannot stack on itself"),
        ({"task_layer": {"type": "gru"}}, "x.yaml: task_layer.type: unknown task layer type 'gru'"),
        ({"task_layer": {"dropout": 2}}, "x.yaml: task_layer.dropout:"),
    ],
)
def test_bad_hierarchy_fields_name_file_and_field(fields, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        parse_card(card_data("ner", **fields), "x.yaml")


def test_stack_on_a_task_not_loaded_names_the_card(tmp_path):
    import yaml

    for name, fields in {"pos": {}, "ner": {"stack_on": "chunk"}}.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(card_data(name, **fields)))
    with pytest.raises(UserError) as error:
        load_cards([tmp_path])
    assert (
        str(error.value)
        == f"{tmp_path / 'ner.yaml'}: stack_on: no task 'chunk' among the tasks (ner, pos)"
    )


# ------------------------------------------------------------------------------ successive reg.
def test_successive_penalty_two_parameters():
    current = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}
    snapshot = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor(1.0)}
    # delta * (1^2 + 2^2 + 2^2) = 0.5 * 9
    assert successive_penalty(current, snapshot, delta=0.5).item() == pytest.approx(4.5)


def test_regularizer_pulls_shared_parameters_toward_lower_snapshot():
    model = build(jmt_specs())
    regularizer = SuccessiveRegularizer(model, {"pos": 0.0, "chunk": 0.25, "ner": 0.0})
    shared = set(regularizer.shared["chunk"])
    assert shared == trained_parameter_names(model, "chunk") & trained_parameter_names(model, "pos")
    assert (
        "encoder.encoder.layer.0.output.dense.weight" in shared and "heads.pos.out.weight" in shared
    )
    assert not any(".layer.1." in name or "heads.chunk" in name for name in shared)
    assert regularizer.penalty("chunk") == 0.0  # pos has not been trained yet
    regularizer.update("pos")
    assert regularizer.penalty("chunk").item() == 0.0
    bias = model.heads["pos"].out.bias
    with torch.no_grad():
        bias.add_(0.1)  # a chunk update moves a shared parameter
    penalty = regularizer.penalty("chunk")
    assert penalty.item() == pytest.approx(0.25 * bias.numel() * 0.01)
    penalty.backward()
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 2 * 0.25 * 0.1))
    assert regularizer.penalty("ner") == 0.0 and regularizer.penalty("pos") == 0.0


# ------------------------------------------------------------------------------ save / load
def test_save_and_reload_identical_logits_for_every_task(inputs, tmp_path):
    specs = [
        *jmt_specs(),
        task_spec("cls", "classification", ["neg", "pos"], layer=3),
        # a sentence task stacked on a tagging task (JMT's relatedness on top of the taggers)
        task_spec("doc", "classification", ["a", "b"], stack_on="ner",
                  task_layer=task_layer(type="transformer", hidden_size=8)),
    ]  # fmt: skip
    model = build(specs)
    model.save_pretrained(tmp_path)
    loaded = MultiTaskModel.from_pretrained(tmp_path).eval()
    assert loaded.config.task("ner")["stack_on"] == "chunk"
    assert loaded.config.task("doc")["task_layer"]["type"] == "transformer"
    names = [spec["name"] for spec in specs]
    expected = model.forward_tasks(names, **inputs)
    actual = loaded.forward_tasks(names, **inputs)
    for name in names:
        torch.testing.assert_close(actual[name].logits, expected[name].logits, rtol=0, atol=1e-6)
    assert expected["doc"].logits.shape == (BATCH, 2)
