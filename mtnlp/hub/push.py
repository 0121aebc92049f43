"""Pushing a trained model to the Hugging Face Hub in one commit, with its model card (main
process only).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    HfApi,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
)
from huggingface_hub.utils import httpx, validate_repo_id
from transformers import PreTrainedTokenizerBase

from mtnlp.artifacts.report import REPORT
from mtnlp.artifacts.run_folder import TRAIN_LOG, artifact_files
from mtnlp.hub.card import LIBRARY_NAME, check_languages, check_license, model_card
from mtnlp.modeling.config import MultiTaskConfig
from mtnlp.modeling.loading import check_model_folder, check_tokenizer_files, read_config
from mtnlp.modeling.model import LABEL_MAPS, MultiTaskModel, is_companion_file
from mtnlp.utils.errors import UserError, first_line


def check_repo_id(repo_id: str | None) -> str:
    """`repo_id` if the Hub accepts it as a model id (`name` or `namespace/name`)."""
    if not repo_id:
        raise UserError("--hub-model-id: required to push (e.g. your-name/glue-mt)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(
            f"--hub-model-id: {repo_id!r} is not a valid Hub model id ({error})"
        ) from None
    return repo_id


def _run_file(path: str) -> bool:
    """What a run adds to a model: model card, task cards, dev metrics, summary, log, report."""
    return is_companion_file(path) or path in (TRAIN_LOG, REPORT)


def _files(folder: Path, run_dir: Path) -> dict[str, Path]:
    """Path in the repo -> file: the model folder's, with `run_dir`'s run files in place of its
    own, and `run_dir`'s other files (e.g. the tokenizer) where the folder has none."""
    files = artifact_files(folder)
    if run_dir.resolve() != folder.resolve():
        for path, file in artifact_files(run_dir).items():
            if path not in files or _run_file(path):
                files[path] = file
    return files


# what must match between a model and an ONNX export pushed with it
ENCODER_SHAPE = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")


def _onnx_files(folder: Path, config: MultiTaskConfig) -> dict[str, Path]:
    """The files of an `mtnlp export` folder of this model (its graphs, their metadata, and the
    config, tokenizer and cards the model folder has too)."""
    if not folder.is_dir() or not any(folder.glob("*.onnx")):
        raise UserError(f"--onnx: {folder}: no *.onnx graph (give an `mtnlp export` folder)")
    exported = read_config(folder)

    def shape(of: MultiTaskConfig) -> tuple:
        return of.tasks, of.sharing, [getattr(of.encoder, key, None) for key in ENCODER_SHAPE]

    if shape(exported) != shape(config):
        raise UserError(
            f"--onnx: {folder}: an export of another model (its config.json has other tasks, "
            "sharing or encoder)"
        )
    return artifact_files(folder)


def push_to_hub(
    model: MultiTaskModel | str | Path,
    repo_id: str,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    run_dir: str | Path | None = None,
    onnx_dir: str | Path | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload mtnlp multi-task model",
    license: str | None = None,
    language: Sequence[str] | None = None,
) -> CommitInfo | None:
    """Push a model folder (`model` as a path, e.g. a training `--output-dir`), or a model object
    with its `tokenizer`, in one commit with a generated model card. Returns the commit; None on
    processes other than the main one, which push nothing.

    The card, cards, metrics and report come from `run_dir` when given, else from the model's own
    folder (a model object's: the companion files it was loaded with). The model's weights, config
    and tokenizer always come from `model`; `run_dir` only adds the files it lacks.

    `onnx_dir`, an `mtnlp export` folder of the model, adds its ONNX graphs (`model.onnx`,
    `model.int8.onnx`) and their metadata at the top of the repository, beside the PyTorch
    weights, and the model card says how to run them (`MultiTaskPipeline.from_onnx(repo_id)`).
    `license` and `language` (Hub ids) go into the card's metadata instead of the run's."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return None
    check_repo_id(repo_id)
    check_license(license, "--license")
    check_languages(language, "--language")
    with tempfile.TemporaryDirectory() as staging:
        if isinstance(model, (str, Path)):
            folder = Path(model)
            config = read_config(folder)  # checked: sizes, tasks, no FIFO (limits.py)
            check_model_folder(folder)  # safetensors, whole: never a pickle-only model
            check_tokenizer_files(folder)
        else:
            folder, config = Path(staging), model.config
            model.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
        run_dir = Path(run_dir) if run_dir is not None else folder
        if not run_dir.is_dir():
            raise UserError(f"{run_dir}: no such run folder")
        files = _files(folder, run_dir)
        if onnx_dir is not None:  # the export's own files: what the model folder lacks
            exported = _onnx_files(Path(onnx_dir), config)
            files.update({path: file for path, file in exported.items() if path not in files})
        graphs = sorted(path for path in files if path.endswith(".onnx"))
        api = HfApi(library_name=LIBRARY_NAME)
        try:
            # the full id (a bare name gets the user's namespace) is the one the card shows
            repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
            generated = {
                "README.md": model_card(
                    config, repo_id, run_dir, onnx_files=graphs, license=license, language=language
                ),
                LABEL_MAPS: json.dumps(config.label_maps(), indent=2) + "\n",
            }
            operations = [
                CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(file))
                for path, file in files.items()
                if path not in generated
            ] + [
                CommitOperationAdd(path_in_repo=path, path_or_fileobj=text.encode("utf-8"))
                for path, text in generated.items()
            ]
            return api.create_commit(
                repo_id, operations, commit_message=commit_message, token=token
            )
        except (ConnectionError, httpx.TransportError) as error:  # offline, or no network
            reason = (
                "offline mode: HF_HUB_OFFLINE is set"
                if isinstance(error, OfflineModeIsEnabled)
                else first_line(error)
            )
            raise UserError(
                f"push to {repo_id}: cannot reach the Hugging Face Hub ({reason})"
            ) from None
        except (HfHubHTTPError, LocalTokenNotFoundError) as error:
            raise UserError(f"push to {repo_id}: {first_line(error)}") from None
