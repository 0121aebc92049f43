"""Files of an output folder: the write check, the one-run-at-a-time lock, JSON reading, and
folders written all at once (staging, fsync, rename: a crash never leaves a renamed folder without
its contents, nor a half-written one in place).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from filelock import FileLock, SoftFileLock, Timeout

from mtnlp.utils.errors import UserError

WRITE_PROBE = ".mtnlp-probe-{pid}"  # written and removed at once by `writable_output_dir`

MAX_NAME_LENGTH = 100
"""Longest name from a card or a model's config.json that may become (part of) a file name."""
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""What AutoTokenizer may open in a model folder."""

MODEL_FOLDER_FILES = frozenset(
    {
        "model.safetensors",
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "label_maps.json",
        *TOKENIZER_FILES,
        "README.md",
        "cards",
        "finetuned",
    }
)
"""A model folder's own files: no name from a card or config.json may become one of them."""


def file_name_problem(name: object) -> str | None:
    """Why `name` (data from a card or a model's config.json: a task, split or submission file
    name) cannot be a file name of its own, or None when it can: at most `MAX_NAME_LENGTH`
    characters of letters, digits and `_ . + = -`, not starting with `.` or `-` (so no `/`,
    `..`, NUL, control characters or hidden files), and none of `MODEL_FOLDER_FILES`. The words
    never echo the name (it may be long or hold control characters)."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters, got {len(name)}"
    if not _SAFE_NAME.fullmatch(name):
        return (
            "may hold only letters, digits and _ . + = - (no path separators, '..', control "
            "characters or spaces) and must not start with '.' or '-'"
        )
    if name in MODEL_FOLDER_FILES:
        return "is one of a model folder's own file names"
    return None


def writable_output_dir(folder: Path) -> None:
    """Create `--output-dir` (and its parents) and write a file there, so a folder that cannot
    hold the results fails before any work, as a `UserError` naming it, not at save time."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output-dir: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / WRITE_PROBE.format(pid=os.getpid())
        probe.unlink(missing_ok=True)  # a killed run's (a link is removed, never written through)
        new_file(probe, "wb").close()
        probe.unlink()
    except OSError as error:
        raise UserError(f"--output-dir: {folder}: cannot write here ({_reason(error)})") from None


# ------------------------------------------------------------------------------ the lock
LOCK_FILE = ".mtnlp.lock"
HOLDER = "pid {pid} on {host}\n"  # what the lock file says while a run holds it


@contextmanager
def output_lock(output_dir: Path, main: bool = True) -> Iterator[None]:
    """Hold `output_dir`'s lock (the main process; the others only go along): check first that
    the folder can be created and written, so a bad `--output-dir` fails now, not at the first
    save. Refuses a folder another live run holds, naming it (the lock file says `pid N on
    HOST`). The lock is an OS lock (`filelock`: flock, or msvcrt on Windows) that the system
    releases when a run dies, so a stale lock file never blocks. On leaving, removes the lock file
    and the folders it created if they stayed empty (a run refused early leaves nothing behind)."""
    if not main:
        yield
        return
    created = _missing_folders(output_dir)
    try:
        lock = _lock(output_dir)
    except UserError:
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        _unlock(lock)
        _remove_empty(created)


def _lock(output_dir: Path) -> FileLock:
    """Create `output_dir`, probe a write, take the lock and write this process into it."""
    writable_output_dir(output_dir)
    path = output_dir / LOCK_FILE
    try:
        while (lock := _try_lock(output_dir, path)) is None:
            pass  # the file changed under us (its holder removed it): lock the new one
    except OSError as error:
        raise UserError(
            f"--output-dir: {output_dir}: cannot write here ({_reason(error)})"
        ) from None
    return lock


