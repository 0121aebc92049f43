"""The `mtnlp` command: every subcommand through the installed console script, on a tiny model.

The model folder is built once, in-process (`training.save_run` of a tiny random model); only
`mtnlp train` trains, for 3 steps. Pushes go to a Hub test double that a `sitecustomize` module
installs in the subprocess (no network): it records each commit as JSON.
"""

from __future__ import annotations

import csv
import functools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_runs import WORDS, write_tiny_tasks

from mtnlp.artifacts.run_folder import save_run
from mtnlp.cards.load import load_cards
from mtnlp.cli import main
from mtnlp.inference.pipeline import MultiTaskPipeline
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.tiny import tiny_bert, train_wordpiece

from conftest import TINY_TEXT, TRAINING_TIMEOUT, start_command

MTNLP = Path(sys.executable).with_name("mtnlp")
FAKE_HUB = """
import json, os, types
from huggingface_hub import HfApi, RepoUrl

def create_repo(self, repo_id, **kwargs):
    os.environ["FAKE_HUB_REPO"] = json.dumps({"repo_id": repo_id, **kwargs})
    return RepoUrl("https://huggingface.co/" + repo_id)

def create_commit(self, repo_id, operations, **kwargs):
    files = {}
    for operation in operations:
        with operation.as_file() as file:
            files[operation.path_in_repo] = file.read().decode("utf-8", "replace")
    record = {"repo": json.loads(os.environ["FAKE_HUB_REPO"]), "files": files}
    with open(os.environ["FAKE_HUB_LOG"], "w") as log:
        json.dump(record, log)
    return types.SimpleNamespace(commit_url="https://huggingface.co/" + repo_id + "/commit/1")

HfApi.create_repo = create_repo
HfApi.create_commit = create_commit
"""


class Command:
    """`mtnlp ARGS` started in a subprocess now (it imports torch and transformers meanwhile);
    `finished` feeds `stdin` and waits for it."""

    def __init__(self, *args: str, stdin: str = "", hub_log: Path | None = None, cwd=None):
        env = {}
        if hub_log is not None:  # the Hub test double, imported at start-up by `site`
            (hub_log.parent / "sitecustomize.py").write_text(FAKE_HUB)
            env.update(PYTHONPATH=str(hub_log.parent), FAKE_HUB_LOG=str(hub_log))
        self.stdin = stdin
        self.process = start_command([str(MTNLP), *args], env=env, cwd=cwd)

    @functools.cached_property
    def finished(self) -> tuple[int, str, str]:
        # all of this module's commands share the cores, one of them trains
        stdout, stderr = self.process.communicate(self.stdin, timeout=TRAINING_TIMEOUT)
        return self.process.returncode, stdout, stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Cards and data of three tiny tasks (cls: text, reg: pair, tag: IOB tags) and a saved,
    untrained model of them with its tokenizer and cards."""
    root = tmp_path_factory.mktemp("cli")
    cards_dir, data_dir = write_tiny_tasks(root)
    cards = load_cards([cards_dir])
    tokenizer = train_wordpiece([*TINY_TEXT, " ".join(WORDS)], vocab_size=200)
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(tiny_bert(tokenizer), [c.model_spec() for c in cards])
    save_run(root / "model", model, tokenizer, cards, {}, [], {})
    bad = root / "bad" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text(
        (cards_dir / "cls.yaml").read_text().replace("labels: [neg, pos]", "labels: neg")
    )
    (root / "bad" / "broken.yaml").write_text("name: [unclosed\n")
    return SimpleNamespace(
        root=root, cards=cards_dir, data=data_dir, model=root / "model", bad=bad.parent
    )


PREDICT_INPUT = [
    {"text": "the cat sat on a mat"},
    {"text": "alice ran", "text_pair": "bob sat"},
    {"text": "happy dog"},
]


@pytest.fixture(scope="module")
def commands(tiny):
    """Every subprocess of this module, started at once: they are independent, and most of their
    time goes to importing torch, which a second core halves."""
    run = tiny.root / "run"
    started = {
        "train": Command(
            "train", "--model", "tiny", "--cards", str(tiny.cards), "--data-dir", str(tiny.data),
            "--max-steps", "3", "--batch-size", "4", "--log-every", "1", "--max-eval-samples",
            "8", "--output-dir", str(run), "--push-to-hub", "--hub-model-id", "me/tiny-mt",
            hub_log=tiny.root / "train-hub.json", cwd=tiny.root,
        ),
        "evaluate": Command(
            "evaluate", str(tiny.model), "--data-dir", str(tiny.data), "--max-eval-samples", "8"
        ),
        "predict": Command(
            "predict", str(tiny.model), "--input", "-",
            stdin="".join(json.dumps(line) + "\n" for line in PREDICT_INPUT),
        ),
        "cards": Command("cards", "check", str(tiny.cards), str(tiny.bad)),
        "push": Command(
            "push", str(tiny.model), "--hub-model-id", "me/tiny", "--private",
            hub_log=tiny.root / "push-hub.json",
        ),
    }  # fmt: skip
    yield started
    for command in started.values():
        if command.process.poll() is None:
            command.process.kill()
            command.process.wait()


def pipeline(folder: Path) -> MultiTaskPipeline:
    from transformers import AutoTokenizer

    model = MultiTaskModel.from_pretrained(folder)
    return MultiTaskPipeline(model, AutoTokenizer.from_pretrained(folder))


def test_train(tiny, commands):
    code, _, stderr = commands["train"].finished
    assert code == 0, stderr[-3000:]
    output = tiny.root / "run"
    assert set(json.loads((output / "eval_results.json").read_text())) == {"cls", "reg", "tag"}
    for name in ("report.md", "plots/loss.png", "plots/dev_metrics.png", "plots/task_share.png"):
        assert (output / name).is_file(), name
    assert "## Final dev metrics" in (output / "report.md").read_text()
    pushed = json.loads((tiny.root / "train-hub.json").read_text())
    assert pushed["repo"]["repo_id"] == "me/tiny-mt" and pushed["repo"]["private"] is None
    assert {"README.md", "model.safetensors", "cards/tag.yaml", "report.md"} <= set(pushed["files"])
    assert "library_name: mtnlp" in pushed["files"]["README.md"]


def test_evaluate(tiny, commands):
    code, stdout, stderr = commands["evaluate"].finished
    assert code == 0, stderr[-3000:]
    metrics = json.loads(stdout)
    assert set(metrics) == {"cls", "reg", "tag"}
    assert set(metrics["tag"]) >= {"overall_f1", "overall_accuracy"}
    # the same accuracy as the pipeline's predictions on the first 8 dev sentences
    with open(tiny.data / "cls" / "dev.tsv", encoding="utf-8") as file:
        rows = list(csv.DictReader(file, delimiter="\t"))[:8]
    predicted = pipeline(tiny.model)([row["sentence"] for row in rows], tasks=["cls"])
    correct = [p["cls"]["label"] == row["label"] for p, row in zip(predicted, rows, strict=True)]
    assert metrics["cls"]["accuracy"] == pytest.approx(sum(correct) / len(rows))


@pytest.mark.parametrize("training", [False, True])
def test_evaluate_leaves_the_model_in_the_mode_it_had(training, tiny, monkeypatch, capsys):
    """`mtnlp evaluate` gets an eval-mode model; the training loop's model trains on after."""
    from mtnlp.inference import loading

    loaded, load_model = [], loading.load_model

    def load(name: str):
        model, tokenizer = load_model(name)
        loaded.append(model.train(training))
        return model, tokenizer

    monkeypatch.setattr(loading, "load_model", load)
    main(["evaluate", str(tiny.model), "--data-dir", str(tiny.data), "--max-eval-samples", "4"])
    assert set(json.loads(capsys.readouterr().out)) == {"cls", "reg", "tag"}
    assert {module.training for module in loaded[0].modules()} == {training}


