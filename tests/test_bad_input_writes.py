"""Issue 14, items 3 and 5, as bad inputs: links where mtnlp writes, links out of a model folder
that is read or pushed, and damaged, tampered or foreign checkpoint files.

Two tables. `REFUSED`: each case breaks a copy of the tiny tasks, of a saved model of them
(`{case}/model`) and of a tiny run's checkpoints (`{case}/out/checkpoint-1`, `-2`), then runs
`mtnlp ARGS` in-process: exit 2, one `error:` line, the file outside untouched, no pickle run.
`REPLACED`: each plants links (to a file and a folder outside, `{case}/outside`) where a writer
writes, runs it, and checks that the links were replaced by the writer's own files and that
nothing outside changed."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_bad_input import SafetyCase, snapshot, tiny_model_folder, tiny_tasks  # noqa: F401
from tiny_runs import reset_accelerate

from mtnlp import training
from mtnlp.artifacts.report import write_report
from mtnlp.artifacts.run_folder import LiveLog, clean_leftovers, save_run
from mtnlp.cards.load import load_cards
from mtnlp.hub.card import write_model_card
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.training.args import parse_args

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY-----\n"
CHECKPOINT = "{case}/out/checkpoint-1"
TRAIN = (
    "train", "--model", "tiny", "--cards", "{case}/cards", "--data-dir", "{case}/data",
    "--output-dir", "{case}/out", "--max-steps", "3", "--batch-size", "4",
)  # fmt: skip
RESUME = (*TRAIN, "--resume-from-checkpoint", CHECKPOINT)
PUSH = ("push", "{case}/model", "--hub-model-id", "me/tiny")
PREDICT = ("predict", "{case}/model", "--input", "{case}/inputs.jsonl")
EXPORT = ("export", "{case}/model", "{case}/exported")


def outside(case: Path) -> Path:
    """`{case}/outside`: a secret file and a folder that no writer may touch."""
    folder = case / "outside"
    (folder / "folder").mkdir(parents=True, exist_ok=True)
    (folder / "id_rsa").write_bytes(SECRET)
    (folder / "folder" / "notes.txt").write_bytes(SECRET)
    return folder


def link_out(path: str, to: str = "id_rsa") -> Callable[[Path], object]:
    """Replace `{case}/path` (if any) by a link to `{case}/outside/to`."""

    def setup(case: Path) -> None:
        target = outside(case) / to
        file = case / path
        if file.is_dir() and not file.is_symlink():
            shutil.rmtree(file)
        file.unlink(missing_ok=True)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.symlink_to(target, target_is_directory=target.is_dir())

    return setup


def moved_out(path: str) -> Callable[[Path], object]:
    """`{case}/path` moved to `{case}/outside`, a link left in its place (same contents)."""

    def setup(case: Path) -> None:
        target = outside(case) / Path(path).name
        shutil.move(case / path, target)
        (case / path).symlink_to(target, target_is_directory=target.is_dir())

    return setup


def in_checkpoint(change: Callable[[Path], object], step: int = 1) -> Callable[[Path], object]:
    return lambda case: change(case / "out" / f"checkpoint-{step}")


def flip_byte(name: str) -> Callable[[Path], object]:
    def change(folder: Path) -> None:
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (folder / name).write_bytes(bytes(data))

    return in_checkpoint(change)


def cut(name: str) -> Callable[[Path], object]:
    def change(folder: Path) -> None:
        (folder / name).write_bytes((folder / name).read_bytes()[:-7])

    return in_checkpoint(change)


class Marker:
    """A pickle that creates `{case}/ran` when it is loaded: code from a foreign state file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def foreign_pickle(name: str, same_size: bool = False) -> Callable[[Path], object]:
    def setup(case: Path) -> None:
        file = case / "out" / "checkpoint-1" / name
        data = pickle.dumps(Marker(case / "ran"))
        if same_size:  # padding after the pickle's STOP: a loader reads the code all the same
            data = data + b" " * (file.stat().st_size - len(data))
        file.write_bytes(data)

    return setup


def from_step_2(name: str) -> Callable[[Path], object]:
    """`name` of checkpoint-2 put into checkpoint-1: a real state file, of another step."""

    def setup(case: Path) -> None:
        shutil.copy(case / "out" / "checkpoint-2" / name, case / "out" / "checkpoint-1" / name)

    return setup


def records(change: Callable[[dict], object]) -> Callable[[Path], object]:
    def setup(case: Path) -> None:
        path = case / "out" / "checkpoint-1" / "checkpoint.json"
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))

    return setup