def _try_lock(output_dir: Path, path: Path) -> FileLock | None:
    """The lock on `path`, held; None if the file was removed or replaced meanwhile (try again).
    A lock that another process holds is refused, naming its holder."""
    before = _stat(path)
    if before is not None and not stat.S_ISREG(before.st_mode):
        # filelock follows a link (and before filelock 4 truncates its target); a FIFO blocks
        what = "a symbolic link" if stat.S_ISLNK(before.st_mode) else "not a regular file"
        raise UserError(
            f"--output-dir: {output_dir}: {path} is {what}; mtnlp locks the folder with a file of "
            "that name: remove it"
        )
    holder = _holder(path)  # read before locking: filelocks before 4 truncate the file
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        after = _stat(path)
        if before is None or after is None or not os.path.samestat(before, after):
            return None  # not the file we saw: its holder removed it, maybe released it
        raise UserError(
            f"--output-dir: {output_dir}: another run is writing into this folder ({holder} holds "
            f"{path}); wait for it to end, or give another --output-dir"
        ) from None
    descriptor = _descriptor(lock)
    current = _stat(path)
    if descriptor is not None and (
        current is None or not os.path.samestat(os.fstat(descriptor), current)
    ):  # we locked a file that its holder removed before our lock: a third run may lock anew
        lock.release()
        return None
    soft = isinstance(lock, SoftFileLock) or getattr(lock._context, "soft_fallback", False)
    if descriptor is not None and not soft:
        # the holder, for the message of a refused run (a soft lock's marker is filelock's own)
        os.ftruncate(descriptor, 0)
        os.lseek(descriptor, 0, os.SEEK_SET)
        os.write(descriptor, HOLDER.format(pid=os.getpid(), host=socket.gethostname()).encode())
    return lock


def _unlock(lock: FileLock) -> None:
    """Remove the lock file, then release the lock (Windows cannot remove an open file: there,
    release first; another run that opened it meanwhile keeps it)."""
    path = Path(lock.lock_file)
    try:
        path.unlink(missing_ok=True)
    except PermissionError:
        lock.release()
        with suppress(OSError):
            path.unlink(missing_ok=True)
        return
    lock.release()


def _descriptor(lock: FileLock) -> int | None:
    """The held lock file's descriptor (filelock keeps it in its context since 3.10)."""
    return getattr(getattr(lock, "_context", None), "lock_file_fd", None)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def _holder(path: Path) -> str:
    """Who holds the lock, as its lock file says ("a run" when it says nothing readable)."""
    try:
        with open(path, "rb") as file:
            text = file.read(200).decode("utf-8", "replace").strip()
    except OSError:  # none yet, or locked against reading (Windows)
        text = ""
    return text or "a run"


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove `folders` (deepest first) as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


# ------------------------------------------------------------------------------ atomic folders
def staging_folder(final: Path) -> Path:
    """Where `atomic_folder(final)` writes before the rename: `.<name>.tmp` next to `final`
    (the same file system, so the rename is atomic)."""
    return final.with_name(f".{final.name}.tmp")


@contextmanager
def atomic_folder(
    final: Path, staging: Path | None = None, *, merge: bool = False
) -> Iterator[Path]:
    """Write a folder all at once: yields an empty staging folder to fill; when the block ends
    without an exception, `commit_folder` puts its contents in place (fsync, then rename), else
    the staging folder is removed and `final` is left as it was.

    `merge=False`: the staging folder (default `staging_folder(final)`, `.<name>.tmp` next to it)
    replaces `final` as a whole. `merge=True`: the staging folder (default a fresh
    `.saving-<hex>` inside `final`, which is created if needed) gives its entries to `final`, each
    replacing its namesake; the other entries of `final` stay. A leftover staging folder of a
    killed write (same name) is removed first.
    """
    if merge:
        final.mkdir(parents=True, exist_ok=True)
    if staging is None:
        staging = final / f".saving-{uuid.uuid4().hex[:12]}" if merge else staging_folder(final)
    if staging.is_symlink():  # never follow a link to the staging name (it would be emptied)
        staging.unlink()
    elif staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
        commit_folder(staging, final, merge=merge)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def commit_folder(staging: Path, final: Path, *, merge: bool = False) -> None:
    """fsync everything in `staging`, then rename it to `final` (an existing `final` is removed
    first), or with `merge` move each entry into `final`, replacing its namesake; then fsync the
    folder that holds the new names. For writers spread over processes (a checkpoint): every
    process writes into `staging`, the main one commits."""
    sync_to_disk(staging)
    if not merge:
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        staging.rename(final)
        sync_to_disk(final.parent, recursive=False)
        return
    for item in sorted(staging.iterdir()):
        target = final / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif item.is_dir() and (target.exists() or target.is_symlink()):
            target.unlink()
        item.replace(target)
    sync_to_disk(final, recursive=False)


