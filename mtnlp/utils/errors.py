"""User errors: mistakes in cards, data or flags that get one clear line and exit code 2.

A bug raises any other exception and keeps its traceback; a user mistake raises `UserError`,
whose message names the file, line or field at fault (see DESIGN: "Errors are for people").
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

USER_ERROR_EXIT_CODE = 2
BROKEN_PIPE_EXIT_CODE = 141  # 128 + SIGPIPE, what a shell reports for a killed writer
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A mistake in the user's input (card, data file, flag, path): shown as one line, exit 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the work was put in order; its message says what was kept and how to go
    on (`exit_on_user_error` prints it, without a traceback, and exits 130)."""


class OneLineArgumentErrors:
    """Mixin for argparse parsers: a flag that does not parse is a `UserError` (one `error:` line,
    exit 2 through `exit_on_user_error`) instead of argparse's usage text and message."""

    prog: str

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def first_line(error: BaseException) -> str:
    """The first line of a library's error message (its type name when it has none), to quote
    inside a one-line `UserError`."""
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def exit_on_user_error(main: F) -> F:
    """Decorate a command-line entry point: a `UserError` prints `error: <message>` and exits 2;
    Ctrl-C prints what was kept (`Interrupted`) and exits 130, without a traceback; a reader that
    closes the pipe early (`mtnlp predict ... | head`) ends it quietly, as in Python's own advice
    for SIGPIPE."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            for line in str(error).splitlines():  # several problems: one line each
                print(f"error: {line}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT_CODE)
        except KeyboardInterrupt as error:  # Ctrl-C: what was kept, not a traceback
            print(file=sys.stderr)  # after the ^C the terminal echoed
            for line in (str(error) or "interrupted").splitlines():
                print(line, file=sys.stderr)
            sys.exit(INTERRUPTED_EXIT_CODE)
        except BrokenPipeError:
            # Python flushes stdout again at exit: point it at devnull so that flush is silent.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(BROKEN_PIPE_EXIT_CODE)

    return wrapper  # type: ignore[return-value]
