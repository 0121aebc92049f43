"""int8 that keeps accuracy: ONNX Runtime's dynamic quantization of the exported graph, kept only
when its predictions agree with the fp32 graph's on every task's dev data.

Per task, on the first dev split of its card (at most `max_eval_samples` examples), through
`MultiTaskPipeline.from_onnx` (the same tokenization and decoding as prediction):

- classification: at least 99% of the predicted labels are fp32's;
- tagging: at least 99% of the words' tags are fp32's;
- regression: the Pearson correlation with the gold scores moves by at most 0.005.

The settings of `SETTINGS` are tried in order and the first that passes is kept: int8 weights
with one scale per tensor; one scale per output channel; also the embeddings (Gather) in fp32;
also the first and last layers in fp32 (only the layers between them int8, the task layers and
heads fp32 too; skipped for an encoder of two layers). If none passes, the export is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtnlp.cards.load import load_cards
from mtnlp.cards.schema import TaskCard
from mtnlp.data.labels import encode_label, row_place
from mtnlp.data.read import describe_source, load_raw
from mtnlp.inference.onnx import INT8_FILE, ONNX_FILE
from mtnlp.inference.pipeline import MultiTaskPipeline
from mtnlp.inference.submission import check_cards_fit, split_inputs
from mtnlp.metrics import METRICS, compute_metrics, main_score
from mtnlp.modeling.heads import HEADS
from mtnlp.modeling.hierarchy import find_layer_list
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.utils.errors import UserError

REPORT = "quantization.json"
DEFAULT_SAMPLES = 2000  # dev examples per task in the check, at most
MIN_AGREEMENT = 0.99  # classification labels, tagging words
MAX_PEARSON_CHANGE = 0.005  # regression
PEARSON_CHANGE = "pearson_change"  # a value task's criterion (others': "agreement")


@dataclass(frozen=True)
class Setting:
    """One way to quantize: ONNX Runtime's `quantize_dynamic` options, and what stays fp32."""

    name: str
    per_channel: bool = False
    fp32_embeddings: bool = False
    fp32_first_and_last_layers: bool = False


SETTINGS = (
    Setting("per-tensor"),
    Setting("per-channel", per_channel=True),
    Setting("per-channel, fp32 embeddings", per_channel=True, fp32_embeddings=True),
    Setting(
        "per-channel, fp32 embeddings, first and last layers",
        per_channel=True,
        fp32_embeddings=True,
        fp32_first_and_last_layers=True,
    ),
)


# ------------------------------------------------------------------------------ dev data
@dataclass
class DevSet:
    """A task's dev examples as the pipeline reads them, and their gold values as its metrics
    take them (label ids, values, tag-name lists)."""

    card: TaskCard
    inputs: list[dict[str, str]]
    references: list[Any]

    @property
    def values(self) -> bool:
        """Whether the task predicts a value (regression) rather than labels."""
        return not HEADS.get(self.card.type).needs_labels

    @property
    def tags(self) -> bool:
        """Whether the task predicts a label per word (tagging)."""
        return HEADS.get(self.card.type).token_level


def read_dev(card: TaskCard, data_dirs: Sequence[Path] | None, max_samples: int | None) -> DevSet:
    """The first dev split of `card` (local files in `data_dirs`, else its Hub dataset), at most
    `max_samples` examples."""
    split = card.eval_splits[0]
    dataset = load_raw(card, [split], data_dirs)[split]
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    where = describe_source(card, split, data_dirs)
    local = card.source.local.for_split(split) if Path(where).is_file() else None
    references = [
        encode_label(card, value, row_place(where, index, local))
        for index, value in enumerate(dataset[card.label_column])
    ]
    if HEADS.get(card.type).token_level:
        references = [[card.labels[tag] for tag in tags] for tags in references]
    return DevSet(card, split_inputs(card, dataset, where), references)


def predict(pipeline: MultiTaskPipeline, dev: DevSet) -> list[Any]:
    """The pipeline's predictions of the task on its dev inputs, as its metrics take them: label
    ids, values, or one tag per word (None for words past `max_length`)."""
    card = dev.card
    results = [result[card.name] for result in pipeline(dev.inputs, [card.name])]
    if dev.values:
        return [result["value"] for result in results]
    if dev.tags:
        return [result["tags"] for result in results]
    return [card.labels.index(result["label"]) for result in results]


def dev_scores(dev: DevSet, predicted: list[Any]) -> dict[str, float]:
    """The card's built-in dev metrics of `predicted` (words past `max_length` left out, as
    evaluation leaves them out)."""
    references = dev.references
    if dev.tags:
        pairs = [
            [(tag, gold) for tag, gold in zip(tags, golds, strict=True) if tag is not None]
            for tags, golds in zip(predicted, references, strict=True)
        ]
        predicted = [[tag for tag, _ in sentence] for sentence in pairs]
        references = [[gold for _, gold in sentence] for sentence in pairs]
    names = [name for name in dev.card.metrics if name in METRICS]
    return compute_metrics(names, predicted, references)


