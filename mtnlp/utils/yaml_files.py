"""YAML files (task cards, `--config` files) read with bounded work: a regular file of at most
`MAX_YAML_BYTES`, UTF-8, nested at most `MAX_NESTING` deep, at most `MAX_YAML_VALUES` values once
aliases are expanded (a "billion laughs" file is refused before anything walks it), no alias
inside the node it names (a structure that contains itself), integers of at most
`MAX_INTEGER_DIGITS` digits. Each problem is one `UserError` line naming the file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mtnlp.utils.errors import UserError
from mtnlp.utils.untrusted import MAX_NESTING, clip, decode_utf8, read_bounded

MAX_YAML_BYTES = 2**20
"""Largest YAML file read (real cards and config files: a few KiB)."""
MAX_YAML_VALUES = 1_000_000
"""Most values (scalars, lists, mappings) a YAML file may hold once its aliases are expanded."""
MAX_INTEGER_DIGITS = 100
"""Longest integer in a YAML file (Python converts at most 4300 digits, slowly)."""


def load_yaml(path: str | Path, where: str | None = None, what: str = "file") -> Any:
    """The one YAML document in `path`, read with bounded work (see the module); `where` names
    the file in errors (default: the path), `what` says what it should be (`card file`)."""
    where = str(path) if where is None else where
    text = decode_utf8(read_bounded(Path(path), MAX_YAML_BYTES, where, what), where)
    loader = _BoundedLoader(text, where)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{where}: {line}YAML syntax error: {problem}") from None
    finally:
        loader.dispose()


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader (pure Python: its parser keeps a stack, never recursing), which
    counts while it composes: the nesting depth, and each node's values with aliases expanded
    (an alias adds the count of the node it names, so the count costs nothing to keep)."""

    def __init__(self, text: str, where: str) -> None:
        super().__init__(text)
        self.where = where
        self.depth = 0
        self.values: dict[int, int] = {}  # id of a finished node -> its values, aliases expanded

    def limit(self, mark: yaml.Mark | None, problem: str) -> UserError:
        line = f"line {mark.line + 1}: " if mark is not None else ""
        return UserError(f"{self.where}: {line}{problem}")

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            named = self.anchors.get(event.anchor)
            if named is not None and id(named) not in self.values:  # still being composed
                raise self.limit(
                    event.start_mark,
                    f"alias *{clip(event.anchor)} inside the node it names (a structure that "
                    "holds itself)",
                )
            return super().compose_node(parent, index)
        collection = not self.check_event(yaml.ScalarEvent)
        self.depth += collection
        if self.depth > MAX_NESTING:
            raise self.limit(
                self.peek_event().start_mark, f"nested more than {MAX_NESTING} levels deep"
            )
        node = super().compose_node(parent, index)
        self.depth -= collection
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        count = 1 + sum(self.values[id(child)] for child in children)
        if count > MAX_YAML_VALUES:
            raise self.limit(
                node.start_mark,
                f"more than {MAX_YAML_VALUES} values once aliases are expanded",
            )
        self.values[id(node)] = count
        return node

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = len(node.value.lstrip("+-"))
        if digits > MAX_INTEGER_DIGITS:
            raise self.limit(
                node.start_mark,
                f"an integer of {digits} digits (at most {MAX_INTEGER_DIGITS})",
            )
        return super().construct_yaml_int(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)
