"""Pushing to the Hub (mocked: no network): which files one commit holds, what the model card says,
and that the pushed files load through both entry points with identical outputs; transformers' own
`model.push_to_hub` publishing the whole model folder (label maps, cards, mtnlp's model card)."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml
from accelerate import PartialState
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.errors import LocalTokenNotFoundError
from transformers import AutoModel, AutoTokenizer

from mtnlp.artifacts.run_folder import save_run
from mtnlp.cards.load import parse_card
from mtnlp.cli import main
from mtnlp.hub.card import model_card, write_model_card
from mtnlp.hub.push import push_to_hub
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.tiny import tiny_bert
from mtnlp.training.args import parse_args
from mtnlp.utils.errors import UserError

REPO_ID = "me/tiny-mt"


def card(name: str, type: str, inputs: list[str], hub: tuple[str, str | None], **extra):
    source = {"hub": {"path": hub[0], "name": hub[1]}}
    data = {"name": name, "type": type, "source": source, "inputs": inputs, **extra}
    return parse_card(data, f"{name}.yaml")


CARDS = [
    card("rte", "classification", ["sentence1", "sentence2"], ("nyu-mll/glue", "rte"),
         labels=["entailment", "not_entailment"], metrics=["accuracy"], description="RTE"),
    card("stsb", "regression", ["sentence1", "sentence2"], ("nyu-mll/glue", "stsb"),
         metrics=["pearson", "spearmanr"]),
    card("mnli", "classification", ["premise", "hypothesis"], ("nyu-mll/glue", "mnli"),
         labels=["entailment", "neutral", "contradiction"], metrics=["accuracy"],
         eval_splits=["validation_matched", "validation_mismatched"]),
    card("ner", "tagging", ["tokens"], ("lhoestq/conll2003", None),
         labels=["O", "B-PER", "I-PER"], metrics=["seqeval"], label_column="ner_tags"),
]  # fmt: skip
RESULTS = {
    "rte": {"accuracy": 0.625},
    "stsb": {"pearson": 0.81, "spearmanr": 0.79},
    "mnli": {"accuracy": 0.7, "accuracy_validation_mismatched": 0.71},
    "ner": {"overall_f1": 0.5},
}
SUMMARY = {
    "args": {"model": "bert-base-uncased", "sampler": "temperature", "weighting": "uncertainty"},
    "steps": 7,
    "mixed_precision": "bf16",
    "num_processes": 1,
    "task_steps": {"rte": 2, "stsb": 2, "mnli": 2, "ner": 1},
}
HISTORY = [
    {"step": 7, "loss": {"rte": 0.7, "ner": 1.1}, "share": {"rte": 0.5, "ner": 0.5}},
    {"step": 7, "eval": RESULTS},
]


@pytest.fixture(scope="module")
def run(tiny_tokenizer, tmp_path_factory):
    """A saved training run (what `training.save_run` writes), plus a checkpoint not to push."""
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(
        tiny_bert(tiny_tokenizer), [c.model_spec() for c in CARDS]
    ).eval()
    folder = tmp_path_factory.mktemp("hub") / "run"
    save_run(folder, model, tiny_tokenizer, CARDS, RESULTS, HISTORY, SUMMARY)
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "optimizer.bin").write_bytes(b"state")
    return SimpleNamespace(folder=folder, model=model, tokenizer=tiny_tokenizer)


def full(repo_id: str) -> str:
    """The Hub puts a bare repository name in the user's namespace."""
    return repo_id if "/" in repo_id else f"me/{repo_id}"


