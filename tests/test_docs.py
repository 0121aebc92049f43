"""The documentation is checked against the code: the code blocks marked runnable in README.md and
docs/ run, the generated references (docs/hooks.py) list exactly what the code defines, and the
hand-written pages name only flags, card fields and components that exist.

Markers, an HTML comment on the line before a fenced block (invisible on the rendered page):

- `<!-- run -->`: run the block (python or bash) in the page's working folder;
- `<!-- run: smoke -->`: the block that trains `outputs/smoke` (Getting started's first run; README
  shows the same command). It runs once per session; every page whose runnable blocks name
  `outputs/smoke` gets a copy of the result instead of training again;
- `<!-- run: copy -->`: a word-for-word copy of a block that runs in README.md (checked), not run
  twice;
- `<!-- run: fails -->`: a bash block whose last command must fail with exit code 2 (a user error);
  the comment lines after it are the lines it must print (`...` matches anything);
- `<!-- run: file PATH -->`: write the block's text to PATH in the page's folder.

Each page runs in a fresh folder `main/` beside `shared/data` (a link to the real data), with links
to the repository's `tasks/` and `recipes/`, so `../shared/data/glue` means what it means in a
checkout; without the data the page is skipped with a reason. To stay fast, commands run in this
process: `mtnlp ...`, `python -m mtnlp.cli ...`, `python recipes/X.py ...` and single-process
`accelerate launch [--cpu] ...` call the same entry points as the shell would (`mtnlp.cli.main`,
the recipe as `__main__`, with the launcher's `--cpu`); any other command runs in bash. Run sizes
are capped (`CAPS`), and the training report's plots are not drawn (tested in test_report.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from conftest import DATA_DIR, REPO

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DOCS = REPO / "docs"
# pages other helpers own: run if marked, but not held to this file's wording checks
OTHER_PAGES = {"onnx.md", "transformers.md", "distributed.md", "data-formats.md"}
CAPS = {  # run-size flags in runnable blocks are capped at these values
    "--max-steps": 4,
    "--max-train-samples": 48,
    "--max-eval-samples": 16,
    "--eval-every": 2,
    "--checkpoint-every": 2,
    "--affinity-every": 2,
}
MARKER = re.compile(r"^<!-- run(?::\s*(.*?))? -->\n```(\w+)[^\n]*\n(.*?)^```", re.M | re.S)
SMOKE = "outputs/smoke"


def load_hooks():
    spec = importlib.util.spec_from_file_location("mtnlp_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


def own_pages() -> list[Path]:
    return [page for page in pages() if page.name not in OTHER_PAGES]


def name(page: Path) -> str:
    return str(page.relative_to(REPO))


@dataclasses.dataclass
class Block:
    page: Path
    line: int
    marker: str  # "", "smoke", "copy", "fails", "file PATH"
    language: str
    text: str


def runnable_blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    return [
        Block(page, text.count("\n", 0, m.start()) + 2, (m[1] or "").strip(), m[2], m[3])
        for m in MARKER.finditer(text)
    ]


def fenced_blocks(page: Path, language: str) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def capped(text: str) -> str:
    """The block with every run-size flag's value capped (`CAPS`), in bash or Python spelling."""
    for flag, cap in CAPS.items():
        pattern = rf"(?<![\w-])({re.escape(flag)}[\"']?,?\s*[\"']?)(\d+)(?![.\d])"
        text = re.sub(pattern, lambda m, cap=cap: f"{m[1]}{min(int(m[2]), cap)}", text)
    return text


# ------------------------------------------------------------------------------ the shell
def logical_lines(script: str) -> list[tuple[str, list[str]]]:
    """(command, the comment lines after it) per command line; continuations joined."""
    commands: list[tuple[str, list[str]]] = []
    pending = ""
    for raw in script.splitlines():
        line = raw.strip()
        if pending:
            pending += " " + line.removesuffix("\\").strip()
            if not line.endswith("\\"):
                commands.append((pending, []))
                pending = ""
        elif line.startswith("#"):
            if commands:
                commands[-1][1].append(line[1:].strip())
        elif line.endswith("\\"):
            pending = line.removesuffix("\\").strip()
        elif line:
            commands.append((line, []))
    return commands


