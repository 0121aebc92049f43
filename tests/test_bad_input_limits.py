"""Bounded work on untrusted input (issue 14, items 4 and 10): a damaged or hostile model folder
(config.json, tokenizer, weights that are not regular files) and `--config` files / cards that
would exhaust the machine or hang it. Each case breaks a copy of the tiny tasks and of a saved
model of them (`{case}/model`), then runs `mtnlp ARGS` in-process (the runner of
tests/test_bad_input.py's safety table): exit 2, one `error:` line naming the file and the field,
no traceback."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_bad_input import (
    EVALUATE,
    PREDICT,
    PUSH,
    TRAIN,
    SafetyCase,
    run_safety_case,
    tiny_model_folder,  # noqa: F401  (a fixture)
    tiny_tasks,  # noqa: F401  (a fixture)
    write,
)

CONFIG = "{case}/model/config.json"
CONFIG_FILE = ("--config", "{case}/run.yaml")
TRAIN_FROM_MODEL = (*TRAIN, "--model", "{case}/model")


def edit_json(change: Callable[[dict], object]) -> Callable[[Path], object]:
    """Change the model's config.json (the whole object) with `change`."""

    def setup(case: Path) -> None:
        path = case / "model" / "config.json"
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))

    return setup


def encoder(**sizes: object) -> Callable[[Path], object]:
    return edit_json(lambda config: config["encoder"].update(sizes))


def task(number: int, **fields: object) -> Callable[[Path], object]:
    return edit_json(lambda config: config["tasks"][number].update(fields))


def fifo(path: str) -> Callable[[Path], object]:
    """A FIFO in place of `path`: whoever opens it for reading waits for a writer (forever).
    A thread plays the writer for a minute, so that a case whose code opens it fails (it reads
    nothing) instead of hanging the test run."""

    def setup(case: Path) -> None:
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        target = case / path
        target.unlink(missing_ok=True)
        os.mkfifo(target)
        threading.Thread(target=release_readers, args=(target,), daemon=True).start()

    return setup


def release_readers(path: Path, seconds: float = 60) -> None:
    """Open the FIFO `path` for writing and close it, whenever someone waits to read it."""
    for _ in range(int(seconds * 10)):
        time.sleep(0.1)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # fails while nobody reads
        except OSError:
            continue


def folder(path: str) -> Callable[[Path], object]:
    def setup(case: Path) -> None:
        target = case / path
        target.unlink(missing_ok=True)
        target.mkdir()

    return setup


def sparse(path: str, size: int) -> Callable[[Path], object]:
    """`path` grown to `size` bytes without writing them (a sparse file)."""

    def setup(case: Path) -> None:
        with open(case / path, "ab") as file:
            file.truncate(size)

    return setup


def tokenizer_of_another_model(case: Path) -> None:
    """A tokenizer of 200 tokens in place of the model's (its encoder embeds 44)."""
    from mtnlp.modeling.tiny import train_wordpiece

    words = " ".join(f"w{i}q" for i in range(300))
    train_wordpiece([words, words.upper()], vocab_size=200).save_pretrained(case / "model")


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n"
    for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)  # 10^9 values once expanded, in 9 lines, too many from line 6 on
DEEP_YAML = "cards: " + "[" * 60 + "]" * 60 + "\n"
INTEGERS = "expected an integer from {} to {}, got {}"

