"""Which encoder layer holds POS, chunks and entities: a linear probe per layer on CoNLL-2003.

    python -m bench.probe_layers --output bench/probe_layers_minilm.json   # MiniLM, 2000/1000
    python -m bench.probe_layers --quick                                   # tiny random BERT

The frozen encoder runs once (no gradients) over the first N training and M dev sentences, read
by mtnlp's readers through the cards of tasks/conll2003/. Each word is represented at every layer
0..L (0: the embeddings) by the hidden state of its first sub-word, where mtnlp's tagging heads
read it; words cut off by the card's `max_length` are left out, as mtnlp's dev metrics leave them
out. Per (layer, task), a multinomial logistic regression (one linear layer on the features
standardized with the training words' mean and deviation, cross-entropy, Adam, a fixed number of
epochs, seeded minibatch order) learns the tags of the training words and is scored on the dev
sentences with the card's metrics and main metric: POS word accuracy, chunk F1, NER entity F1
(seqeval, strict IOB2). Prints one JSON object: settings, scores per layer and task, the best
layer per task, wall times.

Why: low supervision and JMT put POS and chunking on lower layers (a card's `layer:`,
`--layout low` of recipes/conll_hierarchical.py); the probe says which layers already hold
what a task needs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    CONLL_CARDS,
    DATA_DIR,
    data_dirs,
    emit,
    encoder_folder,
    parser,
    setup,
    temporary_folder,
)

TASKS = ("pos", "chunk", "ner")  # bottom to top, as recipes/conll_hierarchical.py lays them out
PROBE_BATCH = 256  # words per probe update


def read_sentences(
    cards: Sequence[Any], split: str, dirs: Sequence[Path], count: int
) -> tuple[list[list[str]], dict[str, list[list[int]]]]:
    """The first `count` sentences of `split` (their words) and each card's tag ids for them.

    The cards read the same CoNLL file (one column each); a card whose words differ from the
    first card's is refused, since one encoder pass serves them all.
    """
    from mtnlp.data.labels import encode_label
    from mtnlp.data.read import load_raw

    words: list[list[str]] | None = None
    tags: dict[str, list[list[int]]] = {}
    for card in cards:
        dataset = load_raw(card, [split], dirs)[split]
        dataset = dataset.select(range(min(count, len(dataset))))
        card_words = dataset[card.inputs[0]]
        if words is None:
            words = card_words
        elif card_words != words:
            raise SystemExit(f"{card.where}: its {split} words differ from {cards[0].name}'s")
        tags[card.name] = [
            encode_label(card, value, f"{card.name} {split} sentence {index}")
            for index, value in enumerate(dataset[card.label_column])
        ]
    return words or [], tags


def first_subword_features(
    encoder: Any,
    tokenizer: Any,
    sentences: Sequence[Sequence[str]],
    *,
    max_length: int,
    batch_size: int = 64,
    bf16: bool = False,
) -> tuple[torch.Tensor, list[list[int]]]:
    """Every layer's hidden state at each word's first sub-word, and which words have one.

    Returns features of shape (layers + 1, words, hidden) in float32, words in sentence order,
    and per sentence the indices of the words they are for (a word with no sub-word, or cut off
    by `max_length`, has none). Sentences are encoded in batches of similar length.
    """
    from mtnlp.data.words import word_predictions

    order = sorted(range(len(sentences)), key=lambda index: len(sentences[index]))
    per_sentence: list[torch.Tensor | None] = [None] * len(sentences)
    kept: list[list[int]] = [[] for _ in sentences]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    encoder.eval()
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        encoded = tokenizer(
            [list(sentences[index]) for index in batch],
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode(), autocast:
            hidden = encoder(**encoded, output_hidden_states=True).hidden_states
        stacked = torch.stack(hidden).float()  # (layers + 1, batch, tokens, hidden)
        positions = range(encoded["input_ids"].shape[1])
        for row, index in enumerate(batch):
            first = word_predictions(encoded.word_ids(row), positions, len(sentences[index]))
            kept[index] = [word for word, position in enumerate(first) if position is not None]
            per_sentence[index] = stacked[:, row, [first[word] for word in kept[index]]]
    hidden_size = encoder.config.hidden_size
    empty = torch.zeros(len(hidden), 0, hidden_size)
    return torch.cat([empty, *(part for part in per_sentence if part is not None)], 1), kept


def standardized(train: torch.Tensor, dev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature sets scaled with the training words' mean and deviation per dimension, so
    every layer's probe trains at the same scale and learning rate."""
    mean, deviation = train.mean(0), train.std(0).clamp_min(1e-6)
    return (train - mean) / deviation, (dev - mean) / deviation