def split_top_level(command: str, separator: str) -> list[str]:
    """`command` split at `separator` outside quotes (`|` never matches inside `||`)."""
    parts, start, quote, i = [], 0, None, 0
    while i < len(command):
        char = command[i]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif command.startswith(separator, i) and not (
            separator == "|" and command.startswith("||", i)
        ):
            parts.append(command[start:i].strip())
            start = i + len(separator)
            i = start
            continue
        i += 1
    return [*parts, command[start:].strip()]


@dataclasses.dataclass
class Result:
    code: int
    output: str


class Shell:
    """Runs a bash block's commands in `cwd`, the mtnlp and recipe ones in this process."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def run(self, command: str) -> Result:
        """`A && B && C`: each part in turn, stopping at the first failure."""
        if re.search(r"(?<![<>])[<>](?![<>])|;|(?<!\|)\|\|(?!\|)|&\s*$", command):
            return self.bash(command)  # redirections, lists: the whole line in bash
        result = Result(0, "")
        for part in split_top_level(command, "&&"):
            result = self.pipeline(part)
            if result.code != 0:
                break
        return result

    def pipeline(self, command: str) -> Result:
        *producers, last = split_top_level(command, "|")
        words = shlex.split(last, comments=True)
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if words[:1] == ["cd"] and not producers:
            self.cwd = (self.cwd / words[1]).resolve()
            return Result(0, "")
        entry = self.entry_point(words)
        if entry is None:
            return self.bash(command)
        stdin = b""
        if producers:
            done = subprocess.run(
                " | ".join(producers), shell=True, cwd=self.cwd, env=self.env,
                capture_output=True, check=True, executable="/bin/bash",
            )  # fmt: skip
            stdin = done.stdout
        return self.in_process(entry, stdin, env)

    def entry_point(self, words: list[str]) -> Callable[[], object] | None:
        """The function the shell would end up calling for `words`, if it is mtnlp's."""
        from mtnlp.cli import main

        if words[:1] == ["mtnlp"]:
            return lambda: main(words[1:])
        if words[:3] == ["python", "-m", "mtnlp.cli"]:
            return lambda: main(words[3:])
        if words[:1] == ["python"] and len(words) > 1 and words[1].startswith("recipes/"):
            return self.script(words[1], words[2:])
        if words[:2] == ["accelerate", "launch"]:
            from accelerate.commands.launch import launch_command_parser

            launch = launch_command_parser().parse_args(words[2:])
            if launch.multi_gpu or (launch.num_processes or 1) > 1 or launch.mixed_precision:
                return None  # a real launch
            if launch.cpu:
                self.env_for_call = {"ACCELERATE_USE_CPU": "true"}
            if launch.module:
                if launch.training_script != "mtnlp.cli":
                    return None
                return lambda: main(launch.training_script_args)
            return self.script(launch.training_script, launch.training_script_args)
        return None

    def script(self, path: str, argv: list[str]) -> Callable[[], object]:
        def call() -> None:
            saved = sys.argv
            sys.argv = [path, *argv]
            try:
                runpy.run_path(str(self.cwd / path), run_name="__main__")
            finally:
                sys.argv = saved

        return call

    def in_process(self, call: Callable[[], object], stdin: bytes, env: dict[str, str]) -> Result:
        from tiny_runs import reset_accelerate

        env = {**env, **getattr(self, "env_for_call", {})}
        self.env_for_call = {}
        output = io.StringIO()
        saved_env = {key: os.environ.get(key) for key in env}
        saved_cwd, saved_stdin = Path.cwd(), sys.stdin
        os.environ.update(env)
        os.chdir(self.cwd)
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        reset_accelerate()
        code = 0
        try:
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                call()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            reset_accelerate()
            sys.stdin = saved_stdin
            os.chdir(saved_cwd)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return Result(code, output.getvalue())

    def bash(self, command: str) -> Result:
        done = subprocess.run(
            command, shell=True, cwd=self.cwd, env=self.env, capture_output=True, text=True,
            executable="/bin/bash",
        )  # fmt: skip
        return Result(done.returncode, done.stdout + done.stderr)


