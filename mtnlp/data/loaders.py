"""DataLoaders: dynamic padding per task type, seeded shuffling, batches grouped by length."""

from __future__ import annotations

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
