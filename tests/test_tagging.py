"""Sequence tagging: word/sub-word alignment, long sentences, predictions mapped back to words,
seqeval schemes, the CoNLL-2003 and UD EWT readers, the conll_hierarchical recipe in each layout,
and tagging mixed with a GLUE task in one model."""

from __future__ import annotations

import json
import logging
import sys

import datasets
import pytest
import torch
from transformers import AutoTokenizer, BertTokenizer

from mtnlp.cards.load import load_cards, parse_card
from mtnlp.data.read import load_raw
from mtnlp.data.tokenize import tokenize_task
from mtnlp.data.words import word_predictions
from mtnlp.inference.pipeline import MultiTaskPipeline
from mtnlp.metrics import compute_metrics
from mtnlp.modeling.heads import IGNORE_INDEX as X
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.tiny import tiny_bert

from conftest import REPO, task_spec

sys.path.insert(0, str(REPO / "recipes"))
import conll_hierarchical

CONLL_TASKS = ["pos", "chunk", "ner"]
PIECES = ["the", "cat", "##s", "un", "##believ", "##able", "sat"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def piece_tokenizer() -> BertTokenizer:
    """A hand-made WordPiece vocabulary: 'cats' -> cat ##s, 'unbelievable' -> un ##believ ##able."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return BertTokenizer(vocab={t: i for i, t in enumerate(specials + PIECES)}, do_lower_case=True)


def toy_card(max_length: int = 32):
    return parse_card(
        {
            "name": "toy", "type": "tagging", "inputs": ["tokens"], "label_column": "tags",
            "labels": ["O", "B-X", "I-X"], "metrics": ["seqeval"], "max_length": max_length,
            "source": {"local": {"format": "conll", "column_names": ["tokens", "tags"],
                                 "files": {"train": "t.txt", "validation": "d.txt"}}},
        },
        "toy.yaml",
    )  # fmt: skip


def tag(card, tokenizer, sentences, all_subtokens=False):
    words = [sentence for sentence, _ in sentences]
    tags = [labels for _, labels in sentences]
    dataset = datasets.Dataset.from_dict({"tokens": words, "tags": tags})
    return tokenize_task(card, tokenizer, dataset, "toy.txt", all_subtokens)


# ------------------------------------------------------------------------------ alignment
def test_word_pieces_labelled_on_first_piece_or_all(piece_tokenizer):
    sentence = (["The", "cats", "unbelievable", "sat"], ["B-X", "I-X", "O", "B-X"])
    first = tag(toy_card(), piece_tokenizer, [sentence])[0]
    # [CLS] the cat ##s un ##believ ##able sat [SEP]
    assert piece_tokenizer.convert_ids_to_tokens(first["input_ids"])[1:-1] == PIECES
    assert first["labels"] == [X, 1, 2, X, 0, X, X, 1, X]
    every = tag(toy_card(), piece_tokenizer, [sentence], all_subtokens=True)[0]
    assert every["labels"] == [X, 1, 2, 2, 0, 0, 0, 1, X]


def test_sentences_longer_than_max_length_are_counted_and_warned(piece_tokenizer, caplog):
    long = (["the", "cats", "unbelievable", "sat", "the"], ["O", "B-X", "I-X", "O", "O"])
    short = (["sat"], ["O"])
    with caplog.at_level(logging.WARNING, logger="mtnlp.data"):
        encoded = tag(toy_card(max_length=6), piece_tokenizer, [long, short])
    # [CLS] the cat ##s un [SEP]: 'unbelievable' keeps its first piece; 'sat' and 'the' are cut
    assert encoded[0]["labels"] == [X, 0, 1, X, 2, X]
    assert encoded[1]["labels"] == [X, 0, X]
    assert caplog.messages == [
        "toy.txt: 1 of 2 sentences are longer than max_length=6 tokens; their last 2 words get no "
        "label (raise max_length in task toy to keep them)"
    ]


def test_word_predictions_read_first_piece_and_mark_cut_words():
    word_ids = [None, 0, 1, 1, 2, None]
    assert word_predictions(word_ids, [7, 1, 2, 3, 4, 7], num_words=4) == [1, 2, 4, None]


def tagging_tasks(model: MultiTaskModel) -> list[str]:
    return [task["name"] for task in model.config.tasks if task["type"] == "tagging"]


def test_the_pipeline_tags_raw_sentences(tiny_tokenizer):
    torch.manual_seed(0)
    specs = [
        task_spec("tag", "tagging", ["O", "B-X", "I-X"], layer=1),
        task_spec("cls", "classification", ["neg", "pos"]),
    ]
    model = MultiTaskModel.from_encoder(tiny_bert(tiny_tokenizer), specs).eval()
    sentences = ["the cat sat on the mat", "unbelievably  good\tfilm"]
    results = MultiTaskPipeline(model, tiny_tokenizer)(sentences, tasks=tagging_tasks(model))
    assert [sorted(result) for result in results] == [["tag"], ["tag"]]  # tagging tasks only
    assert results[1]["tag"]["words"] == ["unbelievably", "good", "film"]  # split on whitespace
    assert [len(result["tag"]["tags"]) for result in results] == [6, 3]
    assert all(t in {"O", "B-X", "I-X"} for result in results for t in result["tag"]["tags"])
    # the same tags as the logits read at each word's first sub-token
    encoded = tiny_tokenizer(sentences[1].split(), is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        ids = model(task="tag", **encoded).logits.argmax(-1)[0].tolist()
    expected = word_predictions(encoded.word_ids(0), ids, 3)
    assert results[1]["tag"]["tags"] == [["O", "B-X", "I-X"][i] for i in expected]


def test_the_pipeline_tags_up_to_the_cards_max_length(tiny_tokenizer):
    """Words beyond the task's `max_length` (its card's, as in training) get no tag, even though
    the tokenizer reads 512 tokens (`data.predict_tags` cut at the tokenizer's maximum)."""
    torch.manual_seed(0)
    spec = task_spec("tag", "tagging", ["O", "B-X", "I-X"], max_length=5)
    model = MultiTaskModel.from_encoder(tiny_bert(tiny_tokenizer), [spec]).eval()
    assert tiny_tokenizer.model_max_length > 5
    result = MultiTaskPipeline(model, tiny_tokenizer)("the cat sat on the mat")["tag"]
    assert result["tags"][:3] != [None] * 3
    assert result["tags"][3:] == [None] * 3  # [CLS] + 3 words + [SEP]


# ------------------------------------------------------------------------------ metrics
def test_seqeval_schemes_by_hand():
    # IOBES: gold PER (B E), LOC (S); predicted PER (B E) right, ORG (S) wrong -> P = R = F1 = 1/2
    gold, pred = [["B-PER", "E-PER", "O", "S-LOC"]], [["B-PER", "E-PER", "O", "S-ORG"]]
    result = compute_metrics(["seqeval_iobes"], pred, gold)
    assert result["overall_f1"] == pytest.approx(0.5)
    # IOB1: an entity starts with I-; B- only between two adjacent entities of the same type.
    # gold: PER (I I), PER (B); predicted: one PER over all three words -> P = 0, R = 0
    gold, pred = [["I-PER", "I-PER", "B-PER"]], [["I-PER", "I-PER", "I-PER"]]
    assert compute_metrics(["seqeval_iob1"], pred, gold)["overall_f1"] == 0.0
    assert compute_metrics(["seqeval_iob1"], gold, gold)["overall_f1"] == 1.0
    # token accuracy for POS / chunking counts every word once
    assert compute_metrics(["accuracy"], [["DT", "NN"], ["VB"]], [["DT", "VB"], ["VB"]]) == {
        "accuracy": pytest.approx(2 / 3)
    }


# ------------------------------------------------------------------------------ real data
def test_local_conll2003_reader_counts(data_dir):
    cards = {card.name: card for card in load_cards([REPO / "tasks" / "conll2003"])}
    raw = load_raw(cards["ner"], ["train", "validation", "test"], [data_dir / "conll2003"])
    assert {split: len(data) for split, data in raw.items()} == {
        "train": 14041, "validation": 3250, "test": 3453,
    }  # fmt: skip
    train = raw["train"]
    assert train[0]["tokens"][:3] == ["EU", "rejects", "German"]
    assert sum(len(tokens) for tokens in train["tokens"]) == 203621
    for name in CONLL_TASKS:  # every tag in the data is one of the card's labels
        used = {tag for tags in train[cards[name].label_column] for tag in tags}
        assert used <= set(cards[name].labels), name


def test_local_ud_ewt_conllu_reader_counts(data_dir):
    (card,) = load_cards([REPO / "tasks" / "ud"])
    raw = load_raw(card, ["train", "validation", "test"], [data_dir / "ud_english_ewt"])
    assert {split: len(data) for split, data in raw.items()} == {
        "train": 12544, "validation": 2001, "test": 2077,
    }  # fmt: skip
    words = {split: sum(len(tokens) for tokens in data["tokens"]) for split, data in raw.items()}
    assert words == {"train": 204577, "validation": 25147, "test": 25094}  # no `3-4` or `8.1` lines
    assert {tag for tags in raw["validation"]["upos"] for tag in tags} == set(card.labels)


# ------------------------------------------------------------------------------ recipe
@pytest.mark.parametrize(
    ("layout", "depth", "layers", "stack_on"),
    [
        ("flat", 6, [-1, -1, -1], [None, None, None]),
        ("low", 6, [2, 4, -1], [None, None, None]),
        ("low", 2, [1, 1, -1], [None, None, None]),
        ("jmt", 12, [4, 8, -1], [None, "pos", "chunk"]),
    ],
)
def test_layouts(layout, depth, layers, stack_on):
    cards = load_cards([REPO / "tasks" / "conll2003"], CONLL_TASKS)
    laid_out = conll_hierarchical.apply_layout(cards, layout, depth, "transformer", 0.5)
    assert [card.layer for card in laid_out] == layers
    assert [card.stack_on for card in laid_out] == stack_on
    assert [card.path for card in laid_out] == [card.path for card in cards]
    if layout == "jmt":
        assert [card.task_layer.type for card in laid_out] == ["transformer"] * 3
        assert [card.successive_regularization for card in laid_out] == [0.0, 0.5, 0.5]
    else:
        assert all(card.task_layer is None for card in laid_out)


def recipe_args(data_dir, output, model, *extra) -> list[str]:
    return [
        "--model", str(model), "--data-dir", str(data_dir / "conll2003"), "--max-steps", "6",
        "--max-train-samples", "64", "--max-eval-samples", "32", "--batch-size", "8",
        "--learning-rate", "1e-3", "--output-dir", str(output), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_encoder(data_dir, tmp_path_factory):
    """A saved tiny BERT whose vocabulary is learned from a slice of the CoNLL and RTE text: the
    runs below load it like a pretrained encoder instead of training a vocabulary each time."""
    from mtnlp.modeling.tiny import train_wordpiece

    folder = tmp_path_factory.mktemp("tiny_encoder")
    conll = load_cards([REPO / "tasks" / "conll2003"], ["ner"])[0]
    sentences = load_raw(conll, ["train"], [data_dir / "conll2003"])["train"]["tokens"][:3000]
    text = [" ".join(words) for words in sentences]
    rte = (data_dir / "glue" / "RTE" / "train.tsv").read_text(encoding="utf-8").splitlines()[:500]
    tokenizer = train_wordpiece(text + rte)
    tokenizer.save_pretrained(folder)
    tiny_bert(tokenizer).save_pretrained(folder)
    return folder


def check_run(output, layers: list[int], stack_on: list[str | None]) -> MultiTaskModel:
    results = json.loads((output / "eval_results.json").read_text())
    assert list(results) == CONLL_TASKS
    assert 0 <= results["pos"]["accuracy"] <= 1 and 0 <= results["chunk"]["accuracy"] <= 1
    assert {"overall_precision", "overall_recall", "overall_f1"} <= set(results["ner"])
    model = MultiTaskModel.from_pretrained(output).eval()
    assert [model.config.task(t)["layer"] for t in CONLL_TASKS] == layers
    assert [model.config.task(t)["stack_on"] for t in CONLL_TASKS] == stack_on
    return model


def test_jmt_run_reloads_and_tags_raw_sentences(data_dir, tiny_encoder, tmp_path):
    output = tmp_path / "jmt"
    conll_hierarchical.main(["--layout", "jmt", *recipe_args(data_dir, output, tiny_encoder)])
    model = check_run(output, [1, 1, -1], [None, "pos", "chunk"])
    assert set(model.task_layers) == set(CONLL_TASKS)
    assert model.task_layers["ner"].label_embedding.weight.shape == (100, 23)  # chunk's 23 tags
    summary = json.loads((output / "train_summary.json").read_text())
    assert sum(summary["task_steps"].values()) == 6
    tokenizer = AutoTokenizer.from_pretrained(output)
    pipeline = MultiTaskPipeline(model, tokenizer)
    tags = pipeline("Peter Blackburn visited Brussels .", tasks=tagging_tasks(model))
    assert list(tags) == CONLL_TASKS and all(len(tags[t]["tags"]) == 5 for t in CONLL_TASKS)
    for task in CONLL_TASKS:
        assert set(tags[task]["tags"]) <= set(model.config.task(task)["labels"])
    assert "entities" in tags["ner"] and "entities" not in tags["pos"]


@pytest.mark.parametrize(("layout", "layers"), [("flat", [-1, -1, -1]), ("low", [1, 1, -1])])
def test_flat_and_low_runs(layout, layers, data_dir, tiny_encoder, tmp_path):
    model = "tiny" if layout == "flat" else tiny_encoder  # 'tiny': a vocabulary trained here
    conll_hierarchical.main(["--layout", layout, *recipe_args(data_dir, tmp_path, model)])
    assert len(check_run(tmp_path, layers, [None, None, None]).task_layers) == 0


def test_glue_and_tagging_tasks_in_one_model(data_dir, tiny_encoder, tmp_path):
    from mtnlp.training.args import parse_args
    from mtnlp.training.loop import train

    cards = load_cards([REPO / "tasks" / "glue" / "rte.yaml", REPO / "tasks" / "conll2003"])
    cards = [card for card in cards if card.name in ("rte", "ner")]
    args = parse_args(
        [*recipe_args(data_dir, tmp_path, tiny_encoder), "--data-dir", str(data_dir / "glue"),
         str(data_dir / "conll2003"), "--sampler", "round_robin"]
    )  # fmt: skip
    results = train(args, cards)
    assert set(results) == {"rte", "ner"} and "accuracy" in results["rte"]
    assert "overall_f1" in results["ner"]
    model = MultiTaskModel.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    inputs = tokenizer(["A man sleeps ."], ["Someone is asleep ."], return_tensors="pt")
    outputs = model.forward_tasks(["rte", "ner"], **inputs)  # one encoder pass, both heads
    assert outputs["rte"].logits.shape == (1, 2)
    assert outputs["ner"].logits.shape == (*inputs["input_ids"].shape, 9)
