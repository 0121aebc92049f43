"""Reading files that come from elsewhere (a downloaded model folder, its cards, a config file)
with bounded work: a regular file only (a FIFO named `config.json` must not block the process),
its size checked before it is read, UTF-8 text, JSON nested a bounded depth. Each problem is one
`UserError` line naming the file; the words never echo the file's content.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from mtnlp.utils.errors import UserError

MAX_NESTING = 50
"""Deepest nesting of lists and mappings in a JSON or YAML file mtnlp reads (real ones: < 10)."""

MAX_SHOWN_INTEGER = 10**12
"""Larger integers are named by their number of digits, never written out in an error."""

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _not_regular(mode: int, where: str, what: str) -> UserError | None:
    """The error for a file of `mode` that is not a regular file, else None."""
    if stat.S_ISREG(mode):
        return None
    kind = next((words for test, words in _KINDS if test(mode)), "not a regular file")
    return UserError(f"{where}: is {kind}, not a {what}")


def check_regular_file(
    path: Path, max_bytes: int | None = None, where: str | None = None, what: str = "file"
) -> None:
    """A `UserError` unless `path` is a regular file (a link is followed, as to a Hub cache's
    blob) of at most `max_bytes`: checked with `stat`, which never opens it (opening a FIFO
    blocks until someone writes to it)."""
    where = str(path) if where is None else where
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{where}: {what} not found") from None
    except OSError as error:
        raise UserError(f"{where}: cannot read it ({_reason(error)})") from None
    if problem := _not_regular(info.st_mode, where, what):
        raise problem
    if max_bytes is not None and info.st_size > max_bytes:
        raise UserError(
            f"{where}: {info.st_size} bytes, more than a {what} may hold ({_size(max_bytes)})"
        )


def read_bounded(path: Path, max_bytes: int, where: str | None = None, what: str = "file") -> bytes:
    """The bytes of `path`, a regular file of at most `max_bytes` (`check_regular_file`), opened
    without blocking (a FIFO swapped in meanwhile is refused, not waited on) and never read past
    the limit. `where` names the file in errors (default: the path), `what` says what it should
    be."""
    where = str(path) if where is None else where
    check_regular_file(path, max_bytes, where, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise UserError(f"{where}: cannot read it ({_reason(error)})") from None
    with os.fdopen(descriptor, "rb") as file:
        if problem := _not_regular(os.fstat(descriptor).st_mode, where, what):  # swapped since
            raise problem
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew since
        raise UserError(f"{where}: more than a {what} may hold ({_size(max_bytes)})")
    return data


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _size(count: int) -> str:
    """A limit in words: `16 MiB`, `512 bytes`."""
    return f"{count / 2**20:g} MiB" if count >= 2**20 else f"{count} bytes"


def decode_utf8(data: bytes, where: str) -> str:
    """`data` as text, or a `UserError` naming the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def load_json_object(
    path: Path, max_bytes: int, where: str | None = None, what: str = "file"
) -> dict[str, Any]:
    """The JSON object in `path` (`read_bounded`), nested at most `MAX_NESTING` deep; a
    `UserError` for anything else (not JSON, a list, not UTF-8, too large, too deep)."""
    where = str(path) if where is None else where
    text = decode_utf8(read_bounded(path, max_bytes, where, what), where)
    try:
        data = json.loads(text)
    except RecursionError:
        raise UserError(f"{where}: nested more than {MAX_NESTING} levels deep") from None
    except json.JSONDecodeError as error:
        raise UserError(
            f"{where}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from None
    except ValueError:  # Python's limit on the digits of an integer it converts
        raise UserError(f"{where}: not valid JSON (an integer too long to read)") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object, got {kind_of(data)}")
    if nested_deeper_than(data, MAX_NESTING):
        raise UserError(f"{where}: nested more than {MAX_NESTING} levels deep")
    return data


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether lists and dicts in `value` nest more than `limit` levels (`value` itself is 1)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def kind_of(value: Any) -> str:
    """What a JSON or YAML value is, in words that never echo a long value: `-1`, `2.5`, `true`,
    `null`, `a string`, `a list`, `an object`, `an integer of 5000 digits`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if abs(value) < MAX_SHOWN_INTEGER:
            return str(value)
        try:
            return f"an integer of {len(str(abs(value)))} digits"
        except ValueError:  # past Python's limit on converting integers to text
            return "an integer of thousands of digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def clip(text: str, limit: int = 40) -> str:
    """`text` cut to `limit` characters with an ellipsis: an error message quotes a value (from a
    data file, a card, a config.json) only as far as it helps find it, never a whole (possibly
    private or huge) one."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