def expected_line(pattern: str, output: str) -> bool:
    regex = ".*".join(map(re.escape, pattern.split("...")))
    return any(re.fullmatch(regex, line.strip()) for line in output.splitlines())


# ------------------------------------------------------------------------------ running pages
def workspace(root: Path) -> Path:
    """`root/main` (the working folder) beside `root/shared/data`, with tasks/ and recipes/."""
    main = root / "main"
    main.mkdir(parents=True)
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(DATA_DIR, target_is_directory=True)
    for folder in ("tasks", "recipes"):
        (main / folder).symlink_to(REPO / folder, target_is_directory=True)
    return main


def run_block(block: Block, cwd: Path, namespace: dict) -> None:
    where = f"{name(block.page)}:{block.line}"
    if block.marker.startswith("file "):
        path = cwd / block.marker.removeprefix("file ").strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.text, encoding="utf-8")
        return
    text = capped(block.text)
    if block.language == "python":
        from tiny_runs import reset_accelerate

        saved = Path.cwd()
        os.chdir(cwd)
        reset_accelerate()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(text, where, "exec"), namespace)
        finally:
            reset_accelerate()
            os.chdir(saved)
        return
    assert block.language in ("bash", "sh"), f"{where}: cannot run a {block.language} block"
    shell = Shell(cwd)
    commands = logical_lines(text)
    for index, (command, comments) in enumerate(commands):
        result = shell.run(command)
        last = index == len(commands) - 1
        if block.marker == "fails" and last:
            assert result.code == 2, f"{where}: `{command}` should fail with exit code 2:\n{result}"
            for line in comments:
                assert expected_line(line, result.output), (
                    f"{where}: `{command}` did not print {line!r}; it printed:\n{result.output}"
                )
        else:
            assert result.code == 0, f"{where}: `{command}` failed:\n{result.output}"


@pytest.fixture(scope="session")
def smoke_model(tmp_path_factory) -> Path:
    """`outputs/smoke`, trained once by the `run: smoke` block of Getting started."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data not found at {DATA_DIR} (set MTNLP_DATA_DIR)")
    (block,) = [b for b in runnable_blocks(DOCS / "getting-started.md") if b.marker == "smoke"]
    cwd = workspace(tmp_path_factory.mktemp("smoke"))
    run_block(dataclasses.replace(block, marker=""), cwd, {})
    return cwd / SMOKE


@pytest.fixture
def no_report_plots(monkeypatch):
    from mtnlp.artifacts import run_folder

    monkeypatch.setattr(run_folder, "write_report", lambda *args, **kwargs: None)


RUNNABLE = [page for page in pages() if runnable_blocks(page)]


@pytest.mark.usefixtures("no_report_plots")
@pytest.mark.parametrize("page", RUNNABLE, ids=name)
def test_page_runs(page, tmp_path, request):
    """Every runnable block of the page, in order, in one working folder."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data not found at {DATA_DIR} (set MTNLP_DATA_DIR)")
    blocks = runnable_blocks(page)
    cwd = workspace(tmp_path)
    if any(SMOKE in block.text for block in blocks):
        shutil.copytree(request.getfixturevalue("smoke_model"), cwd / SMOKE)
    namespace: dict = {"__name__": "__main__"}
    for block in blocks:
        if block.marker not in ("smoke", "copy"):  # smoke: its result is copied above
            run_block(block, cwd, namespace)


def test_smoke_blocks_are_one_command():
    """README's first run is Getting started's, word for word (the tests run it once)."""
    smoke = [b.text for page in pages() for b in runnable_blocks(page) if b.marker == "smoke"]
    assert len(smoke) == 2 and len(set(smoke)) == 1, smoke
    assert SMOKE in smoke[0]


def test_copies_are_word_for_word():
    readme = [b.text for b in runnable_blocks(REPO / "README.md") if b.marker == ""]
    copies = [b for page in pages() for b in runnable_blocks(page) if b.marker == "copy"]
    assert copies
    for block in copies:
        assert block.text in readme, f"{name(block.page)}:{block.line}: not a copy of README's"