def rename_record(name: str) -> Callable[[dict], object]:
    """checkpoint.json's record of optimizer.bin moved to `name` (a path out of the folder)."""
    return lambda meta: meta["files"].update({name: meta["files"].pop("optimizer.bin")})


def fifo_instead(name: str) -> Callable[[Path], object]:
    def change(folder: Path) -> None:
        (folder / name).unlink()
        os.mkfifo(folder / name)  # reading it would block

    return in_checkpoint(change)


def add_file(name: str) -> Callable[[Path], object]:
    def setup(case: Path) -> None:
        path = case / "out" / "checkpoint-1" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(Marker(case / "ran")))

    return setup


def damaged(name: str, role: str, why: str) -> str:
    return (
        f"--resume-from-checkpoint: {CHECKPOINT}: {name} is damaged ({role}: {why}); resume from "
        "a complete checkpoint"
    )


CHANGED = "its sha256 differs from checkpoint.json: the file was changed or damaged"
WEIGHTS, OPTIMIZER, RNG, STATE = (
    "the model's weights",
    "the optimizer's state",
    "the random number generators' states",
    "the run's state",
)
BAD_RECORD = (
    CHECKPOINT + '/checkpoint.json: files: optimizer.bin: expected {{"size": bytes, "sha256": '
    "64 hex digits}}"
)
NOT_LISTED = "is not one of its files (checkpoint.json does not list it); remove it, or resume"
READ_ONLY_OWN = "mtnlp reads only a model folder's own files (replace it with the file itself, or"
UPLOAD_ONLY_OWN = "mtnlp uploads only a folder's own files (replace it with the file itself, or"