@pytest.fixture
def hub():
    """HfApi.create_repo / create_commit replaced: each commit's files (path -> bytes) recorded."""
    commits: list[dict] = []

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            with operation.as_file() as file:
                files[operation.path_in_repo] = file.read()
        commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/1")

    with (
        mock.patch.dict("os.environ", {"HF_HUB_OFFLINE": "1"}),
        mock.patch.object(
            HfApi,
            "create_repo",
            autospec=True,
            side_effect=lambda self, repo_id, **kw: RepoUrl(
                f"https://huggingface.co/{full(repo_id)}"
            ),
        ) as create_repo,
        mock.patch.object(HfApi, "create_commit", autospec=True, side_effect=create_commit),
    ):
        yield SimpleNamespace(create_repo=create_repo, commits=commits)


def test_model_card_metadata(run):
    card = ModelCard(model_card(run.model.config, REPO_ID, run.folder))
    data = card.data.to_dict()
    assert data["library_name"] == "mtnlp"
    assert {"mtnlp", "multi-task", "text-classification", "token-classification"} <= set(
        data["tags"]
    )
    assert data["base_model"] == "bert-base-uncased"
    assert data["datasets"] == ["lhoestq/conll2003", "nyu-mll/glue"]
    [entry] = data["model-index"]
    assert entry["name"] == "tiny-mt"
    reported = {
        (r["task"]["name"], metric["name"], r["dataset"]["split"], metric["value"])
        for r in entry["results"]
        for metric in r["metrics"]
    }
    assert reported == {
        ("rte", "accuracy", "validation", 0.625),
        ("stsb", "pearson", "validation", 0.81),
        ("stsb", "spearmanr", "validation", 0.79),
        ("mnli", "accuracy", "validation_matched", 0.7),
        ("mnli", "accuracy_validation_mismatched", "validation_mismatched", 0.71),
        ("ner", "overall_f1", "validation", 0.5),
    }
    by_task = {r["task"]["name"]: r for r in entry["results"]}
    assert by_task["ner"]["task"]["type"] == "token-classification"
    assert by_task["rte"]["dataset"] == {
        "name": "nyu-mll/glue rte",
        "type": "nyu-mll/glue",
        "config": "rte",
        "split": "validation",
    }


