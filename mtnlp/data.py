"""From a task card to tokenized datasets and DataLoaders.

`load_raw` reads a card's splits from the Hub (`datasets.load_dataset(path, name)`) or from
local files under `--data-dir` (TSV/CSV/JSON through datasets' csv/json builders, CoNLL and
CoNLL-U through its conll builder), renaming file columns to the card's names.
`tokenize_task` encodes labels (checking each against the card) and tokenizes with `datasets.map`
(cached on disk). `make_dataloader` pads each batch dynamically.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from torch.utils.data import DataLoader
from transformers import (
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from mtnlp.cards import LocalSource, TaskCard
from mtnlp.errors import UserError
from mtnlp.heads import HEADS, IGNORE_INDEX

logger = logging.getLogger(__name__)

CONLLU_COLUMNS = ["id", "form", "lemma", "upos", "xpos", "feats", "head", "deprel", "deps", "misc"]
MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")


@dataclass
class TaskData:
    """A task's tokenized train split and dev splits (split name -> dataset)."""

    card: TaskCard
    train: datasets.Dataset | None
    evals: dict[str, datasets.Dataset] = field(default_factory=dict)


# ------------------------------------------------------------------------------ reading
def resolve_file(card: TaskCard, split: str, data_dirs: Sequence[Path]) -> Path:
    """The local file of `split`: the first `--data-dir` that holds the card's relative path."""
    relative = card.source.local.files[split]
    for folder in data_dirs:
        candidate = Path(folder) / relative
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(folder) for folder in data_dirs)
    raise UserError(f"{card.where}: {split} data file not found: {relative} (looked in {looked})")


def _reader_kwargs(local: LocalSource, path: Path) -> tuple[str, dict[str, Any]]:
    """datasets builder name and options for a local format."""
    if local.format in ("tsv", "csv"):
        sep = "\t" if local.format == "tsv" else ","
        names = local.column_names
        if local.header:
            with open(path, encoding=local.encoding) as file:
                names = next(csv.reader([file.readline().rstrip("\n")], delimiter=sep))
        kwargs: dict[str, Any] = {
            "sep": sep,
            "keep_default_na": False,
            "encoding": local.encoding,
            # every column as text, so that type inference never differs between chunks
            "features": datasets.Features({name: datasets.Value("string") for name in names}),
        }
        if local.format == "tsv":
            kwargs["quoting"] = csv.QUOTE_NONE  # GLUE rows hold unbalanced quotes
        if not local.header:
            kwargs["header"] = None
            kwargs["column_names"] = names
        return "csv", kwargs
    if local.format == "json":
        return "json", {}
    if local.format == "conllu":
        return "conll", {"column_names": CONLLU_COLUMNS, "delimiter": "\t", "comment_prefix": "#"}
    return "conll", {"column_names": local.column_names}


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _read_local_file(card: TaskCard, path: Path) -> datasets.Dataset:
    try:
        builder, kwargs = _reader_kwargs(card.source.local, path)
        dataset = datasets.load_dataset(builder, data_files={"data": str(path)}, split="data", **kwargs)
    except Exception as error:  # datasets wraps parser errors in several types
        cause = _root_cause(error)
        if isinstance(cause, UnicodeDecodeError):
            reason = f"not valid {card.source.local.encoding} text (byte {cause.start})"
        else:
            reason = f"could not read as {card.source.local.format}: {cause}"
        raise UserError(f"{path}: {reason}") from None
    if card.source.local.format == "conllu":
        dataset = dataset.map(_drop_multiword_and_empty_nodes, desc=f"{card.name}: CoNLL-U words")
    renames = {file: ours for ours, file in card.source.local.columns.items() if file != ours}
    missing = [file for file in renames if file not in dataset.column_names]
    if missing:
        raise UserError(
            f"{path}: column {missing[0]!r} (for {card.where} source.local.columns) not found; "
            f"columns: {', '.join(dataset.column_names)}"
        )
    return dataset.rename_columns(renames)


def _drop_multiword_and_empty_nodes(sentence: dict[str, list[str]]) -> dict[str, list[str]]:
    """CoNLL-U: keep word lines only (drop multi-word tokens `3-4` and empty nodes `8.1`)."""
    keep = [i for i, word_id in enumerate(sentence["id"]) if word_id.isdigit()]
    return {column: [values[i] for i in keep] for column, values in sentence.items()}


def load_raw(
    card: TaskCard, splits: Sequence[str], data_dirs: Sequence[Path] | None = None
) -> dict[str, datasets.Dataset]:
    """The card's `splits`, untokenized, from local files when `data_dirs` is given (and the
    card has a local source), else from the Hub."""
    raw: dict[str, datasets.Dataset] = {}
    use_local = bool(data_dirs) and card.source.local is not None
    if not use_local and card.source.hub is None:
        raise UserError(f"{card.where}: source: no Hub dataset; pass --data-dir for local files")
    for split in splits:
        if use_local:
            path = resolve_file(card, split, data_dirs)
            dataset = _read_local_file(card, path)
            where = str(path)
        else:
            hub = card.source.hub
            hub_split = hub.splits.get(split, split)
            dataset = datasets.load_dataset(hub.path, hub.name, split=hub_split)
            where = f"{hub.path}/{hub.name or ''}:{hub_split}"
        _check_columns(card, dataset, where)
        if len(dataset) == 0:
            raise UserError(f"{where}: the {split} split of task {card.name} has no examples")
        raw[split] = dataset
    return raw


