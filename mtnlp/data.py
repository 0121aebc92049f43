"""From a task card to tokenized datasets and DataLoaders.

`load_raw` reads a card's splits from the Hub (`datasets.load_dataset(path, name)`) or from
local files under `--data-dir` (TSV/CSV/JSON through datasets' csv/json builders, CoNLL and
CoNLL-U through its conll builder), renaming file columns to the card's names.
`tokenize_task` encodes labels (checking each against the card) and tokenizes with `datasets.map`
(cached on disk). `make_dataloader` pads each batch dynamically.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
from datasets.exceptions import DatasetNotFoundError
from pandas.errors import ParserWarning
from torch.utils.data import DataLoader
from transformers import (
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from mtnlp.cards import LocalSource, TaskCard
from mtnlp.errors import UserError, first_line
from mtnlp.heads import HEADS, IGNORE_INDEX

if TYPE_CHECKING:
    from mtnlp.modeling import MultiTaskModel

logger = logging.getLogger(__name__)

CONLLU_COLUMNS = ["id", "form", "lemma", "upos", "xpos", "feats", "head", "deprel", "deps", "misc"]
MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")
MISSING = "the value is missing or null"


@dataclass
class TaskData:
    """A task's tokenized train split and dev splits (split name -> dataset)."""

    card: TaskCard
    train: datasets.Dataset | None
    evals: dict[str, datasets.Dataset] = field(default_factory=dict)


# ------------------------------------------------------------------------------ reading
def resolve_file(card: TaskCard, split: str, data_dirs: Sequence[Path]) -> Path:
    """The local file of `split`: the first `--data-dir` that holds the card's relative path.
    It must stay inside that folder once symbolic links are followed (cards refuse `..` and
    absolute paths already)."""
    relative = card.source.local.files[split]
    for folder in data_dirs:
        candidate = Path(folder) / relative
        if candidate.is_file():
            if not candidate.resolve().is_relative_to(Path(folder).resolve()):
                raise UserError(
                    f"{card.where}: source.local.files.{split}: {candidate} leads outside "
                    f"--data-dir {folder} (through a symbolic link); refusing to read it"
                )
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
            # rows longer than the header are an error (see _read_local_file), never an index
            "index_col": False,
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
        return "json", {"encoding": local.encoding}
    if local.format == "conllu":
        return "conll", {
            "column_names": CONLLU_COLUMNS,
            "delimiter": "\t",
            "comment_prefix": "#",
            "encoding": local.encoding,
        }
    return "conll", {"column_names": local.column_names, "encoding": local.encoding}