def test_markers_are_known():
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages())
    for marker in re.findall(r"<!-- run(?::\s*(.*?))? -->", text):
        assert marker in ("", "smoke", "copy", "fails") or marker.startswith("file "), marker
    for block in (b for page in pages() for b in runnable_blocks(page)):
        assert block.marker.startswith("file ") or block.language in ("python", "bash", "sh")


# ------------------------------------------------------------------------------ README and CI
def test_readme_is_a_front_door():
    assert len((REPO / "README.md").read_bytes()) <= 10_000


def test_readme_commands_are_what_ci_runs():
    """CI installs what README tells people to install and runs README's test command."""
    readme = REPO / "README.md"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    tests = fenced_blocks(readme, "bash")[1].strip()
    assert tests == "python -m pytest -q tests" and tests in ci

    def installs(lines: list[str]) -> list[list[str]]:
        found = []
        for line in lines:
            for part in split_top_level(line, "&&"):
                words = [w for w in shlex.split(part, comments=True) if w != "-q"]
                if "pip" in words and "install" in words:
                    found.append(words[words.index("install") + 1 :])
        return found

    setup = fenced_blocks(readme, "bash")[0].splitlines()
    assert installs(setup) == installs(ci) == [["torch==2.13.0"], ["-e", ".[dev,onnx,docs,peft]"]]


# ------------------------------------------------------------------------------ generated pages
def table_rows(markdown: str) -> list[list[str]]:
    rows = []
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows.append(cells)
    return rows


def first_column(markdown: str) -> set[str]:
    return {row[0].strip("`") for row in table_rows(markdown) if row[0].startswith("`")}


