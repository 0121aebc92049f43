"""The `mtnlp` command starts light: its help and its argument errors import neither torch nor
transformers (`import mtnlp` defers them, each command imports what it needs when it runs), so
they answer at once even on a loaded machine. Each case is a genuine `python -m mtnlp.cli` (or the
console script) in a subprocess; `-X importtime` lists every module it imported. Last, the import
hook that registers the model with transformers once transformers is imported (`import_after`)."""

from __future__ import annotations

import importlib
import importlib.util
import resource
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from mtnlp.utils.lazy import import_after

from conftest import run_command

HEAVY = {"torch", "transformers", "numpy", "pydantic", "datasets", "accelerate", "yaml"}
# a light start costs a few hundredths of a CPU second, one that imports torch several seconds
CPU_SECONDS = 1.0


class Started(NamedTuple):
    code: int
    stdout: str
    stderr: list[str]  # without the import log
    imported: set[str]  # top-level packages
    cpu: float  # seconds


def start(*command: str) -> Started:
    """`command` run to its end with `-X importtime` (PYTHONPROFILEIMPORTTIME), which logs every
    import on stderr, and its CPU time (its own, not the wall clock of a loaded machine)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = run_command(list(command), env={"PYTHONPROFILEIMPORTTIME": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = done.stderr.splitlines()
    log = [line for line in lines if line.startswith("import time:")][1:]  # [0]: the header
    return Started(
        code=done.returncode,
        stdout=done.stdout,
        stderr=[line for line in lines if not line.startswith("import time:")],
        imported={line.rsplit("|", 1)[1].strip().split(".")[0] for line in log},
        cpu=after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
    )


def assert_light(started: Started) -> None:
    assert "mtnlp" in started.imported
    assert not started.imported & HEAVY, sorted(started.imported & HEAVY)
    assert started.cpu < CPU_SECONDS, f"{started.cpu:.2f} s of CPU"


CLI = (sys.executable, "-m", "mtnlp.cli")


@pytest.mark.parametrize(
    "command",
    [[], ["evaluate"], ["predict"], ["cards", "check"], ["push"], ["export"]],
    ids=lambda command: "-".join(["mtnlp", *command]),
)
def test_help_imports_neither_torch_nor_transformers(command):
    started = start(*CLI, *command, "--help")
    assert (started.code, started.stderr) == (0, [])
    assert started.stdout.startswith(f"usage: {' '.join(['mtnlp', *command])} ")
    assert_light(started)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict"], "mtnlp predict: the following arguments are required: model"),
        (
            ["evaluate", "model", "--batch-size", "0"],
            "mtnlp evaluate: argument --batch-size: must be positive, got 0",
        ),
        (
            ["nope"],
            "mtnlp: argument COMMAND: invalid choice: 'nope' (choose from 'train', 'evaluate', "
            "'predict', 'cards', 'push', 'export')",
        ),
        (["cards"], "mtnlp cards: the following arguments are required: COMMAND"),
    ],
    ids=["missing-argument", "bad-value", "unknown-command", "missing-subcommand"],
)
def test_argument_errors_are_one_line_at_once(argv, message):
    """Exit 2 with one `error:` line and no traceback, before anything heavy is imported."""
    started = start(*CLI, *argv)
    prog = message.split(":")[0]
    expected = [f"error: {message} (see {prog} --help)"]
    assert (started.code, started.stdout, started.stderr) == (2, "", expected)
    assert_light(started)


def test_the_console_script_starts_light_too():
    script = Path(sys.executable).with_name("mtnlp")
    if not script.is_file():
        pytest.skip("the mtnlp console script is not installed")
    started = start(str(script), "--help")
    assert (started.code, started.stderr) == (0, [])
    assert started.stdout.startswith("usage: mtnlp ")
    assert_light(started)


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """`trigger` (a package) and `follower`, which imports `trigger` as mtnlp.modeling imports
    transformers, and counts in `trigger.followed` how often its code ran."""
    (tmp_path / "trigger").mkdir()
    (tmp_path / "trigger" / "__init__.py").write_text("followed = 0\n")
    (tmp_path / "follower.py").write_text("import trigger\n\ntrigger.followed += 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    finders = list(sys.meta_path)
    yield
    sys.meta_path[:] = finders  # no hook left behind by a failed test
    for name in ("trigger", "follower"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("first", ["trigger", "follower"])
def test_import_after_runs_the_follower_once_whichever_comes_first(first, packages):
    finders = list(sys.meta_path)
    import_after("trigger", "follower")
    assert importlib.util.find_spec("trigger") is not None  # a look-up imports nothing
    assert "follower" not in sys.modules and "trigger" not in sys.modules
    module = importlib.import_module(first)
    assert "follower" in sys.modules
    assert sys.modules["trigger"].followed == 1
    assert sys.meta_path == finders  # the hook is gone
    assert type(sys.modules["trigger"].__loader__).__name__ == "SourceFileLoader"
    assert module.__spec__.loader is module.__loader__


def test_import_after_a_trigger_already_imported_imports_at_once(packages):
    importlib.import_module("trigger")
    import_after("trigger", "follower")
    assert sys.modules["trigger"].followed == 1
