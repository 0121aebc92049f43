"""Issue 11, items 10, 11, 14, 15 and 19 (model card): a model folder never runs code (no custom
metric without `--allow-custom-metrics`, no pickle), loads strictly or not at all, and the Hub out
of reach is one line; the model card shows no local folder. The table of exact CLI messages is
`HARDENING_SAFETY_CASES` in test_bad_input.py; these are the checks around it."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import datasets
import pytest
import torch
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub.utils import httpx
from safetensors.torch import load_file
from tiny_runs import write_tiny_tasks
from transformers import AutoModel

from mtnlp.artifacts.run_folder import save_run
from mtnlp.cards.load import load_cards
from mtnlp.cli import main
from mtnlp.data.read import load_raw
from mtnlp.hub.card import model_card
from mtnlp.hub.push import push_to_hub
from mtnlp.metrics import load_evaluate_module
from mtnlp.modeling.config import MultiTaskConfig
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.tiny import tiny_bert, train_wordpiece
from mtnlp.training.checkpointing import read_meta
from mtnlp.utils.errors import UserError
from mtnlp.utils.files import LOCK_FILE, atomic_folder, output_lock, staging_folder

from conftest import REPO


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny tasks and a saved, untrained model of them."""
    root = tmp_path_factory.mktemp("safety")
    cards_dir, data_dir = write_tiny_tasks(root, train_size=8, dev_size=5)
    cards = load_cards([cards_dir])
    tokenizer = train_wordpiece(["the cat sat on a mat", "alice ran to bob"], vocab_size=60)
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(tiny_bert(tokenizer), [c.model_spec() for c in cards])
    save_run(root / "model", model, tokenizer, cards, {"cls": {"accuracy": 0.5}}, [], {})
    return SimpleNamespace(cards=cards_dir, data=data_dir, model=root / "model", weights=model)


@pytest.fixture
def model(tiny, tmp_path) -> Path:
    """A copy of the saved model, to break."""
    return Path(shutil.copytree(tiny.model, tmp_path / "model"))


# ------------------------------------------------------------------------------ item 10
def test_custom_metrics_run_only_when_allowed(model, tiny, capsys):
    load_evaluate_module.cache_clear()  # evaluate.load runs once per name and process
    card = model / "cards" / "cls.yaml"
    card.write_text(card.read_text().replace("- accuracy", "- someone/metric"))
    module = SimpleNamespace(compute=mock.Mock(return_value={"custom": 0.25, "counts": [1, 2]}))
    command = ["evaluate", str(model), "--data-dir", str(tiny.data), "--tasks", "cls"]
    with mock.patch("evaluate.load", return_value=module) as load:
        with pytest.raises(SystemExit):
            main(command)
        load.assert_not_called()
        assert "pass --allow-custom-metrics to allow it" in capsys.readouterr().err
        main([*command, "--allow-custom-metrics"])
    load.assert_called_once_with("someone/metric")
    assert json.loads(capsys.readouterr().out) == {"cls": {"custom": 0.25}}
    load_evaluate_module.cache_clear()  # the mock module is no metric for later tests


# ------------------------------------------------------------------------------ item 11
def test_a_pickled_model_is_never_unpickled(model):
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    message = f"{model}: no *.safetensors weights (mtnlp never unpickles models)"
    with mock.patch("torch.load", side_effect=AssertionError("unpickled")):
        for load in (MultiTaskModel.from_pretrained, AutoModel.from_pretrained):
            with pytest.raises(UserError) as error:
                load(model)
            assert str(error.value) == message