def card_field_paths() -> set[str]:
    """Every field of a task card as a dotted path, walked from the schema."""
    from pydantic import BaseModel

    from mtnlp.cards.schema import TaskCard

    def models(annotation) -> list[tuple[str, type]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [("", annotation)]
        args = getattr(annotation, "__args__", ())
        if getattr(annotation, "__origin__", None) is dict:
            return [(".<split>", model) for _, model in models(args[1])]
        return [found for arg in args for found in models(arg)]

    def walk(prefix: str, model: type) -> set[str]:
        paths = set()
        for field, info in model.model_fields.items():
            path = f"{prefix}{info.alias or field}"  # as a card writes it (derive.from)
            paths.add(path)
            for suffix, sub in models(info.annotation):
                paths |= walk(f"{path}{suffix}.", sub)
        return paths

    return walk("", TaskCard)


def test_card_reference_lists_every_field():
    reference = hooks.card_fields()
    assert first_column(reference) == card_field_paths()
    for row in table_rows(reference)[1:]:
        if row[0] != "field":
            assert row[-1], f"card field {row[0]} has no description (Field(description=...))"


def train_flag_names() -> set[str]:
    from mtnlp.training.args import TrainArguments, flag

    return {flag(field.name) for field in dataclasses.fields(TrainArguments)} | {"--config"}


def cli_flag_names() -> dict[str, set[str]]:
    """`mtnlp` sub-command -> its flags and positional arguments, from `build_parser`."""
    import argparse

    from mtnlp.cli import build_parser

    found = {}

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(f"{prefix} {sub_name}", sub)
        found[prefix] = {
            hooks.long_flag(action)
            for action in parser._actions
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
        }

    walk("mtnlp", build_parser())
    return found


def test_flag_reference_lists_every_flag():
    assert first_column(hooks.train_flags()) == train_flag_names()
    sections = re.split(r"^### `(.+)`$", hooks.cli(), flags=re.M)[1:]
    documented = dict(zip(sections[::2], sections[1::2], strict=True))
    expected = cli_flag_names()
    assert set(documented) == set(expected) - {"mtnlp"}
    for command, text in documented.items():
        assert first_column(text) == expected[command], command
    recipes = hooks.recipe_flags()
    for recipe, (_, own) in hooks.recipe_parsers().items():
        assert f"### `{recipe}`" in recipes
        for flag in hooks.option_flags(own) if own else ():
            assert f"`{flag}`" in recipes


def test_component_reference_lists_every_registry_entry():
    for generator, registry in hooks.registries().items():
        assert first_column(hooks.GENERATORS[generator]()) == set(registry.names()), generator


def test_every_generated_section_is_on_a_page():
    text = "\n".join(page.read_text(encoding="utf-8") for page in (DOCS / "reference").glob("*.md"))
    assert set(hooks.MARKER.findall(text)) == set(hooks.GENERATORS)


# ------------------------------------------------------------------------------ hand-written text
def test_hand_written_tables_name_every_component():
    """The tables of samplers, weightings and strategies (with their papers) list the registries'
    names: a new component needs its line there too."""
    registries = hooks.registries()
    for page, flag, registry in [
        ("sampling.md", "--sampler", "samplers"),
        ("sampling.md", "--weighting", "weightings"),
        ("sharing.md", "--sharing", "sharing"),
    ]:
        text = (DOCS / page).read_text(encoding="utf-8")
        start = text.index(f"| `{flag}` |")
        rows = table_rows(text[start : text.index("\n\n", start)])[1:]
        names = {re.match(r"`(\w+)`", row[0])[1] for row in rows}
        assert names == set(registries[registry].names()), (page, flag)


def known_flags() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    recipe_own = {
        flag
        for _, own in hooks.recipe_parsers().values()
        if own is not None
        for flag in hooks.option_flags(own)
    }
    launcher = {
        option for action in launch_command_parser()._actions for option in action.option_strings
    }
    cli = set().union(*cli_flag_names().values())
    train = {option for action in hooks.train_parser()._actions for option in action.option_strings}
    return train | cli | recipe_own | launcher


def test_pages_name_only_real_flags():
    """Every `--flag` in README and the guide is a flag of mtnlp, a recipe or `accelerate
    launch` (lines about the bench/ scripts and mkdocs aside)."""
    known = known_flags()
    for page in own_pages():
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if "bench" in line or "mkdocs" in line:
                continue
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", line):
                assert flag in known, f"{name(page)}:{number}: {flag} is not a flag"


def check_card_keys(data: dict, model: type, where: str) -> None:
    """The keys of a partial card are fields of the schema, at every level."""
    from pydantic import BaseModel

    fields = {info.alias or name: info for name, info in model.model_fields.items()}
    for key, value in data.items():
        assert key in fields, f"{where}: {key} is not a field of {model.__name__}"
        annotation = fields[key].annotation
        subs = [annotation, *getattr(annotation, "__args__", ())]
        sub = next((t for t in subs if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if sub is not None and isinstance(value, dict):
            check_card_keys(value, sub, f"{where}: {key}")


def test_yaml_blocks_are_cards_or_configs():
    """Every YAML example is a valid card, a valid `--config` file, or part of a card whose keys
    all exist."""
    from mtnlp.cards.schema import TaskCard
    from mtnlp.training.args import validate_values

    arguments = {flag.removeprefix("--").replace("-", "_") for flag in train_flag_names()}
    checked = 0
    for page in own_pages():
        for block in fenced_blocks(page, "yaml"):
            if block.startswith("--8<--"):
                continue  # an included file of the repository (tasks/...), loaded by its tests
            data = yaml.safe_load(block)
            where = f"{name(page)}: {block.splitlines()[0]}"
            if {"name", "type"} <= set(data):
                TaskCard.model_validate(data)
            elif set(data) <= arguments:
                validate_values(data, str)
            else:
                check_card_keys(data, TaskCard, where)
            checked += 1
    assert checked >= 4


def test_pages_are_in_the_site():
    """Every page is in mkdocs.yml's nav (mkdocs warns, and --strict fails, otherwise) and the
    four pages other contributors write exist."""
    config = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    for page in DOCS.rglob("*.md"):
        assert f": {page.relative_to(DOCS).as_posix()}" in config, page
    for page in OTHER_PAGES:
        assert (DOCS / page).is_file()