def _check_columns(card: TaskCard, dataset: datasets.Dataset, where: str) -> None:
    for column in [*card.inputs, card.label_column]:
        if column not in dataset.column_names:
            raise UserError(
                f"{where}: column {column!r} (named by {card.where}) not found; "
                f"columns: {', '.join(dataset.column_names)}"
            )


# ------------------------------------------------------------------------------ labels
def label_to_id(value: Any, labels: list[str]) -> int | None:
    """A label name, or an index into the label list (int or digit string); None if neither."""
    if isinstance(value, str):
        if value in labels:
            return labels.index(value)
        value = value.strip()
        if value.lstrip("-").isdigit():
            value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    return None


def _row_place(where: str, index: int, header: bool) -> str:
    """`file: line N` for a TSV/CSV row (1-based data row index), `file: example N` otherwise."""
    if where.endswith((".tsv", ".csv")):
        return f"{where}: line {index + (2 if header else 1)}"
    return f"{where}: example {index + 1}"


def encode_label(card: TaskCard, value: Any, place: str) -> Any:
    """The label id(s) or float target of one example; a bad value raises a `UserError`."""
    if card.type == "regression":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{place}: {card.label_column}: {value!r} is not a number") from None
    if HEADS.get(card.type).token_level:
        ids = [label_to_id(tag, card.labels) for tag in value]
        if None in ids:
            bad = value[ids.index(None)]
            raise UserError(f"{place}: {card.label_column}: tag {bad!r} is not in the card's labels")
        return ids
    label = label_to_id(value, card.labels)
    if label is None:
        raise UserError(
            f"{place}: {card.label_column}: {value!r} is not one of the card's labels "
            f"({', '.join(card.labels)})"
        )
    return label


# ------------------------------------------------------------------------------ tokenizing
def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int], all_subtokens: bool) -> list[int]:
    """Word-level label ids -> one id per sub-token.

    The first sub-token of a word gets its label; later sub-tokens get the label too when
    `all_subtokens`, else IGNORE_INDEX; special tokens always get IGNORE_INDEX.
    """
    aligned, previous = [], None
    for word in word_ids:
        if word is None:
            aligned.append(IGNORE_INDEX)
        elif word != previous or all_subtokens:
            aligned.append(word_labels[word])
        else:
            aligned.append(IGNORE_INDEX)
        previous = word
    return aligned


def tokenize_task(
    card: TaskCard,
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset,
    where: str,
    label_all_subtokens: bool = False,
) -> datasets.Dataset:
    """Labels encoded and checked, inputs tokenized (truncated to the card's `max_length`)."""
    token_level = HEADS.get(card.type).token_level
    header = card.source.local.header if card.source.local is not None else True

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        texts = [batch[column] for column in card.inputs]
        if token_level:
            for words, tags, index in zip(batch[card.inputs[0]], batch[card.label_column], indices):
                if len(words) != len(tags) or "" in tags:
                    raise UserError(
                        f"{_row_place(where, index, header)}: {len(words)} tokens but "
                        f"{sum(1 for tag in tags if tag != '')} {card.label_column} tags"
                    )
        encoded = tokenizer(
            *texts,
            truncation=True,
            max_length=card.max_length,
            is_split_into_words=token_level,
        )
        labels = [
            encode_label(card, value, _row_place(where, index, header))
            for value, index in zip(batch[card.label_column], indices)
        ]
        if token_level:
            labels = [
                align_labels(encoded.word_ids(i), word_labels, label_all_subtokens)
                for i, word_labels in enumerate(labels)
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
        cause = _root_cause(error)
        if isinstance(cause, UserError):
            raise cause from None
        raise
    keep = [column for column in tokenized.column_names if column in MODEL_COLUMNS]
    return tokenized.select_columns(keep)


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
    """Read, cap and tokenize the train split (when `train`) and every dev split of a card."""
    splits = ([card.train_split] if train else []) + list(card.eval_splits)
    raw = load_raw(card, splits, data_dirs)
    caps = {card.train_split: max_train_samples, **dict.fromkeys(card.eval_splits, max_eval_samples)}
    tokenized = {}
    for split, dataset in raw.items():
        cap = caps[split]
        if cap is not None and cap < len(dataset):
            dataset = dataset.select(range(cap))
        where = _describe_source(card, split, data_dirs)
        tokenized[split] = tokenize_task(card, tokenizer, dataset, where, label_all_subtokens)
    return TaskData(
        card=card,
        train=tokenized.get(card.train_split) if train else None,
        evals={split: tokenized[split] for split in card.eval_splits},
    )


def _describe_source(card: TaskCard, split: str, data_dirs: Sequence[Path] | None) -> str:
    if data_dirs and card.source.local is not None:
        return str(resolve_file(card, split, data_dirs))
    return f"{card.source.hub.path}:{split}"


# ------------------------------------------------------------------------------ batching
def make_collator(card: TaskCard, tokenizer: PreTrainedTokenizerBase):
    """Dynamic padding to the longest example of each batch (tags padded with IGNORE_INDEX)."""
    if HEADS.get(card.type).token_level:
        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)
    return DataCollatorWithPadding(tokenizer)


def make_dataloader(
    card: TaskCard,
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
) -> DataLoader:
    import torch

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=make_collator(card, tokenizer),
    )
