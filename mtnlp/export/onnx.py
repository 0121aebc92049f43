"""`mtnlp export --format onnx`: a trained multi-task model as ONE ONNX graph with every head.

The graph's inputs are the encoder's (`input_ids`, `attention_mask`, and `token_type_ids` when the
encoder and tokenizer use them; int64, dynamic batch and sequence axes); it has one output per
task, named after the task, in the model's task order: logits (batch, labels) for
classification, per-token logits (batch, tokens, labels) for tagging, the value (batch,) for
regression. The encoder runs once for all heads (`AllTasks`).

The export folder is self-contained: `model.onnx`, config.json (the task metadata), the
tokenizer, `label_maps.json`, `cards/` and `onnx.json` (inputs, outputs, exporter, opset, the
parity check), so `MultiTaskPipeline.from_onnx(folder)` needs no PyTorch model folder. With
`quantize="int8"` it also holds `model.int8.onnx` and `quantization.json` (`quantize.py`).

Two exporters of `torch.onnx.export` are tried in turn: the TorchScript one (`dynamo=False`:
seconds, readable node names) and then the dynamo one. Each graph is checked against the model at
two input shapes other than the example's before it is kept: a graph that baked in a shape or
drifts from the model is never written. Known limits, refused up front with one line:
nn.MultiheadAttention (JMT's `transformer` task layer) traces with fixed sizes under TorchScript;
packed sequences (the `bilstm` task layer) have data-dependent shapes under dynamo.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import mtnlp
from mtnlp.artifacts.run_folder import CARDS_DIR
from mtnlp.inference.onnx import INSTALL, ONNX_FILE, import_onnxruntime, session_options
from mtnlp.modeling.heads import HEADS
from mtnlp.modeling.model import LABEL_MAPS, MultiTaskModel, eval_mode
from mtnlp.utils.errors import UserError, first_line
from mtnlp.utils.files import atomic_folder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

METADATA = "onnx.json"
DEFAULT_OPSET = 18
EXAMPLE_SHAPE = (2, 16)  # (batch, tokens) of the input the exporters trace
CHECK_SHAPES = ((3, 11), (1, 5))  # other shapes the graph must reproduce the model at
CHECK_TOLERANCE = 1e-3  # max |ORT - torch| of the check, times max(1, the largest |logit|)
# what an exporter cannot export: task-layer type -> why (the check after export catches the rest)
EXPORTERS: dict[str, dict[str, str]] = {
    "torchscript": {"transformer": "nn.MultiheadAttention traces with fixed batch and length"},
    "dynamo": {"bilstm": "packed sequences have data-dependent shapes"},
}


class AllTasks(nn.Module):
    """What the graph computes: the encoder once, then every head (and the task layers they read),
    one output per task in the model's task order."""

    def __init__(self, model: MultiTaskModel, input_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        tasks = self.model.config.task_names
        outputs = self.model.forward_tasks(
            tasks, **dict(zip(self.input_names, inputs, strict=True))
        )
        return tuple(outputs[task].logits for task in tasks)


def require_onnx() -> None:
    """A `UserError` naming the extra to install unless onnx and onnxruntime import."""
    import_onnxruntime()
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError(
            f"ONNX export needs the onnx package, which is not installed: {INSTALL}"
        ) from None


def graph_inputs(model: MultiTaskModel, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The encoder inputs the graph takes: `input_ids`, `attention_mask`, and `token_type_ids`
    when the encoder's forward takes them and the tokenizer gives them."""
    takes = inspect.signature(model.encoder.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in takes and "token_type_ids" in tokenizer.model_input_names:
        names.append("token_type_ids")
    return names


def example_inputs(
    model: MultiTaskModel, names: Sequence[str], batch: int, tokens: int, seed: int = 0
) -> tuple[Tensor, ...]:
    """Random right-padded inputs of one shape: the first row full, the others shorter."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.encoder.vocab_size, (batch, tokens), generator=generator)
    lengths = torch.randint(1, tokens + 1, (batch,), generator=generator)
    lengths[0] = tokens
    mask = (torch.arange(tokens) < lengths.unsqueeze(1)).long()
    values = {
        "input_ids": ids * mask,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
    }
    return tuple(values[name] for name in names)


def _output_axes(model: MultiTaskModel) -> dict[str, dict[int, str]]:
    return {
        spec["name"]: {0: "batch", 1: "sequence"}
        if HEADS.get(spec["type"]).token_level
        else {0: "batch"}
        for spec in model.config.tasks
    }


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """The exporters' tracer warnings and dynamo's log lines stay out of the command's output."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _export(
    wrapper: AllTasks, inputs: tuple[Tensor, ...], path: Path, exporter: str, opset: int
) -> None:
    """Write the graph of `wrapper` with one exporter of `torch.onnx.export`."""
    names, tasks = wrapper.input_names, wrapper.model.config.task_names
    with _quiet_exporters(), torch.no_grad():
        if exporter == "torchscript":
            axes = {name: {0: "batch", 1: "sequence"} for name in names}
            torch.onnx.export(
                wrapper, inputs, str(path), dynamo=False, opset_version=opset,
                input_names=names, output_names=tasks,
                dynamic_axes={**axes, **_output_axes(wrapper.model)},
            )  # fmt: skip
        else:
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(
                wrapper, inputs, str(path), dynamo=True, opset_version=opset,
                input_names=names, output_names=tasks, external_data=False, verbose=False,
                dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in names),),  # *inputs
            )  # fmt: skip