def train_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_labels: int,
    *,
    epochs: int,
    seed: int,
    learning_rate: float = 1e-3,
) -> torch.nn.Linear:
    """A multinomial logistic regression from `features` (words, hidden) to `labels` (words):
    zero-initialised (the loss is convex, so no initial draw), Adam on shuffled minibatches whose
    order `seed` fixes."""
    probe = torch.nn.Linear(features.shape[1], num_labels)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.Adam(probe.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(PROBE_BATCH):
            loss = torch.nn.functional.cross_entropy(probe(features[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return probe.eval()


def kept_tags(tags: Sequence[Sequence[int]], kept: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each sentence's tag ids of the words that have features (`first_subword_features`)."""
    return [[sentence[word] for word in words] for sentence, words in zip(tags, kept, strict=True)]


def score(card: Any, predicted: torch.Tensor, gold: Sequence[Sequence[int]]) -> dict[str, float]:
    """The card's dev metrics of flat word predictions against per-sentence gold tag ids, and
    `score`, its main metric (POS accuracy, chunk or entity F1)."""
    from mtnlp.metrics import compute_metrics, main_score

    names = [card.labels[tag] for tag in predicted.tolist()]
    predictions, references, start = [], [], 0
    for sentence in gold:
        predictions.append(names[start : start + len(sentence)])
        references.append([card.labels[tag] for tag in sentence])
        start += len(sentence)
    results = compute_metrics(card.metrics, predictions, references)
    return {"score": main_score(results, card.resolved_main_metric(), card.name), **results}


def probe_layers(
    cards: Sequence[Any],
    train: tuple[torch.Tensor, dict[str, list[list[int]]]],
    dev: tuple[torch.Tensor, dict[str, list[list[int]]]],
    *,
    epochs: int,
    seed: int,
    learning_rate: float,
) -> list[dict[str, Any]]:
    """Per layer, each card's dev scores of a probe trained on that layer's features.
    `train` and `dev`: features (layers + 1, words, hidden) and each card's kept tag ids."""
    (train_features, train_tags), (dev_features, dev_tags) = train, dev
    rows = []
    for layer in range(len(train_features)):
        train_x, dev_x = standardized(train_features[layer], dev_features[layer])
        row: dict[str, Any] = {"layer": layer}
        for card in cards:
            labels = torch.tensor([tag for tags in train_tags[card.name] for tag in tags])
            probe = train_probe(
                train_x, labels, len(card.labels), epochs=epochs, seed=seed,
                learning_rate=learning_rate,
            )  # fmt: skip
            with torch.no_grad():
                predicted = probe(dev_x).argmax(-1)
            row[card.name] = score(card, predicted, dev_tags[card.name])
        rows.append(row)
    return rows


def best_layers(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> dict[str, int]:
    """Per task, the layer whose probe scored best (the lowest such layer on a tie)."""
    return {
        task: max(rows, key=lambda row: (row[task]["score"], -row["layer"]))["layer"]
        for task in tasks
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--model", default="minilm", help="minilm, tiny, mini, base or a folder")
    cli.add_argument("--data-dir", type=Path, default=DATA_DIR, help="../shared/data or a folder")
    cli.add_argument("--train-sentences", type=int, default=2000, help="first N training ones")
    cli.add_argument("--dev-sentences", type=int, default=1000, help="first N dev ones")
    cli.add_argument("--epochs", type=int, default=30, help="probe epochs over the train words")
    cli.add_argument("--learning-rate", type=float, default=1e-3, help="the probes' Adam rate")
    cli.add_argument("--batch-size", type=int, default=64, help="sentences per encoder pass")
    cli.add_argument("--seed", type=int, default=42, help="the probes' minibatch order")
    cli.add_argument("--bf16", action="store_true", help="bf16 autocast of the encoder pass")
    options = cli.parse_args(argv)
    if options.quick:
        options.model, options.train_sentences, options.dev_sentences = "tiny", 100, 50
        options.epochs = 2
    options.mixed_precision = "bf16" if options.bf16 else "no"  # for setup() and the machine info
    setup(options)
    from transformers import AutoModel, AutoTokenizer

    from mtnlp.cards.load import load_card

    started = time.perf_counter()
    cards = [load_card(CONLL_CARDS / f"{task}.yaml") for task in TASKS]
    dirs = data_dirs(options.data_dir)
    counts = {
        cards[0].train_split: options.train_sentences,
        cards[0].eval_splits[0]: options.dev_sentences,
    }
    words = {split: read_sentences(cards, split, dirs, count) for split, count in counts.items()}
    read = time.perf_counter()
    features = {}
    with temporary_folder() as folder:
        model = encoder_folder(options.model, folder)
        tokenizer, encoder = AutoTokenizer.from_pretrained(model), AutoModel.from_pretrained(model)
        for split, (sentences, tags) in words.items():
            vectors, kept = first_subword_features(
                encoder, tokenizer, sentences, max_length=cards[0].max_length,
                batch_size=options.batch_size, bf16=options.bf16,
            )  # fmt: skip
            features[split] = (vectors, {task: kept_tags(tags[task], kept) for task in TASKS})
    encoded = time.perf_counter()
    train_split, dev_split = counts
    rows = probe_layers(
        cards, features[train_split], features[dev_split], epochs=options.epochs,
        seed=options.seed, learning_rate=options.learning_rate,
    )  # fmt: skip
    done = time.perf_counter()
    settings = {
        key: getattr(options, key)
        for key in ("model", "train_sentences", "dev_sentences", "epochs", "learning_rate")
    }
    settings.update(seed=options.seed, bf16=options.bf16, probe_batch=PROBE_BATCH)
    settings["words"] = {split: features[split][0].shape[1] for split in features}
    settings["words_without_features"] = {
        split: sum(map(len, sentences)) - features[split][0].shape[1]
        for split, (sentences, _) in words.items()
    }
    seconds = {"read": read - started, "encode": encoded - read, "probe": done - encoded}
    result = {
        "settings": settings,
        "main_metric": {card.name: card.resolved_main_metric() for card in cards},
        "layers": rows,
        "best_layer": best_layers(rows, TASKS),
        "seconds": {**seconds, "total": done - started},
    }
    return emit(result, options.output)


if __name__ == "__main__":
    main()