def test_predict(tiny, commands):
    code, stdout, stderr = commands["predict"].finished
    assert code == 0, stderr[-3000:]
    outputs = [json.loads(line) for line in stdout.splitlines()]
    expected = pipeline(tiny.model)(PREDICT_INPUT)
    assert [sorted(o) for o in outputs] == [["cls", "tag"], ["reg"], ["cls", "tag"]]
    for output, reference in zip(outputs, expected, strict=True):
        for task, value in output.items():
            assert value.get("label") == reference[task].get("label")
            assert value.get("tags") == reference[task].get("tags")
            assert value.get("value") == pytest.approx(reference[task].get("value"), abs=1e-5)


def test_predict_errors_name_the_line(tiny, tmp_path, capsys):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a", "text_pair": "b"}\n{"text": "a"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tiny.model), "--tasks", "reg", "--input", str(inputs)])
    assert exit_info.value.code == 2
    assert f"error: {inputs}: input 2 has no text_pair, but task reg reads a text pair" in (
        capsys.readouterr().err
    )
    inputs.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(SystemExit):
        main(["predict", str(tiny.model), "--input", str(inputs)])
    assert f"error: {inputs}: line 2: not JSON" in capsys.readouterr().err


def test_cards_check(tiny, commands, capsys):
    code, _, stderr = commands["cards"].finished
    assert code == 2
    assert stderr.strip().splitlines() == [
        f"{tiny.bad / 'bad.yaml'}: labels: expected a list of strings",
        f"{tiny.bad / 'broken.yaml'}: line 2: YAML syntax error: expected ',' or ']', but got "
        "'<stream end>'",
    ]
    main(["cards", "check", str(tiny.cards)])
    assert capsys.readouterr().out == "3 card(s) OK: cls, reg, tag\n"


def test_push(tiny, commands):
    code, stdout, stderr = commands["push"].finished
    assert code == 0, stderr[-3000:]
    assert stdout.strip() == "https://huggingface.co/me/tiny/commit/1"
    pushed = json.loads((tiny.root / "push-hub.json").read_text())
    assert pushed["repo"]["private"] is True
    expected = {"config.json", "tokenizer.json", "label_maps.json", "cards/reg.yaml"}
    assert expected <= set(pushed["files"])
    assert "| reg | regression |" in pushed["files"]["README.md"]


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["train"], "--hub-model-id"),
        (["evaluate"], "--max-eval-samples"),
        (["predict"], "--input"),
        (["cards", "check"], "paths"),
        (["push"], "--hub-model-id"),
        ([], "evaluate"),
    ],
)
def test_help(command, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mtnlp {' '.join(command)}".rstrip())
    assert flag in out


def test_train_without_cards(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no tasks/glue to default to
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "tiny"])
    assert exit_info.value.code == 2
    assert "error: --cards: give task-card files or folders (there is no tasks/glue here)" in (
        capsys.readouterr().err
    )
