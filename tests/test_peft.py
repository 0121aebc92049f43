"""Issue 16 (core slice): `--peft lora` trains a shared LoRA adapter on the frozen encoder with the
heads; the adapter is part of the saved model and its config, reloads strictly, and resumes
exactly. Without peft, `--peft` is one error line naming the extra."""

from __future__ import annotations

import json
import logging
import sys

import pytest

pytest.importorskip("peft")

import test_hardening_resume
import torch
from safetensors.torch import load_file
from test_bad_input import train_errors
from test_hardening_resume import (
    assert_same_weights,
    flags,
    killed_and_resumed,
    train,
)

from mtnlp.modeling.lora import lora_entry
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.tiny import tiny_bert, train_wordpiece
from mtnlp.training.args import parse_args
from mtnlp.training.checkpointing import MODEL_FILE
from mtnlp.training.setup import parameter_groups
from mtnlp.utils.errors import UserError

from conftest import TINY_TASKS, TINY_TEXT

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# the in-process runs of test_hardening_resume: its cards, data and tiny encoder, and a fresh
# accelerate around each test
tiny = test_hardening_resume.tiny
fresh_accelerate = test_hardening_resume.fresh_accelerate

LORA = ("--peft", "lora", "--lora-r", "4", "--lora-dropout", "0")
INSTALL_ERROR = "LoRA adapters need peft, which is not installed: pip install 'mtnlp[peft]'"


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(TINY_TEXT, vocab_size=200)


@pytest.fixture
def lora_model(tokenizer) -> MultiTaskModel:
    """A tiny model (hidden size 32, 2 layers) with a rank-4 adapter on query and value."""
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(tiny_bert(tokenizer), TINY_TASKS)
    model.add_lora(lora_entry(4, 8, 0.0, ["query", "value"]))
    return model


@pytest.fixture
def batch(tokenizer) -> dict[str, torch.Tensor]:
    return dict(tokenizer(["the cat sat", "a dog ran fast"], padding=True, return_tensors="pt"))


def test_training_steps_change_the_adapter_and_heads_but_not_the_encoder(lora_model, batch):
    before = {name: p.detach().clone() for name, p in lora_model.named_parameters()}
    groups = parameter_groups(lora_model, 1e-2, 1e-2, 0.0)
    optimizer = torch.optim.AdamW(groups)
    lora_model.train()
    for _ in range(3):
        loss = lora_model(task="cls", labels=torch.tensor([0, 1]), **batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(lora_model.named_parameters())
    lora = [name for name in after if ".lora_" in name]
    base = [name for name in after if name.startswith("encoder.") and ".lora_" not in name]
    assert len(lora) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    assert all(torch.equal(after[name], before[name]) for name in base)
    assert all(not torch.equal(after[name], before[name]) for name in lora)
    assert not torch.equal(after["heads.cls.out.weight"], before["heads.cls.out.weight"])
    optimized = {id(p) for group in groups for p in group["params"]}
    assert optimized == {id(p) for p in lora_model.parameters() if p.requires_grad}


def test_trainable_parameters_are_the_adapter_and_the_heads(lora_model):
    trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    heads = sum(p.numel() for p in lora_model.heads.parameters())
    # r x (in + out) per adapted Linear: 2 layers x (query, value), 32 -> 32, r = 4
    assert trainable == 2 * 2 * 4 * (32 + 32) + heads


def test_save_and_reload_gives_identical_logits(lora_model, batch, tmp_path):
    with torch.no_grad():  # B starts at 0: give the adapter an effect
        for name, parameter in lora_model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_()
    lora_model.eval()
    lora_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["lora"] == {
        "r": 4,
        "alpha": 8,
        "dropout": 0.0,
        "target_modules": ["query", "value"],
        "scope": "shared",
    }
    loaded = MultiTaskModel.from_pretrained(tmp_path).eval()
    for task in ("cls", "reg", "tag"):
        expected = lora_model(task=task, **batch).logits
        got = loaded(task=task, **batch).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    saved = dict(lora_model.named_parameters())
    assert all(torch.equal(p, saved[name]) for name, p in loaded.named_parameters())


def test_the_adapter_alone_loads_with_peft(lora_model, tokenizer, batch, tmp_path):
    from peft import PeftModel

    with torch.no_grad():
        for name, parameter in lora_model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_()
    lora_model.save_pretrained(tmp_path)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    torch.manual_seed(0)  # the fixture's encoder, before its adapter
    adapted = PeftModel.from_pretrained(tiny_bert(tokenizer), tmp_path / "adapter").eval()
    expected = lora_model.eval().encoder(**batch).last_hidden_state
    torch.testing.assert_close(adapted(**batch).last_hidden_state, expected, rtol=0, atol=1e-6)
    with adapted.disable_adapter():  # the adapter does change the encoder's outputs
        assert not torch.allclose(adapted(**batch).last_hidden_state, expected, atol=1e-3)
    MultiTaskModel.from_pretrained(tmp_path).save_pretrained(tmp_path)  # saved again: kept
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    torch.manual_seed(0)
    MultiTaskModel.from_encoder(tiny_bert(tokenizer), TINY_TASKS).save_pretrained(tmp_path)
    assert list((tmp_path / "adapter").iterdir()) == []  # another model: no stale adapter


def test_training_run_keeps_the_encoder_and_logs_trainable_parameters(tiny, tmp_path, caplog):
    _, _, encoder = tiny
    with caplog.at_level(logging.INFO, logger="mtnlp.training.setup"):
        train(flags(tiny, tmp_path / "out", "cls", "--max-steps", "3", *LORA))
    weights = load_file(tmp_path / "out" / MODEL_FILE)
    pretrained = load_file(encoder / "model.safetensors")
    for name, value in pretrained.items():
        if name.startswith("pooler."):
            continue
        saved = f"encoder.{name}".replace(".query.", ".query.base_layer.")
        saved = saved.replace(".value.", ".value.base_layer.")
        assert torch.equal(weights[saved], value), name
    assert any(".lora_B." in name and weights[name].any() for name in weights)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["lora"]["target_modules"] == ["query", "value"]  # peft's default for BERT
    # 2 layers x (query, value) x r 4 x (32 + 32) = 1024, and the cls head: 32 x 2 + 2
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("--peft")] == [
        "--peft lora: 1090 of 37794 parameters train (2.88%)"
    ]


