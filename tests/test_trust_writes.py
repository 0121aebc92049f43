"""Issue 14, item 3: mtnlp never writes through a link. Every file it writes outside a fresh
staging folder goes through `write_file` (a temporary sibling created O_EXCL|O_NOFOLLOW, then
`os.replace`), so a link, hard link or FIFO at the name is replaced and what it points to stays as
it was; a model folder's companion files and uploads that are links out of the folder are refused,
since a downloaded folder is untrusted input. (The table of link cases at each write target is in
test_bad_input_writes.py.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_hub import hub  # noqa: F401 (fixture)
from tiny_runs import save_tiny_model, write_tiny_tasks

from mtnlp.artifacts.run_folder import artifact_files
from mtnlp.hub.push import push_to_hub
from mtnlp.modeling.model import MultiTaskModel, read_companion_files
from mtnlp.utils.errors import UserError
from mtnlp.utils.files import make_folder, outside_link_problem, remove_path, write_file

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY-----\n"


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside every folder mtnlp works in, standing for ~/.ssh/id_rsa."""
    path = tmp_path / "home" / "id_rsa"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A saved tiny model with its companion files (cards, metrics, summary, plots)."""
    root = tmp_path_factory.mktemp("trust_writes")
    cards, _ = write_tiny_tasks(root)
    return save_tiny_model(root / "model", cards, ["cls", "reg"])


@pytest.fixture
def folder(model_folder, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_folder, copy)
    return copy


# ------------------------------------------------------------------------------ write_file
def test_write_file_replaces_a_link_and_never_follows_it(tmp_path, secret):
    target = tmp_path / "eval_results.json"
    target.symlink_to(secret)
    write_file(target, "{}\n")
    assert not target.is_symlink() and target.read_text() == "{}\n"
    assert secret.read_bytes() == SECRET
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_results.json", "home"]


def test_write_file_never_truncates_a_hard_linked_file(tmp_path, secret):
    target = tmp_path / "README.md"
    os.link(secret, target)
    write_file(target, b"card")
    assert target.read_bytes() == b"card" and secret.read_bytes() == SECRET


def test_write_file_replaces_a_fifo_without_opening_it(tmp_path):
    target = tmp_path / "report.md"
    os.mkfifo(target)
    write_file(target, "# report\n")  # opening the FIFO to write would block
    assert target.is_file() and target.read_text() == "# report\n"


def test_write_file_refuses_a_folder_in_one_line(tmp_path):
    (tmp_path / "report.md").mkdir()
    with pytest.raises(UserError) as error:
        write_file(tmp_path / "report.md", "x")
    assert str(error.value) == (
        f"{tmp_path}/report.md: is a folder; mtnlp writes a file of that name here: remove it"
    )


def test_make_folder_and_remove_path_never_follow_a_link(tmp_path, secret):
    link = tmp_path / "plots"
    link.symlink_to(secret.parent, target_is_directory=True)
    make_folder(link)
    assert link.is_dir() and not link.is_symlink() and secret.read_bytes() == SECRET
    link.rmdir()
    link.symlink_to(secret.parent, target_is_directory=True)
    remove_path(link)
    assert not link.exists() and secret.read_bytes() == SECRET


# ------------------------------------------------------------------------------ model folders
def test_save_pretrained_replaces_links_in_the_folder(folder, tmp_path, secret):
    """Every file a save writes (transformers' config.json and weights, label maps, companion
    files, a whole `cards/` folder) replaces a link at its name: written in a staging folder,
    then moved in."""
    model = MultiTaskModel.from_pretrained(folder)
    out = tmp_path / "saved"
    out.mkdir()
    for name in ["config.json", "model.safetensors", "label_maps.json", "eval_results.json"]:
        (out / name).symlink_to(secret)
    (out / "cards").symlink_to(secret.parent, target_is_directory=True)
    model.save_pretrained(out)
    assert secret.read_bytes() == SECRET and os.listdir(secret.parent) == ["id_rsa"]
    links = [p for p in out.rglob("*") if p.is_symlink()]
    assert links == [] and not [p for p in out.iterdir() if p.name.startswith(".")]
    again = MultiTaskModel.from_pretrained(out)
    assert again.companion_files == model.companion_files
    for name, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, rtol=0, atol=0)


def test_save_pretrained_removes_stale_weight_shards(folder):
    """As transformers' own save does: shards of an earlier sharded save that this save did not
    write are removed (the merge into the folder keeps other files)."""
    model = MultiTaskModel.from_pretrained(folder)
    stale = folder / "model-00001-of-00002.safetensors"
    stale.write_bytes(b"old shard")
    (folder / "notes.txt").write_text("mine")
    model.save_pretrained(folder)
    assert not stale.exists() and (folder / "notes.txt").read_text() == "mine"


def test_a_companion_link_out_of_the_folder_is_refused(folder, secret):
    (folder / "README.md").symlink_to(secret)
    with pytest.raises(UserError) as error:
        MultiTaskModel.from_pretrained(folder)
    assert str(error.value) == (
        f"{folder}/README.md: is a symbolic link out of {folder}; mtnlp reads only a model "
        "folder's own files (replace it with the file itself, or remove it)"
    )


def test_a_companion_folder_linked_out_of_the_folder_is_refused(folder, secret):
    (secret.parent / "x.yaml").write_bytes(SECRET)
    shutil.rmtree(folder / "cards")
    (folder / "cards").symlink_to(secret.parent, target_is_directory=True)
    with pytest.raises(UserError, match=r"cards/x\.yaml: is a symbolic link out of"):
        read_companion_files(folder)


def hub_cache_snapshot(folder: Path, cache: Path) -> Path:
    """`folder` laid out as huggingface_hub caches a repository: each file of the snapshot a link
    into the repository's `blobs/`."""
    repo = cache / "models--me--tiny-mt"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        blob = repo / "blobs" / name.replace("/", "_")
        shutil.copyfile(path, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_a_hub_cache_snapshot_loads_and_pushes(folder, tmp_path, hub):  # noqa: F811
    """The Hub cache's own links (snapshot -> blobs) are the folder's files."""
    snapshot = hub_cache_snapshot(folder, tmp_path / "cache")
    model = MultiTaskModel.from_pretrained(snapshot)
    assert model.companion_files == read_companion_files(folder)
    assert set(artifact_files(snapshot)) == set(artifact_files(folder))
    push_to_hub(snapshot, "me/tiny-mt")
    [commit] = hub.commits
    assert commit["files"]["model.safetensors"] == (folder / "model.safetensors").read_bytes()


def test_push_refuses_a_link_out_of_the_folder(folder, secret, hub):  # noqa: F811
    (folder / "eval_results.json").unlink()
    (folder / "eval_results.json").symlink_to(secret)
    with pytest.raises(UserError) as error:
        push_to_hub(folder, "me/tiny-mt")
    assert str(error.value) == (
        f"{folder}/eval_results.json: is a symbolic link out of {folder}; mtnlp uploads only a "
        "folder's own files (replace it with the file itself, or remove it)"
    )
    assert hub.commits == []


def test_a_link_inside_the_folder_is_the_folders_file(folder):
    (folder / "notes.txt").write_text("x")
    (folder / "more.txt").symlink_to("notes.txt")
    assert outside_link_problem(folder / "more.txt", folder) is None
    assert outside_link_problem(folder / "missing.txt", folder) == "is not a regular file"
    assert json.loads((folder / "config.json").read_text())["tasks"]


def test_a_cache_lookalike_whose_blobs_lead_out_is_refused(folder, tmp_path, secret):
    """A folder laid out as a Hub cache snapshot (from a tarball, say) whose `blobs` is itself a
    link out: its links are not the cache's."""
    snapshot = hub_cache_snapshot(folder, tmp_path / "cache")
    blobs = snapshot.parents[1] / "blobs"
    (secret.parent / "README.md").write_bytes(SECRET)
    shutil.rmtree(blobs)
    blobs.symlink_to(secret.parent, target_is_directory=True)
    (snapshot / "README.md").symlink_to("../../blobs/README.md")
    assert outside_link_problem(snapshot / "README.md", snapshot) == (
        f"is a symbolic link out of {snapshot}"
    )
