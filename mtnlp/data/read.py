"""Reading a card's data: local files (tsv, csv, json, conll, conllu, parquet, arrow, or a
`Dataset.save_to_disk` folder) inside `--data-dir`, or a Hub dataset, through `datasets`
builders; errors name the file, never its content.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets.exceptions import DatasetNotFoundError
from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
from pandas.errors import ParserWarning

from mtnlp.cards.schema import TYPED_FORMATS, LocalSource, TaskCard, shown
from mtnlp.utils.errors import UserError, first_line
from mtnlp.utils.untrusted import clip

CONLLU_COLUMNS = ["id", "form", "lemma", "upos", "xpos", "feats", "head", "deprel", "deps", "misc"]


SAVED_STATE, SAVED_SPLITS = "state.json", "dataset_dict.json"  # what save_to_disk writes


def resolve_file(card: TaskCard, split: str, data_dirs: Sequence[Path]) -> Path:
    """The local file of `split` (format save_to_disk: its folder): the first `--data-dir` that
    holds the card's relative path. It, and a folder's files, must stay inside that folder once
    symbolic links are followed (cards refuse `..` and absolute paths already)."""
    local = card.source.local
    relative, folder_format = local.files[split], local.format == "save_to_disk"
    kind = "folder" if folder_format else "file"
    for folder in data_dirs:
        candidate = Path(folder) / relative
        if candidate.exists() and candidate.is_dir() != folder_format:
            instead = (
                "a file, and format 'save_to_disk' reads the folder Dataset.save_to_disk writes "
                "(one .arrow file is format 'arrow')"
                if folder_format
                else f"a folder, and format {local.format!r} reads a file (a folder written by "
                "Dataset.save_to_disk is format 'save_to_disk')"
            )
            raise UserError(f"{card.where}: source.local.files.{split}: {candidate} is {instead}")
        if candidate.exists():
            inside = [candidate, *candidate.iterdir()] if folder_format else [candidate]
            if not all(p.resolve().is_relative_to(Path(folder).resolve()) for p in inside):
                raise UserError(
                    f"{card.where}: source.local.files.{split}: {candidate} leads outside "
                    f"--data-dir {folder} (through a symbolic link); refusing to read it"
                )
            return candidate
    looked = ", ".join(str(folder) for folder in data_dirs)
    raise UserError(f"{card.where}: {split} data {kind} not found: {relative} (looked in {looked})")


def _saved_files(path: Path) -> list[str]:
    """The Arrow files of a `Dataset.save_to_disk` folder, in order (as its state.json lists
    them). Read through datasets' arrow builder, like any local file, so that tokenizing never
    writes cache files into the data folder (a dataset from `load_from_disk` would)."""
    if (path / SAVED_SPLITS).is_file():
        splits = [p.name for p in sorted(path.iterdir()) if (p / SAVED_STATE).is_file()]
        raise UserError(
            f"{path}: a DatasetDict folder (splits {', '.join(splits)}); give each split's "
            f"folder in files, e.g. {path.name}/{splits[0] if splits else 'train'}"
        )
    try:
        state = json.loads((path / SAVED_STATE).read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{path}: not a folder written by Dataset.save_to_disk (no readable {SAVED_STATE})"
        ) from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not (path / name).is_file():
            raise UserError(f"{path}: {SAVED_STATE} lists a data file that is not in the folder")
    return [str(path / name) for name in names]


def _reader_kwargs(local: LocalSource, path: Path) -> tuple[str, dict[str, Any]]:
    """datasets builder name and options for a local format."""
    if local.format in ("tsv", "csv"):
        sep = "\t" if local.format == "tsv" else ","
        names = local.column_names
        if local.header:
            with open(path, encoding=local.encoding) as file:
                names = next(csv.reader([file.readline().rstrip("\n")], delimiter=sep))
            twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
            if twice is not None:  # pandas would rename the second one `name.1`
                raise UserError(
                    f"{path}: line 1: column {clip(twice)!r} appears twice in the header"
                )
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
    if local.format in TYPED_FORMATS:  # a save_to_disk folder holds Arrow files
        return ("parquet" if local.format == "parquet" else "arrow"), {}
    if local.format == "conllu":
        return "conll", {
            "column_names": CONLLU_COLUMNS,
            "delimiter": "\t",
            "comment_prefix": "#",
            "encoding": local.encoding,
        }
    return "conll", {"column_names": local.column_names, "encoding": local.encoding}


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


def _decodes(path: Path, encoding: str) -> bool | None:
    """Whether `path` is `encoding` text throughout (None when it cannot be read): a reader's
    UnicodeDecodeError on a file that decodes whole had another reason, which the error keeps."""
    try:
        path.read_bytes().decode(encoding)
    except UnicodeDecodeError:
        return False
    except (OSError, LookupError):
        return None
    return True


def _check_conll_columns(path: Path, local: LocalSource) -> None:
    """A CoNLL line with more columns than the card names is refused (the builder would drop the
    extra ones silently, and a tag would become a word's)."""
    conllu = local.format == "conllu"
    names = CONLLU_COLUMNS if conllu else local.column_names
    where = "CoNLL-U's ten columns" if conllu else "source.local.column_names"
    with open(path, encoding=local.encoding, errors="replace") as file:
        for number, raw in enumerate(file, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip() or line.startswith("-DOCSTART-") or (conllu and line[0] == "#"):
                continue
            fields = line.split("\t") if conllu else line.split()
            if len(fields) > len(names):
                raise UserError(
                    f"{path}: line {number}: {len(fields)} columns, but the card names "
                    f"{len(names)} ({where}: {', '.join(names)})"
                )


def root_cause(error: BaseException) -> BaseException:
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
    files = _saved_files(path) if local.format == "save_to_disk" else [str(path)]
    if local.format in ("conll", "conllu"):
        _check_conll_columns(path, local)
    try:
        builder, kwargs = _reader_kwargs(local, path)
        with warnings.catch_warnings():
            # pandas only warns when every row has more fields than the header names (it drops
            # the extra ones): the columns would hold the wrong fields
            warnings.simplefilter("error", ParserWarning)
            dataset = datasets.load_dataset(
                builder, data_files={"data": files}, split="data", **kwargs
            )
    except UserError:  # our own check (a duplicated header column): its reason as it is
        raise
    except Exception as error:  # datasets wraps parser errors in several types
        cause = root_cause(error)
        if isinstance(cause, ParserWarning):
            names = "its header line" if local.header else "the card's column_names"
            reason = f"every row has more fields than {names} names; check the separator"
        elif isinstance(cause, UnicodeDecodeError) and _decodes(path, local.encoding) is False:
            line, byte = _undecodable_at(path, local.encoding)
            reason = f"line {line}: not valid {local.encoding} text (byte {byte})"
        # the builders fail on an empty text file
        elif local.format not in TYPED_FORMATS and _holds_no_rows(path, local):
            reason = f"the {split} split of task {card.name} has no examples"
        else:
            reason = f"could not read as {local.format}: {_no_content(cause)}"
        raise UserError(f"{path}: {reason}") from cause  # the parser's own error stays its cause
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
    for split in splits:
        dataset, where = read_split(card, split, data_dirs, labels=labels)
        problems = split_problems(card, dataset, where, split, labels)
        if problems:  # the first; `mtnlp cards check --data-dir` lists them all
            raise UserError(problems[0])
        raw[split] = dataset
    return raw


def read_split(
    card: TaskCard,
    split: str,
    data_dirs: Sequence[Path] | None = None,
    *,
    labels: bool = True,
) -> tuple[datasets.Dataset, str]:
    """One split of the card as `load_raw` reads it, not yet checked (`split_problems`), and
    where it was read from (the file, or the Hub dataset and split)."""
    if data_dirs and card.source.local is not None:
        path = resolve_file(card, split, data_dirs)
        return _read_local_file(card, path, split, labels), str(path)
    hub = card.source.hub
    if hub is None:
        raise UserError(f"{card.where}: source: no Hub dataset; pass --data-dir for local files")
    hub_split = hub.splits.get(split, split)
    return _load_hub(card, hub_split), f"{hub.path}/{hub.name or ''}:{hub_split}"


def split_problems(
    card: TaskCard, dataset: datasets.Dataset, where: str, split: str, labels: bool
) -> list[str]:
    """What makes a split unusable for its card, one line each: a column the card reads that is
    not in the data (after `columns` renames it; the label column only with `labels`), no
    examples."""
    problems = [
        f"{where}: column {column!r} (named by {card.where}) not found; "
        f"columns: {_column_list(dataset)}"
        for column in ([*card.inputs, card.label_column] if labels else card.inputs)
        if column not in dataset.column_names
    ]
    if len(dataset) == 0:
        problems.append(f"{where}: the {split} split of task {card.name} has no examples")
    return problems


def _load_hub(card: TaskCard, split: str) -> datasets.Dataset:
    """One split of the card's Hub dataset; one line when the Hub cannot be reached (offline, no
    network) or has no such dataset, instead of datasets' traceback."""
    hub = card.source.hub
    _check_not_local(card)
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


def _check_not_local(card: TaskCard) -> None:
    """Refuse a Hub id that `datasets.load_dataset` would read locally instead: a file or folder
    of that name in the working folder (`./nyu-mll/glue`), or one of its file builders (`json`
    reads the working folder's files). Cards refuse local paths already; this is the check at
    the point of reading."""
    path = card.source.hub.path
    if path in _PACKAGED_DATASETS_MODULES:
        reason = f"is datasets' {path} builder, which reads files of the working folder"
    elif os.path.lexists(path):
        reason = f"is also a local path in the working folder {Path.cwd()}, which datasets reads"
    else:
        return
    raise UserError(
        f"{card.where}: source.hub.path: {shown(path)} {reason} instead of the Hub; read local "
        "files through source.local with --data-dir"
    )


def _column_list(dataset: datasets.Dataset, most: int = 10) -> str:
    """The dataset's column names for an error message, each clipped, at most `most` of them
    (a file without the header its card expects has a data row as its column names)."""
    names = [clip(name) for name in dataset.column_names]
    more = f", … ({len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def describe_source(card: TaskCard, split: str, data_dirs: Sequence[Path] | None) -> str:
    if data_dirs and card.source.local is not None:
        return str(resolve_file(card, split, data_dirs))
    return f"{card.source.hub.path}:{split}"


def training_text(cards: Sequence[TaskCard], data_dirs: Sequence[Path] | None) -> Iterator[str]:
    for card in cards:
        train = load_raw(card, [card.train_split], data_dirs)[card.train_split]
        for column in card.inputs:
            for value in train[column]:  # not text (a JSON null): tokenize_task says where
                if isinstance(value, list):
                    yield " ".join(word for word in value if isinstance(word, str))
                elif isinstance(value, str):
                    yield value
