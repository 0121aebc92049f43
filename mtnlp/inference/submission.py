"""`mtnlp predict MODEL --split test`: a split of the cards' data into one prediction file
per task (the cards' `submission`: GLUE's format).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtnlp.cards.schema import TaskCard
from mtnlp.inference.pipeline import Example, MultiTaskPipeline
from mtnlp.inference.rows import as_text, kind
from mtnlp.utils.errors import UserError
from mtnlp.utils.files import writable_output_dir


def check_cards_fit(cards: Sequence[TaskCard], model: str, config: Any) -> None:
    """Every card must be a task of the model, with the labels it learned."""
    for card in cards:
        if card.name not in config.task_names:
            raise UserError(f"{card.where}: task {card.name} is not a task of {model}")
        if card.labels != config.task(card.name).get("labels"):
            raise UserError(f"{card.where}: labels: differ from the labels {model} learned")


def card_splits(card: TaskCard, name: str, local: bool) -> list[str]:
    """The splits of a card that `--split NAME` predicts: NAME, or, for a card without a split
    NAME, its splits NAME_* (MNLI's test_matched and test_mismatched). From local files
    (`local`) the card must name them in `source.local.files`."""
    if local:
        known = set(card.source.local.files)
    else:  # the Hub's splits are unknown offline: the ones the card names
        hub = card.source.hub.splits if card.source.hub is not None else {}
        known = {*card.submission.files, *hub, card.train_split, *card.eval_splits}
    if name in known:
        return [name]
    prefixed = sorted(split for split in known if split.startswith(f"{name}_"))
    if not prefixed and local:
        splits = ", ".join(sorted(known))
        raise UserError(f"{card.where}: source.local.files: no {name} split (splits: {splits})")
    return prefixed or [name]


def submission_file(card: TaskCard, split: str, name: str) -> str:
    """The card's file name for `split`: `submission.files`, else `<task>.tsv`, or
    `<task>-<split>.tsv` for one of several NAME_* splits."""
    default = f"{card.name}.tsv" if split == name else f"{card.name}-{split}.tsv"
    return card.submission.files.get(split, default)


def prediction_cell(card: TaskCard, result: dict[str, Any]) -> str:
    """A prediction as the submission file writes it: the label's name or index, the value, or
    the tags of the words (`_` for words beyond max_length)."""
    if "value" in result:
        return f"{result['value']:.6g}"
    if "tags" in result:
        return " ".join(tag or "_" for tag in result["tags"])
    if card.submission.label_format == "index":
        return str(card.labels.index(result["label"]))
    return result["label"]


def split_inputs(card: TaskCard, dataset: Any, where: str) -> list[Example]:
    """The pipeline's inputs for a split: its input columns; a tagging task's words stay the
    split's words (a token such as "New York" is one word, never re-split on whitespace)."""
    columns = [dataset[column] for column in card.inputs]
    inputs = []
    for index, values in enumerate(zip(*columns, strict=True)):
        words = values[0] if len(values) == 1 and _is_words(values[0]) else None
        texts = []
        for column, value in zip(card.inputs, map(as_text, values), strict=True):
            if not isinstance(value, str):
                raise UserError(
                    f"{where}: example {index + 1}: {column}: expected text, got {kind(value)}"
                )
            texts.append(value)
        words = tuple(words) if words is not None else None
        inputs.append(Example(*texts, words=words))
    return inputs


def _is_words(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(w, str) for w in value)


def cell(value: Any, place: str) -> str:
    """A value as one TSV cell: text with a tab or a line break of any kind (which would forge a
    cell or a row) is refused, naming the place, never the whole value."""
    text = str(value)
    if "\t" not in text and len(text.splitlines()) <= 1 and not text.endswith(("\n", "\r")):
        return text
    raise UserError(
        f"{place}: {_clip(repr(text))} holds a tab or line break, which would break the "
        "submission file's rows"
    )


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def predict_split(
    pipeline: MultiTaskPipeline,
    cards: Sequence[TaskCard],
    name: str,
    data_dirs: Sequence[Path] | None,
    output_dir: Path,
) -> list[tuple[Path, int]]:
    """Predict split `name` of every card into `output_dir`, one `index<TAB>prediction` TSV
    file per task and split (GLUE's submission format); return (file, rows) per file."""
    from mtnlp.data.read import load_raw

    writable_output_dir(output_dir)
    written = []
    for card in cards:
        local = bool(data_dirs) and card.source.local is not None  # as load_raw decides
        splits = card_splits(card, name, local)
        for split, dataset in load_raw(card, splits, data_dirs, labels=False).items():
            where = f"{card.where}: {split}"
            results = pipeline(split_inputs(card, dataset, where), [card.name])
            column = card.submission.index_column
            ids = dataset[column] if column in dataset.column_names else range(len(dataset))
            path = output_dir / submission_file(card, split, name)
            with open(path, "w", encoding="utf-8", newline="") as file:
                file.write("index\tprediction\n")
                for number, (index, result) in enumerate(zip(ids, results, strict=True), 1):
                    place = f"{where}: example {number}"
                    row = (
                        cell(index, f"{place}: {column}"),
                        cell(prediction_cell(card, result[card.name]), f"{place}: prediction"),
                    )
                    file.write("\t".join(row) + "\n")
            written.append((path, len(results)))
    return written
