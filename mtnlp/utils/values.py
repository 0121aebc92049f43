"""Values from flags and YAML files, checked strictly by pydantic and worded in one line each:
the annotated types of the training arguments (with bounds) and the words of their errors
(`must be positive, got 0`, `expected an integer, got 10.7`)."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

import yaml
from annotated_types import Ge, Gt, Le
from pydantic import AllowInfNan, BeforeValidator

from mtnlp.utils.untrusted import clip


def number_from_yaml(value: Any) -> Any:
    """PyYAML reads YAML 1.1, where `5e-5` (no dot) is a string: such a string is a number."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def word_from_yaml(value: Any) -> Any:
    """A YAML number where a word is expected (`block_sparse_q: 2`): the word, "2"."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def one_or_more(value: Any) -> Any:
    """A config file may name one card folder or data folder as a string: a list of one."""
    return [value] if isinstance(value, str) else value


# field types: HfArgumentParser sees the plain type, pydantic the bounds too (validate_values)
Number = Annotated[float, BeforeValidator(number_from_yaml), AllowInfNan(False)]
PositiveNumber = Annotated[Number, Gt(0)]
NonNegativeNumber = Annotated[Number, Ge(0)]
Share = Annotated[Number, Ge(0), Le(1)]
PositiveInt = Annotated[int, Gt(0)]
Seed = Annotated[int, Ge(0), Le(2**32 - 1)]  # NumPy's seeds are 32-bit
Paths = Annotated[list[str], BeforeValidator(one_or_more)]


EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
}
BOUNDS = {
    "greater_than": ("gt", "must be > {}"),
    "greater_than_equal": ("ge", "must be >= {}"),
    "less_than_equal": ("le", "must be <= {}"),
}


def problem_words(error: dict[str, Any]) -> str:
    """One pydantic error in the words of the flags: `must be positive, got 0`, `expected an
    integer, got 10.7`; an item of a list is named by its position."""
    kind, value = error["type"], error["input"]
    item = "".join(f"item {index}: " for index in error["loc"])
    if kind == "finite_number":
        return f"{item}must be a finite number, got {shown(value)}"
    if kind in BOUNDS:
        key, text = BOUNDS[kind]
        bound = error["ctx"][key]
        text = "must be positive" if kind == "greater_than" and bound == 0 else text
        return f"{item}{text.format(compact(bound))}, got {compact(value)}"
    if kind == "literal_error":
        return f"{item}expected {error['ctx']['expected']}, got {shown(value)}"
    expected = EXPECTED.get(kind)
    if expected is None:  # no other kind comes from these field types; a generic line anyway
        return f"{item}{error['msg']}, got {shown(value)}"
    return f"{item}expected {expected}, got {shown(value)}"


def shown(value: Any) -> str:
    """A value as a YAML file or a command line would write it (cut at 80 characters: a
    config file's value may be long)."""
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).split("\n")[0]  # null, true, false
    return clip(repr(value) if isinstance(value, str) else str(value), 80)


def compact(number: Any) -> str:
    """A number for a bound message: 0 rather than 0.0."""
    if isinstance(number, float) and number.is_integer():
        return str(int(number))
    return str(number)