REFUSED = [
    # ---------------------------------------------------------------- item 5: checkpoint files
    SafetyCase(
        "flipped-byte-in-weights",
        flip_byte("model.safetensors"),
        RESUME,
        damaged("model.safetensors", WEIGHTS, CHANGED),
    ),
    SafetyCase(
        "flipped-byte-in-optimizer",
        flip_byte("optimizer.bin"),
        RESUME,
        damaged("optimizer.bin", OPTIMIZER, CHANGED),
    ),
    SafetyCase(
        "flipped-byte-in-tokenizer",
        flip_byte("tokenizer.json"),
        RESUME,
        damaged("tokenizer.json", "a checkpoint file", CHANGED),
    ),
    SafetyCase(
        "truncated-optimizer",
        cut("optimizer.bin"),
        RESUME,
        damaged(
            "optimizer.bin",
            OPTIMIZER,
            "{optimizer_bin_cut} bytes where checkpoint.json records {optimizer_bin}",
        ),
    ),
    SafetyCase(
        "truncated-weights",
        cut("model.safetensors"),
        RESUME,
        damaged(
            "model.safetensors",
            WEIGHTS,
            "{model_safetensors_cut} bytes where checkpoint.json records {model_safetensors}",
        ),
    ),
    SafetyCase(
        "foreign-optimizer-pickle",
        foreign_pickle("optimizer.bin", same_size=True),
        RESUME,
        damaged("optimizer.bin", OPTIMIZER, CHANGED),
    ),
    SafetyCase(
        "foreign-state-pickle",
        foreign_pickle("custom_checkpoint_0.pkl", same_size=True),
        RESUME,
        damaged("custom_checkpoint_0.pkl", STATE, CHANGED),
    ),
    SafetyCase(
        "rng-states-of-another-step",
        from_step_2("random_states_0.pkl"),
        RESUME,
        damaged("random_states_0.pkl", RNG, CHANGED),
    ),
    SafetyCase(
        "weights-of-another-step",
        from_step_2("model.safetensors"),
        RESUME,
        damaged("model.safetensors", WEIGHTS, CHANGED),
    ),
    SafetyCase(
        "missing-optimizer",
        in_checkpoint(lambda f: (f / "optimizer.bin").unlink()),
        RESUME,
        f"--resume-from-checkpoint: {CHECKPOINT}: optimizer.bin is missing (the optimizer's "
        "state), so the run cannot continue exactly; resume from a complete checkpoint",
    ),
    SafetyCase(
        "extra-state-file",
        add_file("custom_checkpoint_1.pkl"),
        RESUME,
        f"--resume-from-checkpoint: {CHECKPOINT}: custom_checkpoint_1.pkl {NOT_LISTED} from a "
        "complete checkpoint",
    ),
    SafetyCase(
        "extra-folder-of-shards",
        add_file("pytorch_model_fsdp_0/__0_0.distcp"),
        RESUME,
        f"--resume-from-checkpoint: {CHECKPOINT}: pytorch_model_fsdp_0/__0_0.distcp "
        f"{NOT_LISTED} from a complete checkpoint",
    ),
    SafetyCase(
        "extra-file-with-newline-in-name",
        add_file("x\nerror: forged"),
        RESUME,
        f"--resume-from-checkpoint: {CHECKPOINT}: 'x\\nerror: forged' {NOT_LISTED} from a "
        "complete checkpoint",
    ),
    SafetyCase(
        "state-file-is-link-out",
        moved_out("out/checkpoint-1/random_states_0.pkl"),
        RESUME,
        damaged("random_states_0.pkl", RNG, "not a regular file but a link or a special file"),
    ),
    SafetyCase(
        "state-file-is-fifo",
        fifo_instead("optimizer.bin"),
        RESUME,
        damaged("optimizer.bin", OPTIMIZER, "not a regular file but a link or a special file"),
    ),
    SafetyCase(
        "records-name-a-file-outside",
        records(rename_record("../../outside/id_rsa")),
        RESUME,
        f"{CHECKPOINT}/checkpoint.json: files: ../../outside/id_rsa is not a file name inside "
        "the checkpoint",
    ),
    SafetyCase(
        "records-name-an-absolute-path",
        records(rename_record("/etc/passwd")),
        RESUME,
        f"{CHECKPOINT}/checkpoint.json: files: /etc/passwd is not a file name inside the "
        "checkpoint",
    ),
    SafetyCase(
        "records-not-a-mapping",
        records(lambda meta: meta.update(files=[])),
        RESUME,
        f"{CHECKPOINT}/checkpoint.json: files: expected a mapping, got list",
    ),
    SafetyCase(
        "record-without-digest",
        records(lambda meta: meta["files"]["optimizer.bin"].update(sha256="x")),
        RESUME,
        BAD_RECORD,
    ),
    SafetyCase(
        "record-with-negative-size",
        records(lambda meta: meta["files"]["optimizer.bin"].update(size=-1)),
        RESUME,
        BAD_RECORD,
    ),
    # ---------------------------------------------------------------- item 3: links out of a model
    SafetyCase(
        "push-model-card-linked-out",
        link_out("model/README.md"),
        PUSH,
        f"{{case}}/model/README.md: is a symbolic link out of {{case}}/model; {UPLOAD_ONLY_OWN} "
        "remove it)",
    ),
    SafetyCase(
        "push-weights-linked-out",
        moved_out("model/model.safetensors"),
        PUSH,
        f"{{case}}/model/model.safetensors: is a symbolic link out of {{case}}/model; "
        f"{UPLOAD_ONLY_OWN} remove it)",
    ),
    SafetyCase(
        "push-plot-linked-out",
        link_out("model/plots/loss.png"),
        PUSH,
        f"{{case}}/model/plots/loss.png: is a symbolic link out of {{case}}/model; "
        f"{UPLOAD_ONLY_OWN} remove it)",
    ),
    SafetyCase(
        "push-cards-folder-linked-out",
        moved_out("model/cards"),
        PUSH,
        f"{{case}}/model/cards/cls.yaml: is a symbolic link out of {{case}}/model; "
        f"{UPLOAD_ONLY_OWN} remove it)",
    ),
    SafetyCase(
        "predict-model-card-linked-out",
        link_out("model/README.md"),
        PREDICT,
        f"{{case}}/model/README.md: is a symbolic link out of {{case}}/model; {READ_ONLY_OWN} "
        "remove it)",
    ),
    SafetyCase(
        "export-metrics-linked-out",
        link_out("model/eval_results.json"),
        EXPORT,
        f"{{case}}/model/eval_results.json: is a symbolic link out of {{case}}/model; "
        f"{READ_ONLY_OWN} remove it)",
    ),
]


@pytest.fixture(scope="module")
def checkpoints(tiny_tasks, tmp_path_factory) -> Path:  # noqa: F811
    """A 2-step run of the tiny tasks (`--model tiny`) with checkpoints at steps 1 and 2."""
    output = tmp_path_factory.mktemp("writes") / "out"
    flags = [arg.format(case=tiny_tasks) for arg in TRAIN[1:9]]
    argv = [*flags, "--output-dir", str(output), "--max-steps", "2", "--batch-size", "4"]
    reset_accelerate()
    try:
        args = parse_args([*argv, "--checkpoint-every", "1"])
        training.train(args, load_cards(args.cards, args.task_list))
    finally:
        reset_accelerate()
    return output


