"""A card's data tokenized for training and evaluation (label checks, word/sub-word
alignment; `datasets.map`, cached).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from mtnlp.cards.schema import TaskCard
from mtnlp.data.labels import MISSING, encode_label, number_of, row_place
from mtnlp.data.read import describe_source, load_raw, root_cause
from mtnlp.data.words import align_labels
from mtnlp.modeling.heads import HEADS
from mtnlp.utils.errors import UserError
from mtnlp.utils.untrusted import clip

logger = logging.getLogger(__name__)


MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")


@dataclass
class TaskData:
    """A task's tokenized train split and dev splits (split name -> dataset)."""

    card: TaskCard
    train: datasets.Dataset | None
    evals: dict[str, datasets.Dataset] = field(default_factory=dict)


def _is_text(value: Any, words: bool) -> bool:
    """A string, or for tagging a list of word strings: what a tokenizer can encode."""
    if words:
        return isinstance(value, list) and all(isinstance(word, str) for word in value)
    return isinstance(value, str)


def row_problem(card: TaskCard, row: Mapping[str, Any], labelled: bool = True) -> str | None:
    """What training refuses in one row before tokenizing it, as `column: problem`, or None: an
    input that is not text (a JSON null or number) and, for tagging, not one tag per token.
    Label values themselves are checked by `encode_label`."""
    words = HEADS.get(card.type).token_level
    for column in card.inputs:
        value = row[column]
        if not _is_text(value, words):
            return f"{column}: {MISSING if value is None else f'{clip(repr(value))} is not text'}"
    tags = row[card.label_column] if labelled and words else None
    tokens = row[card.inputs[0]]
    if tags is not None and (len(tags) != len(tokens) or "" in tags):
        count = sum(1 for tag in tags if tag != "")
        return f"{card.label_column}: {count} tags for {len(tokens)} tokens"
    return None


def tokenize_task(
    card: TaskCard,
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset,
    where: str,
    label_all_subtokens: bool = False,
    split: str = "",
) -> datasets.Dataset:
    """Labels encoded and checked, inputs tokenized (truncated to the card's `max_length`);
    `split` names the split whose file options (header) number the lines in errors."""
    token_level = HEADS.get(card.type).token_level
    from_file = Path(where).is_file()  # else read from the Hub
    local = card.source.local.for_split(split) if from_file else None

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        texts = [batch[column] for column in card.inputs]
        for offset, index in enumerate(indices):
            row = {column: batch[column][offset] for column in (*card.inputs, card.label_column)}
            problem = row_problem(card, row)
            if problem is not None:
                raise UserError(f"{row_place(where, index, local)}: {problem}")
        encoded = tokenizer(
            *texts,
            truncation=True,
            max_length=card.max_length,
            is_split_into_words=token_level,
        )
        labels = [
            encode_label(card, value, row_place(where, index, local))
            for value, index in zip(batch[card.label_column], indices, strict=True)
        ]
        if token_level:
            labels = [
                align_labels(encoded.word_ids(i), word_labels, label_all_subtokens)
                for i, word_labels in enumerate(labels)
            ]
            encoded["truncated_words"] = [
                len(words) - len(set(encoded.word_ids(i)) - {None})
                for i, words in enumerate(batch[card.inputs[0]])
            ]
        encoded["labels"] = labels
        return encoded

    try:
        tokenized = dataset.map(
            encode,
            batched=True,
            with_indices=True,
            remove_columns=dataset.column_names,
            desc=f"Tokenizing {card.name}",
        )
    except UserError:
        raise
    except Exception as error:
        cause = root_cause(error)
        if isinstance(cause, UserError):
            raise cause from None
        raise
    if token_level:
        warn_truncated(card, where, tokenized["truncated_words"])
    keep = [column for column in tokenized.column_names if column in MODEL_COLUMNS]
    return tokenized.select_columns(keep)


def warn_truncated(card: TaskCard, where: str, truncated_words: Sequence[int]) -> int:
    """Log how many sentences lost words to `max_length` (those words get no label and are left
    out of training and of the dev metrics); return the number of words lost."""
    lost = [count for count in truncated_words if count > 0]
    if lost:
        logger.warning(
            "%s: %d of %d sentences are longer than max_length=%d tokens; their last %d words get "
            "no label (raise max_length in %s to keep them)",
            where, len(lost), len(truncated_words), card.max_length, sum(lost), card.where,
        )  # fmt: skip
    return sum(lost)


def with_training_range(
    card: TaskCard, dataset: datasets.Dataset, data_dirs: Sequence[Path] | None
) -> TaskCard:
    """`card` (derived as bins) with `derive.range` [lowest, highest] of the training split's
    values; a `UserError` when they are all the same (no bins to learn)."""
    split = card.train_split
    where = describe_source(card, split, data_dirs)
    local = card.source.local.for_split(split) if Path(where).is_file() else None
    values = []
    for index, value in enumerate(dataset[card.label_column]):
        try:
            values.append(number_of(card, value, ""))
        except UserError:  # the row's place, found only for a bad value (it reads the file)
            number_of(card, value, row_place(where, index, local))
    if not values or min(values) == max(values):
        raise UserError(
            f"{card.where}: derive.range: the {split} split has no two different values to "
            "bin; give derive.range [low, high]"
        )
    return card.replace(derive={**card.derive.model_dump(), "range": [min(values), max(values)]})


def load_task(
    card: TaskCard,
    tokenizer: PreTrainedTokenizerBase,
    data_dirs: Sequence[Path] | None = None,
    *,
    train: bool = True,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    label_all_subtokens: bool = False,
) -> TaskData:
    """Read, cap and tokenize the train split (when `train`) and every dev split of a card. A
    task derived as bins without `derive.range` gets the training split's lowest and highest
    value as its range (read for that even when not `train`; `TaskData.card` holds it)."""
    needs_range = card.derive is not None and card.derive.kind == "bins" and not card.derive.range
    splits = ([card.train_split] if train or needs_range else []) + list(card.eval_splits)
    raw = load_raw(card, splits, data_dirs)
    if needs_range:
        card = with_training_range(card, raw[card.train_split], data_dirs)
        if not train and card.train_split not in card.eval_splits:
            del raw[card.train_split]
    caps = {
        card.train_split: max_train_samples,
        **dict.fromkeys(card.eval_splits, max_eval_samples),
    }
    tokenized = {}
    for split, dataset in raw.items():
        cap = caps[split]
        if cap is not None and cap < len(dataset):
            dataset = dataset.select(range(cap))
        where = describe_source(card, split, data_dirs)
        # dev splits label first sub-tokens only, so tagging metrics count every word once
        all_subtokens = label_all_subtokens and split == card.train_split
        tokenized[split] = tokenize_task(card, tokenizer, dataset, where, all_subtokens, split)
    return TaskData(
        card=card,
        train=tokenized.get(card.train_split) if train else None,
        evals={split: tokenized[split] for split in card.eval_splits},
    )
