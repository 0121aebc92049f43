"""What a model folder may ask for: a downloaded `config.json` is untrusted input, so its sizes
are checked before anything is allocated, against limits far above any real encoder (BERT-large:
24 layers, hidden size 1024; XLM-R XXL: 48 layers, hidden size 4096, 250k tokens). Each problem
is one `UserError` line naming the file and the field; a value is never echoed at length.
"""

from __future__ import annotations

from typing import Any

from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from mtnlp.utils.errors import UserError
from mtnlp.utils.untrusted import clip, kind_of

MAX_CONFIG_BYTES = 16 * 2**20
"""Largest config.json read (real ones: a few KiB; 100,000 label names fit easily)."""
MAX_TOKENIZER_BYTES = 512 * 2**20
"""Largest tokenizer file opened (a multilingual tokenizer.json: 10-40 MiB)."""

MAX_LAYERS = 512
MAX_TASKS = 1_000
MAX_LABELS = 100_000
MAX_TASK_LENGTH = 1_000_000
"""Longest `max_length` of a task (the pipeline reads at most the encoder's positions anyway)."""
MAX_HEAD_SIZE = 65_536
MAX_ENCODER_WEIGHTS = 50 * 10**9
"""Most weights the sizes of an encoder's config may add up to (the largest encoders: ~11e9)."""

ENCODER_SIZES: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, MAX_LAYERS),
    "hidden_size": (1, 65_536),
    "intermediate_size": (1, 262_144),
    "num_attention_heads": (1, 1_024),
    "vocab_size": (1, 4_000_000),
    "max_position_embeddings": (1, 1_000_000),
    "type_vocab_size": (0, 1_024),  # DeBERTa-v3 has none
    "embedding_size": (1, 65_536),  # ALBERT, ELECTRA
    # DistilBERT's names
    "n_layers": (1, MAX_LAYERS),
    "dim": (1, 65_536),
    "hidden_dim": (1, 262_144),
    "n_heads": (1, 1_024),
}
"""An encoder config's sizes, (smallest, largest), checked where the config has them."""


def size_problem(value: Any, smallest: int, largest: int) -> str | None:
    """Why `value` is not an integer from `smallest` to `largest` (a bool, a string or a float
    is not one), or None."""
    if isinstance(value, int) and not isinstance(value, bool) and smallest <= value <= largest:
        return None
    return f"expected an integer from {smallest} to {largest}, got {kind_of(value)}"


def check_size(value: Any, smallest: int, largest: int, where: str, field: str) -> None:
    """A `UserError` `{where}: {field}: ...` unless `value` is an integer in the range."""
    if problem := size_problem(value, smallest, largest):
        raise UserError(f"{where}: {field}: {problem}")


def check_encoder_config(encoder: Any, where: str, prefix: str = "") -> None:
    """An encoder's config (a dict, as in config.json; `prefix` is its field there, e.g.
    `encoder`): a model type transformers knows, sizes within `ENCODER_SIZES`, a hidden size the
    attention heads divide, and at most `MAX_ENCODER_WEIGHTS` weights in all."""

    def field(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    if not isinstance(encoder, dict):
        raise UserError(f"{where}: {prefix}: expected an object, got {kind_of(encoder)}")
    if "model_type" in encoder:
        model_type = encoder["model_type"]
        if not isinstance(model_type, str):
            raise UserError(
                f"{where}: {field('model_type')}: expected a string, got {kind_of(model_type)}"
            )
        if model_type not in CONFIG_MAPPING:
            raise UserError(
                f"{where}: {field('model_type')}: {clip(model_type)!r} is not a model type "
                "that transformers knows"
            )
        if prefix and model_type == "mtnlp":
            raise UserError(f"{where}: {field('model_type')}: an mtnlp model is not an encoder")
    for name, (smallest, largest) in ENCODER_SIZES.items():
        if name in encoder:
            check_size(encoder[name], smallest, largest, where, field(name))
    hidden, heads = encoder.get("hidden_size"), encoder.get("num_attention_heads")
    own_head_size = "head_dim" in encoder or "embedding_size" in encoder
    if hidden and heads and hidden % heads and not own_head_size:
        raise UserError(
            f"{where}: {field('hidden_size')}: {hidden} is not a multiple of "
            f"num_attention_heads ({heads})"
        )
    weights = encoder_weights(encoder)
    if weights > MAX_ENCODER_WEIGHTS:
        raise UserError(
            f"{where}: {prefix or 'config'}: its sizes make an encoder of about "
            f"{weights / 1e9:.0f} billion weights (mtnlp loads at most "
            f"{MAX_ENCODER_WEIGHTS / 1e9:.0f} billion)"
        )


def encoder_weights(encoder: dict[str, Any]) -> int:
    """About how many weights a BERT-like encoder of these (checked) sizes has: embeddings, then
    per layer attention (4 h^2) and the feed-forward block (2 h i)."""

    def size(*names: str, default: int = 0) -> int:
        return next((encoder[name] for name in names if encoder.get(name)), default)

    hidden = size("hidden_size", "dim")
    layers = size("num_hidden_layers", "n_layers")
    inner = size("intermediate_size", "hidden_dim", default=4 * hidden)
    tokens = size("vocab_size") + size("max_position_embeddings")
    return tokens * hidden + layers * (4 * hidden * hidden + 2 * hidden * inner)


TASK_PART_SIZES = {
    "head": ("hidden_size",),
    "task_layer": ("hidden_size", "num_heads", "label_embedding_size"),
}
"""The sizes in a task's `head` and `task_layer` options (cards/schema.py): each at most
MAX_HEAD_SIZE."""

SHARING_SIZES = ("layers", "subspaces")
"""The shape options of a sharing strategy (`sharing/`): each an integer from 1 to MAX_LAYERS."""
SHARING_RANKS = ("rank_task", "rank_in", "rank_out")
"""The ranks of tensor sharing (`sharing/tensor.py`): each an integer from 1 to the largest hidden
size (the strategy then checks them against the encoder's sizes)."""


def check_sharing_entry(sharing: Any, where: str) -> None:
    """config.json's `sharing`: null, or an object whose shape options are small integers."""
    if sharing is None:
        return
    if not isinstance(sharing, dict):
        raise UserError(f"{where}: sharing: expected an object or null, got {kind_of(sharing)}")
    if not isinstance(sharing.get("name", ""), str):
        raise UserError(f"{where}: sharing.name: expected a string, got {kind_of(sharing['name'])}")
    for name in SHARING_SIZES:
        if name in sharing:
            check_size(sharing[name], 1, MAX_LAYERS, where, f"sharing.{name}")
    for name in SHARING_RANKS:
        if name in sharing:
            largest = ENCODER_SIZES["hidden_size"][1]
            check_size(sharing[name], 1, largest, where, f"sharing.{name}")
