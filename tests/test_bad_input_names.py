"""Bad input, issue 14 items 2 and 3: names from cards (split names, task names, submission
file names) that would become paths, two tasks writing one file, and prediction files that
would be written through a link or over a file mtnlp did not write. Each case gives exactly one
`error:` line (exit 2) naming the file and the field, through `predict --split` (cards given or
the model folder's own), `cards check`, `train` or `evaluate`, and changes nothing on disk."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from test_bad_input import Case, edit, edit_card, run, snapshot, steps, write
from test_trust_names import write_sick_tasks

from mtnlp.cli import main
from mtnlp.inference.submission import PREDICTIONS_MANIFEST

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SPLIT = ("predict", "{model}", "--split", "test", "--data-dir", "{case}/data", "--cards",
         "{case}/cards", "--output-dir", "{case}/out")  # fmt: skip
# the model folder's own cards/
MODEL_CARDS = ("predict", "{case}/model", "--split", "test", "--data-dir", "{case}/data",
               "--output-dir", "{case}/out")  # fmt: skip
CHECK = ("cards", "check", "{case}/cards")
TRAIN = ("train", "--model", "tiny", "--cards", "{case}/cards", "--data-dir", "{case}/data",
         "--output-dir", "{case}/run", "--max-steps", "1")  # fmt: skip
EVALUATE = ("evaluate", "{model}", "--data-dir", "{case}/data", "--cards", "{case}/cards")

CLS, MODEL_CLS = "{case}/cards/cls.yaml", "{case}/model/cards/cls.yaml"
CHARSET = (
    "may hold only letters, digits and _ . + = - (no path separators, '..', control characters "
    "or spaces) and must not start with '.' or '-'"
)
LONG = "x" * 300
LONG_SHOWN = f"{repr(LONG)[:39]}… must be at most 100 characters, got 300"
MODEL_FILE = "is one of a model folder's own file names"
NOT_OURS = (
    "already exists, and mtnlp did not write it (it replaces only the prediction files that "
    f"{PREDICTIONS_MANIFEST} lists); remove it, or give another --output-dir"
)
LINK = "is a symbolic link; mtnlp never writes through a link: remove it"
BAD_MANIFEST = (
    f"{{case}}/out/{PREDICTIONS_MANIFEST}: not mtnlp's list of the prediction files it wrote "
    "here; remove it, or give another --output-dir"
)


def split_named(yaml_key: str):
    """cls's test split under another name (a YAML key: quoted where needed)."""
    return edit_card("cls", "test: cls/dev.tsv", f"{yaml_key}: cls/dev.tsv")


def submission(yaml_files: str, card: str = "cls", folder: str = "cards"):
    """A `submission.files` mapping added to a card (of `folder`: cards or model/cards)."""

    def setup(case: Path) -> None:
        with (case / folder / f"{card}.yaml").open("a", encoding="utf-8") as file:
            file.write(f"submission: {{files: {yaml_files}}}\n")

    return setup


def symlink(path: str, target: str, content: str | None = "keep me\n"):
    """`path` (in the case folder) a symbolic link to `target`, which holds `content` (None:
    a link to nothing)."""

    def setup(case: Path) -> None:
        if content is not None:
            (case / target).write_text(content)
        (case / path).parent.mkdir(parents=True, exist_ok=True)
        (case / path).symlink_to(case / target)

    return setup


def manifest(files: object):
    return write(f"out/{PREDICTIONS_MANIFEST}", json.dumps({"files": files}))