def test_loading_is_strict_and_complete(model, tiny):
    loaded, info = MultiTaskModel.from_pretrained(model, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == info["mismatched_keys"] == set()
    expected = tiny.weights.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # a config naming another task: transformers alone would leave its head random
    config = json.loads((model / "config.json").read_text())
    config["tasks"][1]["name"] = "score"
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as error:
        AutoModel.from_pretrained(model)
    assert str(error.value) == (
        f"{model}: the weights do not fit the tasks of its config.json (missing: "
        "heads.score.out.bias, heads.score.out.weight; unexpected: heads.reg.out.bias, "
        "heads.reg.out.weight)"
    )


# ------------------------------------------------------------------------------ item 15
@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ("[]", "expected a JSON object, got list"),
        ('{"step": 3}', "tasks: missing"),
        ('{"step": -1, "tasks": []}', "step: expected a step number (an integer >= 0), got -1"),
        (
            '{"step": 3, "tasks": [{"type": "tagging"}]}',
            "tasks: expected a list of tasks, each a mapping with a name, got "
            "[{'type': 'tagging'}]",
        ),
    ],
)
def test_checkpoint_json_is_validated(tmp_path, meta, message):
    (tmp_path / "checkpoint.json").write_text(meta)
    with pytest.raises(UserError) as error:
        read_meta(tmp_path)
    assert str(error.value) == f"{tmp_path / 'checkpoint.json'}: {message}"


# ------------------------------------------------------------------------------ item 14
GLUE_RTE = REPO / "tasks" / "glue" / "rte.yaml"
HUB_ONLY = """name: rte
type: classification
source: {hub: {path: nyu-mll/glue, name: rte}}
inputs: [sentence1, sentence2]
labels: [entailment, not_entailment]
metrics: [accuracy]
"""


def test_offline_hub_data_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    [card] = load_cards([GLUE_RTE])
    with pytest.raises(UserError) as error:
        load_raw(card, ["validation"])
    assert str(error.value) == (
        f"{GLUE_RTE}: the data comes from the Hugging Face Hub (nyu-mll/glue, rte), which cannot "
        "be reached (offline); pass --data-dir with local files"
    )


@pytest.mark.parametrize(
    ("raised", "local", "message"),
    [
        (
            ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)"),
            False,
            "the data comes from the Hugging Face Hub (nyu-mll/glue, rte), which cannot be "
            "reached (Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)); give "
            "the card a source.local and pass --data-dir with local files",
        ),
        (
            DatasetNotFoundError("Dataset 'nyu-mll/glue' doesn't exist on the Hub"),
            True,
            "source.hub: no dataset nyu-mll/glue, rte on the Hugging Face Hub (Dataset "
            "'nyu-mll/glue' doesn't exist on the Hub)",
        ),
    ],
    ids=["no-network", "no-such-dataset"],
)
def test_hub_errors_are_one_line(tmp_path, monkeypatch, raised, local, message):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    path = GLUE_RTE
    if not local:
        path = tmp_path / "rte.yaml"
        path.write_text(HUB_ONLY)
    [card] = load_cards([path])
    with (
        mock.patch("datasets.load_dataset", side_effect=raised),
        pytest.raises(UserError) as error,
    ):
        load_raw(card, ["validation"])
    assert str(error.value) == f"{path}: {message}"


def test_push_without_network_is_one_line(model):
    unreachable = httpx.ConnectError("[Errno -2] Name or service not known")
    with (
        mock.patch.object(HfApi, "create_repo", side_effect=unreachable),
        pytest.raises(UserError) as error,
    ):
        push_to_hub(model, "me/tiny")
    assert str(error.value) == (
        "push to me/tiny: cannot reach the Hugging Face Hub ([Errno -2] Name or service not known)"
    )


def test_push_never_ships_a_pickle(model):
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    (model / "training_args.pkl").write_bytes(b"pickle")
    pushed = {}

    def create_commit(self, repo_id, operations, **kwargs):
        pushed.update((op.path_in_repo, op) for op in operations)
        return SimpleNamespace(commit_url="url")

    with (
        mock.patch.object(HfApi, "create_repo", return_value=RepoUrl("https://hf.co/me/tiny")),
        mock.patch.object(HfApi, "create_commit", autospec=True, side_effect=create_commit),
    ):
        push_to_hub(model, "me/tiny")
    assert "model.safetensors" in pushed
    assert not [path for path in pushed if path.endswith((".bin", ".pkl"))]


