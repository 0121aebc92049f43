"""bench/probe_layers.py: first sub-word features per layer, the linear probe, the best layer."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO))  # the bench scripts are modules of the repository's bench/ folder

from bench import probe_layers
from bench.common import CONLL_CARDS, data_dirs
from mtnlp.cards.load import load_card

SENTENCES = [
    ["thecat", "dogpark", "sharply"],  # every word of several sub-words but the last
    ["the", "cats", "sat", "on", "mats"],
    ["parks", "fell"],
]


@pytest.fixture(scope="module")
def tiny_encoder(tiny_tokenizer):
    from mtnlp.modeling.tiny import tiny_bert

    torch.manual_seed(0)
    return tiny_bert(tiny_tokenizer).eval()


@pytest.fixture(scope="module")
def tag_card(tmp_path_factory):
    from tiny_runs import CARDS

    path = tmp_path_factory.mktemp("cards") / "tag.yaml"
    path.write_text(CARDS["tag"])
    return load_card(path)


def one_by_one(encoder, tokenizer, sentences, max_length):
    """Each sentence alone (no padding), each word's vector at the first token of its word id."""
    layers, kept = [], []
    for words in sentences:
        encoded = tokenizer(
            words, is_split_into_words=True, truncation=True, max_length=max_length,
            return_tensors="pt",
        )  # fmt: skip
        with torch.no_grad():
            hidden = torch.stack(encoder(**encoded, output_hidden_states=True).hidden_states)
        word_ids = encoded.word_ids()
        firsts = [word_ids.index(word) for word in sorted(set(word_ids) - {None})]
        layers.append(hidden[:, 0, firsts])
        kept.append(sorted(set(word_ids) - {None}))
    return torch.cat(layers, 1), kept


def test_features_are_each_words_first_subword_at_every_layer(tiny_encoder, tiny_tokenizer):
    word_ids = tiny_tokenizer(SENTENCES[0], is_split_into_words=True).word_ids()
    assert word_ids == [None, 0, 0, 0, 1, 1, 1, 1, 2, None]  # several sub-words per word
    features, kept = probe_layers.first_subword_features(
        tiny_encoder, tiny_tokenizer, SENTENCES, max_length=32, batch_size=2
    )
    assert features.shape == (3, 10, 32)  # embeddings + 2 layers, 3 + 5 + 2 words, hidden 32
    assert kept == [[0, 1, 2], [0, 1, 2, 3, 4], [0, 1]]
    expected, _ = one_by_one(tiny_encoder, tiny_tokenizer, SENTENCES, 32)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    # the first sub-word of "dogpark" (token 4), not its last one (token 7)
    with torch.no_grad():
        alone = tiny_encoder(
            **tiny_tokenizer([SENTENCES[0]], is_split_into_words=True, return_tensors="pt"),
            output_hidden_states=True,
        ).hidden_states[-1][0]
    torch.testing.assert_close(features[-1, 1], alone[4], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(features[-1, 1], alone[7], atol=1e-3)


def test_words_cut_off_by_max_length_get_no_features(tiny_encoder, tiny_tokenizer):
    features, kept = probe_layers.first_subword_features(
        tiny_encoder, tiny_tokenizer, SENTENCES, max_length=6, batch_size=3
    )
    # 6 tokens: [CLS], 4 sub-words, [SEP]: "thecat" + the first of "dogpark"; "the cat ##s sat"
    assert kept == [[0, 1], [0, 1, 2], [0, 1]]
    assert features.shape == (3, 7, 32)
    expected, _ = one_by_one(tiny_encoder, tiny_tokenizer, SENTENCES, 6)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    assert probe_layers.kept_tags([[5, 6, 7], [1, 2, 3, 4, 5], [8, 9]], kept) == [
        [5, 6],
        [1, 2, 3],
        [8, 9],
    ]


def separable(count: int = 300, classes: int = 3, generator_seed: int = 0):
    """Features whose class is the largest of the first `classes` dimensions (a margin of 1)."""
    generator = torch.Generator().manual_seed(generator_seed)
    labels = torch.randint(0, classes, (count,), generator=generator)
    features = torch.randn(count, 8, generator=generator) * 0.1
    features[torch.arange(count), labels] += 1.0
    return features, labels


def test_probe_fits_linearly_separable_features_exactly_and_repeatably():
    features, labels = separable()
    probe = probe_layers.train_probe(features, labels, 3, epochs=30, seed=1, learning_rate=0.01)
    with torch.no_grad():
        accuracy = (probe(features).argmax(-1) == labels).float().mean().item()
    assert accuracy == 1.0
    again = probe_layers.train_probe(features, labels, 3, epochs=30, seed=1, learning_rate=0.01)
    assert torch.equal(probe.weight, again.weight)


def test_best_layer_is_the_one_whose_features_hold_the_tags(tag_card):
    informative, labels = separable(count=240, classes=2)
    noise = torch.randn(240, 8, generator=torch.Generator().manual_seed(3))
    layers = torch.stack([noise, informative])  # layer 0: noise, layer 1: the tags
    tags = [labels[start : start + 6].tolist() for start in range(0, 240, 6)]
    train = (layers[:, :120], {"tag": tags[:20]})
    dev = (layers[:, 120:], {"tag": tags[20:]})
    rows = probe_layers.probe_layers([tag_card], train, dev, epochs=30, seed=0, learning_rate=0.01)
    assert [row["layer"] for row in rows] == [0, 1]
    assert rows[1]["tag"]["score"] == rows[1]["tag"]["overall_f1"] == 1.0
    assert rows[1]["tag"]["overall_accuracy"] == 1.0
    assert rows[0]["tag"]["score"] < 0.8
    assert probe_layers.best_layers(rows, ["tag"]) == {"tag": 1}


def test_score_reads_flat_predictions_sentence_by_sentence(tag_card):
    gold = [[0, 1, 0], [1, 1]]  # O B-PER O | B-PER B-PER: 3 entities
    predicted = torch.tensor([0, 1, 0, 1, 0])  # the last entity missed
    result = probe_layers.score(tag_card, predicted, gold)
    assert result["overall_precision"] == 1.0
    assert result["overall_recall"] == pytest.approx(2 / 3)
    assert result["score"] == result["overall_f1"] == pytest.approx(0.8)
    assert result["overall_accuracy"] == pytest.approx(0.8)


def test_best_layer_prefers_the_lower_layer_on_a_tie():
    scores = [0.5, 0.9, 0.9]
    rows = [{"layer": layer, "pos": {"score": score}} for layer, score in enumerate(scores)]
    assert probe_layers.best_layers(rows, ["pos"]) == {"pos": 1}


def test_conll_cards_read_one_encoder_input_and_three_tag_columns(data_dir):
    cards = [load_card(CONLL_CARDS / f"{task}.yaml") for task in probe_layers.TASKS]
    words, tags = probe_layers.read_sentences(cards, "train", data_dirs(data_dir), 2)
    assert words[0] == ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
    assert len(words) == 2
    pos, chunk, ner = cards
    assert [pos.labels[tag] for tag in tags["pos"][0]][:3] == ["NNP", "VBZ", "JJ"]
    assert [chunk.labels[tag] for tag in tags["chunk"][0]][:4] == ["B-NP", "B-VP", "B-NP", "I-NP"]
    assert [ner.labels[tag] for tag in tags["ner"][0]][:3] == ["B-ORG", "O", "B-MISC"]
