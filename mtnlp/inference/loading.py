"""A trained model and its tokenizer from a folder or Hub id (safetensors only, strict)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mtnlp.utils.errors import UserError, first_line
from mtnlp.utils.untrusted import clip

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from mtnlp.modeling.model import MultiTaskModel


# a saved tokenizer has at least one of these (fast: tokenizer.json; any: tokenizer_config.json)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def load_model(name: str) -> tuple[MultiTaskModel, PreTrainedTokenizerBase]:
    """Model and tokenizer of a trained model folder or Hub id. The weights load from safetensors
    only and strictly (`MultiTaskModel.from_pretrained`): a folder holding only a pickled
    `pytorch_model.bin`, a truncated file, heads that do not fit config.json, a damaged or
    oversized config.json or tokenizer file, a FIFO among its files (`check_model_folder`,
    `check_tokenizer_files`), a folder without tokenizer files or a tokenizer whose ids the
    encoder does not embed is one `UserError` naming the folder or file."""
    from transformers import AutoTokenizer

    from mtnlp.modeling.loading import check_tokenizer_files, check_tokenizer_fits, read_config
    from mtnlp.modeling.model import MultiTaskModel

    path = Path(name)
    if path.is_dir():
        read_config(path)  # a folder of another kind of model: a clear error
        check_tokenizer_files(path)
        if not any((path / file).is_file() for file in TOKENIZER_FILES):
            raise UserError(f"{name}: no tokenizer files ({' / '.join(TOKENIZER_FILES)} ...)")
    elif path.is_absolute() or name.startswith("."):
        raise UserError(f"{name}: no such model folder")
    try:
        model = MultiTaskModel.from_pretrained(name)
    except OSError as error:
        raise UserError(
            f"{name}: not an mtnlp model folder or Hub id ({first_line(error)})"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as error:  # a damaged tokenizer file: any of the tokenizer libraries' errors
        raise UserError(
            f"{name}: its tokenizer does not load ({clip(first_line(error), 200)})"
        ) from None
    check_tokenizer_fits(name, tokenizer, model)
    return model, tokenizer
