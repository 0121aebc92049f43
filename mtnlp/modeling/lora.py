"""LoRA adapters on the shared encoder (`--peft lora`), built with peft.

A model config's `lora` entry (`lora_entry`) describes the adapter: rank, alpha, dropout, the
encoder modules it wraps and its scope (`shared`: one adapter for every task). The adapter is
injected into `model.encoder` (`peft.inject_adapter_in_model`), so its weights are part of the
model's state dict (`encoder.<module>.lora_A.default.weight`, ...) and a saved model reloads by
injecting the same adapter before its strict load. peft is an optional extra: it is imported here
only when a config asks for LoRA.
"""

from __future__ import annotations

import json
import re
from typing import Any

from safetensors.torch import save
from torch import nn

from mtnlp.modeling.limits import MAX_HEAD_SIZE, check_size
from mtnlp.utils.errors import UserError
from mtnlp.utils.untrusted import kind_of

INSTALL = "pip install 'mtnlp[peft]'"
LORA_SCOPES = ("shared",)
ADAPTER_NAME = "default"  # peft's name of a model's first adapter
ADAPTER_FOLDER = "adapter"  # the adapter alone, in peft's format, inside a model folder
ADAPTER_FILES = (
    f"{ADAPTER_FOLDER}/adapter_config.json",
    f"{ADAPTER_FOLDER}/adapter_model.safetensors",
)
MAX_TARGET_MODULES = 64
# a module name peft matches against the encoder's (`query`, `attention.self.value`)
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z0-9_]{1,64}){0,7}")


def import_peft() -> Any:
    """The `peft` module; a `UserError` naming the extra to install when it is missing."""
    try:
        import peft
    except ImportError:
        raise UserError(f"LoRA adapters need peft, which is not installed: {INSTALL}") from None
    return peft


def default_target_modules(model_type: str) -> list[str]:
    """peft's default LoRA targets for an encoder type (BERT, RoBERTa: query and value)."""
    peft = import_peft()
    mapping = peft.utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    if model_type not in mapping:
        raise UserError(
            f"LoRA: peft has no default target modules for {model_type} encoders; name them "
            "with --lora-target-modules"
        )
    return list(mapping[model_type])


def lora_entry(
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str],
    scope: str = "shared",
    where: str = "LoRA",
) -> dict[str, Any]:
    """The config entry of a LoRA adapter (what config.json's `lora` holds); a bad value is a
    `UserError` naming `where` and the field."""
    entry = {
        "r": r,
        "alpha": alpha,
        "dropout": dropout,
        "target_modules": list(target_modules),
        "scope": scope,
    }
    check_lora_entry(entry, where)
    return entry


def check_lora_entry(entry: Any, where: str) -> None:
    """config.json's `lora` (untrusted): null, or an object with a bounded rank and alpha, a
    dropout from 0 to 1, a short list of module names and a known scope; one `UserError` line
    naming `where` and the field otherwise."""
    if entry is None:
        return
    if not isinstance(entry, dict):
        raise UserError(f"{where}: lora: expected an object or null, got {kind_of(entry)}")
    check_size(entry.get("r"), 1, MAX_HEAD_SIZE, where, "lora.r")
    check_size(entry.get("alpha"), 1, MAX_HEAD_SIZE, where, "lora.alpha")
    dropout = entry.get("dropout")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout <= 1:
        raise UserError(
            f"{where}: lora.dropout: expected a number from 0 to 1, got {kind_of(dropout)}"
        )
    modules = entry.get("target_modules")
    if not isinstance(modules, list) or not 1 <= len(modules) <= MAX_TARGET_MODULES:
        raise UserError(
            f"{where}: lora.target_modules: expected a list of 1 to {MAX_TARGET_MODULES} module "
            f"names, got {kind_of(modules)}"
        )
    for number, name in enumerate(modules):
        if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
            raise UserError(
                f"{where}: lora.target_modules[{number}]: expected a module name (letters, "
                f"digits, '_' and '.'), got {kind_of(name)}"
            )
    if entry.get("scope") not in LORA_SCOPES:
        raise UserError(
            f"{where}: lora.scope: expected one of {', '.join(LORA_SCOPES)}, got "
            f"{kind_of(entry.get('scope'))}"
        )


def peft_config(entry: dict[str, Any]) -> Any:
    """peft's `LoraConfig` of a config entry."""
    return import_peft().LoraConfig(
        r=entry["r"],
        lora_alpha=entry["alpha"],
        lora_dropout=entry["dropout"],
        target_modules=entry["target_modules"],
    )


def inject_lora(encoder: nn.Module, entry: dict[str, Any]) -> None:
    """Wrap `encoder`'s target modules in a LoRA adapter (peft's initialization: B = 0, so the
    encoder computes what it did). Targets that match no module are a `UserError`."""
    peft = import_peft()
    config = peft_config(entry)
    try:
        peft.inject_adapter_in_model(config, encoder, adapter_name=ADAPTER_NAME)
    except ValueError:  # peft: "Target modules {...} not found in the base model"
        raise UserError(
            "lora.target_modules: no module of the encoder has one of these names (BERT's "
            "attention: query, key, value)"
        ) from None


def freeze_all_but_lora(encoder: nn.Module) -> None:
    """Only the LoRA weights of `encoder` train; its own weights stay as they are."""
    for name, parameter in encoder.named_parameters():
        parameter.requires_grad = ".lora_" in name


def adapter_files(encoder: nn.Module, entry: dict[str, Any]) -> dict[str, bytes]:
    """The adapter alone in peft's format (`adapter/adapter_config.json`,
    `adapter/adapter_model.safetensors`): `PeftModel.from_pretrained(encoder, "FOLDER/adapter")`
    puts it on the pretrained encoder (without the heads, which peft does not know)."""
    peft = import_peft()
    config = peft_config(entry).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    weights = peft.get_peft_model_state_dict(encoder, adapter_name=ADAPTER_NAME)
    # the names PeftModel.save_pretrained gives them: below its base_model.model
    weights = {f"base_model.model.{name}": value.contiguous() for name, value in weights.items()}
    config_file, weights_file = ADAPTER_FILES
    return {
        config_file: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"),
        weights_file: save(weights),
    }
