"""Prediction through ONNX Runtime: the graph that `mtnlp export` writes (every head in one
graph), run by `MultiTaskPipeline.from_onnx` and `mtnlp predict --backend onnx` without the
model's PyTorch weights.

An export folder holds `model.onnx` (and `model.int8.onnx` after `--quantize int8`), config.json,
the tokenizer, `label_maps.json`, the task cards and `onnx.json`. A pushed model holds the same
files at the top of its repository, so a model folder or Hub id with a `model.onnx` serves too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mtnlp.modeling.config import MultiTaskConfig, MultiTaskOutput
from mtnlp.modeling.heads import HEADS
from mtnlp.modeling.loading import read_config
from mtnlp.utils.errors import UserError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ONNX_FILE = "model.onnx"  # the fp32 graph
INT8_FILE = "model.int8.onnx"  # its dynamic int8 quantization (`mtnlp export --quantize int8`)
INSTALL = "pip install 'mtnlp[onnx]'"
# a repository's files that ONNX prediction never reads (PyTorch weights, pickles, figures)
NOT_NEEDED = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "plots/*", "*.onnx"]


def import_onnxruntime() -> Any:
    """The `onnxruntime` module; a `UserError` naming the extra to install when it is missing."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"ONNX needs onnxruntime, which is not installed: {INSTALL}") from None
    return onnxruntime


def onnx_folder(name: str | Path, file: str = ONNX_FILE) -> Path:
    """The folder that holds `file` and the files around it: a local folder, or a Hub id whose
    repository holds `file` (downloaded without the PyTorch weights)."""
    path = Path(name)
    if path.is_dir():
        if not (path / file).is_file():
            raise UserError(
                f"{path}: no {file} (an `mtnlp export` folder holds it; export the model with "
                f"`mtnlp export {path} OUTPUT`)"
            )
        return path
    if path.is_absolute() or str(name).startswith("."):
        raise UserError(f"{name}: no such folder")
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        folder = Path(snapshot_download(str(name), ignore_patterns=NOT_NEEDED))
        hf_hub_download(str(name), file)  # into the same snapshot folder
    except Exception as error:  # offline, no such repository or file, no network
        raise UserError(
            f"{name}: no {file} from the Hugging Face Hub ({first_line(error)})"
        ) from None
    return folder


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime's options for prediction: every graph optimization, `threads` intra-op threads
    (default: ONNX Runtime's, one per physical core), one inter-op thread."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return options


class OnnxModel(nn.Module):
    """The part of `MultiTaskModel` that `MultiTaskPipeline` uses (`config`, `forward_tasks`,
    `heads[task].decode`), run by an ONNX Runtime session on the CPU.

    `heads` are built from the config for their `decode` only: their weights are not used (the
    trained ones are in the graph).
    """

    def __init__(self, folder: str | Path, file: str = ONNX_FILE, threads: int | None = None):
        super().__init__()
        ort = import_onnxruntime()
        folder = Path(folder)
        path = folder / file
        self.config: MultiTaskConfig = read_config(folder)
        try:
            self.session = ort.InferenceSession(
                str(path), session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime's own error types: a missing or broken graph
            raise UserError(
                f"{path}: not a graph ONNX Runtime runs ({first_line(error)})"
            ) from None
        self.path = path
        self.input_names = [node.name for node in self.session.get_inputs()]
        outputs = {node.name for node in self.session.get_outputs()}
        missing = [task for task in self.config.task_names if task not in outputs]
        if missing:
            raise UserError(
                f"{path}: no output for task {', '.join(missing)} of {folder / 'config.json'} "
                "(not an export of this model)"
            )
        hidden = self.config.encoder.hidden_size
        self.heads = nn.ModuleDict(
            {spec["name"]: HEADS.get(spec["type"])(spec, hidden) for spec in self.config.tasks}
        )
        self.eval()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward_tasks(
        self,
        tasks: Sequence[str],
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        **_: Any,
    ) -> dict[str, MultiTaskOutput]:
        """The logits of `tasks` on one batch: one run of the graph (the encoder once)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        given = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
        }
        feed = {name: given[name].to(torch.int64).numpy() for name in self.input_names}
        logits = self.session.run(list(tasks), feed)
        return {
            task: MultiTaskOutput(logits=torch.from_numpy(value))
            for task, value in zip(tasks, logits, strict=True)
        }


def load_onnx(
    name: str | Path, file: str = ONNX_FILE, threads: int | None = None
) -> tuple[OnnxModel, PreTrainedTokenizerBase]:
    """The graph `file` of an export folder (or Hub id) and its tokenizer."""
    from transformers import AutoTokenizer

    import_onnxruntime()  # before any download
    folder = onnx_folder(name, file)
    model = OnnxModel(folder, file, threads)
    try:
        return model, AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise UserError(f"{folder}: its tokenizer does not load ({first_line(error)})") from None
