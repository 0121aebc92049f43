"""`MultiTaskConfig` and `MultiTaskModel`: one shared encoder, one head per task (MT-DNN).

Liu et al. 2019, "Multi-Task Deep Neural Networks for Natural Language Understanding". The
encoder is any Hugging Face `AutoModel` encoder, stored as a sub-config; tasks are plain JSON
metadata (the `model_spec()` of each card), so `from_pretrained` rebuilds every head from the
config alone. Loading is safetensors only and strict. This module imports only torch, safetensors,
transformers and mtnlp's modeling-side modules.

A model folder holds more than weights and config: `label_maps.json` (computed from the config) and
the companion files a training run adds (the model card, task cards, dev metrics, run summary,
report figures). `save_pretrained` writes them, so transformers' own `push_to_hub`, which saves into
a temporary folder and uploads it, publishes a whole model without this layer importing the Hub.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoModel,
    PreTrainedModel,
)

from mtnlp.modeling.auto import PIPELINE_TASK
from mtnlp.modeling.config import MultiTaskConfig, MultiTaskOutput, TaskStates
from mtnlp.modeling.heads import HEADS
from mtnlp.modeling.hierarchy import (
    build_task_layers,
    reads_encoder,
    truncated_encoder,
    with_dependencies,
)
from mtnlp.modeling.loading import (
    build_encoder,
    check_loaded,
    check_model_folder,
    quiet_load_report,
)
from mtnlp.modeling.lora import ADAPTER_FILES, adapter_files, freeze_all_but_lora, inject_lora
from mtnlp.modeling.sharing import build_sharing, resolve_sharing
from mtnlp.modeling.single_task import check_same_logits, probe_inputs, single_task_model
from mtnlp.utils.errors import UserError
from mtnlp.utils.files import (
    atomic_folder,
    make_folder,
    outside_link_problem,
    umask_permissions,
    write_file,
)

LABEL_MAPS = "label_maps.json"
MODEL_CARD = "README.md"
# What a training run adds to a model folder besides weights, config and tokenizer: the model card,
# the task cards, dev metrics, the run summary and the report's figures. Read as bytes, never run.
COMPANION_FILES = (
    MODEL_CARD,
    "eval_results.json",
    "train_summary.json",
    "cards/*.yaml",
    "plots/*.png",
)
# transformers' name for a shard of the weights; a save removes the shards it did not write
_WEIGHT_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def is_companion_file(name: str) -> bool:
    """`name` (relative to a model folder, with '/') matches one of `COMPANION_FILES`."""
    parts = PurePosixPath(name).parts
    return ".." not in parts and any(
        len(parts) == len(pattern.parts) and all(map(fnmatchcase, parts, pattern.parts))
        for pattern in map(PurePosixPath, COMPANION_FILES)
    )


def read_companion_files(folder: Path) -> dict[str, bytes]:
    """The companion files of a model folder: relative name -> content. A link out of the folder
    (`README.md -> ~/.ssh/id_rsa` in a downloaded folder) is refused: what is read here is saved
    and uploaded with the model."""
    files: dict[str, bytes] = {}
    for pattern in COMPANION_FILES:
        for path in sorted(folder.glob(pattern)):
            if not (path.is_file() or path.is_symlink()):
                continue
            if problem := outside_link_problem(path, folder):
                raise UserError(
                    f"{path}: {problem}; mtnlp reads only a model folder's own files (replace "
                    "it with the file itself, or remove it)"
                )
            files[path.relative_to(folder).as_posix()] = path.read_bytes()
    return files


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode (no dropout) inside the block; afterwards every module is back in the
    mode it had (the training loop's model trains on, a caller's model stays as it was)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


class MultiTaskModel(PreTrainedModel):
    """A shared encoder with a `ModuleDict` of task heads.

    `model(task="rte", input_ids=..., attention_mask=..., labels=...)` runs one task;
    `model.forward_tasks(["sst2", "cola"], input_ids=...)` runs several heads on one encoder pass.
    Build a new model with `from_encoder` (pretrained encoder weights) and reload a trained one
    with `from_pretrained`.

    A model loaded from a local folder keeps that folder's companion files (`COMPANION_FILES`: its
    model card `README.md`, `cards/*.yaml`, `eval_results.json`, `train_summary.json`,
    `plots/*.png`) as bytes in `companion_files`; `save_pretrained` writes them back with a fresh
    `label_maps.json`, and the inherited `push_to_hub` uploads them with mtnlp's model card as
    README.md. They describe the run that trained the weights: clear `companion_files` after
    training the model further.
    """

    config_class = MultiTaskConfig
    base_model_prefix = "mtnlp"
    supports_gradient_checkpointing = True

    def __init__(self, config: MultiTaskConfig) -> None:
        super().__init__(config)
        self.encoder = build_encoder(config.encoder)
        self._check_layers()
        # JMT task layers (Hashimoto et al. 2017) of stacked tasks; heads read their outputs
        self.task_layers, head_sizes = build_task_layers(
            config.tasks or [], config.encoder.hidden_size
        )
        self.sharing = build_sharing(config.sharing, self.encoder, config.task_names)
        self.heads = nn.ModuleDict(
            {
                task["name"]: HEADS.get(task["type"])(task, head_sizes[task["name"]])
                for task in config.tasks or []
            }
        )
        # the companion files of the folder the model was loaded from (from_pretrained)
        self.companion_files: dict[str, bytes] = {}
        self.post_init()
        if config.lora:  # after post_init, which would re-initialize the adapter's weights
            inject_lora(self.encoder, config.lora)

    def add_lora(self, entry: dict[str, Any]) -> None:
        """Put a fresh LoRA adapter (`lora.lora_entry`) on the encoder and freeze the encoder's
        own weights: the adapter, the heads and the task layers train. The config records the
        adapter, so a saved model reloads with it."""
        if self.config.lora:
            raise ValueError("this model already has a LoRA adapter")
        inject_lora(self.encoder, entry)
        freeze_all_but_lora(self.encoder)
        self.config.lora = entry

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_encoder(
        cls,
        encoder: str | PreTrainedModel,
        tasks: list[dict[str, Any]],
        sharing: dict[str, Any] | None = None,
        **load_kwargs: Any,
    ) -> MultiTaskModel:
        """A new model whose encoder holds pretrained weights and whose heads are fresh.

        `encoder` is a Hub id, a local folder, or an already built encoder model; `tasks` are
        the cards' `model_spec()` dicts; `sharing` the sharing strategy (sharing.py). Every
        encoder weight must load (strict), so a typo in a checkpoint name can never leave the
        encoder silently random.
        """
        if not isinstance(encoder, PreTrainedModel):
            encoder = AutoModel.from_pretrained(encoder, **load_kwargs)
        config = MultiTaskConfig(
            encoder=encoder.config.to_dict(), tasks=tasks, sharing=resolve_sharing(sharing)
        )
        model = cls(config)
        state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("pooler.")}
        model.encoder.load_state_dict(state, strict=True)
        model.sharing.load_from_encoder(model.encoder)  # task columns start pretrained
        return model

    @classmethod
    def from_multitask(
        cls,
        pretrained: nn.Module,
        tasks: list[dict[str, Any]],
        sharing: dict[str, Any] | None = None,
    ) -> MultiTaskModel:
        """The model to train on `tasks`: new heads on a pretrained encoder, or, when `pretrained`
        is a trained multi-task model (MT-DNN's fine-tuning stage), its encoder and the weights of
        the tasks it knows (other tasks' weights are dropped, new tasks start fresh). The sharing
        strategy carries its own weights over (`SharingStrategy.inherit`): task columns, and
        mixing units cut down to the tasks kept."""
        if not isinstance(pretrained, MultiTaskModel):
            return cls.from_encoder(pretrained, tasks, sharing)
        if pretrained.config.lora:
            raise UserError(
                "a model with a LoRA adapter cannot be trained further yet (start from its encoder)"
            )
        model = cls.from_encoder(pretrained.encoder, tasks, sharing)
        for spec in tasks:
            if spec["name"] in pretrained.config.task_names:
                old = pretrained.config.task(spec["name"])
                if (old["type"], old.get("labels")) != (spec["type"], spec.get("labels")):
                    raise UserError(
                        f"task {spec['name']} was trained with another type or labels than its "
                        "card has"
                    )
        target = model.state_dict()
        kept = {
            key: value
            for key, value in pretrained.state_dict().items()
            if key in target and not key.startswith("sharing.")  # the strategy's: inherit()
        }
        try:
            model.load_state_dict(kept, strict=False)
        except RuntimeError as error:  # same task, other head options: shapes differ
            reason = " ".join(str(error).split())
            raise UserError(f"its task weights do not fit the cards ({reason})") from None
        model.sharing.inherit(pretrained.sharing)
        return model

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any
    ) -> MultiTaskModel:
        """A trained model from a folder or Hub id: safetensors only, and strict.

        transformers would unpickle a `pytorch_model.bin` and load weights that do not fit the
        config (other tasks, other head shapes) with a printed report, leaving them random. Here
        each of these is a `UserError` naming the folder: no safetensors weights, a truncated
        file, tasks in config.json that cannot be built (a `stack_on` cycle, a layer the encoder
        lacks), missing, unexpected or mismatched weights. (`AutoModel.from_pretrained` comes
        here too.)

        From a local folder, the model keeps the folder's companion files (`companion_files`) so
        that `save_pretrained` and `push_to_hub` write them back; from a Hub id it keeps none (load
        a `huggingface_hub.snapshot_download` folder to keep them).
        """
        name = str(pretrained_model_name_or_path)
        if Path(name).is_dir():
            check_model_folder(Path(name))  # config.json's sizes, no FIFO, whole safetensors
        loading_info = kwargs.pop("output_loading_info", False)
        kwargs.update(use_safetensors=True, ignore_mismatched_sizes=True)  # checked below
        try:
            with quiet_load_report():
                model, info = super().from_pretrained(
                    pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
                )
        except UserError as error:  # raised by __init__: the config's tasks do not build
            raise UserError(f"{Path(name) / 'config.json'}: {error}") from None
        check_loaded(name, info)
        folder = Path(name, kwargs.get("subfolder") or "")
        if folder.is_dir():
            model.companion_files = read_companion_files(folder)
        return (model, info) if loading_info else model

    # ---------------------------------------------------------------- saving and publishing
    def save_pretrained(
        self, save_directory: str | os.PathLike, is_main_process: bool = True, *args, **kwargs
    ) -> None:
        """transformers' save (config.json, model.safetensors), plus what else a model folder
        needs: `label_maps.json` (each labelled task's `id2label`/`label2id`, from the config),
        the model's `companion_files` and, with a LoRA adapter, the adapter alone in peft's format
        (`adapter/`; a stale one is removed). With `push_to_hub=True` these are uploaded as well
        (see `_upload_modified_files`). Everything is written into a fresh staging folder inside
        `save_directory`, then moved in (`atomic_folder`): a link found at one of the names is
        replaced, never written through, and no file is ever half-written."""
        self._check_companion_names()
        folder = Path(save_directory)
        if not is_main_process or folder.is_file():  # transformers' own handling
            super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
            return
        if kwargs.get("push_to_hub"):  # transformers names the repository after the folder
            kwargs.setdefault("repo_id", os.path.basename(os.path.normpath(save_directory)))
        with atomic_folder(folder, merge=True) as staging:
            super().save_pretrained(staging, is_main_process, *args, **kwargs)
            # safetensors writes 0600; the folder's other files get 0666 less the umask
            umask_permissions(staging.glob("*.safetensors"))
            self._write_folder_files(staging)
            for stale in folder.iterdir():  # as transformers cleans a folder it saves into
                if _WEIGHT_SHARD.fullmatch(stale.name) and not (staging / stale.name).exists():
                    stale.unlink()
            for name in ADAPTER_FILES:  # an earlier model's adapter is not this one's
                if not (staging / name).exists() and (folder / name).is_file():
                    (folder / name).unlink()

    def _check_companion_names(self) -> None:
        """Every `companion_files` name is a companion file's (never a path out of the folder)."""
        bad = [name for name in self.companion_files if not is_companion_file(name)]
        if bad:
            raise ValueError(
                f"companion_files: {', '.join(map(repr, bad))} match none of "
                f"{', '.join(COMPANION_FILES)}"
            )

    def _write_folder_files(self, folder: Path) -> list[str]:
        """Write `label_maps.json`, the companion files and, with a LoRA adapter, the adapter in
        peft's format (`adapter/`) into `folder`; return their names."""
        self._check_companion_names()
        files = {
            LABEL_MAPS: (json.dumps(self.config.label_maps(), indent=2) + "\n").encode("utf-8"),
            **self.companion_files,
        }
        if self.config.lora:  # the adapter alone, for peft's own loader
            files.update(adapter_files(self.encoder, self.config.lora))
        for name, content in files.items():  # a link at a name is replaced, never followed
            if "/" in name:  # cards/, plots/
                make_folder((folder / name).parent)
            write_file(folder / name, content)
        return list(files)

    def _upload_modified_files(
        self,
        working_dir: str | os.PathLike,
        repo_id: str,
        files_timestamps: dict[str, float],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Put mtnlp's model card (and the other folder files) back before transformers uploads.

        Why this hook: transformers' `push_to_hub` (and `save_pretrained(push_to_hub=True)`)
        calls `save_pretrained`, then overwrites README.md with a generic card from
        `create_and_tag_model_card` (the repository's current card, or a "🤗 transformers
        model" template), then hands the folder to this method, which uploads it in one commit.
        It is the one step that both public entry points pass through after the generic card is
        written, so overriding it keeps transformers' own `push_to_hub` (signature, repository
        creation, branch and PR options) and keeps this layer free of `huggingface_hub` and
        `mtnlp.hub`. The alternatives were worse: overriding `push_to_hub` itself would copy its
        body (and still call this method to upload), and a second commit for README.md would
        leave the repository for a moment with transformers' card.

        The files written here are dropped from `files_timestamps` so that they count as
        modified. A model without a model card of its own keeps transformers' card; one with a
        card publishes it as is (the `tags` given to `push_to_hub` are then not added to it).
        tests/test_hub.py checks the pushed README.md, so a rename of this private transformers
        method would not go unnoticed.
        """
        written = self._write_folder_files(Path(working_dir))
        fresh = {name.split("/")[0] for name in written}
        unchanged = {name: time for name, time in files_timestamps.items() if name not in fresh}
        return super()._upload_modified_files(working_dir, repo_id, unchanged, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """Heads start like the encoder's own layers: normal(0, initializer_range), zero bias."""
        std = getattr(self.config.encoder, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def regularization_loss(self) -> Tensor | float:
        """The sharing strategy's penalty for the training loss: soft sharing's parameter
        distance, sluice's subspace orthogonality of the latest training forward passes (0 for
        hard sharing and cross-stitch)."""
        return self.sharing.regularization_loss()

    # ---------------------------------------------------------------- transformers' model API
    def get_input_embeddings(self) -> nn.Module:
        """The encoder's token embeddings (shared by every task)."""
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.encoder.set_input_embeddings(value)

    def task_model(self, task: str) -> PreTrainedModel:
        """A plain transformers model of one task, with this model's weights, that any
        transformers client loads: the `AutoModelForSequenceClassification` (classification,
        regression) or `AutoModelForTokenClassification` (tagging) class of the encoder's config,
        with the task's `id2label` / `label2id`, in eval mode. Its logits are this model's
        (checked on a probe batch). A `UserError` says why when the task's head or layout has no
        plain counterpart (mean pooling, JMT task layers, mixing columns, ...)."""
        plain = single_task_model(self, task)
        probe = probe_inputs(self.config.encoder, self.device)
        with eval_mode(self), torch.no_grad():
            expected = self(task=task, **probe).logits
        check_same_logits(task, plain, probe, expected)
        return plain

    # ---------------------------------------------------------------- forward
    def layer_index(self, task: str) -> int:
        """Index into the encoder's hidden states (0 = embeddings, L = last layer)."""
        layer = self.config.task(task).get("layer", -1)
        num_layers = self.config.encoder.num_hidden_layers
        return layer if layer >= 0 else num_layers + 1 + layer

    def _check_layers(self) -> None:
        """Every task's `layer` must name one of the encoder's hidden states."""
        num_layers = self.config.encoder.num_hidden_layers
        for task in self.config.tasks or []:
            if not 0 <= self.layer_index(task["name"]) <= num_layers:
                raise UserError(
                    f"task {task['name']}: layer: {task.get('layer')} is not a layer of this "
                    f"encoder (0..{num_layers}, or -{num_layers + 1}..-1 counting from the top)"
                )

    def task_order(self, tasks: list[str]) -> list[str]:
        """`tasks` plus the tasks they stack on, each after the tasks below it."""
        specs = {name: self.config.task(name) for name in self.config.task_names}
        for task in tasks:
            self.config.task(task)  # an unknown task: KeyError naming the model's tasks
        return with_dependencies(specs, tasks)

    def encode(self, tasks: list[str], **inputs: Tensor) -> dict[str, Tensor]:
        """Run the encoder once, only as deep as the deepest layer that `tasks` and the tasks they
        stack on read (low supervision: layers above it get no work and no gradient); return, per
        task that reads the encoder, the hidden states of its layer."""
        return self._encode(tasks, inputs).states

    def _encode(
        self,
        tasks: list[str],
        inputs: dict[str, Tensor],
        hidden_states: bool = False,
        attentions: bool = False,
    ) -> TaskStates:
        """`encode`, with each task's hidden states on the way to its layer (with
        `hidden_states`) and the attention weights of those layers (with `attentions`)."""
        layers = {
            task: self.layer_index(task)
            for task in self.task_order(tasks)
            if reads_encoder(self.config.task(task))
        }
        if self.sharing.columns:  # per-task top layers (soft, cross_stitch, sluice)
            return self.sharing.encode(self.encoder, layers, inputs, attentions)
        depth = max(layers.values())
        need_all = hidden_states or any(index != depth for index in layers.values())
        with truncated_encoder(self.encoder, depth):
            outputs = self.encoder(
                **inputs,
                output_hidden_states=need_all,
                output_attentions=attentions,
                return_dict=True,
            )
        hidden, weights = outputs.hidden_states or (), outputs.attentions or ()
        return TaskStates(
            states={
                task: outputs.last_hidden_state if index == depth else hidden[index]
                for task, index in layers.items()
            },
            hidden_states={task: hidden[: index + 1] for task, index in layers.items()},
            attentions={task: weights[:index] for task, index in layers.items()},
        )

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        task: str | None = None,
        *,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MultiTaskOutput | tuple[Tensor, ...]:
        """Logits (and loss when `labels` is given) of one task. Other keyword arguments
        (`inputs_embeds`, `position_ids`, ...) go to the encoder; `output_hidden_states`,
        `output_attentions` and `return_dict` work as in transformers' models (default: the
        config's)."""
        if task is None:
            raise ValueError(
                f"pass task=... (this model's tasks: {', '.join(self.config.task_names)}); to "
                f'predict raw text, use mtnlp.MultiTaskPipeline or transformers.pipeline("'
                f'{PIPELINE_TASK}", model=...); for a plain transformers model of one task, '
                "model.task_model(task)"
            )
        return self.forward_tasks(
            [task],
            input_ids,
            attention_mask,
            token_type_ids,
            {task: labels},
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            **kwargs,
        )[task]

    def forward_tasks(
        self,
        tasks: list[str],
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: dict[str, Tensor | None] | None = None,
        *,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, MultiTaskOutput | tuple[Tensor, ...]]:
        """Several tasks on the same inputs with one encoder pass (each task's output as
        `forward` gives it)."""
        config = self.config
        attentions = config.output_attentions if output_attentions is None else output_attentions
        hidden_states = (
            config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if attention_mask is None:  # every token counts
            given = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            if given is None:
                raise ValueError("pass input_ids or inputs_embeds")
            attention_mask = torch.ones(given.shape[:2], dtype=torch.long, device=given.device)
        encoded = self._encode(tasks, inputs, bool(hidden_states), bool(attentions))
        labels = labels or {}
        states: dict[str, Tensor] = {}
        logits: dict[str, Tensor] = {}
        losses: dict[str, Tensor | None] = {}
        for task in self.task_order(tasks):  # a stacked task after the tasks below it
            states[task] = self._task_states(task, encoded.states, states, logits, attention_mask)
            logits[task], losses[task] = self.heads[task](
                states[task], attention_mask, labels.get(task) if task in tasks else None
            )
        as_dict = config.return_dict if return_dict is None else return_dict
        outputs = {}
        for task in tasks:
            source = self._encoder_reader(task)
            output = MultiTaskOutput(
                loss=losses[task],
                logits=logits[task],
                hidden_states=encoded.hidden_states[source] if hidden_states else None,
                attentions=encoded.attentions[source] if attentions else None,
            )
            outputs[task] = output if as_dict else output.to_tuple()
        return outputs

    def _encoder_reader(self, task: str) -> str:
        """`task`, or for a stacked task that reads no encoder states, the nearest task below it
        that does (whose hidden states it builds on)."""
        spec = self.config.task(task)
        while not reads_encoder(spec):
            spec = self.config.task(spec["stack_on"])
        return spec["name"]

    def _task_states(
        self,
        task: str,
        hidden: dict[str, Tensor],
        states: dict[str, Tensor],
        logits: dict[str, Tensor],
        attention_mask: Tensor,
    ) -> Tensor:
        """What the task's head reads: encoder states, or its task layer's output (JMT)."""
        if task not in self.task_layers:
            return hidden[task]
        lower = self.config.task(task).get("stack_on")
        return self.task_layers[task](
            hidden.get(task), attention_mask, states.get(lower), logits.get(lower)
        )