def check_graph(wrapper: AllTasks, path: Path) -> dict[str, float]:
    """Max |ORT - torch| per task over `CHECK_SHAPES`; a `ValueError` if the graph does not run
    at a shape or drifts past `CHECK_TOLERANCE`."""
    ort = import_onnxruntime()
    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    tasks = wrapper.model.config.task_names
    worst = dict.fromkeys(tasks, 0.0)
    for seed, (batch, tokens) in enumerate(CHECK_SHAPES, start=1):
        inputs = example_inputs(wrapper.model, wrapper.input_names, batch, tokens, seed)
        with torch.no_grad():
            expected = wrapper(*inputs)
        feed = {
            name: value.numpy() for name, value in zip(wrapper.input_names, inputs, strict=True)
        }
        try:
            got = session.run(tasks, feed)
        except Exception as error:  # onnxruntime's errors: e.g. a reshape to the example's size
            raise ValueError(
                f"the graph fails at batch {batch} x {tokens} tokens ({first_line(error)})"
            ) from None
        for task, want, have in zip(tasks, expected, got, strict=True):
            want = want.float().numpy()
            if want.shape != have.shape:
                raise ValueError(f"output {task} has shape {have.shape}, not {want.shape}")
            diff = float(abs(want - have).max()) if want.size else 0.0
            if not diff <= CHECK_TOLERANCE * max(1.0, float(abs(want).max(initial=0.0))):
                raise ValueError(
                    f"output {task} differs from the model by {diff:.2g} at batch {batch} x "
                    f"{tokens} tokens"
                )
            worst[task] = max(worst[task], diff)
    return worst


def _blockers(model: MultiTaskModel, exporter: str) -> list[str]:
    """What in the model `exporter` is known not to export, in words."""
    types = {spec["task_layer"]["type"] for spec in model.config.tasks if spec.get("task_layer")}
    return [
        f"a {kind} task layer ({why})" for kind, why in EXPORTERS[exporter].items() if kind in types
    ]


def export_graph(
    model: MultiTaskModel, input_names: Sequence[str], path: Path, opset: int, name: str
) -> dict[str, Any]:
    """Write the model's graph to `path` with the first exporter whose graph passes
    `check_graph`; return what `onnx.json` records of it. A `UserError` naming what is not
    supported when none does."""
    wrapper = AllTasks(model, input_names).eval()
    inputs = example_inputs(model, input_names, *EXAMPLE_SHAPE)
    failures = []
    for exporter in EXPORTERS:
        blockers = _blockers(model, exporter)
        if blockers:
            failures.append(f"{exporter}: {'; '.join(blockers)}")
            continue
        try:
            _export(wrapper, inputs, path, exporter, opset)
            worst = check_graph(wrapper, path)
        except Exception as error:  # the exporters fail in many types on what they cannot trace
            while error.__cause__ is not None:  # dynamo wraps the reason in a page of advice
                error = error.__cause__
            failures.append(f"{exporter}: {first_line(error)}")
            continue
        return {"exporter": exporter, "check": {"shapes": CHECK_SHAPES, "max_abs_diff": worst}}
    path.unlink(missing_ok=True)
    raise UserError(f"{name}: cannot export to ONNX ({' | '.join(failures)})")