def sizes(case: Path) -> dict[str, int]:
    """`{optimizer_bin}` -> size of checkpoint-1's optimizer.bin, `{optimizer_bin_cut}` -> 7
    bytes less (and so for each of its files), for the messages."""
    folder = case / "out" / "checkpoint-1"
    found = {p.name.replace(".", "_"): p.stat().st_size for p in folder.iterdir() if p.is_file()}
    return {**found, **{f"{name}_cut": size - 7 for name, size in found.items()}}


def test_the_refused_table_is_complete():
    ids = [case.id for case in REFUSED]
    assert len(ids) == len(set(ids)) == 26


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
def test_refused_bad_input_gives_its_exact_error(
    case,
    tiny_tasks,  # noqa: F811
    tiny_model_folder,  # noqa: F811
    checkpoints,
    tmp_path,
    monkeypatch,
    capsys,
):
    from huggingface_hub import constants

    from mtnlp.artifacts import run_folder
    from mtnlp.cli import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(run_folder, "write_report", lambda *args, **kwargs: None)
    shutil.copytree(tiny_tasks / "cards", tmp_path / "cards")
    shutil.copytree(tiny_tasks / "data", tmp_path / "data")
    shutil.copytree(tiny_model_folder, tmp_path / "model")
    for step in (1, 2):
        name = f"checkpoint-{step}"
        shutil.copytree(checkpoints / name, tmp_path / "out" / name)
    (tmp_path / "inputs.jsonl").write_text('{"text": "the cat sat"}\n')
    words = {"case": tmp_path, **sizes(tmp_path)}
    case.setup(tmp_path)
    before = snapshot(tmp_path / "outside")
    reset_accelerate()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main([arg.format(case=tmp_path) for arg in case.command])
    finally:
        reset_accelerate()
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert stderr.strip().splitlines()[-1] == f"error: {case.message.format(**words)}"
    assert "Traceback" not in stderr
    assert not (tmp_path / "ran").exists()  # no foreign pickle ran
    assert snapshot(tmp_path / "outside") == before


# ------------------------------------------------------------------------------ replaced links
@dataclass
class WriteCase:
    """`setup` plants links in folder `case`; `write` runs a writer there; afterwards each of
    `written` (relative to `case`) is the writer's own file or folder, not a link."""

    id: str
    setup: Callable[[Path], object]
    write: Callable[[Path], object]
    written: tuple[str, ...]


def steps(*setups: Callable[[Path], object]) -> Callable[[Path], object]:
    return lambda case: [setup(case) for setup in setups]


def copy_model_to_run(case: Path) -> None:
    shutil.copytree(case / "model", case / "run")


def saved_model(case: Path) -> tuple[MultiTaskModel, object, list]:
    from transformers import AutoTokenizer

    model = MultiTaskModel.from_pretrained(case / "model")
    model.companion_files = {}  # as after training it further
    cards = load_cards([case / "model" / "cards"])
    return model, AutoTokenizer.from_pretrained(case / "model"), cards


def run_saved(case: Path) -> None:
    model, tokenizer, cards = saved_model(case)
    history = [{"step": 1, "loss": {"cls": 0.5}, "share": {"cls": 1.0}}]
    save_run(case / "run", model, tokenizer, cards, {"cls": {"accuracy": 0.5}}, history, {})


def model_saved(case: Path) -> None:
    MultiTaskModel.from_pretrained(case / "model").save_pretrained(case / "run")


def live_log(case: Path) -> None:
    with LiveLog(case / "run" / "train_log.jsonl", [{"step": 1}]) as log:
        log.append({"step": 2})


def checkpoint_saved(case: Path) -> None:
    from accelerate import Accelerator

    from mtnlp.training.checkpointing import save_checkpoint

    reset_accelerate()
    try:
        accelerator = Accelerator(cpu=True)
        linear = torch.nn.Linear(3, 2)
        accelerator.prepare(linear, torch.optim.AdamW(linear.parameters()))
        for step in (1, 2, 3):
            save_checkpoint(accelerator, case / "run", step, [{"name": "a"}], keep=2)
    finally:
        reset_accelerate()


def export_onnx_folder(case: Path) -> None:
    from mtnlp.export.onnx import export_onnx

    export_onnx(case / "model", case / "exported")