def test_model_card_metadata_the_hub_understands(run, tmp_path):
    """What the Hub reads from the card's YAML, as huggingface_hub parses it: evaluate's metric
    ids, the Hub's task types, pipeline tag, license, languages and base model (recorded by the
    run: its flags, or its encoder's card)."""
    folder = tmp_path / "run"
    shutil.copytree(run.folder, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    args = {**SUMMARY["args"], "model": "enc", "license": "apache-2.0", "language": ["en"],
            "base_model": "google-bert/bert-base-uncased"}  # fmt: skip
    (folder / "train_summary.json").write_text(json.dumps({**SUMMARY, "args": args}))
    data = ModelCard(model_card(run.model.config, REPO_ID, folder)).data.to_dict()
    assert data["license"] == "apache-2.0" and data["language"] == ["en"]
    assert data["base_model"] == "google-bert/bert-base-uncased"
    assert data["metrics"] == ["accuracy", "pearsonr", "seqeval", "spearmanr"]
    assert "pipeline_tag" not in data  # sentence and token classification: no one pipeline
    results = data["model-index"][0]["results"]
    reported = {
        (r["task"]["name"], r["task"]["type"], metric["type"], metric["name"])
        for r in results
        for metric in r["metrics"]
    }
    assert ("stsb", "sentence-similarity", "pearsonr", "pearson") in reported
    assert ("stsb", "sentence-similarity", "spearmanr", "spearmanr") in reported
    assert ("ner", "token-classification", "seqeval", "overall_f1") in reported
    assert ("rte", "text-classification", "accuracy", "accuracy") in reported

    # push flags replace the run's values
    text = model_card(run.model.config, REPO_ID, folder, license="mit", language=["de", "fr"])
    data = ModelCard(text).data.to_dict()
    assert (data["license"], data["language"]) == ("mit", ["de", "fr"])


@pytest.mark.parametrize(
    ("tasks", "tag"),
    [(["rte", "stsb"], "text-classification"), (["ner"], "token-classification")],
)
def test_pipeline_tag_of_one_kind_of_task(tiny_tokenizer, tmp_path, tasks, tag):
    chosen = [c for c in CARDS if c.name in tasks]
    model = MultiTaskModel.from_encoder(tiny_bert(tiny_tokenizer), [c.model_spec() for c in chosen])
    save_run(tmp_path, model, tiny_tokenizer, chosen, {}, [], {})
    assert ModelCard(model_card(model.config, REPO_ID, tmp_path)).data.pipeline_tag == tag


def test_card_metadata_comes_from_the_encoders_card(tmp_path):
    """A local encoder folder's card (an mtnlp run's, say) gives base model, license and
    languages; flags win; a folder in the Hub cache names its repository."""
    from mtnlp.training.setup import run_arguments

    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "README.md").write_text(
        "---\nlicense: cc-by-4.0\nlanguage: de\nbase_model: deepset/gbert-base\n---\n# enc\n"
    )
    recorded = run_arguments(parse_args(["--model", str(encoder)]))
    assert recorded["base_model"] == "deepset/gbert-base"
    assert (recorded["license"], recorded["language"]) == ("cc-by-4.0", ["de"])
    flags = ["--model", str(encoder), "--license", "mit", "--language", "en", "de"]
    assert run_arguments(parse_args(flags))["license"] == "mit"
    assert run_arguments(parse_args(flags))["language"] == ["en", "de"]
    snapshot = tmp_path / "models--google-bert--bert-base-uncased" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    assert run_arguments(parse_args(["--model", str(snapshot)]))["base_model"] == (
        "google-bert/bert-base-uncased"
    )
    assert run_arguments(parse_args(["--model", "tiny"]))["base_model"] is None


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--license", "Apache 2.0"], "--license: expected a Hub license id such as apache-2.0"),
        (["--language", "en", "English"], "--language: expected ISO 639 language codes"),
    ],
)
def test_bad_card_metadata_flags_are_one_line(run, hub, flags, error):
    with pytest.raises(UserError, match=error):
        parse_args(flags)
    values = {"license": flags[1]} if flags[0] == "--license" else {"language": flags[1:]}
    with pytest.raises(UserError, match=error):
        push_to_hub(run.folder, REPO_ID, **values)
    assert hub.commits == []


def test_model_card_text(run):
    text = ModelCard(model_card(run.model.config, REPO_ID, run.folder)).text
    assert "| rte | classification | RTE | entailment, not_entailment | accuracy |" in text
    assert "| stsb | regression |  | (a real value) | pearson, spearmanr |" in text
    assert "| ner | tagging |  | O, B-PER, I-PER | seqeval | overall_f1 0.5000 |" in text
    for row in ["| task sampler | temperature |", "| loss weighting | uncertainty |",
                "| optimizer steps | 7 |", "| mixed precision | bf16 |"]:  # fmt: skip
        assert row in text
    assert "![training loss](plots/loss.png)" in text
    # the usage snippet runs the tasks that read the same input as the first (pairs here)
    assert f'mtnlp.MultiTaskModel.from_pretrained("{REPO_ID}")' in text
    assert "tasks=['rte', 'stsb', 'mnli']" in text
    assert f"mtnlp predict {REPO_ID} --tasks rte,stsb,mnli" in text


def test_model_card_cells(run, tmp_path):
    """Settings keep their own notation; a `|` or line break in a value stays inside its cell."""
    folder = tmp_path / "run"
    shutil.copytree(run.folder, folder)
    args = {**SUMMARY["args"], "learning_rate": 2e-05, "batch_size": 16}
    (folder / "train_summary.json").write_text(json.dumps({**SUMMARY, "args": args}))
    rte = yaml.safe_load((folder / "cards/rte.yaml").read_text())
    (folder / "cards/rte.yaml").write_text(yaml.safe_dump({**rte, "description": "a | b\nc"}))
    text = ModelCard(model_card(run.model.config, REPO_ID, folder)).text
    assert "| learning rate | 2e-05 |" in text
    assert "| batch size per process | 16 |" in text
    assert "| rte | classification | a \\| b c | entailment, not_entailment |" in text