def clip(text: str, limit: int = 40) -> str:
    """`text`, cut to `limit` characters with an ellipsis: error messages quote a value from a
    data file only as far as it helps find it, never a whole (possibly private) row."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _no_content(error: BaseException) -> str:
    """A parser's error message safe to show: its first line, quoted text (which may be the
    file's content) replaced by '…', clipped; the line/row/position numbers it gives remain."""
    first = str(error).strip().split("\n", 1)[0] or type(error).__name__
    return clip(re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", first), 120)


def _undecodable_at(path: Path, encoding: str) -> tuple[int, int]:
    """(line, byte offset) of the first bytes of `path` that are not `encoding` text, both from
    the file's start: the readers decode in chunks and report offsets inside a chunk. Reads the
    whole file, so only for the error message."""
    data = path.read_bytes()
    try:
        data.decode(encoding)
    except UnicodeDecodeError as error:
        return data[: error.start].decode(encoding).count("\n") + 1, error.start
    raise ValueError(f"{path} is valid {encoding} text")  # the reader failed on other bytes


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _holds_no_rows(path: Path, local: LocalSource) -> bool:
    """True when a file has no data rows: empty, blank, or a header (comments in CoNLL) only."""
    with open(path, encoding=local.encoding, errors="replace") as file:
        lines = [line for line in file if line.strip()]
    if local.format in ("conll", "conllu"):
        lines = [line for line in lines if not line.startswith(("#", "-DOCSTART-"))]
    return len(lines) <= (1 if local.format in ("tsv", "csv") and local.header else 0)


def _read_local_file(card: TaskCard, path: Path, split: str, labels: bool) -> datasets.Dataset:
    local = card.source.local.for_split(split)
    try:
        builder, kwargs = _reader_kwargs(local, path)
        with warnings.catch_warnings():
            # pandas only warns when every row has more fields than the header names (it drops
            # the extra ones): the columns would hold the wrong fields
            warnings.simplefilter("error", ParserWarning)
            dataset = datasets.load_dataset(
                builder, data_files={"data": str(path)}, split="data", **kwargs
            )
    except Exception as error:  # datasets wraps parser errors in several types
        cause = _root_cause(error)
        if isinstance(cause, ParserWarning):
            names = "its header line" if local.header else "the card's column_names"
            reason = f"every row has more fields than {names} names; check the separator"
        elif isinstance(cause, UnicodeDecodeError):
            line, byte = _undecodable_at(path, local.encoding)
            reason = f"line {line}: not valid {local.encoding} text (byte {byte})"
        elif _holds_no_rows(path, local):  # the builders fail on an empty file
            reason = f"the {split} split of task {card.name} has no examples"
        else:
            reason = f"could not read as {local.format}: {_no_content(cause)}"
        raise UserError(f"{path}: {reason}") from None
    if local.format == "conllu":
        dataset = dataset.map(_drop_multiword_and_empty_nodes, desc=f"{card.name}: CoNLL-U words")
    renames = {
        file: ours
        for ours, file in local.columns.items()
        # a test file has no label column to rename
        if file != ours and (labels or ours != card.label_column or file in dataset.column_names)
    }
    missing = [file for file in renames if file not in dataset.column_names]
    if missing:
        raise UserError(
            f"{path}: column {missing[0]!r} (for {card.where} source.local.columns) not found; "
            f"columns: {_column_list(dataset)}"
        )
    return dataset.rename_columns(renames)


def _drop_multiword_and_empty_nodes(sentence: dict[str, list[str]]) -> dict[str, list[str]]:
    """CoNLL-U: keep word lines only (drop multi-word tokens `3-4` and empty nodes `8.1`)."""
    keep = [i for i, word_id in enumerate(sentence["id"]) if word_id.isdigit()]
    return {column: [values[i] for i in keep] for column, values in sentence.items()}


def load_raw(
    card: TaskCard,
    splits: Sequence[str],
    data_dirs: Sequence[Path] | None = None,
    *,
    labels: bool = True,
) -> dict[str, datasets.Dataset]:
    """The card's `splits`, untokenized, from local files when `data_dirs` is given (and the
    card has a local source), else from the Hub; `labels=False` reads splits that may have no
    label column (test sets)."""
    raw: dict[str, datasets.Dataset] = {}
    use_local = bool(data_dirs) and card.source.local is not None
    if not use_local and card.source.hub is None:
        raise UserError(f"{card.where}: source: no Hub dataset; pass --data-dir for local files")
    for split in splits:
        if use_local:
            path = resolve_file(card, split, data_dirs)
            dataset = _read_local_file(card, path, split, labels)
            where = str(path)
        else:
            hub = card.source.hub
            hub_split = hub.splits.get(split, split)
            dataset = _load_hub(card, hub_split)
            where = f"{hub.path}/{hub.name or ''}:{hub_split}"
        _check_columns(card, dataset, where, labels)
        if len(dataset) == 0:
            raise UserError(f"{where}: the {split} split of task {card.name} has no examples")
        raw[split] = dataset
    return raw


def _load_hub(card: TaskCard, split: str) -> datasets.Dataset:
    """One split of the card's Hub dataset; one line when the Hub cannot be reached (offline, no
    network) or has no such dataset, instead of datasets' traceback."""
    hub = card.source.hub
    named = f"{hub.path}, {hub.name}" if hub.name else hub.path
    try:
        return datasets.load_dataset(hub.path, hub.name, split=split)
    except DatasetNotFoundError as error:
        raise UserError(
            f"{card.where}: source.hub: no dataset {named} on the Hugging Face Hub "
            f"({first_line(error)})"
        ) from None
    except ConnectionError as error:  # datasets' words for offline mode and network failures
        offline = datasets.config.HF_HUB_OFFLINE or "OfflineModeIsEnabled" in str(error)
        reason = "offline" if offline else first_line(error)
        instead = (
            "pass --data-dir with local files"
            if card.source.local is not None
            else "give the card a source.local and pass --data-dir with local files"
        )
        raise UserError(
            f"{card.where}: the data comes from the Hugging Face Hub ({named}), which cannot be "
            f"reached ({reason}); {instead}"
        ) from None


def _check_columns(card: TaskCard, dataset: datasets.Dataset, where: str, labels: bool) -> None:
    for column in [*card.inputs, card.label_column] if labels else card.inputs:
        if column not in dataset.column_names:
            raise UserError(
                f"{where}: column {column!r} (named by {card.where}) not found; "
                f"columns: {_column_list(dataset)}"
            )


def _column_list(dataset: datasets.Dataset, most: int = 10) -> str:
    """The dataset's column names for an error message, each clipped, at most `most` of them
    (a file without the header its card expects has a data row as its column names)."""
    names = [clip(name) for name in dataset.column_names]
    more = f", … ({len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


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


def _row_place(where: str, index: int, local: LocalSource | None) -> str:
    """Where example `index` (0-based) is: `file: line N` in a local TSV/CSV file (its row) or
    CoNLL file (its sentence's first line), `source: example N` otherwise (Hub, JSON)."""
    if local is not None and local.format in ("tsv", "csv"):
        return f"{where}: line {index + (2 if local.header else 1)}"
    if local is not None and local.format in ("conll", "conllu"):
        stat = os.stat(where)
        lines = _sentence_lines(where, stat.st_mtime_ns, local.format == "conllu", local.encoding)
        return f"{where}: line {lines[index]}"
    return f"{where}: example {index + 1}"


@functools.lru_cache(maxsize=8)
def _sentence_lines(path: str, mtime_ns: int, comments: bool, encoding: str) -> list[int]:
    """The line (1-based) where each sentence of a CoNLL file starts, split as datasets' conll
    builder splits it: blank lines end a sentence; -DOCSTART- and `#` comment lines are skipped."""
    starts, in_sentence = [], False
    with open(path, encoding=encoding) as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                in_sentence = False
            elif not (line.startswith("-DOCSTART-") or (comments and line.startswith("#"))):
                if not in_sentence:
                    starts.append(number)
                in_sentence = True
    return starts


def encode_label(card: TaskCard, value: Any, place: str) -> Any:
    """The label id(s) or float target of one example; a bad value raises a `UserError`."""
    if value is None:  # a JSON null or missing key, a Hub dataset's missing value
        raise UserError(f"{place}: {card.label_column}: {MISSING}")
    if card.type == "regression":
        try:
            target = float(value)
        except (TypeError, ValueError):
            raise UserError(
                f"{place}: {card.label_column}: {clip(repr(value))} is not a number"
            ) from None
        if not math.isfinite(target):  # a NaN/inf target makes every loss it touches NaN/inf
            raise UserError(
                f"{place}: {card.label_column}: {clip(repr(value))} is not a finite number"
            )
        return target
    if HEADS.get(card.type).token_level:
        ids = [label_to_id(tag, card.labels) for tag in value]
        if None in ids:
            bad = value[ids.index(None)]
            raise UserError(
                f"{place}: {card.label_column}: tag {clip(repr(bad))} is not in the card's labels"
            )
        return ids
    label = label_to_id(value, card.labels)
    if label is None:
        raise UserError(
            f"{place}: {card.label_column}: {clip(repr(value))} is not one of the card's labels "
            f"({', '.join(card.labels)})"
        )
    return label


# ------------------------------------------------------------------------------ tokenizing
def align_labels(
    word_ids: Sequence[int | None], word_labels: Sequence[int], all_subtokens: bool
) -> list[int]:
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


def word_predictions(
    word_ids: Sequence[int | None], predicted: Sequence[Any], num_words: int
) -> list:
    """Per-token predictions -> one per word, read at each word's first sub-token (the inverse of
    `align_labels`); a word cut off by truncation gets None."""
    words: list = [None] * num_words
    for word, value in zip(word_ids, predicted, strict=True):
        if word is not None and words[word] is None:
            words[word] = value
    return words


def predict_tags(
    model: MultiTaskModel,
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[str | Sequence[str]],
    tasks: Sequence[str] | None = None,
) -> list[dict[str, list[str | None]]]:
    """Tag names per word of raw sentences for every tagging task (or `tasks`), one encoder pass.

    A sentence is a string (split on whitespace) or a list of words. Returns, per sentence,
    task -> one tag per word (None for words beyond the encoder's maximum length).
    """
    import torch

    words = [s.split() if isinstance(s, str) else list(s) for s in sentences]
    if tasks is None:
        tasks = [t["name"] for t in model.config.tasks if HEADS.get(t["type"]).token_level]
    encoded = tokenizer(
        words, is_split_into_words=True, truncation=True, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        outputs = model.forward_tasks(list(tasks), **encoded.to(model.device))
    results: list[dict[str, list[str | None]]] = [{} for _ in words]
    for task in tasks:
        labels = model.config.task(task)["labels"]
        predicted = model.heads[task].decode(outputs[task].logits).tolist()  # (batch, tokens)
        for i, sentence in enumerate(words):
            ids = word_predictions(encoded.word_ids(i), predicted[i], len(sentence))
            results[i][task] = [None if tag is None else labels[tag] for tag in ids]
    return results


def _is_text(value: Any, words: bool) -> bool:
    """A string, or for tagging a list of word strings: what a tokenizer can encode."""
    if words:
        return isinstance(value, list) and all(isinstance(word, str) for word in value)
    return isinstance(value, str)


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
        for column, values in zip(card.inputs, texts, strict=True):  # e.g. a JSON null or number
            for value, index in zip(values, indices, strict=True):
                if not _is_text(value, token_level):
                    place = _row_place(where, index, local)
                    problem = MISSING if value is None else f"{clip(repr(value))} is not text"
                    raise UserError(f"{place}: {column}: {problem}")
        if token_level:
            for words, tags, index in zip(
                batch[card.inputs[0]], batch[card.label_column], indices, strict=True
            ):
                if len(words) != len(tags) or "" in tags:
                    raise UserError(
                        f"{_row_place(where, index, local)}: {card.label_column}: "
                        f"{sum(1 for tag in tags if tag != '')} tags for {len(words)} tokens"
                    )
        encoded = tokenizer(
            *texts,
            truncation=True,
            max_length=card.max_length,
            is_split_into_words=token_level,
        )
        labels = [
            encode_label(card, value, _row_place(where, index, local))
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
        cause = _root_cause(error)
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
    caps = {
        card.train_split: max_train_samples,
        **dict.fromkeys(card.eval_splits, max_eval_samples),
    }
    tokenized = {}
    for split, dataset in raw.items():
        cap = caps[split]
        if cap is not None and cap < len(dataset):
            dataset = dataset.select(range(cap))
        where = _describe_source(card, split, data_dirs)
        # dev splits label first sub-tokens only, so tagging metrics count every word once
        all_subtokens = label_all_subtokens and split == card.train_split
        tokenized[split] = tokenize_task(card, tokenizer, dataset, where, all_subtokens, split)
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
    group_by_length: bool = False,
) -> DataLoader:
    """Batches padded to their longest example; shuffled with a generator seeded by `seed`.

    `group_by_length` (training only, with `shuffle`) draws batches of similar lengths, so little
    of each batch is padding: transformers' `LengthGroupedSampler` shuffles the examples, cuts
    them into mega-batches of up to 50 batches and sorts each mega-batch by length. The sampler
    shares the loader's generator, so a resumed run replays the same order.
    """
    import torch

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    sampler = None
    if group_by_length:
        if not shuffle:
            raise ValueError("group_by_length needs shuffle=True (it is a training sampler)")
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sizes = example_lengths(dataset)
        sampler = LengthGroupedSampler(batch_size, lengths=sizes, generator=generator)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        collate_fn=make_collator(card, tokenizer),
    )


def example_lengths(dataset: datasets.Dataset) -> list[int]:
    """Tokens per example (read from the Arrow column, without decoding the token ids)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()