def sync_to_disk(folder: Path, recursive: bool = True) -> None:
    """fsync the files (and the folder entry) so a rename never outlives its contents on a crash.
    (Windows cannot open a folder to fsync it; its renames are journaled by NTFS.)"""
    if recursive:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                with open(path, "rb+" if os.name == "nt" else "rb") as file:  # Windows: writable
                    os.fsync(file.fileno())
    if os.name == "nt":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def umask_permissions(paths: Iterator[Path] | Sequence[Path]) -> None:
    """Give files that a library wrote with its own permissions (safetensors writes 0600 through
    a temporary file) the ones every other file gets: 0666 less the umask. Links are skipped."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def new_file(path: Path, mode: str = "w") -> Any:
    """Open a file that must not exist yet for writing (`O_EXCL`: never through a link, never
    truncating someone else's file), with the permissions the umask gives (0666 & ~umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(path, flags, 0o666)
    except FileExistsError:
        raise UserError(f"{path}: already exists; mtnlp writes only files it creates") from None
    return os.fdopen(descriptor, mode, encoding=None if "b" in mode else "utf-8")


TEMPORARY_FILE = ".{name}.{tag}.tmp"  # `write_file`'s temporary sibling (a leftover if killed)


def write_file(path: Path, data: bytes | str) -> Path:
    """Write `path` whole without ever writing through what is at its name: the data goes into a
    fresh temporary sibling (`new_file`: O_EXCL, O_NOFOLLOW), which then replaces `path`
    (`os.replace`). So a link at `path` is replaced, never followed; a file linked there from
    elsewhere (a hard link) keeps its contents; a reader sees the old file or the new one. A
    folder at `path` is refused (`UserError`). Text is written as UTF-8. Returns `path`."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise UserError(f"{path}: is a folder; mtnlp writes a file of that name here: remove it")
    temporary = path.with_name(TEMPORARY_FILE.format(name=path.name[:200], tag=uuid.uuid4().hex))
    try:
        with new_file(temporary, "wb") as file:
            file.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def make_folder(path: Path) -> Path:
    """Create the folder `path` (and its parents) to write into; a link at its name is replaced
    by a folder, never followed (files written there would land wherever it points). Returns
    `path`."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_path(path: Path) -> None:
    """Remove a file, a folder with its contents, or a link (never what the link points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def outside_link_problem(path: Path, folder: Path) -> str | None:
    """Why the file `path` in `folder` must not be read as the folder's own, or None: it is not a
    regular file, or a symbolic link (of the file or a folder on the way) leads out of `folder`.
    A model folder is untrusted input: `README.md -> ~/.ssh/id_rsa` must never be copied into
    a saved model or uploaded. A Hugging Face cache snapshot's links into its repository's
    `blobs/` stay inside (that is how the cache stores files)."""
    if not path.is_file():
        return "is not a regular file"
    target = path.resolve()
    roots = [folder.resolve(), *_hub_cache_blobs(folder)]
    if not any(target.is_relative_to(root) for root in roots):
        return f"is a symbolic link out of {folder}"
    return None


def _hub_cache_blobs(folder: Path) -> list[Path]:
    """The `blobs/` folder of the Hugging Face cache repository that `folder` (a snapshot, or a
    folder in one) belongs to: `models--x--y/snapshots/<revision>/...`; else none."""
    for inner in [folder.absolute(), *folder.absolute().parents]:
        blobs = inner.parent.parent / "blobs"
        if inner.parent.name == "snapshots" and blobs.is_dir() and not blobs.is_symlink():
            return [blobs.resolve()]  # (a `blobs` link could lead anywhere)
    return []


def file_digest(path: Path, chunk_size: int = 1 << 20) -> str:
    """The SHA-256 of a file, read in chunks (a checkpoint's optimizer state may be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