def test_push_folder_commits_the_artifact(run, hub, tmp_path):
    commit = push_to_hub(run.folder, REPO_ID, private=True)
    assert commit.commit_url.startswith(f"https://huggingface.co/{REPO_ID}")
    hub.create_repo.assert_called_once_with(
        mock.ANY, REPO_ID, private=True, token=None, exist_ok=True
    )
    [pushed] = hub.commits
    files = pushed["files"]
    expected = {
        "README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "label_maps.json", "eval_results.json", "train_summary.json", "train_log.jsonl",
        "report.md", "plots/loss.png", "plots/dev_metrics.png", "plots/task_share.png",
        *(f"cards/{c.name}.yaml" for c in CARDS),
    }  # fmt: skip
    assert set(files) == expected  # no checkpoint, no hidden staging folder, no code
    readme = files["README.md"].decode()
    assert readme == model_card(run.model.config, REPO_ID, run.folder)
    assert yaml.safe_load(readme.split("---")[1])["library_name"] == "mtnlp"
    assert json.loads(files["label_maps.json"])["mnli"] == {
        "id2label": {"0": "entailment", "1": "neutral", "2": "contradiction"},
        "label2id": {"entailment": 0, "neutral": 1, "contradiction": 2},
    }
    assert yaml.safe_load(files["cards/rte.yaml"])["labels"] == ["entailment", "not_entailment"]

    # what was pushed loads through both entry points, with every head, identically
    for path, content in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(content)
    direct = MultiTaskModel.from_pretrained(tmp_path).eval()
    auto = AutoModel.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    inputs = tokenizer(["the cat sat", "a dog runs in the park"], padding=True, return_tensors="pt")
    tasks = [c.name for c in CARDS]
    assert isinstance(auto, MultiTaskModel)
    with torch.no_grad():
        original = run.model.forward_tasks(tasks, **inputs)
        by_class = direct.forward_tasks(tasks, **inputs)
        by_auto = auto.forward_tasks(tasks, **inputs)
    for task in tasks:
        assert torch.equal(by_auto[task].logits, by_class[task].logits), task
        torch.testing.assert_close(by_class[task].logits, original[task].logits, rtol=0, atol=1e-6)