CASES = [
    # ---------------------------------------------------------------- split names
    Case("split-name-parent", split_named('"../x"'),
         f"{CLS}: source.local.files: split name '../x' {CHARSET}", SPLIT),
    Case("split-name-slash", split_named('"a/b"'),
         f"{CLS}: source.local.files: split name 'a/b' {CHARSET}", SPLIT),
    Case("split-name-nul", split_named('"a\\0b"'),
         f"{CLS}: source.local.files: split name 'a\\x00b' {CHARSET}", SPLIT),
    Case("split-name-newline", split_named('"a\\nb"'),
         f"{CLS}: source.local.files: split name 'a\\nb' {CHARSET}", CHECK),
    Case("split-name-300-chars", split_named(LONG),
         f"{CLS}: source.local.files: split name {LONG_SHOWN}", SPLIT),
    Case("split-name-config-json", split_named("config.json"),
         f"{CLS}: source.local.files: split name 'config.json' {MODEL_FILE}", SPLIT),
    Case("split-name-hidden", split_named(".hidden"),
         f"{CLS}: source.local.files: split name '.hidden' {CHARSET}", TRAIN),
    Case("split-options-name",
         edit_card("cls", "format: tsv\n", 'format: tsv\n    split_options: {"a/b": {}}\n'),
         f"{CLS}: source.local.split_options: split name 'a/b' {CHARSET}", CHECK),
    Case("hub-split-name",
         edit_card("cls", "source:\n",
                   'source:\n  hub: {path: nyu-mll/glue, name: cola, splits: {"../t": test}}\n'),
         f"{CLS}: source.hub.splits: split name '../t' {CHARSET}", CHECK),
    Case("eval-split-name",
         edit_card("cls", "metrics: [accuracy]", 'metrics: [accuracy]\neval_splits: ["a/b"]'),
         f"{CLS}: eval_splits: split name 'a/b' {CHARSET}", EVALUATE),
    Case("model-card-split-name",
         edit("model/cards/cls.yaml", "test: cls/dev.tsv", '"../test": cls/dev.tsv'),
         f"{MODEL_CLS}: source.local.files: split name '../test' {CHARSET}", MODEL_CARDS),
    # ---------------------------------------------------------------- task names
    Case("task-name-101-chars", edit_card("cls", "name: cls", f"name: {'c' * 101}"),
         f"{CLS}: name: String should have at most 100 characters", SPLIT),
    Case("stack-on-path",
         edit_card("cls", "metrics: [accuracy]", 'metrics: [accuracy]\nstack_on: "../tag"'),
         f"{CLS}: stack_on: String should match pattern '^[A-Za-z][A-Za-z0-9_]*$'", CHECK),
    # ---------------------------------------------------------------- submission file names
    Case("submission-file-parent", submission("{test: ../CLS.tsv}"),
         f"{CLS}: submission.files.test: file name '../CLS.tsv' {CHARSET}", SPLIT),
    Case("submission-file-slash", submission("{test: sub/CLS.tsv}"),
         f"{CLS}: submission.files.test: file name 'sub/CLS.tsv' {CHARSET}", SPLIT),
    Case("submission-file-absolute", submission("{test: /tmp/CLS.tsv}"),
         f"{CLS}: submission.files.test: file name '/tmp/CLS.tsv' {CHARSET}", SPLIT),
    Case("submission-file-nul", submission('{test: "CLS\\0.tsv"}'),
         f"{CLS}: submission.files.test: file name 'CLS\\x00.tsv' {CHARSET}", SPLIT),
    Case("submission-file-newline", submission('{test: "CLS.tsv\\nx"}'),
         f"{CLS}: submission.files.test: file name 'CLS.tsv\\nx' {CHARSET}", SPLIT),
    Case("submission-file-300-chars", submission(f"{{test: {LONG}}}"),
         f"{CLS}: submission.files.test: file name {LONG_SHOWN}", SPLIT),
    Case("submission-file-config-json", submission("{test: config.json}"),
         f"{CLS}: submission.files.test: file name 'config.json' {MODEL_FILE}", SPLIT),
    Case("submission-file-hidden", submission("{test: .bashrc}"),
         f"{CLS}: submission.files.test: file name '.bashrc' {CHARSET}", SPLIT),
    Case("submission-file-cards-folder", submission("{test: cards}"),
         f"{CLS}: submission.files.test: file name 'cards' {MODEL_FILE}", SPLIT),
    Case("submission-split-name", submission('{"../test": CLS.tsv}'),
         f"{CLS}: submission.files: split name '../test' {CHARSET}", SPLIT),
    Case("submission-two-splits-one-file", submission("{test: CLS.tsv, validation: cls.tsv}"),
         f"{CLS}: submission.files.validation: cls.tsv is also the file of split test", SPLIT),
    Case("model-card-writes-model-weights",  # into the model folder itself
         submission("{test: model.safetensors}", folder="model/cards"),
         f"{MODEL_CLS}: submission.files.test: file name 'model.safetensors' {MODEL_FILE}",
         (*MODEL_CARDS[:-1], "{case}/model")),
    # ---------------------------------------------------------------- one file, two tasks
    Case("two-tasks-one-file", submission("{test: reg.tsv}", card="ent"),
         "{case}/cards/reg.yaml: test: prediction file reg.tsv is also written for "
         "{case}/cards/ent.yaml: test; give each its own file (submission.files)", SPLIT),
    Case("two-tasks-one-file-but-case", submission("{test: TAG.tsv}"),
         "{case}/cards/tag.yaml: test: prediction file tag.tsv is also written for "
         f"{CLS}: test; give each its own file (submission.files)", SPLIT),
    # ---------------------------------------------------------------- the output folder
    Case("output-file-links-outside", symlink("out/cls.tsv", "outside.txt"),
         f"{{case}}/out/cls.tsv: {LINK}", SPLIT),
    Case("output-file-dangling-link", symlink("out/reg.tsv", "nowhere.txt", None),
         f"{{case}}/out/reg.tsv: {LINK}", SPLIT),
    Case("output-file-link-listed-as-ours",
         steps(manifest(["cls.tsv"]), symlink("out/cls.tsv", "outside.txt")),
         f"{{case}}/out/cls.tsv: {LINK}", SPLIT),
    Case("output-file-foreign", write("out/ent.tsv", "my notes\n"),
         f"{{case}}/out/ent.tsv: {NOT_OURS}", SPLIT),
    Case("output-file-is-a-folder", write("out/tag.tsv/notes.txt", "mine\n"),
         "{case}/out/tag.tsv: is not a regular file; remove it, or give another --output-dir",
         SPLIT),
    Case("manifest-is-a-link", symlink(f"out/{PREDICTIONS_MANIFEST}", "list.json", '{"files": []}'),
         BAD_MANIFEST, SPLIT),
    Case("manifest-lists-a-path", manifest(["../outside.txt"]), BAD_MANIFEST, SPLIT),
    Case("manifest-not-json", write(f"out/{PREDICTIONS_MANIFEST}", b"\xff{"), BAD_MANIFEST, SPLIT),
]  # fmt: skip