# ------------------------------------------------------------------------------ item 19: model card
def test_model_card_shows_no_local_folder_and_needs_no_network(model, monkeypatch):
    home = "/home/someone/work"
    summary = {
        "args": {
            "model": f"{home}/encoders/my-bert",
            "data_dir": [f"{home}/data/glue"],
            "output_dir": f"{home}/outputs/run",
            "cards": [f"{home}/cards"],
            "sampler": "proportional",
        },
        "steps": 3,
    }
    (model / "train_summary.json").write_text(json.dumps(summary))
    config = MultiTaskConfig.from_pretrained(model)
    config.tasks[0]["metrics"] = ["accuracy", f"{home}/metrics/my_f1.py"]

    def no_network(*args, **kwargs):
        raise AssertionError("the model card reached for the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    text = model_card(config, "me/tiny", model)
    assert "/home/" not in text and str(model) not in text
    assert "(from a local encoder folder, `my-bert`)" in text
    assert "| accuracy, my_f1.py |" in text
    assert "base_model" not in text


# ------------------------------------------------------------------------------ output folder
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX links and FIFOs")
def test_a_link_or_fifo_at_the_lock_path_is_refused(tmp_path):
    """filelock opens the lock file by its name, following a link (and, before filelock 4,
    truncating what it points to): the lock path must be a plain file or nothing."""
    output, precious = tmp_path / "out", tmp_path / "precious.txt"
    output.mkdir()
    precious.write_text("keep me\n")
    (output / LOCK_FILE).symlink_to(precious)
    with pytest.raises(UserError) as error, output_lock(output):
        pytest.fail("locked through a link")
    assert str(error.value) == (
        f"--output-dir: {output}: {output / LOCK_FILE} is a symbolic link; mtnlp locks the folder "
        "with a file of that name: remove it"
    )
    assert precious.read_text() == "keep me\n" and (output / LOCK_FILE).is_symlink()
    (output / LOCK_FILE).unlink()
    os.mkfifo(output / LOCK_FILE)  # opening it to read the holder would block
    with pytest.raises(UserError, match=r"\.lock is not a regular file; "), output_lock(output):
        pass


def test_atomic_folder_replaces_or_merges_and_never_half_writes(tmp_path):
    final = tmp_path / "checkpoint-4"
    with atomic_folder(final) as staging:
        assert staging == staging_folder(final) == tmp_path / ".checkpoint-4.tmp"
        (staging / "model.safetensors").write_bytes(b"weights")
        (staging / "sub").mkdir()
        (staging / "sub" / "state.json").write_text("{}")
        assert not final.exists()  # nothing in place before the block ends
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]
    assert (final / "sub" / "state.json").read_text() == "{}"
    with pytest.raises(RuntimeError), atomic_folder(final) as staging:  # killed while writing
        (staging / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")
    assert (final / "model.safetensors").read_bytes() == b"weights"  # the old one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]
    with atomic_folder(final) as staging:  # resumed from an earlier step: replaced as a whole
        (staging / "model.safetensors").write_bytes(b"new")
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors"]

    run = tmp_path / "run"  # merge: the final save of a run folder that holds checkpoints
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "cards").mkdir()
    (run / "cards" / "old.yaml").write_text("old")
    with atomic_folder(run, merge=True) as staging:
        assert staging.parent == run and staging.name.startswith(".saving-")
        (staging / "cards").mkdir()
        (staging / "cards" / "cls.yaml").write_text("new")
        (staging / "eval_results.json").write_text("{}")
    assert sorted(p.name for p in run.iterdir()) == ["cards", "checkpoint-2", "eval_results.json"]
    assert [p.name for p in (run / "cards").iterdir()] == ["cls.yaml"]  # a folder: replaced