def test_push_a_loaded_model_object_with_its_tokenizer(run, hub):
    """`mtnlp.push_to_hub(model, ...)`: the card and run files come from the folder it was loaded
    from (its companion files), the tokenizer is the one given."""
    push_to_hub(MultiTaskModel.from_pretrained(run.folder), REPO_ID, tokenizer=run.tokenizer)
    files = hub.commits[0]["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "cards/ner.yaml"} <= set(files)
    assert b"library_name: mtnlp" in files["README.md"]
    assert b"| mixed precision | bf16 |" in files["README.md"]
    assert files["README.md"].decode() == model_card(run.model.config, REPO_ID, run.folder)
    assert files["eval_results.json"] == (run.folder / "eval_results.json").read_bytes()
    assert hub.commits[0]["commit_message"] == "Upload mtnlp multi-task model"


def other_run(run, folder: Path) -> Path:
    """A copy of the run folder's run files, with other dev results and another step count."""
    shutil.copytree(run.folder / "cards", folder / "cards")
    results = {**RESULTS, "rte": {"accuracy": 0.875}}
    (folder / "eval_results.json").write_text(json.dumps(results))
    (folder / "train_summary.json").write_text(json.dumps({**SUMMARY, "steps": 99}))
    return folder


def test_push_folder_with_another_run_dir(run, hub, tmp_path):
    """`run_dir` gives the card, metrics and summary; the weights stay the folder's."""
    other = other_run(run, tmp_path / "other")
    push_to_hub(run.folder, REPO_ID, run_dir=other)
    files = hub.commits[0]["files"]
    readme = files["README.md"].decode()
    rte = "| rte | classification | RTE | entailment, not_entailment | accuracy | accuracy 0.8750 |"
    assert rte in readme
    assert "| optimizer steps | 99 |" in readme
    assert readme == model_card(run.model.config, REPO_ID, other)
    assert files["eval_results.json"] == (other / "eval_results.json").read_bytes()
    assert files["train_summary.json"] == (other / "train_summary.json").read_bytes()
    assert files["model.safetensors"] == (run.folder / "model.safetensors").read_bytes()
    assert "plots/loss.png" in files  # the folder's run files that run_dir lacks stay

    with pytest.raises(UserError, match="no-such-run: no such run folder"):
        push_to_hub(run.folder, REPO_ID, run_dir=tmp_path / "no-such-run")

    # a model object: run_dir's files win over the companion files it was loaded with
    push_to_hub(MultiTaskModel.from_pretrained(run.folder), REPO_ID, run_dir=other)
    files = hub.commits[1]["files"]
    assert "| optimizer steps | 99 |" in files["README.md"].decode()
    assert files["eval_results.json"] == (other / "eval_results.json").read_bytes()


# ------------------------------------------------------------------ the model's own publishing
@pytest.fixture
def carded(run, tmp_path) -> Path:
    """A copy of the run folder, finished as training finishes it: with its model card."""
    folder = tmp_path / "carded"
    shutil.copytree(run.folder, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    write_model_card(folder, REPO_ID)
    return folder


COMPANIONS = {
    "README.md", "eval_results.json", "train_summary.json", "plots/loss.png",
    "plots/dev_metrics.png", "plots/task_share.png", *(f"cards/{c.name}.yaml" for c in CARDS),
}  # fmt: skip
MNLI_MAPS = {
    "id2label": {"0": "entailment", "1": "neutral", "2": "contradiction"},
    "label2id": {"entailment": 0, "neutral": 1, "contradiction": 2},
}


def test_write_model_card(run, tmp_path):
    folder = tmp_path / "glue-run"
    shutil.copytree(run.folder, folder)
    path = write_model_card(folder)
    assert path == folder / "README.md"
    text = path.read_text(encoding="utf-8")
    assert text == model_card(run.model.config, "glue-run", folder)  # default id: folder name
    assert 'mtnlp.MultiTaskModel.from_pretrained("glue-run")' in text
    assert "| optimizer steps | 7 |" in text
    assert ModelCard(text).data.to_dict()["model-index"][0]["name"] == "glue-run"
    write_model_card(folder, REPO_ID)
    assert path.read_text(encoding="utf-8") == model_card(run.model.config, REPO_ID, folder)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no staging left


def test_model_push_to_hub_uploads_the_whole_model(carded, hub):
    """transformers' own `model.push_to_hub(repo)`: weights, config, label maps, cards, run files,
    and mtnlp's model card as README.md (not transformers' generic one)."""
    model = MultiTaskModel.from_pretrained(carded)
    model.push_to_hub(REPO_ID, commit_message="Upload tiny-mt")
    [commit] = hub.commits
    assert (commit["repo_id"], commit["commit_message"]) == (REPO_ID, "Upload tiny-mt")
    files = commit["files"]
    assert set(files) == {"config.json", "model.safetensors", "label_maps.json", *COMPANIONS}
    readme = files["README.md"].decode()
    assert readme == (carded / "README.md").read_text(encoding="utf-8")
    assert readme == model_card(model.config, REPO_ID, carded)
    assert ModelCard(readme).data.to_dict()["library_name"] == "mtnlp"
    assert "| mixed precision | bf16 |" in readme
    assert "transformers model" not in readme
    assert json.loads(files["label_maps.json"])["mnli"] == MNLI_MAPS
    assert "rte" in json.loads(files["label_maps.json"])
    assert "stsb" not in json.loads(files["label_maps.json"])  # regression: no labels
    for name in COMPANIONS - {"README.md"}:
        assert files[name] == (carded / name).read_bytes(), name
    assert files["model.safetensors"] == (carded / "model.safetensors").read_bytes()


def test_save_pretrained_push_to_hub_uploads_the_model_card(carded, hub, tmp_path):
    """The other entry point, `save_pretrained(folder, push_to_hub=True)`, also publishes mtnlp's
    card, into a folder that did not hold one."""
    model = MultiTaskModel.from_pretrained(carded)
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id=REPO_ID)
    files = hub.commits[0]["files"]
    assert {"config.json", "model.safetensors", "label_maps.json", *COMPANIONS} <= set(files)
    assert files["README.md"] == (carded / "README.md").read_bytes()
    assert (tmp_path / "out" / "README.md").read_bytes() == (carded / "README.md").read_bytes()


def test_model_without_a_card_pushes_transformers_card(run, hub):
    """A model built in memory has no companion files: transformers' card, the label maps."""
    run.model.push_to_hub(REPO_ID)
    files = hub.commits[0]["files"]
    assert set(files) == {"config.json", "model.safetensors", "label_maps.json", "README.md"}
    assert b"library_name: mtnlp" not in files["README.md"]
    assert json.loads(files["label_maps.json"])["mnli"] == MNLI_MAPS


def test_companion_files_round_trip(carded, tmp_path):
    """from_pretrained keeps the folder's companion files as bytes; save_pretrained writes them
    back with fresh label maps, and no other file of the run (log, report, tokenizer)."""
    model = MultiTaskModel.from_pretrained(carded)
    assert set(model.companion_files) == COMPANIONS
    assert model.companion_files["cards/rte.yaml"] == (carded / "cards/rte.yaml").read_bytes()
    assert set(AutoModel.from_pretrained(carded).companion_files) == COMPANIONS
    out = tmp_path / "saved"
    model.save_pretrained(out)
    saved = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert saved == {"config.json", "model.safetensors", "label_maps.json", *COMPANIONS}
    for name in COMPANIONS:
        assert (out / name).read_bytes() == (carded / name).read_bytes(), name
    assert json.loads((out / "label_maps.json").read_text())["mnli"] == MNLI_MAPS
    again = MultiTaskModel.from_pretrained(out)
    assert again.companion_files == model.companion_files
    assert MultiTaskModel.from_pretrained(carded).companion_files["README.md"].startswith(b"---")


def test_companion_file_names_stay_in_the_folder(carded, tmp_path):
    model = MultiTaskModel.from_pretrained(carded)
    for name in ["../evil.yaml", "cards/../../evil.yaml", "/tmp/evil.yaml", "model.py"]:
        model.companion_files = {name: b"x"}
        with pytest.raises(ValueError, match="match none of"):
            model.save_pretrained(tmp_path / "out" / "inner")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil.yaml").exists()


def test_model_card_template_is_package_data():
    template = resources.files("mtnlp.hub") / "model_card_template.md"
    assert template.is_file()
    assert "{{ card_data }}" in template.read_text(encoding="utf-8")
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '[tool.setuptools.package-data]\nmtnlp = ["hub/*.md"]' in pyproject  # in the wheel


def test_card_names_the_full_repository_id(run, hub):
    push_to_hub(run.folder, "tiny-mt")
    assert hub.commits[0]["repo_id"] == "me/tiny-mt"
    assert b'MultiTaskModel.from_pretrained("me/tiny-mt")' in hub.commits[0]["files"]["README.md"]


def test_only_the_main_process_pushes(run, hub):
    with mock.patch.object(
        PartialState, "is_main_process", new_callable=mock.PropertyMock, return_value=False
    ):
        assert push_to_hub(run.folder, REPO_ID) is None
    hub.create_repo.assert_not_called()
    assert hub.commits == []


def test_push_errors_are_user_errors(run, hub, tmp_path):
    with pytest.raises(UserError, match="--hub-model-id: 'a/b/c' is not a valid Hub model id"):
        push_to_hub(run.folder, "a/b/c")
    with pytest.raises(UserError, match="not an mtnlp model folder"):
        push_to_hub(tmp_path, REPO_ID)
    hub.create_repo.side_effect = LocalTokenNotFoundError("Token is required, but no token found")
    with pytest.raises(UserError, match=f"push to {REPO_ID}: Token is required, but no token"):
        push_to_hub(run.folder, REPO_ID)
    with pytest.raises(UserError, match="--hub-model-id: required to push"):
        parse_args(["--push-to-hub"])  # before any training starts
    args = parse_args(["--push-to-hub", "--hub-model-id", REPO_ID, "--hub-private"])
    assert (args.push_to_hub, args.hub_model_id, args.hub_private) == (True, REPO_ID, True)


@pytest.mark.skipif(
    find_spec("onnxruntime") is None or find_spec("onnx") is None,
    reason="onnx and onnxruntime are not installed (pip install 'mtnlp[onnx]')",
)
def test_push_with_onnx_graphs(run, hub, tmp_path):
    """`onnx_dir`: the export's graph and metadata beside the weights, a card that says how to
    run them, and a repository that predicts through ONNX Runtime as the model does."""
    from mtnlp.export.onnx import export_onnx
    from mtnlp.inference.pipeline import MultiTaskPipeline

    export = export_onnx(run.folder, tmp_path / "export")
    push_to_hub(run.folder, REPO_ID, onnx_dir=export)
    files = hub.commits[0]["files"]
    assert {"model.onnx", "onnx.json", "model.safetensors"} <= set(files)
    assert files["model.onnx"] == (export / "model.onnx").read_bytes()
    assert files["config.json"] == (run.folder / "config.json").read_bytes()
    readme = files["README.md"].decode()
    assert readme == model_card(run.model.config, REPO_ID, run.folder, onnx_files=["model.onnx"])
    assert f'mtnlp.MultiTaskPipeline.from_onnx("{REPO_ID}")' in readme
    assert f"mtnlp predict {REPO_ID} --backend onnx --tasks rte,stsb,mnli" in readme
    assert "model.int8.onnx" not in readme

    pushed = tmp_path / "pushed"  # what a download without the weights holds
    for path, content in files.items():
        if not path.endswith(".safetensors"):
            (pushed / path).parent.mkdir(parents=True, exist_ok=True)
            (pushed / path).write_bytes(content)
    pair = ("A man sleeps.", "Someone is asleep.")
    expected = MultiTaskPipeline(run.model, run.tokenizer)(pair)
    got = MultiTaskPipeline.from_onnx(pushed)(pair)
    assert got["rte"]["label"] == expected["rte"]["label"]
    assert got["stsb"]["value"] == pytest.approx(expected["stsb"]["value"], abs=1e-4)

    other = shutil.copytree(export, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "tasks": config["tasks"][:1]}))
    with pytest.raises(UserError, match="other: an export of another model"):
        push_to_hub(run.folder, REPO_ID, onnx_dir=other)
    with pytest.raises(UserError, match=r"--onnx: .*: no \*\.onnx graph"):
        push_to_hub(run.folder, REPO_ID, onnx_dir=run.folder)

    # `mtnlp push --onnx`: without a folder, an fp32 export made for the push
    main(["push", str(run.folder), "--hub-model-id", REPO_ID, "--onnx"])
    files = hub.commits[-1]["files"]
    assert {"model.onnx", "onnx.json", "model.safetensors"} <= set(files)
    assert "model.int8.onnx" not in files


def test_nothing_pushed_is_code(run, hub):
    push_to_hub(run.folder, REPO_ID)
    assert not [p for p in hub.commits[0]["files"] if Path(p).suffix in (".py", ".bin", ".pkl")]
