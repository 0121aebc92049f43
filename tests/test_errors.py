"""Command-line endings: a reader that closes the pipe early ends the command quietly."""

import sys
import textwrap

from conftest import run_command

WRITER = textwrap.dedent(
    """
    from mtnlp.utils.errors import exit_on_user_error

    @exit_on_user_error
    def main():
        for i in range(100_000):
            print(f"line {i}")

    main()
    """
)


def test_closed_pipe_ends_quietly():
    """`mtnlp predict ... | head -1`: no BrokenPipeError traceback, exit status 141."""
    pipeline = run_command(
        ["bash", "-c", f'{sys.executable} -c "$WRITER" | head -1; echo "${{PIPESTATUS[0]}}" >&2'],
        env={"WRITER": WRITER, "PATH": "/usr/bin:/bin"},
    )
    assert pipeline.stdout == "line 0\n"
    assert pipeline.stderr == "141\n"
