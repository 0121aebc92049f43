"""Plain transformers folders from a trained multi-task model (`mtnlp export --format
transformers --task T` and `--format encoder`).

`export_task` writes one task as the `AutoModelForSequenceClassification` /
`AutoModelForTokenClassification` of the encoder's config (`MultiTaskModel.task_model`), so that
`transformers.pipeline("text-classification", model=folder)`, the Inference API or any other
transformers client loads it; `export_encoder` writes the bare encoder (feature extraction,
sentence-transformers). Each folder holds config.json, model.safetensors and the tokenizer, and is
written all at once (`atomic_folder`).
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mtnlp.inference.loading import load_model
from mtnlp.utils.errors import UserError, first_line
from mtnlp.utils.files import atomic_folder


def export_task(model_folder: str | Path, output: str | Path, task: str) -> Path:
    """Write `task` of the model in `model_folder` as a plain transformers model with its
    tokenizer into `output` (new or empty); return `output`. The tokenizer's `model_max_length`
    is the task's `max_length` when its card gave one (what training truncated at). A task whose
    head or layout has no plain counterpart is a `UserError` saying why."""
    output = _check_output(Path(output))
    model, tokenizer = load_model(str(model_folder))
    plain = model.task_model(task)
    max_length = model.config.task(task).get("max_length")
    if max_length:
        tokenizer.model_max_length = max_length
    return _write(plain, tokenizer, output)


def export_encoder(model_folder: str | Path, output: str | Path) -> Path:
    """Write the shared encoder of the model in `model_folder` with its tokenizer into `output`
    (new or empty), as a folder `AutoModel` loads; return `output`. mtnlp's heads never use an
    encoder's pooler, so the folder has none (BERT's `AutoModel` starts one at random and says
    so; read `last_hidden_state`)."""
    output = _check_output(Path(output))
    model, tokenizer = load_model(str(model_folder))
    if model.sharing.columns:
        raise UserError(
            f"{model_folder}: with {model.sharing.name} sharing each task runs its own copy of "
            f"the top {model.sharing.config.layers} layers, so the shared encoder's top layers "
            "never trained; export a task instead (--format transformers --task T)"
        )
    return _write(model.encoder, tokenizer, output)


def _check_output(output: Path) -> Path:
    """`output` unless it is a file or a folder with something in it."""
    if output.is_file() or output.is_symlink():
        raise UserError(f"{output}: is a file; give a new or empty folder")
    if output.is_dir() and any(output.iterdir()):
        raise UserError(f"{output}: is not empty; give a new or empty folder")
    return output


def _write(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output: Path) -> Path:
    """Save `model` (safetensors) and `tokenizer` into `output`, all at once."""
    try:
        with atomic_folder(output) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    except OSError as error:
        raise UserError(f"{output}: cannot write here ({first_line(error)})") from None
    return output
