"""Loading a model folder as data, never as code: safetensors only, whole, and strictly.

mtnlp never unpickles a `pytorch_model.bin`, a truncated file never reaches a loader, and
weights that do not fit the config are a `UserError` naming the folder and keys (transformers
alone would leave such heads random and print a load report).
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from mtnlp.modeling.config import MultiTaskConfig
from mtnlp.utils.errors import UserError
from mtnlp.utils.files import read_json


def check_weight_files(folder: Path) -> None:
    """A `UserError` unless `folder` holds safetensors weights whose every file opens whole.

    mtnlp never unpickles a `pytorch_model.bin` (unpickling can run code), and a truncated or
    garbled file must not reach a loader, whose error would be a traceback.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors weights (mtnlp never unpickles models)")
    for path in files:
        try:
            with safe_open(path, framework="pt"):  # reads the header, checks the file's length
                pass
        except (SafetensorError, OSError) as error:
            raise UserError(f"{path}: not a complete safetensors file ({error})") from None


def check_loaded(name: str, info: dict[str, Any]) -> None:
    """Every weight of the model came from the file and every weight of the file found its place;
    else a `UserError` naming the first keys of each kind."""
    kinds = {
        "missing": info["missing_keys"],
        "unexpected": info["unexpected_keys"],
        "other shape": {key for key, *_shapes in info["mismatched_keys"]},
    }
    problems = [
        f"{kind}: {', '.join(sorted(keys)[:3])}{', ...' if len(keys) > 3 else ''}"
        for kind, keys in kinds.items()
        if keys
    ]
    if problems:
        raise UserError(
            f"{name}: the weights do not fit the tasks of its config.json ({'; '.join(problems)})"
        )


def _not_a_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


@contextmanager
def quiet_load_report():
    """Mute transformers' table of unfitting weights: `check_loaded` turns it into the error."""
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_not_a_load_report)
    try:
        yield
    finally:
        logger.removeFilter(_not_a_load_report)


def build_encoder(config: PreTrainedConfig) -> PreTrainedModel:
    """An encoder from its config, without the pooler that the heads never use."""
    model_class = MODEL_MAPPING[type(config)]
    kwargs = {}
    if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    return model_class(config, **kwargs)


def read_config(folder: Path) -> MultiTaskConfig:
    """The config of an mtnlp model folder; a `UserError` for any other folder."""
    config = read_json(folder / "config.json")
    if config.get("model_type") != MultiTaskConfig.model_type:
        raise UserError(
            f"{folder}: not an mtnlp model folder (no config.json of model_type 'mtnlp')"
        )
    return MultiTaskConfig.from_pretrained(folder)