@pytest.fixture(scope="module")
def sick(tmp_path_factory):
    return write_sick_tasks(tmp_path_factory.mktemp("names"))


def prepare(case: Case, sick, folder: Path) -> tuple[list[str], str]:
    """Copy the tasks and the model into `folder`, break them; (argv, expected error)."""
    cards, data, model = sick
    shutil.copytree(cards, folder / "cards")
    shutil.copytree(data, folder / "data")
    shutil.copytree(model, folder / "model")
    case.setup(folder)
    argv = [flag.format(case=folder, model=model) for flag in case.flags]
    return argv, case.message.format(case=folder)


def test_the_names_table_is_complete():
    assert len({case.id for case in CASES}) == len(CASES) == 35


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_name_gives_one_error_line_and_writes_nothing(case, sick, tmp_path, capsys):
    argv, expected = prepare(case, sick, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if argv[0] == "cards":  # `cards check` lists every broken card, one line each
        assert err.strip().splitlines() == [expected]
    else:
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            f"error: {expected}"
        ]
        assert out == ""
    assert snapshot(tmp_path) == before  # nothing written, nothing written through a link


@pytest.mark.parametrize("case_id", ["submission-file-nul", "output-file-links-outside"])
def test_exit_code_2_without_traceback(case_id, sick, tmp_path):
    case = next(case for case in CASES if case.id == case_id)
    argv, expected = prepare(case, sick, tmp_path)
    result = run([sys.executable, "-m", "mtnlp.cli", *argv])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {expected}"
    ]
