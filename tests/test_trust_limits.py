"""The bounded readers of untrusted input (issue 14, item 4): YAML files (`load_yaml`), JSON
objects (`load_json_object`), regular files only, and the limits on a model's config.json, which
every real encoder's config passes. The cases through the command line are in
tests/test_bad_input_limits.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from transformers import (
    AlbertConfig,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    XLMRobertaConfig,
)

from mtnlp.cards.load import load_cards
from mtnlp.modeling.config import MultiTaskConfig, check_task_entries
from mtnlp.modeling.limits import MAX_LABELS, check_encoder_config
from mtnlp.modeling.loading import check_tokenizer_fits
from mtnlp.utils.errors import UserError
from mtnlp.utils.untrusted import (
    MAX_NESTING,
    check_regular_file,
    kind_of,
    load_json_object,
    read_bounded,
)
from mtnlp.utils.values import shown
from mtnlp.utils.yaml_files import MAX_INTEGER_DIGITS, load_yaml

from conftest import REPO, TINY_TASKS, task_spec


def error_of(function, *args, **kwargs) -> str:
    with pytest.raises(UserError) as error:
        function(*args, **kwargs)
    return str(error.value)


# ------------------------------------------------------------------------------ YAML
def test_every_card_of_the_repository_reads_as_before():
    files = sorted((REPO / "tasks").rglob("*.yaml"))
    assert files
    for file in files:
        assert load_yaml(file) == yaml.safe_load(file.read_text(encoding="utf-8")), file


def test_a_few_aliases_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base: &base {seed: 3, epochs: 2}\nrun: {<<: *base, epochs: 5}\nl: [*base]\n")
    assert load_yaml(path) == {
        "base": {"seed": 3, "epochs": 2},
        "run": {"seed": 3, "epochs": 5},
        "l": [{"seed": 3, "epochs": 2}],
    }


def test_yaml_nesting_is_refused_past_the_limit_only(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("[" * MAX_NESTING + "]" * MAX_NESTING)
    assert load_yaml(path) is not None
    path.write_text("[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1))
    assert error_of(load_yaml, path) == f"{path}: line 1: nested more than 50 levels deep"


def test_yaml_integers_are_refused_past_the_limit_only(tmp_path):
    path = tmp_path / "n.yaml"
    path.write_text(f"n: {'9' * MAX_INTEGER_DIGITS}\n")
    assert load_yaml(path) == {"n": int("9" * MAX_INTEGER_DIGITS)}
    path.write_text(f"n: -{'9' * (MAX_INTEGER_DIGITS + 1)}\n")
    assert error_of(load_yaml, path) == f"{path}: line 1: an integer of 101 digits (at most 100)"


def test_a_billion_laughs_is_refused_before_anything_walks_it(tmp_path):
    path = tmp_path / "laughs.yaml"
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]"
        for a, b in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    message = error_of(load_yaml, path)
    assert time.perf_counter() - start < 5
    assert message == f"{path}: line 6: more than 1000000 values once aliases are expanded"


def test_a_yaml_syntax_error_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2\nb: 3\n")
    assert error_of(load_yaml, path, where="--config: x", what="YAML file") == (
        "--config: x: line 2: YAML syntax error: expected ',' or ']', but got ':'"
    )


def test_a_folder_named_like_a_card_is_one_line(tmp_path):
    (tmp_path / "cards" / "odd.yaml").mkdir(parents=True)
    assert error_of(load_cards, [tmp_path / "cards"]) == (
        f"{tmp_path / 'cards' / 'odd.yaml'}: is a folder, not a card file"
    )


def test_a_long_config_value_is_clipped_in_errors():
    assert shown("x" * 10_000) == "'" + "x" * 78 + "…"
    assert shown("short") == "'short'"


# ------------------------------------------------------------------------------ files, JSON
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_opening_it(tmp_path):
    path = tmp_path / "config.json"
    os.mkfifo(path)
    assert error_of(read_bounded, path, 100) == f"{path}: is a FIFO, not a file"
    link = tmp_path / "link.json"
    link.symlink_to(path)  # a link to a FIFO: the same
    assert error_of(check_regular_file, link, what="config file") == (
        f"{link}: is a FIFO, not a config file"
    )


def test_a_link_to_a_regular_file_is_read(tmp_path):
    (tmp_path / "blob").write_text('{"a": 1}')
    (tmp_path / "config.json").symlink_to(tmp_path / "blob")  # as in a Hub cache snapshot
    assert load_json_object(tmp_path / "config.json", 100) == {"a": 1}


def test_json_nesting_and_size_limits(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"a": ' + "[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1) + "}")
    assert load_json_object(path, 1000)
    path.write_text('{"a": ' + "[" * MAX_NESTING + "]" * MAX_NESTING + "}")
    assert error_of(load_json_object, path, 1000) == f"{path}: nested more than 50 levels deep"
    assert error_of(load_json_object, path, 10) == (
        f"{path}: 107 bytes, more than a file may hold (10 bytes)"
    )


def test_values_are_named_without_echoing_them():
    assert [kind_of(v) for v in (-3, 2.5, True, None, "x" * 99, [], {})] == [
        "-3", "2.5", "true", "null", "a string", "a list", "an object",
    ]  # fmt: skip
    assert kind_of(10**20) == "an integer of 21 digits"
    assert kind_of(10**5000) == "an integer of thousands of digits"


# ------------------------------------------------------------------------------ config.json
@pytest.mark.parametrize(
    "config",
    [
        BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                   intermediate_size=4096),  # BERT-large
        XLMRobertaConfig(hidden_size=4096, num_hidden_layers=48, num_attention_heads=32,
                         intermediate_size=16384, vocab_size=250880),  # XLM-R XXL
        DebertaV2Config(type_vocab_size=0, vocab_size=128100),  # DeBERTa-v3
        DistilBertConfig(),
        ElectraConfig(embedding_size=128, hidden_size=256, num_attention_heads=4),
        AlbertConfig(),
    ],
    ids=["bert-large", "xlm-r-xxl", "deberta-v3", "distilbert", "electra-small", "albert"],
)  # fmt: skip
def test_real_encoders_pass_the_limits(config):
    check_encoder_config(config.to_dict(), "config.json", "encoder")
    check_encoder_config(json.loads(config.to_json_string()), "config.json")  # a plain folder


def test_task_entries_within_the_limits_pass_and_are_checked_fast():
    labels = [f"label{i}" for i in range(MAX_LABELS)]
    start = time.perf_counter()
    check_task_entries([task_spec("big", "classification", labels, max_length=512)])
    assert time.perf_counter() - start < 2  # no quadratic duplicate search
    too_many = [task_spec("big", "classification", [*labels, "label7"])]
    assert error_of(check_task_entries, too_many) == (
        "config.json: tasks[0] (big).labels: 100001 labels, more than a task may have (100000)"
    )
    twice = [task_spec("big", "classification", [*labels[:9], "label3"])]
    assert error_of(check_task_entries, twice) == (
        "config.json: tasks[0] (big).labels: label 'label3' appears twice"
    )


def test_a_config_built_in_python_is_checked_too():
    assert error_of(MultiTaskConfig, tasks=[task_spec("a/b", "regression")]) == (
        "config.json: tasks[0].name: may hold only letters, digits and _ . + = - (no path "
        "separators, '..', control characters or spaces) and must not start with '.' or '-'"
    )
    assert error_of(MultiTaskConfig, tasks=[task_spec("a", "regression", layer=10**6)]) == (
        "config.json: tasks[0] (a).layer: expected an integer from -512 to 512, got 1000000"
    )
    assert MultiTaskConfig(tasks=TINY_TASKS).task_names == ["cls", "reg", "tag"]


def test_a_tokenizer_of_the_encoder_fits(tiny_tokenizer, tiny_model):
    check_tokenizer_fits("model", tiny_tokenizer, tiny_model)
    tiny_model.resize_token_embeddings(len(tiny_tokenizer) - 1)
    assert error_of(check_tokenizer_fits, "model", tiny_tokenizer, tiny_model) == (
        f"model: its tokenizer gives token ids up to {len(tiny_tokenizer) - 1}, but the encoder "
        f"embeds {len(tiny_tokenizer) - 1} tokens (vocab_size in config.json): the tokenizer is "
        "not the encoder's"
    )


def test_a_model_folder_config_error_names_the_folder(tiny_model, tmp_path):
    from mtnlp.modeling.loading import read_config

    tiny_model.save_pretrained(tmp_path / "model")
    path = tmp_path / "model" / "config.json"
    config = json.loads(path.read_text())
    config["encoder"]["max_position_embeddings"] = 0
    path.write_text(json.dumps(config))
    assert error_of(read_config, Path(tmp_path / "model")) == (
        f"{path}: encoder.max_position_embeddings: expected an integer from 1 to 1000000, got 0"
    )