LIMITS_CASES = [
    # ------------------------------------------------------------ config.json: not an object
    SafetyCase(
        "predict-config-not-json",
        write("model/config.json", "{model_type: mtnlp}"),
        PREDICT,
        f"{CONFIG}: not valid JSON (Expecting property name enclosed in double quotes at line 1, "
        "column 2)",
    ),
    SafetyCase(
        "evaluate-config-a-list",
        write("model/config.json", '[{"model_type": "mtnlp"}]'),
        EVALUATE,
        f"{CONFIG}: expected a JSON object, got a list",
    ),
    SafetyCase(
        "push-config-latin-1",
        write("model/config.json", '{"model_type": "mtnlp", "x": "caf\xe9"}'.encode("latin-1")),
        PUSH,
        f"{CONFIG}: not UTF-8 text (invalid continuation byte at byte 33)",
    ),
    SafetyCase(
        "predict-config-nested-deeply",
        write("model/config.json", '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        PREDICT,
        f"{CONFIG}: nested more than 50 levels deep",
    ),
    SafetyCase(
        "evaluate-config-nested-60-levels",
        edit_json(lambda config: config.update(x=json.loads("[" * 60 + "]" * 60))),
        EVALUATE,
        f"{CONFIG}: nested more than 50 levels deep",
    ),
    SafetyCase(
        "predict-config-integer-of-5000-digits",
        write("model/config.json", '{"model_type": "mtnlp", "x": ' + "9" * 5000 + "}"),
        PREDICT,
        f"{CONFIG}: not valid JSON (an integer too long to read)",
    ),
    SafetyCase(
        "predict-config-too-large",
        sparse("model/config.json", 17 * 2**20),
        PREDICT,
        f"{CONFIG}: 17825792 bytes, more than a config file may hold (16 MiB)",
    ),
    SafetyCase(
        "predict-config-is-a-fifo",
        fifo("model/config.json"),
        PREDICT,
        f"{CONFIG}: is a FIFO, not a config file",
    ),
    SafetyCase(
        "evaluate-config-is-a-folder",
        folder("model/config.json"),
        EVALUATE,
        f"{CONFIG}: is a folder, not a config file",
    ),
    # ------------------------------------------------------------ config.json: encoder sizes
    SafetyCase(
        "evaluate-layers-negative",
        encoder(num_hidden_layers=-1),
        EVALUATE,
        f"{CONFIG}: encoder.num_hidden_layers: {INTEGERS.format(1, 512, -1)}",
    ),
    SafetyCase(
        "predict-layers-zero",
        encoder(num_hidden_layers=0),
        PREDICT,
        f"{CONFIG}: encoder.num_hidden_layers: {INTEGERS.format(1, 512, 0)}",
    ),
    SafetyCase(
        "push-hidden-size-a-string",
        encoder(hidden_size="32"),
        PUSH,
        f"{CONFIG}: encoder.hidden_size: {INTEGERS.format(1, 65536, 'a string')}",
    ),
    SafetyCase(
        "predict-hidden-size-of-13-digits",
        encoder(hidden_size=10**12),
        PREDICT,
        f"{CONFIG}: encoder.hidden_size: {INTEGERS.format(1, 65536, 'an integer of 13 digits')}",
    ),
    SafetyCase(
        "evaluate-vocab-size-true",
        encoder(vocab_size=True),
        EVALUATE,
        f"{CONFIG}: encoder.vocab_size: {INTEGERS.format(1, 4000000, 'true')}",
    ),
    SafetyCase(
        "predict-attention-heads-a-float",
        encoder(num_attention_heads=2.0),
        PREDICT,
        f"{CONFIG}: encoder.num_attention_heads: {INTEGERS.format(1, 1024, 2.0)}",
    ),
    SafetyCase(
        "predict-heads-do-not-divide-hidden-size",
        encoder(num_attention_heads=3),
        PREDICT,
        f"{CONFIG}: encoder.hidden_size: 32 is not a multiple of num_attention_heads (3)",
    ),
    SafetyCase(
        "predict-sizes-within-limits-make-too-many-weights",
        encoder(hidden_size=65536, num_attention_heads=1024, num_hidden_layers=512),
        PREDICT,
        f"{CONFIG}: encoder: its sizes make an encoder of about 8800 billion weights (mtnlp "
        "loads at most 50 billion)",
    ),
    SafetyCase(
        "push-unknown-encoder-type",
        encoder(model_type="a-model-type-that-no-version-of-transformers-has"),
        PUSH,
        f"{CONFIG}: encoder.model_type: 'a-model-type-that-no-version-of-transfo…' is not a "
        "model type that transformers knows",
    ),
    SafetyCase(
        "evaluate-encoder-a-list",
        edit_json(lambda config: config.update(encoder=[])),
        EVALUATE,
        f"{CONFIG}: encoder: expected an object, got a list",
    ),
    SafetyCase(
        "predict-unknown-model-type",
        edit_json(lambda config: config.update(model_type="x" * 1000)),
        PREDICT,
        "{case}/model: not an mtnlp model folder (its config.json's model_type is "
        "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx…', not 'mtnlp')",
    ),
    SafetyCase(
        "train-from-a-model-of-unknown-type",
        edit_json(lambda config: config.update(model_type="x" * 1000)),
        TRAIN_FROM_MODEL,
        f"--model: {CONFIG}: model_type: 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx…' is not a "
        "model type that transformers knows",
    ),
    SafetyCase(
        "predict-other-field-of-another-type",
        encoder(hidden_act=["gelu"]),
        PREDICT,
        f"{CONFIG}: Validation error for field 'hidden_act': TypeError: Field 'hidden_act' "
        "expected str, got list (value: ['gelu'])",
    ),
    # ------------------------------------------------------------ config.json: tasks
    SafetyCase(
        "predict-max-length-negative",
        task(0, max_length=-1),
        PREDICT,
        f"{CONFIG}: tasks[0] (cls).max_length: {INTEGERS.format(1, 1000000, -1)}",
    ),
    SafetyCase(
        "evaluate-max-length-a-billion",
        task(2, max_length=10**9),
        EVALUATE,
        f"{CONFIG}: tasks[2] (tag).max_length: {INTEGERS.format(1, 1000000, 1000000000)}",
    ),
    SafetyCase(
        "push-max-length-a-string",
        task(1, max_length="32"),
        PUSH,
        f"{CONFIG}: tasks[1] (reg).max_length: {INTEGERS.format(1, 1000000, 'a string')}",
    ),
    SafetyCase(
        "predict-head-hidden-size-huge",
        task(0, head={"dropout": 0.1, "pooling": "cls", "hidden_size": 10**7}),
        PREDICT,
        f"{CONFIG}: tasks[0] (cls).head.hidden_size: {INTEGERS.format(1, 65536, 10000000)}",
    ),
    SafetyCase(
        "evaluate-too-many-labels",
        task(0, labels=[f"l{i}" for i in range(100_001)]),
        EVALUATE,
        f"{CONFIG}: tasks[0] (cls).labels: 100001 labels, more than a task may have (100000)",
    ),
    SafetyCase(
        "predict-task-name-a-path",
        task(1, name="../../etc/x"),
        PREDICT,
        f"{CONFIG}: tasks[1].name: may hold only letters, digits and _ . + = - (no path "
        "separators, '..', control characters or spaces) and must not start with '.' or '-'",
    ),
    SafetyCase(
        "push-task-name-of-a-model-file",
        task(0, name="config.json"),
        PUSH,
        f"{CONFIG}: tasks[0].name: is one of a model folder's own file names",
    ),
    SafetyCase(
        "predict-sharing-layers-huge",
        edit_json(lambda config: config.update(sharing={"name": "soft", "layers": 10**6})),
        PREDICT,
        f"{CONFIG}: sharing.layers: {INTEGERS.format(1, 512, 1000000)}",
    ),
    # ------------------------------------------------------------ tokenizer and weights
    SafetyCase(
        "predict-tokenizer-of-another-model",
        tokenizer_of_another_model,
        PREDICT,
        "{case}/model: its tokenizer gives token ids up to 199, but the encoder embeds 44 "
        "tokens (vocab_size in config.json): the tokenizer is not the encoder's",
    ),
    SafetyCase(
        "train-from-a-model-with-another-tokenizer",
        tokenizer_of_another_model,
        TRAIN_FROM_MODEL,
        "--model: {case}/model: its tokenizer gives token ids up to 199, but the encoder embeds "
        "44 tokens (vocab_size in config.json): the tokenizer is not the encoder's",
    ),
    SafetyCase(
        "evaluate-tokenizer-json-too-large",
        sparse("model/tokenizer.json", 600 * 2**20),
        EVALUATE,
        "{case}/model/tokenizer.json: 629145600 bytes, more than a tokenizer file may hold "
        "(512 MiB)",
    ),
    SafetyCase(
        "predict-tokenizer-json-is-a-fifo",
        fifo("model/tokenizer.json"),
        PREDICT,
        "{case}/model/tokenizer.json: is a FIFO, not a tokenizer file",
    ),
    SafetyCase(
        "predict-tokenizer-config-nested-deeply",
        write("model/tokenizer_config.json", '{"x": ' + "[" * 5000 + "]" * 5000 + "}"),
        PREDICT,
        "{case}/model: its tokenizer does not load (maximum recursion depth exceeded while "
        "decoding a JSON array from a unicode string)",
    ),
    SafetyCase(
        "predict-weights-are-a-fifo",
        fifo("model/model.safetensors"),
        PREDICT,
        "{case}/model/model.safetensors: is a FIFO, not a safetensors file",
    ),
    SafetyCase(
        "push-weights-are-a-fifo",
        fifo("model/model.safetensors"),
        PUSH,
        "{case}/model/model.safetensors: is a FIFO, not a safetensors file",
    ),
    SafetyCase(
        "train-from-a-model-whose-config-is-a-fifo",
        fifo("model/config.json"),
        TRAIN_FROM_MODEL,
        f"--model: {CONFIG}: is a FIFO, not a config file",
    ),
    SafetyCase(
        "predict-weights-are-a-folder",
        folder("model/model.safetensors"),
        PREDICT,
        "{case}/model/model.safetensors: is a folder, not a safetensors file",
    ),
    SafetyCase(  # safetensors itself refuses it (as before): checked here to stay so
        "evaluate-safetensors-header-of-a-terabyte",
        write("model/model.safetensors", (2**40).to_bytes(8, "little") + b"{}"),
        EVALUATE,
        "{case}/model/model.safetensors: not a complete safetensors file (Error while "
        "deserializing header: header too large)",
    ),
    # ------------------------------------------------------------ YAML: --config files, cards
    SafetyCase(
        "train-config-is-a-folder",
        lambda case: (case / "run.yaml").mkdir(),
        (*TRAIN, *CONFIG_FILE),
        "--config: {case}/run.yaml: is a folder, not a YAML file",
    ),
    SafetyCase(
        "train-config-is-a-fifo",
        fifo("run.yaml"),
        (*TRAIN, *CONFIG_FILE),
        "--config: {case}/run.yaml: is a FIFO, not a YAML file",
    ),
    SafetyCase(
        "train-config-not-utf8",
        write("run.yaml", "seed: 1\nrun_name: caf\xe9\n".encode("latin-1")),
        (*TRAIN, *CONFIG_FILE),
        "--config: {case}/run.yaml: not UTF-8 text (invalid continuation byte at byte 21)",
    ),
    SafetyCase(
        "train-config-nested-deeply",
        write("run.yaml", "cards: " + "[" * 100_000 + "]" * 100_000 + "\n"),
        (*TRAIN, *CONFIG_FILE),
        "--config: {case}/run.yaml: line 1: nested more than 50 levels deep",
    ),
    SafetyCase(
        "train-config-integer-of-5000-digits",
        write("run.yaml", f"max_steps: {'9' * 5000}\n"),
        (*TRAIN, *CONFIG_FILE),
        "--config: {case}/run.yaml: line 1: an integer of 5000 digits (at most 100)",
    ),
    SafetyCase(
        "train-config-integer-of-200-hex-digits",
        write("run.yaml", f"seed: 0x{'f' * 200}\n"),
        (*TRAIN, *CONFIG_FILE),
        "--config: {case}/run.yaml: line 1: an integer of 202 digits (at most 100)",
    ),
    SafetyCase(
        "train-config-seed-of-151-digits",
        write("run.yaml", f"seed: 1{'0' * 150}\n"),
        (*TRAIN, *CONFIG_FILE),
        "--config: {case}/run.yaml: line 1: an integer of 151 digits (at most 100)",
    ),
    SafetyCase(
        "train-config-long-string-is-not-echoed",
        write("run.yaml", f"max_steps: '{'1' * 100_000}'\n"),
        (*TRAIN, *CONFIG_FILE),
        f"{{case}}/run.yaml: max_steps: expected an integer, got '{'1' * 78}…",
    ),
    SafetyCase(
        "train-config-billion-laughs",
        write("run.yaml", BILLION_LAUGHS),
        (*TRAIN, *CONFIG_FILE),
        "--config: {case}/run.yaml: line 6: more than 1000000 values once aliases are expanded",
    ),
    SafetyCase(
        "train-config-alias-inside-itself",
        write("run.yaml", "cards: &loop [cards, *loop]\n"),
        (*TRAIN, *CONFIG_FILE),
        "--config: {case}/run.yaml: line 1: alias *loop inside the node it names (a structure "
        "that holds itself)",
    ),
    SafetyCase(
        "train-config-too-large",
        write("run.yaml", "seed: 1\n" + "#" * 2**20 + "\n"),
        (*TRAIN, *CONFIG_FILE),
        "--config: {case}/run.yaml: 1048585 bytes, more than a YAML file may hold (1 MiB)",
    ),
    SafetyCase(
        "train-card-billion-laughs",
        write("cards/laughs.yaml", BILLION_LAUGHS),
        TRAIN,
        "{case}/cards/laughs.yaml: line 6: more than 1000000 values once aliases are expanded",
    ),
    SafetyCase(
        "evaluate-model-card-nested-deeply",
        write("model/cards/cls.yaml", DEEP_YAML),
        EVALUATE,
        "{case}/model/cards/cls.yaml: line 1: nested more than 50 levels deep",
    ),
    SafetyCase(
        "evaluate-model-card-is-a-fifo",
        fifo("model/cards/cls.yaml"),
        EVALUATE,
        "{case}/model/cards/cls.yaml: is a FIFO, not a card file",
    ),
]


def test_the_limits_table_is_complete():
    ids = [case.id for case in LIMITS_CASES]
    assert len(ids) == len(set(ids)) >= 45


@pytest.mark.parametrize("case", LIMITS_CASES, ids=[c.id for c in LIMITS_CASES])
def test_bounded_input_gives_its_exact_error(
    case,
    tiny_tasks,  # noqa: F811  (the fixtures imported from test_bad_input)
    tiny_model_folder,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    run_safety_case(case, tiny_tasks, tiny_model_folder, tmp_path, monkeypatch, capsys)
