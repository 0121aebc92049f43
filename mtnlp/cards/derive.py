"""Derived cards: a short card that learns another card's data and target again (quantisation
smoothing, Ruder 2017), completed from that card when the cards are loaded together.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from mtnlp.cards.schema import (
    AUXILIARY,
    DeriveOptions,
    TaskCard,
    _Strict,
    bin_names,
    card_errors,
    shown,
)
from mtnlp.utils.errors import UserError

INHERITED = ("source", "inputs", "label_column", "max_length", "train_split", "eval_splits")
"""The fields a derived card takes from its parent (where it does not give them)."""

PARENT_TYPE = {"bins": "regression", "regression": "classification"}  # kind -> parent's type
DEFAULT_METRICS = {"bins": ["accuracy"], "regression": ["pearson", "spearmanr"]}


class _DeriveField(_Strict):
    derive: DeriveOptions


def derive_options(data: dict[str, Any], where: str) -> DeriveOptions:
    """The `derive` field of raw card `data`, validated (a `UserError` naming `where` and the
    field otherwise)."""
    try:
        return _DeriveField.model_validate({"derive": data["derive"]}).derive
    except ValidationError as error:
        raise UserError(card_errors(error, where)) from None


def is_complete(data: dict[str, Any]) -> bool:
    """Whether a derived card gives every field its parent would (a card saved in a run
    folder's cards/, resolved when it was trained): it then loads without its parent."""
    return all(field in data for field in ("type", "source", "inputs", "metrics"))


def derived_data(data: dict[str, Any], parent: TaskCard, where: str) -> dict[str, Any]:
    """Raw derived card `data` completed from `parent`: the data fields (`INHERITED`), the type,
    labels and default metrics of its kind, the parent's range (bins) or labels (regression),
    and `role: auxiliary`; a `UserError` naming `where` and `derive.from` when `parent` cannot
    be derived from."""
    options = derive_options(data, where)
    wanted = PARENT_TYPE[options.kind]
    if parent.type != wanted:
        raise UserError(
            f"{where}: derive.from: kind {options.kind!r} derives from a {wanted} task; "
            f"{parent.name!r} is a {parent.type} task"
        )
    inherited = parent.model_dump(include=set(INHERITED), exclude_defaults=True)
    derive = dict(data["derive"])
    if options.kind == "bins":
        kind_fields = {"type": "classification", "labels": bin_names(options.bins)}
        if options.range is None and parent.range is not None:
            derive["range"] = list(parent.range)
    else:
        kind_fields = {"type": "regression"}
        derive.setdefault("labels", list(parent.labels))
    defaults = {
        "role": AUXILIARY,
        "description": f"{parent.name} learned as {options.kind} (an auxiliary task)",
        "metrics": DEFAULT_METRICS[options.kind],
    }
    return {**defaults, **inherited, **kind_fields, **data, "derive": derive}


def unknown_parent(where: str, name: str, known: list[str]) -> UserError:
    """The error of a derived card whose parent is not among the cards loaded."""
    listed = ", ".join(sorted(known)[:10]) + (", ..." if len(known) > 10 else "")
    return UserError(
        f"{where}: derive.from: no card {shown(name)} among the cards loaded together"
        f"{f' ({listed})' if known else ''}"
    )