RUN_FILES = (
    "config.json", "model.safetensors", "label_maps.json", "eval_results.json",
    "train_summary.json", "train_log.jsonl", "report.md", "tokenizer.json",
)  # fmt: skip
REPLACED = [
    WriteCase(
        "save-run-files-linked-out",
        steps(*(link_out(f"run/{name}") for name in RUN_FILES)),
        run_saved,
        tuple(f"run/{name}" for name in RUN_FILES),
    ),
    WriteCase(
        "save-run-folders-linked-out",
        steps(link_out("run/cards", "folder"), link_out("run/plots", "folder")),
        run_saved,
        ("run/cards", "run/plots", "run/cards/cls.yaml", "run/plots/loss.png"),
    ),
    WriteCase(
        "save-pretrained-files-linked-out",
        steps(*(link_out(f"run/{n}") for n in ("config.json", "model.safetensors", "README.md"))),
        model_saved,
        ("run/config.json", "run/model.safetensors"),
    ),
    WriteCase(
        "save-pretrained-cards-linked-out",
        steps(link_out("run/cards", "folder"), link_out("run/label_maps.json")),
        model_saved,
        ("run/cards", "run/cards/cls.yaml", "run/label_maps.json"),
    ),
    WriteCase(
        "model-card-linked-out",
        steps(copy_model_to_run, link_out("run/README.md")),
        lambda case: write_model_card(case / "run"),
        ("run/README.md",),
    ),
    WriteCase(
        "model-card-hard-linked-out",
        lambda case: (
            shutil.copytree(case / "model", case / "run"),
            os.link(outside(case) / "id_rsa", case / "run" / "README.md"),
        ),
        lambda case: write_model_card(case / "run"),
        ("run/README.md",),
    ),
    WriteCase(
        "report-linked-out",
        steps(
            copy_model_to_run,
            lambda case: (case / "run" / "train_log.jsonl").write_text('{"step": 1}\n'),
            link_out("run/report.md"),
            link_out("run/plots", "folder"),
        ),
        lambda case: write_report(case / "run"),
        ("run/report.md", "run/plots", "run/plots/loss.png"),
    ),
    WriteCase(
        "live-log-linked-out", link_out("run/train_log.jsonl"), live_log, ("run/train_log.jsonl",)
    ),
    WriteCase(
        "leftover-staging-linked-out",
        steps(link_out("run/.checkpoint-1.tmp", "folder"), link_out("run/.saving-1", "folder")),
        lambda case: clean_leftovers(case / "run", logs=True),
        (),
    ),
    WriteCase(
        "checkpoint-staging-and-final-linked-out",
        steps(link_out("run/.checkpoint-2.tmp", "folder"), link_out("run/checkpoint-3", "folder")),
        checkpoint_saved,
        ("run/checkpoint-2", "run/checkpoint-3", "run/checkpoint-3/checkpoint.json"),
    ),
    WriteCase(
        "rotated-checkpoint-linked-out",
        lambda case: (
            (outside(case) / "folder" / "checkpoint.json").write_text("{}"),
            link_out("run/checkpoint-0", "folder")(case),
        ),
        checkpoint_saved,
        ("run/checkpoint-2", "run/checkpoint-3"),
    ),
    WriteCase(
        "export-output-linked-out",
        lambda case: (
            (outside(case) / "empty").mkdir(),
            (case / "exported").symlink_to(case / "outside" / "empty", target_is_directory=True),
        ),
        export_onnx_folder,
        ("exported", "exported/model.onnx", "exported/config.json"),
    ),
]


def test_the_replaced_table_is_complete():
    ids = [case.id for case in REPLACED]
    assert len(ids) == len(set(ids)) == 12


@pytest.mark.parametrize("case", REPLACED, ids=[c.id for c in REPLACED])
def test_links_where_mtnlp_writes_are_replaced(case, tiny_model_folder, tmp_path):  # noqa: F811
    shutil.copytree(tiny_model_folder, tmp_path / "model")
    outside(tmp_path)
    case.setup(tmp_path)
    before = snapshot(tmp_path / "outside")
    case.write(tmp_path)
    assert snapshot(tmp_path / "outside") == before
    assert (tmp_path / "outside" / "id_rsa").read_bytes() == SECRET
    for name in case.written:
        assert not (tmp_path / name).is_symlink() and (tmp_path / name).exists(), name
    leftover_links = [p for p in (tmp_path / "run").glob(".*")] if case.written else []
    assert leftover_links == []  # no temporary or staging name left behind
    if case.id == "leftover-staging-linked-out":
        assert sorted(os.listdir(tmp_path / "run")) == []