def main_dev_score(dev: DevSet, predicted: list[Any]) -> tuple[str, float] | None:
    """(metric, value): Pearson for regression (what the int8 check compares), else the card's
    main metric (None when its metrics are not built in)."""
    if dev.values:
        return "pearson", METRICS.get("pearson")(predicted, dev.references)["pearson"]
    scores = dev_scores(dev, predicted)
    main = dev.card.resolved_main_metric()
    if not main or any(key not in scores for key in main):
        return None
    return "+".join(main), main_score(scores, main, dev.card.name)


def agreement(dev: DevSet, fp32: list[Any], int8: list[Any]) -> dict[str, Any]:
    """One row of the table: how far int8's predictions of a task stay from fp32's."""
    card = dev.card
    row: dict[str, Any] = {"task": card.name, "type": card.type, "examples": len(fp32)}
    reference, quantized = main_dev_score(dev, fp32), main_dev_score(dev, int8)
    if reference is not None and quantized is not None:
        change = quantized[1] - reference[1]
        row["score"] = {"metric": reference[0], "fp32": reference[1], "int8": quantized[1]}
        row["score"]["change"] = change
    if dev.values:
        row["agreement"] = METRICS.get("pearson")(int8, fp32)["pearson"]  # Pearson fp32 / int8
        row["criterion"] = PEARSON_CHANGE
        row["passed"] = abs(row["score"]["change"]) <= MAX_PEARSON_CHANGE
        return row
    row["criterion"] = "agreement"
    if dev.tags:
        pairs = [
            (a, b)
            for tags, others in zip(fp32, int8, strict=True)
            for a, b in zip(tags, others, strict=True)
            if a is not None
        ]
        row["words"] = len(pairs)
        row["agreement"] = sum(a == b for a, b in pairs) / max(1, len(pairs))
    else:
        row["agreement"] = sum(a == b for a, b in zip(fp32, int8, strict=True)) / max(1, len(fp32))
    row["passed"] = row["agreement"] >= MIN_AGREEMENT
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The agreement rows as aligned text, one line per task."""
    lines = [("task", "type", "examples", "agreement", "dev score fp32 -> int8", "ok")]
    for row in rows:
        score = row.get("score")
        shown = (
            f"{score['metric']} {score['fp32']:.4f} -> {score['int8']:.4f} ({score['change']:+.4f})"
            if score
            else "-"
        )
        agreement_ = (
            f"r={row['agreement']:.4f}"
            if row["criterion"] == PEARSON_CHANGE
            else f"{100 * row['agreement']:.2f}%"
        )
        lines.append(
            (row["task"], row["type"], str(row["examples"]), agreement_, shown,
             "yes" if row["passed"] else "NO")
        )  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


# ------------------------------------------------------------------------------ quantizing
def middle_layers(model: MultiTaskModel) -> tuple[str, ...]:
    """Parameter-name prefixes of the layers between the first and the last on the way from the
    embeddings to the heads: the shared encoder layers, then (soft, cross-stitch, sluice) each
    task's column layers. What `fp32_first_and_last_layers` still quantizes."""
    found = find_layer_list(model.encoder)
    if found is None:
        return ()
    name, layers = found
    sharing = model.sharing
    bottom = sharing.bottom if sharing.columns else len(layers)
    shared = [f"encoder.{name}.{index}." for index in range(bottom)]
    columns = sharing.column.items() if sharing.columns else []
    paths = [
        shared + [f"sharing.column.{task}.{index}." for index in range(len(column))]
        for task, column in columns
    ] or [shared]
    return tuple(dict.fromkeys(prefix for path in paths for prefix in path[1:-1]))


def _digest(array: np.ndarray) -> bytes:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).digest() + str(array.shape).encode()


