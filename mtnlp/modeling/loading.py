"""Loading a model folder as data, never as code: safetensors only, whole, and strictly.

mtnlp never unpickles a `pytorch_model.bin`, a truncated file never reaches a loader, and
weights that do not fit the config are a `UserError` naming the folder and keys (transformers
alone would leave such heads random and print a load report). A downloaded folder is untrusted
input: config.json is read with bounded work and its sizes checked (`limits.py`) before anything
is built, and no file a loader opens may be a FIFO or device (`check_model_folder`).
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
    PreTrainedTokenizerBase,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import CONFIG_NAME

from mtnlp.modeling.config import MultiTaskConfig, check_task_entries
from mtnlp.modeling.limits import (
    MAX_CONFIG_BYTES,
    MAX_TOKENIZER_BYTES,
    check_encoder_config,
    check_sharing_entry,
)
from mtnlp.modeling.lora import check_lora_entry
from mtnlp.utils.errors import UserError
from mtnlp.utils.files import TOKENIZER_FILES
from mtnlp.utils.untrusted import check_regular_file, clip, kind_of, load_json_object

WEIGHTS_INDEX = "model.safetensors.index.json"  # the index of sharded weights


def check_weight_files(folder: Path) -> None:
    """A `UserError` unless `folder` holds safetensors weights whose every file opens whole.

    mtnlp never unpickles a `pytorch_model.bin` (unpickling can run code), and a truncated or
    garbled file must not reach a loader, whose error would be a traceback. A name that is not a
    regular file (a FIFO would block whoever opens it) is refused before anything opens it;
    safetensors itself refuses a header over 100 MB.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors weights (mtnlp never unpickles models)")
    for path in files:
        check_regular_file(path, what="safetensors file")
        try:
            with safe_open(path, framework="pt"):  # reads the header, checks the file's length
                pass
        except (SafetensorError, OSError) as error:
            raise UserError(f"{path}: not a complete safetensors file ({error})") from None


def check_model_folder(folder: Path) -> None:
    """What a model loader opens in `folder`, checked before it does: config.json
    (`read_model_config`), the index of sharded weights when there (a regular file within
    `MAX_CONFIG_BYTES`), and the weights (`check_weight_files`)."""
    if (folder / CONFIG_NAME).exists() or (folder / CONFIG_NAME).is_symlink():
        read_model_config(folder)
    if (folder / WEIGHTS_INDEX).exists() or (folder / WEIGHTS_INDEX).is_symlink():
        check_regular_file(folder / WEIGHTS_INDEX, MAX_CONFIG_BYTES, what="weights index")
    check_weight_files(folder)


def check_tokenizer_files(folder: Path) -> None:
    """The tokenizer files in `folder`, checked before a tokenizer loader opens them: each a
    regular file (a FIFO would block it) within `MAX_TOKENIZER_BYTES`."""
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.exists() or path.is_symlink():
            check_regular_file(path, MAX_TOKENIZER_BYTES, what="tokenizer file")


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


def read_model_config(folder: Path, mtnlp_only: bool = False) -> PreTrainedConfig | None:
    """The config.json of a model folder, of mtnlp or of an encoder, read with bounded work
    (`load_json_object`) and checked before any of it is built: the encoder's model type and
    sizes (`check_encoder_config`), and an mtnlp model's tasks and sharing. None when the file
    names no model type (transformers guesses one from the folder's name). `mtnlp_only`: a
    `UserError` for a config of another model type, before anything else is checked."""
    where = str(folder / CONFIG_NAME)
    data = load_json_object(folder / CONFIG_NAME, MAX_CONFIG_BYTES, where, "config file")
    model_type = data.get("model_type")
    if mtnlp_only and model_type != MultiTaskConfig.model_type:
        named = repr(clip(model_type)) if isinstance(model_type, str) else kind_of(model_type)
        raise UserError(
            f"{folder}: not an mtnlp model folder (its config.json's model_type is {named}, not "
            f"'{MultiTaskConfig.model_type}')"
        )
    if model_type == MultiTaskConfig.model_type:
        check_encoder_config(data.get("encoder"), where, "encoder")
        check_task_entries(data.get("tasks"), where)
        check_sharing_entry(data.get("sharing"), where)
        check_lora_entry(data.get("lora"), where)
        config_class = MultiTaskConfig
    else:
        check_encoder_config(data, where)
        if model_type is None:
            return None
        config_class = CONFIG_MAPPING[model_type]
    try:
        return config_class.from_dict(data)
    except Exception as error:  # transformers' own checks of the other fields (types, values)
        raise UserError(f"{where}: {clip(' '.join(str(error).split()), 200)}") from None


def read_config(folder: Path) -> MultiTaskConfig:
    """The config of an mtnlp model folder (`read_model_config`); a `UserError` for any other
    folder."""
    config_file = folder / CONFIG_NAME
    if not (config_file.exists() or config_file.is_symlink()):
        raise UserError(
            f"{folder}: not an mtnlp model folder (no config.json of model_type 'mtnlp')"
        )
    return read_model_config(folder, mtnlp_only=True)


def check_tokenizer_fits(
    name: str, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel
) -> None:
    """A `UserError` when `tokenizer` gives token ids that `model`'s input embeddings lack (a
    tokenizer from another model: every such id would be an index error mid-run)."""
    rows = model.get_input_embeddings().num_embeddings
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if largest >= rows:
        raise UserError(
            f"{name}: its tokenizer gives token ids up to {largest}, but the encoder embeds "
            f"{rows} tokens (vocab_size in config.json): the tokenizer is not the encoder's"
        )