def test_lora_run_resumes_exactly(tiny, tmp_path):
    run = ("--checkpoint-every", "3", *LORA)
    train(flags(tiny, tmp_path / "reference", "cls,tag", *run))
    output = tmp_path / "resumed"
    killed_and_resumed(flags(tiny, output, "cls,tag", *run), output, 6)
    assert_same_weights(output, tmp_path / "reference")


def test_per_task_scope_is_not_yet_supported(tiny, tmp_path, capsys):
    argv = flags(tiny, tmp_path / "out", "cls", *LORA, "--peft-scope", "per_task")
    assert train_errors(argv, tmp_path / "out", capsys) == [
        "--peft-scope per_task: not yet supported (use shared)"
    ]


def test_without_peft_the_error_names_the_extra(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    argv = flags(tiny, tmp_path / "out", "cls", *LORA)
    assert train_errors(argv, tmp_path / "out", capsys) == [INSTALL_ERROR]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sharing", "soft"], "--peft lora: needs --sharing hard, got soft"),
        (["--finetune-each"], "--peft lora: --finetune-each is not supported with it yet"),
    ],
)
def test_peft_flags_that_do_not_combine_yet(extra, message):
    with pytest.raises(UserError) as error:
        parse_args(["--peft", "lora", *extra])
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        (
            "query,../x",
            "--peft lora: lora.target_modules[1]: expected a module name (letters, digits, '_' "
            "and '.'), got a string",
        ),
        (
            "nothing",
            "--peft lora: lora.target_modules: no module of the encoder has one of these names "
            "(BERT's attention: query, key, value)",
        ),
    ],
)
def test_bad_target_modules_are_one_line(tiny, tmp_path, capsys, modules, message):
    argv = flags(tiny, tmp_path / "out", "cls", *LORA, "--lora-target-modules", modules)
    assert train_errors(argv, tmp_path / "out", capsys) == [message]


def test_a_lora_model_is_not_trained_further_yet(lora_model, tokenizer, tiny, tmp_path, capsys):
    lora_model.save_pretrained(tmp_path / "lora")
    tokenizer.save_pretrained(tmp_path / "lora")
    argv = flags(tiny, tmp_path / "out", "cls")
    argv[argv.index("--model") + 1] = str(tmp_path / "lora")
    assert train_errors(argv, tmp_path / "out", capsys) == [
        "--model: a model with a LoRA adapter cannot be trained further yet (start from its "
        "encoder)"
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"r": 0}, "lora.r: expected an integer from 1 to 65536, got 0"),
        ({"r": "8"}, "lora.r: expected an integer from 1 to 65536, got a string"),
        ({"dropout": 2}, "lora.dropout: expected a number from 0 to 1, got 2"),
        (
            {"target_modules": ["query", "../x"]},
            "lora.target_modules[1]: expected a module name (letters, digits, '_' and '.'), "
            "got a string",
        ),
        (
            {"target_modules": "query"},
            "lora.target_modules: expected a list of 1 to 64 module names, got a string",
        ),
        ({"scope": "per_task"}, "lora.scope: expected one of shared, got a string"),
    ],
)
def test_bad_lora_config_is_one_line(lora_model, tmp_path, change, message):
    lora_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["lora"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as error:
        MultiTaskModel.from_pretrained(tmp_path)
    assert str(error.value) == f"{tmp_path / 'config.json'}: {message}"


def test_task_model_of_a_lora_model_is_one_line(lora_model):
    with pytest.raises(UserError) as error:
        lora_model.task_model("cls")
    assert str(error.value) == (
        "task cls: its encoder carries a LoRA adapter (--peft lora), which a plain transformers "
        "model lacks; predict it with mtnlp.MultiTaskPipeline or "
        'transformers.pipeline("mtnlp-multi-task", model=...)'
    )


def test_mixed_precision_run_keeps_the_encoder(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    train(flags(tiny, tmp_path / "out", "cls", "--max-steps", "2", *LORA))
    weights = load_file(tmp_path / "out" / MODEL_FILE)
    assert {value.dtype for value in weights.values()} == {torch.float32}
    assert any(".lora_B." in name and weights[name].any() for name in weights)
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["mixed_precision"] == "bf16"
