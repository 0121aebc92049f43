"""DataLoaders: dynamic padding per task type, seeded shuffling, batches grouped by length, and
joint batches of tasks that read the same inputs (every task's labels in one batch)."""

from __future__ import annotations

from collections.abc import Callable

import datasets
from torch.utils.data import DataLoader
from transformers import (
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from mtnlp.cards.schema import TaskCard
from mtnlp.modeling.heads import HEADS, IGNORE_INDEX


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
    collator: Callable[[list[dict]], dict] | None = None,
) -> DataLoader:
    """Batches padded to their longest example (by `collator`, default the card's
    `make_collator`); shuffled with a generator seeded by `seed`.

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
        collate_fn=collator or make_collator(card, tokenizer),
    )


def example_lengths(dataset: datasets.Dataset) -> list[int]:
    """Tokens per example (read from the Arrow column, without decoding the token ids)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()


# ------------------------------------------------------------------------------ joint batches
INPUT_COLUMNS = ("input_ids", "token_type_ids")  # what the encoder reads (the mask follows)
JOINT_LABELS = "labels."  # a joint dataset's label column of task T is "labels.T"


def first_different_row(first: datasets.Dataset, second: datasets.Dataset) -> int | None:
    """The first row (0-based) whose tokenized inputs differ between two tokenized datasets,
    or None when every row is the same (a dataset shorter than the other differs at its end)."""
    columns = [column for column in INPUT_COLUMNS if column in first.column_names]
    if columns != [column for column in INPUT_COLUMNS if column in second.column_names]:
        return 0
    if len(first) == len(second) and all(
        _arrow(first, column).equals(_arrow(second, column)) for column in columns
    ):  # compared in Arrow: no Python objects for the usual case, identical inputs
        return None
    rows = zip(
        zip(*(first[c] for c in columns), strict=True),
        zip(*(second[c] for c in columns), strict=True),
        strict=False,  # the shorter one ends the comparison
    )
    different = (index for index, (one, other) in enumerate(rows) if one != other)
    return next(different, min(len(first), len(second)))


def _arrow(dataset: datasets.Dataset, column: str):
    """A column as one pyarrow ChunkedArray (in the dataset's row order)."""
    import pyarrow as pa

    values = dataset.with_format("arrow")[column]
    return values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])


def joint_dataset(train_sets: dict[str, datasets.Dataset]) -> datasets.Dataset:
    """One dataset for tasks whose tokenized inputs are the same row by row: the first task's
    input columns and every task's labels as column `labels.<task>`."""
    first = next(iter(train_sets.values()))
    inputs = first.select_columns([c for c in first.column_names if c != "labels"])
    labels = [
        dataset.select_columns(["labels"]).rename_column("labels", f"{JOINT_LABELS}{task}")
        for task, dataset in train_sets.items()
    ]
    return datasets.concatenate_datasets([inputs, *labels], axis=1)


class JointCollator:
    """Pads a joint batch: the inputs to the longest example, and per task its labels as its
    own collator would (tags padded with IGNORE_INDEX); `batch["labels"]` is {task: tensor}."""

    def __init__(self, cards: list[TaskCard], tokenizer: PreTrainedTokenizerBase) -> None:
        self.token_level = {card.name: HEADS.get(card.type).token_level for card in cards}
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict]) -> dict:
        import torch

        inputs = [
            {k: v for k, v in feature.items() if not k.startswith(JOINT_LABELS)}
            for feature in features
        ]
        batch = self.tokenizer.pad(inputs, return_tensors="pt")
        length = batch["input_ids"].shape[1]
        left = self.tokenizer.padding_side == "left"
        labels = {}
        for task, token_level in self.token_level.items():
            values = [feature[f"{JOINT_LABELS}{task}"] for feature in features]
            if token_level:
                pads = [[IGNORE_INDEX] * (length - len(tags)) for tags in values]
                values = [p + t if left else t + p for t, p in zip(values, pads, strict=True)]
                labels[task] = torch.tensor(values, dtype=torch.int64)
            else:
                labels[task] = torch.tensor(values)
        return {**batch, "labels": labels}


def make_joint_dataloader(
    cards: list[TaskCard],
    train_sets: dict[str, datasets.Dataset],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    *,
    seed: int = 0,
    group_by_length: bool = False,
) -> DataLoader:
    """The training loader of tasks with the same inputs (`joint_dataset`): each batch carries
    every task's labels, shuffled and grouped by length as `make_dataloader` does."""
    return make_dataloader(
        cards[0], joint_dataset(train_sets), tokenizer, batch_size, shuffle=True, seed=seed,
        group_by_length=group_by_length, collator=JointCollator(cards, tokenizer),
    )  # fmt: skip
