"""The multi-task model: every head type trains, and a saved model reloads identically."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

import mtnlp
from mtnlp.modeling.heads import HEADS, IGNORE_INDEX
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.tiny import tiny_bert

from conftest import TINY_TASKS, task_spec

BATCH, TOKENS = 3, 7


def labels_for(model: MultiTaskModel, task: str) -> torch.Tensor:
    spec = model.config.task(task)
    head = HEADS.get(spec["type"])
    if head.token_level:
        labels = torch.randint(0, len(spec["labels"]), (BATCH, TOKENS))
        labels[:, 0] = IGNORE_INDEX  # [CLS]
        return labels
    if head.needs_labels:
        return torch.randint(0, len(spec["labels"]), (BATCH,))
    return torch.rand(BATCH) * 5


@pytest.fixture
def inputs(tiny_tokenizer):
    torch.manual_seed(1)
    return {
        "input_ids": torch.randint(5, len(tiny_tokenizer), (BATCH, TOKENS)),
        "attention_mask": torch.ones(BATCH, TOKENS, dtype=torch.long),
    }


@pytest.mark.parametrize("task", [spec["name"] for spec in TINY_TASKS])
def test_forward_backward_each_head(tiny_model, inputs, task):
    tiny_model.train()
    output = tiny_model(task=task, labels=labels_for(tiny_model, task), **inputs)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    output.loss.backward()
    head_grads = [p.grad for p in tiny_model.heads[task].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in head_grads)
    assert tiny_model.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    others = [
        p.grad for name, h in tiny_model.heads.items() if name != task for p in h.parameters()
    ]
    assert all(g is None for g in others)  # heads of other tasks are untouched


def test_every_registered_type_is_covered():
    assert {spec["type"] for spec in TINY_TASKS} <= set(HEADS.names())


def test_logit_shapes(tiny_model, inputs):
    outputs = tiny_model.forward_tasks(["cls", "reg", "tag"], **inputs)
    assert outputs["cls"].logits.shape == (BATCH, 2)
    assert outputs["reg"].logits.shape == (BATCH,)
    assert outputs["tag"].logits.shape == (BATCH, TOKENS, 3)
    single = tiny_model(task="tag", **inputs)
    torch.testing.assert_close(single.logits, outputs["tag"].logits)


def test_save_and_reload_identical_logits(tiny_model, inputs, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    direct = MultiTaskModel.from_pretrained(tmp_path).eval()
    auto = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(auto, MultiTaskModel)
    assert AutoConfig.from_pretrained(tmp_path).task_names == ["cls", "reg", "tag"]
    for task in ["cls", "reg", "tag"]:
        expected = tiny_model(task=task, **inputs).logits
        torch.testing.assert_close(direct(task=task, **inputs).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(auto(task=task, **inputs).logits, expected, rtol=0, atol=1e-6)
    assert direct.config.task("cls")["labels"] == ["neg", "pos"]


def test_from_encoder_keeps_pretrained_weights(tiny_tokenizer):
    encoder = tiny_bert(tiny_tokenizer)
    model = MultiTaskModel.from_encoder(encoder, [task_spec("a", "classification", ["x", "y"])])
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[name], value)


def test_unknown_task_is_a_clear_error(tiny_model, inputs):
    with pytest.raises(KeyError, match="no task 'nope' in this model; tasks: cls, reg, tag"):
        tiny_model(task="nope", **inputs)
    assert mtnlp.MultiTaskModel is MultiTaskModel