def metadata(
    model: MultiTaskModel, input_names: Sequence[str], opset: int, graph: dict[str, Any]
) -> dict[str, Any]:
    """What `onnx.json` says: for readers without mtnlp, how to feed the graph and read it."""
    outputs = {}
    for spec in model.config.tasks:
        head = HEADS.get(spec["type"])
        shape = ["batch", "sequence", "labels"] if head.token_level else ["batch", "labels"]
        outputs[spec["name"]] = {
            "type": spec["type"],
            "shape": shape if head.needs_labels else ["batch"],
            "labels": spec.get("labels"),
        }
    return {
        "format": 1,
        "mtnlp_version": mtnlp.__version__,
        "torch_version": torch.__version__,
        "opset": opset,
        **graph,
        "inputs": {
            name: {"dtype": "int64", "shape": ["batch", "sequence"]} for name in input_names
        },
        "outputs": outputs,
    }


def _load(
    model: MultiTaskModel | str | Path, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[MultiTaskModel, PreTrainedTokenizerBase, str]:
    """(model, tokenizer, name for messages) of a model object or folder."""
    if isinstance(model, MultiTaskModel):
        if tokenizer is None:
            raise UserError("export_onnx: give the model's tokenizer (tokenizer=...)")
        return model, tokenizer, type(model).__name__
    from mtnlp.inference.loading import load_model

    folder = Path(model)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such model folder")
    loaded, own_tokenizer = load_model(str(folder))
    return loaded, tokenizer or own_tokenizer, str(folder)


def _write_companions(model: MultiTaskModel, folder: Path) -> None:
    """config.json, `label_maps.json` and the model's task cards."""
    model.config.save_pretrained(folder)
    (folder / LABEL_MAPS).write_text(json.dumps(model.config.label_maps(), indent=2) + "\n")
    for name, content in model.companion_files.items():
        if name.startswith(f"{CARDS_DIR}/"):
            (folder / name).parent.mkdir(exist_ok=True)
            (folder / name).write_bytes(content)


def export_onnx(
    model: MultiTaskModel | str | Path,
    output: str | Path,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    quantize: str | None = None,
    opset: int | None = None,
    data_dir: Sequence[str | Path] | None = None,
    max_eval_samples: int | None = None,
) -> Path:
    """Export `model` (a `MultiTaskModel` with its `tokenizer`, or a model folder) as one ONNX
    graph for every head into the new folder `output`; return it.

    `quantize="int8"` also writes `model.int8.onnx` (ONNX Runtime's dynamic quantization) if it
    agrees with the fp32 graph on every task's dev data (read from `data_dir`, else the cards'
    Hub datasets; at most `max_eval_samples` examples per task, default 2000), trying the
    fallbacks of `quantize.SETTINGS` in turn; it prints the agreement table and writes it to
    `quantization.json`. `opset` defaults to 18. Needs `pip install 'mtnlp[onnx]'`.
    """
    require_onnx()
    if quantize not in (None, "int8"):
        raise UserError(f"--quantize: {quantize!r}; expected int8")
    if quantize is None and (data_dir or max_eval_samples):
        raise UserError("--data-dir, --max-eval-samples: only with --quantize int8 (its dev check)")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{output}: exists and is not an empty folder; give a new output folder")
    model, tokenizer, name = _load(model, tokenizer)
    if model.dtype != torch.float32 or model.device.type != "cpu":  # fp32 (int8 comes from it)
        model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    opset = opset or DEFAULT_OPSET
    names = graph_inputs(model, tokenizer)
    with atomic_folder(output) as staging, eval_mode(model):
        graph = export_graph(model, names, staging / ONNX_FILE, opset, name)
        tokenizer.save_pretrained(staging)
        _write_companions(model, staging)
        record = metadata(model, names, opset, graph)
        (staging / METADATA).write_text(json.dumps(record, indent=2) + "\n")
        if quantize:
            from mtnlp.export.quantize import quantize_int8

            quantize_int8(staging, model, name, data_dir, max_eval_samples)
    return output
