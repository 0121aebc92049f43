"""Words and sub-words (pure Python, no `datasets`): aligning word labels to sub-word tokens,
and sub-word predictions back to words.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtnlp.modeling.heads import IGNORE_INDEX


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
