"""A tiny random BERT and a WordPiece vocabulary trained on the task text, for smoke runs.

`--model tiny` uses it: no download, seconds to train, real tokenization. Not for quality.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import BertWordPieceTokenizer
from transformers import BertConfig, BertModel, BertTokenizer

TINY_VOCAB_SIZE = 2000
TINY_HIDDEN_SIZE = 32
TINY_LAYERS = 2  # recipes/conll_hierarchical.py lays tasks out on this depth


def train_wordpiece(texts: Iterable[str], vocab_size: int = TINY_VOCAB_SIZE) -> BertTokenizer:
    """A lower-casing BERT tokenizer whose WordPiece vocabulary is learned from `texts`."""
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, show_progress=False)
    return BertTokenizer(vocab=trainer.get_vocab(), do_lower_case=True)


def tiny_bert(
    tokenizer: BertTokenizer, *, hidden_size: int = TINY_HIDDEN_SIZE, num_layers: int = TINY_LAYERS
) -> BertModel:
    """A randomly initialised BERT sized for tests (hidden 32, 2 layers, 2 heads by default)."""
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BertModel(config, add_pooling_layer=False)
