"""The generated parts of the documentation, built from the code on every `mkdocs build`.

A page asks for a generated section with a line `<!-- generated: NAME -->` (NAME one of
`GENERATORS`); the MkDocs hook `on_page_markdown` replaces it. Nothing here is written by hand:

- `card-fields`: every task-card field from the pydantic schema (`mtnlp.cards.schema.TaskCard` and
  the models it nests), with its type, default, allowed values and description;
- `train-flags`, `cli`, `recipe-flags`: the argument parsers themselves (the one `parse_args`
  builds from `TrainArguments`, `mtnlp.cli.build_parser`, the recipes' own parsers);
- `heads`, `task-layers`, `sharing`, `samplers`, `weightings`, `metrics`: the registries, with each
  entry's docstring and options.

`tests/test_docs.py` imports this file to check that the reference and the code list the same
names.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import runpy
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)
RECIPES = sorted(path.relative_to(REPO).as_posix() for path in REPO.glob("recipes/*.py"))


# ------------------------------------------------------------------------------ helpers
def cell(text: Any) -> str:
    """Text for a Markdown table cell: one line, pipes escaped, `<` and `>` outside code spans
    written as entities (`<task>.tsv` is not an HTML tag)."""
    parts = " ".join(str(text).split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def code(value: Any) -> str:
    return f"`{value}`"


def yaml_value(value: Any) -> str:
    """A default as a card or config file writes it."""
    import yaml

    if isinstance(value, str) and value:
        return code(value)
    return code(yaml.safe_dump(value, default_flow_style=True).split("\n...")[0].strip())


def docstring(obj: Any) -> str:
    """The first paragraph of an object's own docstring (not one it inherits), on one line."""
    own = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    text = inspect.cleandoc(own) if own else ""
    return cell(text.split("\n\n")[0])


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def bounds(metadata: list[Any]) -> list[str]:
    """Words for pydantic / annotated-types constraints: `> 0`, `<= 1`, `1 to 2 items`, ..."""
    words = []
    for item in metadata:
        for name, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(item, name, None) is not None:
                words.append(f"{sign} {getattr(item, name)}")
        if getattr(item, "min_length", None) is not None:
            words.append(f"at least {item.min_length} item(s)")
        if getattr(item, "max_length", None) is not None:
            words.append(f"at most {item.max_length} items")
        if getattr(item, "pattern", None):
            words.append(f"matches `{item.pattern}`")
    return words


def type_words(annotation: Any) -> tuple[str, list[str]]:
    """(type in words, constraints) of a field annotation."""
    from pydantic import BaseModel

    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null", []
    if origin is typing.Annotated:
        base, extra = type_words(args[0])
        return base, extra + bounds(list(args[1:]))
    if origin is Literal:
        return "string", []
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [type_words(arg) for arg in args]
        return " or ".join(part for part, _ in parts), [w for _, extra in parts for w in extra]
    if origin is list:
        inner, extra = type_words(args[0])
        return f"list of {inner}", extra
    if origin is dict:
        key, _ = type_words(args[0])
        value, extra = type_words(args[1])
        return f"mapping {key} -> {value}", extra
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping", []
    names = {str: "string", int: "integer", float: "number", bool: "true/false"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation))), []


def literal_values(annotation: Any) -> list[Any]:
    """The allowed values of a Literal annotation (also inside Optional / Annotated)."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [value for arg in get_args(annotation) for value in literal_values(arg)]


# ------------------------------------------------------------------------------ task cards
def _registry_values() -> dict[tuple[str, str], str]:
    """Card fields whose allowed values are a registry's names (validated there, not typed)."""
    from mtnlp.metrics import METRICS
    from mtnlp.modeling import HEADS, TASK_LAYERS

    return {
        ("TaskCard", "type"): ", ".join(map(code, HEADS.names()))
        + " ([heads](components.md#heads))",
        ("TaskLayerOptions", "type"): ", ".join(map(code, TASK_LAYERS.names()))
        + " ([task layers](components.md#task-layers))",
        ("TaskCard", "metrics"): ", ".join(map(code, METRICS.names()))
        + " ([metrics](components.md#metrics)), or an evaluate Hub id / metric script path",
        ("LocalSource", "encoding"): "any Python codec name",
    }