def nodes_between(graph: Path, model: MultiTaskModel) -> list[str]:
    """Names of the graph's nodes whose weight belongs to a layer between the first and the last
    (`middle_layers`): found by value, as the exporters rename the weights they transpose."""
    import onnx
    from onnx import numpy_helper

    middle = middle_layers(model)
    owners: dict[bytes, set[str]] = defaultdict(set)
    for name, parameter in model.named_parameters():
        if parameter.dim() == 2:
            array = parameter.detach().float().numpy()
            owners[_digest(array)].add(name)
            owners[_digest(array.T)].add(name)
    proto = onnx.load(str(graph))
    weights = {
        tensor.name: owners.get(_digest(numpy_helper.to_array(tensor)), set())
        for tensor in proto.graph.initializer
        if len(tensor.dims) == 2
    }
    return [
        node.name
        for node in proto.graph.node
        if any(owner.startswith(middle) for value in node.input for owner in weights.get(value, ()))
    ]


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice through the root logger: keep it out of the output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize(source: Path, target: Path, setting: Setting, between: Sequence[str]) -> None:
    """`quantize_dynamic` of `source` into `target` with `setting` (int8 weights; the ops the
    setting keeps in fp32 left out; with `fp32_first_and_last_layers`, only the nodes `between`
    them quantized: a list of the nodes to quantize, as the quantizer renames the Gemm nodes it
    turns into MatMul)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    fp32_ops = set()
    if setting.fp32_embeddings:
        fp32_ops |= {"Gather", "EmbedLayerNormalization"}
    if setting.fp32_first_and_last_layers:
        fp32_ops.add("LSTM")  # only task layers (the top) have LSTMs
    with _quiet_quantizer():
        quantize_dynamic(
            source,
            target,
            per_channel=setting.per_channel,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=sorted(set(IntegerOpsRegistry) - fp32_ops),
            nodes_to_quantize=list(between) if setting.fp32_first_and_last_layers else None,
        )


def model_dev_sets(
    folder: Path,
    model: MultiTaskModel,
    name: str,
    data_dirs: Sequence[Path] | None,
    cap: int | None,
) -> list[DevSet]:
    """Every task's dev set, read through the cards saved with the model (`folder/cards`)."""
    cards_dir = folder / "cards"
    cards = load_cards([cards_dir]) if cards_dir.is_dir() else []
    check_cards_fit(cards, name, model.config)
    have = {card.name for card in cards}
    missing = [task for task in model.config.task_names if task not in have]
    if missing:
        raise UserError(
            f"--quantize int8: {name} has no task card of {', '.join(missing)} (cards/) to read "
            "its dev data from; export without --quantize"
        )
    by_name = {card.name: card for card in cards}
    return [read_dev(by_name[task], data_dirs, cap) for task in model.config.task_names]


def quantize_int8(
    folder: Path,
    model: MultiTaskModel,
    name: str,
    data_dir: Sequence[str | Path] | None,
    max_eval_samples: int | None,
) -> dict[str, Any]:
    """Write `folder/model.int8.onnx` with the first of `SETTINGS` whose predictions agree with
    `folder/model.onnx` on every task's dev data, and `quantization.json`; print each setting's
    table. A `UserError` when no setting passes (nothing int8 is left behind)."""
    cap = max_eval_samples or DEFAULT_SAMPLES
    data_dirs = [Path(path) for path in data_dir] if data_dir else None
    dev_sets = model_dev_sets(folder, model, name, data_dirs, cap)
    fp32 = MultiTaskPipeline.from_onnx(folder, file=ONNX_FILE)
    reference = [predict(fp32, dev) for dev in dev_sets]
    source, target = folder / ONNX_FILE, folder / INT8_FILE
    between = nodes_between(source, model)
    attempts = []
    for setting in SETTINGS:
        if setting.fp32_first_and_last_layers and not between:
            continue  # no layer between the first and the last: nothing left to quantize
        quantize(source, target, setting, between)
        int8 = MultiTaskPipeline.from_onnx(folder, file=INT8_FILE)
        rows = [
            agreement(dev, expected, predict(int8, dev))
            for dev, expected in zip(dev_sets, reference, strict=True)
        ]
        passed = all(row["passed"] for row in rows)
        attempts.append({"setting": asdict(setting), "passed": passed, "tasks": rows})
        print(f"int8 ({setting.name}) against fp32, dev data:\n{table(rows)}")
        if passed:
            report = {
                "file": INT8_FILE,
                "setting": setting.name,
                "criteria": {
                    "min_agreement": MIN_AGREEMENT,
                    "max_pearson_change": MAX_PEARSON_CHANGE,
                },
                "max_eval_samples": cap,
                "attempts": attempts,
            }
            (folder / REPORT).write_text(json.dumps(report, indent=2) + "\n")
            print(f"kept {INT8_FILE}: {setting.name}")
            return report
    target.unlink(missing_ok=True)
    last = attempts[-1]
    failed = "; ".join(shortfall(row) for row in last["tasks"] if not row["passed"])
    raise UserError(
        f"--quantize int8: none of the {len(attempts)} settings keeps accuracy (the last, "
        f"{last['setting']['name']}: {failed}); export without --quantize"
    )


def shortfall(row: dict[str, Any]) -> str:
    """Why a task's row fails the check, in words."""
    if row["criterion"] == PEARSON_CHANGE:
        change = row["score"]["change"]
        return f"{row['task']}: Pearson moves by {change:+.4f} (at most {MAX_PEARSON_CHANGE})"
    return f"{row['task']}: {100 * row['agreement']:.2f}% agree (at least {100 * MIN_AGREEMENT:g}%)"
