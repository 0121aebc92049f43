"""Reading task cards from YAML files and folders, with errors that name the file and field."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
)

from mtnlp.cards.derive import derive_options, derived_data, is_complete, unknown_parent
from mtnlp.cards.schema import AUXILIARY, TaskCard, card_errors
from mtnlp.modeling.hierarchy import check_stacking
from mtnlp.utils.errors import UserError
from mtnlp.utils.yaml_files import load_yaml


def parse_card(data: Any, where: str) -> TaskCard:
    """Validate already-parsed YAML; `where` names the source in error messages."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of fields (a YAML card), got {_kind(data)}")
    try:
        return TaskCard.model_validate(data)
    except ValidationError as error:
        raise UserError(card_errors(error, where)) from None


def _kind(data: Any) -> str:
    return "an empty file" if data is None else f"a {type(data).__name__}"


def load_card(path: str | Path, parents: Mapping[str, TaskCard] | None = None) -> TaskCard:
    """Read and validate one card file (with bounded work: `load_yaml`); a derived card is
    completed from its parent among `parents` (`resolve_derived`)."""
    path = Path(path)
    return _card_from_data(load_yaml(path, what="card file"), path, parents or {})


def _card_from_data(
    data: Any, path: Path, parents: Mapping[str, TaskCard], derived: Collection[Any] = ()
) -> TaskCard:
    card = parse_card(resolve_derived(data, parents, str(path), derived), str(path))
    card._path = path
    return card


def is_derived(data: Any) -> bool:
    """Whether parsed YAML is a derived card (it has `derive`)."""
    return isinstance(data, dict) and "derive" in data


def resolve_derived(
    data: Any, parents: Mapping[str, TaskCard], where: str, derived: Collection[Any] = ()
) -> Any:
    """A derived card's data completed from its parent among `parents` (`derived_data`); a card
    that gives every field (saved in a run folder) loads without it. Other data as it is. A
    parent among the `derived` card names is refused (no chains, no cycles)."""
    if not is_derived(data):
        return data
    options = derive_options(data, where)
    if options.parent == data.get("name"):
        raise UserError(f"{where}: derive.from: a task cannot derive from itself")
    if options.parent in derived:
        raise UserError(
            f"{where}: derive.from: {options.parent!r} is itself a derived card; derive from a "
            "card that is not"
        )
    parent = parents.get(options.parent)
    if parent is not None:
        return derived_data(data, parent, where)
    if is_complete(data):
        return data
    raise unknown_parent(where, options.parent, list(parents))


def find_card_files(paths: Iterable[str | Path]) -> list[Path]:
    """Card files named directly, plus every *.yaml / *.yml below the folders named."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")))
        elif path.exists():
            files.append(path)
        else:
            raise UserError(f"{path}: no such card file or folder")
    return files


def load_cards(paths: Iterable[str | Path], tasks: Iterable[str] | None = None) -> list[TaskCard]:
    """Load the cards under `paths`; keep only `tasks` (in that order) when given.

    Raises a `UserError` for invalid cards, duplicate task names, or a requested task that no
    card defines.
    """
    by_name: dict[str, TaskCard] = {}
    files = find_card_files(paths)
    errors: list[tuple[Path, str]] = []  # (file, error): reported in the files' order
    read: list[tuple[Path, Any]] = []
    for file in files:
        try:
            read.append((file, load_yaml(file, what="card file")))
        except UserError as error:
            errors.append((file, str(error)))
    # derived cards last: they are completed from the other cards (a derived parent is refused)
    parents = _plain_cards(read, errors)
    named = _by_name(parents)
    derived = {
        data["name"] for _, data in read if is_derived(data) and isinstance(data.get("name"), str)
    }
    for file, data in read:
        if file not in parents and not is_derived(data):
            continue  # its error is reported
        try:
            card = parents.get(file) or _card_from_data(data, file, named, derived)
        except UserError as error:
            errors.append((file, str(error)))
            continue
        if card.name in by_name:
            also = f"{file}: name: task {card.name!r} is also defined in {by_name[card.name].path}"
            errors.append((file, also))
        else:
            by_name[card.name] = card
    if errors:
        errors.sort(key=lambda error: files.index(error[0]))  # stable: a file's own order kept
        raise UserError("\n".join(message for _, message in errors))
    if tasks is None:
        return check_hierarchy(list(by_name.values()))
    wanted = list(tasks)
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise UserError(
            f"--tasks: no card for {', '.join(unknown)}; available: {', '.join(sorted(by_name))}"
        )
    return check_hierarchy([by_name[name] for name in wanted])


def _plain_cards(
    read: list[tuple[Path, Any]], errors: list[tuple[Path, str]]
) -> dict[Path, TaskCard]:
    """The cards of `read` that are not derived, by file; their errors appended to `errors`."""
    cards = {}
    for file, data in read:
        if is_derived(data):
            continue
        try:
            cards[file] = _card_from_data(data, file, {})
        except UserError as error:
            errors.append((file, str(error)))
    return cards


def _by_name(cards: dict[Path, TaskCard]) -> dict[str, TaskCard]:
    """Task name -> card, the first card of a name (a duplicate is reported by `load_cards`)."""
    named: dict[str, TaskCard] = {}
    for card in cards.values():
        named.setdefault(card.name, card)
    return named


def check_main_task(cards: Sequence[TaskCard]) -> None:
    """A `UserError` when every one of `cards` is auxiliary: a run needs a main task, the one
    that selects and describes the model."""
    if cards and all(card.role == AUXILIARY for card in cards):
        names = ", ".join(card.name for card in cards[:3]) + (", ..." if len(cards) > 3 else "")
        raise UserError(
            f"{cards[0].where}: role: every task is auxiliary ({names}); give at least one task "
            "with role: main"
        )


def check_hierarchy(cards: list[TaskCard]) -> list[TaskCard]:
    """Raise a `UserError` naming file and field where one card `stack_on`s a task that is not
    among `cards`, stacking forms a cycle, or label embeddings have no labels; else `cards`."""
    where = {card.name: card.where for card in cards}
    problems = check_stacking([card.model_spec() for card in cards])
    if problems:
        lines = [f"{where[task]}: {field}: {message}" for task, field, message in problems]
        raise UserError("\n".join(lines))
    return cards