def card_models() -> Iterator[tuple[str, type]]:
    """(dotted path, pydantic model) of the task card and every model nested in it, depth first:
    `("", TaskCard)`, `("source", DataSource)`, `("source.hub", HubSource)`, ..."""
    from pydantic import BaseModel

    from mtnlp.cards.schema import TaskCard

    def nested(annotation: Any, path: str) -> Iterator[tuple[str, type]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield path, annotation
            return
        origin, args = get_origin(annotation), get_args(annotation)
        if origin is dict:
            key = "<split>" if "split" in path else "<key>"
            yield from nested(args[1], f"{path}.{key}")
        else:
            for arg in args:
                yield from nested(arg, path)

    def walk(path: str, model: type) -> Iterator[tuple[str, type]]:
        yield path, model
        for name, info in model.model_fields.items():
            for sub_path, sub_model in nested(info.annotation, f"{path}.{name}".lstrip(".")):
                yield from walk(sub_path, sub_model)

    yield from walk("", TaskCard)


def card_fields() -> str:
    """Every field of a task card, one table per (nested) section."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    allowed = _registry_values()
    sections = []
    for path, model in card_models():
        rows = []
        for name, info in model.model_fields.items():
            kind, extra = type_words(info.annotation)
            extra = bounds(info.metadata) + extra
            values = allowed.get((model.__name__, name)) or ", ".join(
                code(value) for value in literal_values(info.annotation)
            )
            if info.is_required():
                default = "required"
            elif info.default_factory is not None:
                value = info.default_factory()
                default = "see below" if isinstance(value, BaseModel) else yaml_value(value)
            else:
                default = yaml_value(info.default) if info.default is not PydanticUndefined else ""
            field = f"{path}.{info.alias or name}".lstrip(".")  # as a card writes it
            values = "; ".join(part for part in (values, ", ".join(extra)) if part)
            rows.append([code(field), kind, default, values, info.description or ""])
        title = code(path) if path else "The card"
        anchor = path.replace(".", "-").replace("<", "").replace(">", "") or "card"
        sections.append(
            f"### {title} {{#{anchor}}}\n\n{docstring(model)}\n\n"
            + table(["field", "type", "default", "values", "description"], rows)
        )
    return "\n\n".join(sections)


# ------------------------------------------------------------------------------ flags
class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def captured_parser(call: Callable[[], Any]) -> argparse.ArgumentParser:
    """The training-flag parser that `call` builds through `parse_args` (with its `--config`
    flag, program name and a recipe's defaults), caught before it parses anything."""
    from mtnlp.training import args

    def catch(self: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        raise _Captured(self)

    with mock.patch.object(args._Parser, "parse_known_args", catch):
        try:
            call()
        except _Captured as caught:
            return caught.parser
    raise RuntimeError(f"{call} did not call parse_args")


def train_parser() -> argparse.ArgumentParser:
    """`mtnlp train`'s parser (the recipes use the same flags, with their own defaults)."""
    from mtnlp.cli import train_command

    return captured_parser(lambda: train_command([]))


def recipe_parsers() -> dict[str, tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]]:
    """recipe path -> (its training-flag parser with its defaults, its own extra parser)."""
    parsers = {}
    for recipe in RECIPES:
        namespace = runpy.run_path(str(REPO / recipe))
        main = namespace["main"]
        takes_argv = "argv" in inspect.signature(inspect.unwrap(main)).parameters
        caught = captured_parser(
            lambda main=main, takes_argv=takes_argv: main([]) if takes_argv else main()
        )
        own = namespace["layout_parser"]() if "layout_parser" in namespace else None
        caught.recipe_doc = namespace.get("__doc__") or ""
        parsers[recipe] = (caught, own)
    return parsers


def long_flag(action: argparse.Action) -> str:
    """The flag as the docs write it: `--max-steps` (HfArgumentParser also takes `--max_steps`)."""
    if not action.option_strings:
        return action.metavar or action.dest.upper()
    dashed = [option for option in action.option_strings if "_" not in option]
    return max(dashed or action.option_strings, key=len)


def option_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag and positional argument of a parser, as `long_flag` writes them (no --help)."""
    return [long_flag(a) for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _help_text(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": parser.prog}
    return text


def _action_type(action: argparse.Action, hints: dict[str, Any]) -> str:
    if action.dest in hints:
        kind, extra = type_words(hints[action.dest])
        if action.nargs == "?" and action.const is True:
            kind = "flag (or true/false)"
        elif action.nargs == "+":
            kind = kind.replace("list of ", "") + ", one or more"
        return " ".join([kind, *extra]) if not extra else f"{kind} ({', '.join(extra)})"
    if action.nargs == 0:
        return "flag"
    kind = getattr(action.type, "__name__", None) or "string"
    kind = {"str": "string", "int": "integer", "float": "number", "_positive": "integer > 0"}.get(
        kind, kind
    )
    return kind + (", one or more" if action.nargs == "+" else "")


def parser_table(parser: argparse.ArgumentParser, hints: dict[str, Any] | None = None) -> str:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        default = action.default
        shown = "" if default in (None, argparse.SUPPRESS) else code(default)
        if action.required or (not action.option_strings and action.nargs is None):
            shown = "required"
        choices = ", ".join(code(choice) for choice in action.choices or ())
        rows.append(
            [
                code(long_flag(action)),
                _action_type(action, hints or {}),
                shown,
                choices,
                _help_text(action, parser),
            ]
        )
    return table(["flag", "type", "default", "values", "what"], rows)


def train_flags() -> str:
    from mtnlp.training.args import TrainArguments

    hints = typing.get_type_hints(TrainArguments, include_extras=True)
    return parser_table(train_parser(), hints)


def cli_commands() -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
    """(command, parser, one-line help) of every `mtnlp` sub-command, nested ones too."""
    from mtnlp.cli import build_parser

    def walk(prefix: str, parser: argparse.ArgumentParser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {choice.dest: choice.help for choice in action._choices_actions}
                for name, sub in action.choices.items():
                    yield f"{prefix} {name}", sub, helps.get(name, "")
                    yield from walk(f"{prefix} {name}", sub)

    yield from walk("mtnlp", build_parser())


def cli() -> str:
    sections = []
    for command, parser, help_ in cli_commands():
        if command == "mtnlp train":
            body = "Takes the training flags below (`mtnlp train --help`); cards default to "
            body += "`tasks/glue` in the working folder."
        elif any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            body = "Sub-commands below."
        else:
            description = cell(parser.description or "") if parser.description else ""
            body = (description + "\n\n" if description else "") + parser_table(parser)
        sections.append(f"### `{command}`\n\n{cell(help_)}.\n\n{body}")
    return "\n\n".join(sections)


def recipe_flags() -> str:
    sections = []
    train = train_parser()
    for recipe, (caught, own) in recipe_parsers().items():
        changed = [
            f"`{long_flag(action)}` = {code(action.default)}"
            for action in caught._actions
            if action.option_strings
            and getattr(train._option_string_actions.get(action.option_strings[0]), "default", None)
            != action.default
        ]
        doc = caught.recipe_doc.strip()
        body = f"```text\n{doc}\n```\n\nEvery training flag above"
        body += f", with the defaults {', '.join(changed)}." if changed else "."
        if own is not None:
            body += " Its own flags:\n\n" + parser_table(own)
        sections.append(f"### `{recipe}`\n\n{body}")
    return "\n\n".join(sections)


# ------------------------------------------------------------------------------ registries
def registries() -> dict[str, Any]:
    """Generator name -> registry, for every extension point."""
    from mtnlp.metrics import METRICS
    from mtnlp.modeling import HEADS, SHARING, TASK_LAYERS
    from mtnlp.training.samplers import SAMPLERS
    from mtnlp.training.weighting import WEIGHTINGS

    return {
        "heads": HEADS,
        "task-layers": TASK_LAYERS,
        "sharing": SHARING,
        "samplers": SAMPLERS,
        "weightings": WEIGHTINGS,
        "metrics": METRICS,
    }


def _registry_table(name: str, header: list[str], row: Callable[[str, Any], list[str]]) -> str:
    registry = registries()[name]
    rows = [[code(entry), *row(entry, registry.get(entry))] for entry in registry.names()]
    return table([registry.kind, *header], rows)


def _keyword_options(function: Callable) -> str:
    parameters = inspect.signature(function).parameters.values()
    keyword = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return ", ".join(f"`{p.name}={p.default!r}`" for p in keyword)


def heads() -> str:
    def row(name: str, head: Any) -> list[str]:
        level = "token" if head.token_level else "sentence"
        labels = "a list of names" if head.needs_labels else "none"
        return [code(head.__name__), level, labels, docstring(head)]

    return _registry_table("heads", ["class", "level", "card `labels`", "what"], row)


def task_layers() -> str:
    return _registry_table(
        "task-layers",
        ["class", "what"],
        lambda name, layer: [code(layer.__name__), docstring(layer)],
    )


def sharing() -> str:
    from mtnlp.training.args import SHARING_FLAG_OPTIONS, flag

    flag_of = {option: flag(field) for field, option in SHARING_FLAG_OPTIONS.items()}

    def row(name: str, strategy: Any) -> list[str]:
        config = strategy.config_class
        shape = set(config.shape_options())
        options = [
            f"`{f.name}={f.default!r}`"
            + (f" ({flag_of[f.name]})" if f.name in flag_of else " (model config only)")
            + (" shape" if f.name in shape else "")
            for f in dataclasses.fields(config)
        ]
        return [code(config.__name__), ", ".join(options) or "none", docstring(strategy)]

    return _registry_table("sharing", ["options class", "options (flag)", "what"], row)


def samplers() -> str:
    from mtnlp.training.samplers import TaskSampler

    text = _registry_table(
        "samplers", ["class", "what"], lambda name, s: [code(s.__name__), docstring(s)]
    )
    return text + f"\n\nEvery sampler takes the keyword options {_keyword_options(TaskSampler)}."


def weightings() -> str:
    from mtnlp.training.weighting import LossWeighting

    def row(name: str, weighting: Any) -> list[str]:
        needs = "all tasks per step" if weighting.requires_all_tasks else "any"
        kind = "gradients" if weighting.gradient_based else "losses"
        return [code(weighting.__name__), kind, needs, docstring(weighting)]

    text = _registry_table("weightings", ["class", "acts on", "batch mode", "what"], row)
    return text + (
        f"\n\nEvery weighting takes the keyword options {_keyword_options(LossWeighting)}."
    )


def metrics() -> str:
    def row(name: str, metric: Any) -> list[str]:
        compute = metric.compute
        function = compute.func if isinstance(compute, functools.partial) else compute
        scheme = compute.keywords.get("scheme") if isinstance(compute, functools.partial) else None
        what = docstring(function) + (f" Scheme {scheme}." if scheme else "")
        fits = ", ".join(metric.task_types) + (" (two labels)" if metric.binary else "")
        direction = "higher" if metric.greater_is_better else "lower"
        return [", ".join(map(code, metric.keys)), fits, direction, what]

    return _registry_table("metrics", ["results", "fits", "better", "what"], row)


GENERATORS: dict[str, Callable[[], str]] = {
    "card-fields": card_fields,
    "train-flags": train_flags,
    "cli": cli,
    "recipe-flags": recipe_flags,
    "heads": heads,
    "task-layers": task_layers,
    "sharing": sharing,
    "samplers": samplers,
    "weightings": weightings,
    "metrics": metrics,
}


def render(markdown: str) -> str:
    """A page with every `<!-- generated: NAME -->` line replaced by its generated section."""

    def generate(match: re.Match) -> str:
        name = match[1]
        if name not in GENERATORS:
            raise KeyError(f"<!-- generated: {name} -->: unknown; known: {', '.join(GENERATORS)}")
        return GENERATORS[name]()

    return MARKER.sub(generate, markdown)


# ------------------------------------------------------------------------------ MkDocs hook
def on_page_markdown(markdown: str, **_: Any) -> str:
    return render(markdown)
