"""Reading task cards from YAML files and folders, with errors that name the file and field."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from mtnlp.cards.schema import TaskCard, card_errors
from mtnlp.modeling.hierarchy import check_stacking
from mtnlp.utils.errors import UserError


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


def load_card(path: str | Path) -> TaskCard:
    """Read and validate one card file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: card file not found") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise UserError(f"{path}: {line}YAML syntax error: {problem}") from None
    card = parse_card(data, str(path))
    card._path = path
    return card


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
    errors: list[str] = []
    for file in find_card_files(paths):
        try:
            card = load_card(file)
        except UserError as error:
            errors.append(str(error))
            continue
        if card.name in by_name:
            errors.append(
                f"{file}: name: task {card.name!r} is also defined in {by_name[card.name].path}"
            )
        else:
            by_name[card.name] = card
    if errors:
        raise UserError("\n".join(errors))
    if tasks is None:
        return check_hierarchy(list(by_name.values()))
    wanted = list(tasks)
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise UserError(
            f"--tasks: no card for {', '.join(unknown)}; available: {', '.join(sorted(by_name))}"
        )
    return check_hierarchy([by_name[name] for name in wanted])


def check_hierarchy(cards: list[TaskCard]) -> list[TaskCard]:
    """Raise a `UserError` naming file and field where one card `stack_on`s a task that is not
    among `cards`, stacking forms a cycle, or label embeddings have no labels; else `cards`."""
    where = {card.name: card.where for card in cards}
    problems = check_stacking([card.model_spec() for card in cards])
    if problems:
        lines = [f"{where[task]}: {field}: {message}" for task, field, message in problems]
        raise UserError("\n".join(lines))
    return cards
