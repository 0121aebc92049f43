"""ONNX Runtime against PyTorch on the CPU, for one trained model: speed, latency, size, memory
and dev scores of four backends.

    python -m bench.onnx --model outputs/glue4 --output bench/onnx.json   # a trained model folder
    python -m bench.onnx --quick       # a tiny random model on GLUE cards, small counts (< 1 min)

The model folder is exported first (`mtnlp export --quantize int8` against its cards' dev data in
`--data-dir`): fp32 `model.onnx`, and `model.int8.onnx` with the setting that passed the
agreement check; when the check refuses int8, the refusal is recorded and a per-channel int8 graph
is timed all the same (its dev scores show what it costs). Backends, each through
`MultiTaskPipeline` (tokenization, one encoder pass per batch, decoding): torch fp32 eager, torch
bf16 autocast, ORT fp32 (every graph optimization), ORT int8. All run with the same number of
threads (`--threads`, default torch's). Inputs: short = SST-2 and CoLA dev sentences, read by the
tasks that read one text; long = RTE dev pairs, read by the tasks that read pairs.

Per backend and input: sentences/s at batch 32 and at batch 1, and the batch-1 latency of one
sentence (p50, p95); every round runs every backend (the order alternates), medians over rounds.
Also the size on disk of each backend's model file, its peak RSS (a fresh subprocess per backend:
load, then predict the short inputs at batch 32) and the dev scores of every task (GLUE's: the
mean of the card's metrics x 100, first dev split, at most `--max-eval-samples` examples). The
JSON is written after each stage (`--output`), so a long run keeps what it measured.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    DATA_DIR,
    GLUE_CARDS,
    REPO,
    PeakRSS,
    emit,
    encoder_folder,
    parser,
    rounded,
    setup,
    spread,
    status_mb,
    temporary_folder,
)
from bench.glue_quality import glue_score

BACKENDS = ("torch_fp32", "torch_bf16", "ort_fp32", "ort_int8")
UNCHECKED = "per-channel"  # the int8 setting timed when the export's agreement check refuses int8
QUICK_TASKS = ["sst2", "rte"]


# ------------------------------------------------------------------------------ inputs
def glue_inputs(data_dir: Path, count: int) -> dict[str, list]:
    """`count` short inputs (SST-2 and CoLA dev sentences, alternating) and `count` long ones
    (RTE dev pairs), read through mtnlp's cards."""
    from mtnlp import load_cards
    from mtnlp.data.read import load_raw

    cards = {card.name: card for card in load_cards([GLUE_CARDS], ["sst2", "cola", "rte"])}

    def column(task: str, name: str) -> list[str]:
        return list(load_raw(cards[task], ["validation"], [data_dir])["validation"][name])

    sst2, cola = column("sst2", "sentence"), column("cola", "sentence")
    short = [text for pair in zip(sst2, cola, strict=False) for text in pair]
    rte = load_raw(cards["rte"], ["validation"], [data_dir])["validation"]
    long = [(a, b) for a, b in zip(rte["sentence1"], rte["sentence2"], strict=True)]
    return {"short": short[:count], "long": (long * (count // len(long) + 1))[:count]}


def quick_model(encoder: str, folder: Path) -> Path:
    """A model on `encoder` (a folder: random BERT and tokenizer) with SST-2 and RTE heads,
    saved into `folder` as training saves a run (with its cards). Mean pooling: a random
    encoder's [CLS] states barely differ between sentences, so int8's small errors would reorder
    them and the int8 check would refuse it."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from mtnlp import MultiTaskModel, load_cards
    from mtnlp.artifacts.run_folder import save_run

    cards = [
        card.replace(head={"pooling": "mean"}) for card in load_cards([GLUE_CARDS], QUICK_TASKS)
    ]
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(
        AutoModel.from_pretrained(encoder), [card.model_spec() for card in cards]
    )
    save_run(folder, model, AutoTokenizer.from_pretrained(encoder), cards, {}, [], {})
    return folder


# ------------------------------------------------------------------------------ backends
def build(backend: str, model_folder: Path, export: Path, threads: int, batch_size: int):
    """(pipeline, context of its calls) of one backend."""
    import torch

    from mtnlp.inference.loading import load_model
    from mtnlp.inference.onnx import INT8_FILE, ONNX_FILE
    from mtnlp.inference.pipeline import MultiTaskPipeline

    if backend.startswith("ort"):
        file = INT8_FILE if backend == "ort_int8" else ONNX_FILE
        pipeline = MultiTaskPipeline.from_onnx(
            export, file=file, threads=threads, batch_size=batch_size
        )
        return pipeline, contextlib.nullcontext
    model, tokenizer = load_model(str(model_folder))
    pipeline = MultiTaskPipeline(model.eval(), tokenizer, batch_size=batch_size)
    if backend == "torch_bf16":
        return pipeline, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return pipeline, contextlib.nullcontext


def backend(name: str, model_folder: Path, export: Path, threads: int, batch_size: int):
    """(pipeline, context of its calls, tasks per input kind) of one backend."""
    pipeline, context = build(name, model_folder, export, threads, batch_size)
    kinds = {"short": tasks_reading(pipeline, False), "long": tasks_reading(pipeline, True)}
    return pipeline, context, kinds


def file_size_mb(backend: str, model_folder: Path, export: Path) -> float:
    from mtnlp.inference.onnx import INT8_FILE, ONNX_FILE

    if backend.startswith("torch"):
        files = list(model_folder.glob("*.safetensors"))  # bf16 autocast reads the fp32 weights
    else:
        files = [export / (INT8_FILE if backend == "ort_int8" else ONNX_FILE)]
    return sum(path.stat().st_size for path in files) / 2**20


def tasks_reading(pipeline, pair: bool) -> list[str]:
    return [
        t for t in pipeline.tasks if (len(pipeline.model.config.task(t)["inputs"]) == 2) == pair
    ]


# ------------------------------------------------------------------------------ timing
def time_batched(predict: Callable, inputs: list, tasks: list[str]) -> float:
    """Seconds for every input, in batches of the pipeline's batch size."""
    started = time.perf_counter()
    predict(inputs, tasks)
    return time.perf_counter() - started


def time_one_by_one(predict: Callable, inputs: list, tasks: list[str]) -> list[float]:
    """Seconds per input, one call each (batch 1)."""
    times = []
    for value in inputs:
        started = time.perf_counter()
        predict(value, tasks)
        times.append(time.perf_counter() - started)
    return times


def measure_speed(
    backends: dict[str, tuple], inputs: dict[str, list], rounds: int, batch_size: int
) -> dict[str, Any]:
    """Interleaved rounds: per backend and input kind, sentences/s at `batch_size` and at 1, and
    the batch-1 latency per sentence (p50, p95, ms)."""
    batched: dict = {name: {kind: [] for kind in inputs} for name in backends}
    single: dict = {name: {kind: [] for kind in inputs} for name in backends}
    per_call: dict = {name: {kind: [] for kind in inputs} for name in backends}
    for round_index in range(rounds):
        order = list(backends) if round_index % 2 == 0 else list(reversed(backends))
        for kind, values in inputs.items():
            for name in order:
                pipeline, context, tasks = (
                    backends[name][0],
                    backends[name][1],
                    backends[name][2][kind],
                )
                if not tasks:
                    continue

                def predict(batch, chosen, pipeline=pipeline, context=context):
                    with context():
                        return pipeline(batch, chosen)

                if round_index == 0:  # warm-up: ORT's first runs allocate, torch's first call too
                    predict(values[:batch_size], tasks)
                pipeline.batch_size = batch_size
                batched[name][kind].append(len(values) / time_batched(predict, values, tasks))
                pipeline.batch_size = 1
                times = time_one_by_one(predict, values, tasks)
                single[name][kind].append(len(values) / sum(times))
                per_call[name][kind].extend(times)
    result: dict[str, Any] = {}
    for name in backends:
        result[name] = {}
        for kind in inputs:
            if not per_call[name][kind]:
                continue
            latencies = sorted(per_call[name][kind])
            result[name][kind] = {
                f"sentences_per_s_batch_{batch_size}": spread(batched[name][kind])["median"],
                "sentences_per_s_batch_1": spread(single[name][kind])["median"],
                "latency_ms_batch_1": {
                    "p50": 1000 * statistics.median(latencies),
                    "p95": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
                },
            }
    return result


def dev_scores(
    backends: dict[str, tuple], export: Path, data_dir: Path, max_samples: int
) -> dict[str, Any]:
    """Per backend and task: the card's dev metrics and GLUE's score (mean x 100)."""
    from mtnlp import load_cards
    from mtnlp.export.quantize import dev_scores as scores_of
    from mtnlp.export.quantize import predict, read_dev

    dev_sets = [read_dev(card, [data_dir], max_samples) for card in load_cards([export / "cards"])]
    result = {}
    for name, (pipeline, context, _) in backends.items():
        pipeline.batch_size = 32
        result[name] = {}
        for dev in dev_sets:
            with context():
                metrics = scores_of(dev, predict(pipeline, dev))
            names = [metric for metric in metrics if metric in dev.card.metrics] or list(metrics)
            result[name][dev.card.name] = {**metrics, "glue_score": glue_score(metrics, names)}
    return result


# ------------------------------------------------------------------------------ memory
def probe(options) -> None:
    """`--probe BACKEND`: in this fresh process (libraries imported), load the backend and
    predict the short inputs at batch 32; print the resident memory before loading and the peak
    while loading and predicting (MB) as JSON."""
    import torch

    # the libraries every backend needs, imported before the measured block
    from mtnlp.inference.pipeline import MultiTaskPipeline  # noqa: F401

    torch.set_num_threads(options.threads)
    inputs = json.loads(Path(options.probe_inputs).read_text())
    with PeakRSS() as peak:
        before = status_mb("VmRSS")
        pipeline, context = build(options.probe, options.model, options.export, options.threads, 32)
        with context():
            pipeline(inputs, tasks_reading(pipeline, pair=False) or None)
    print(json.dumps({"peak_rss_mb": peak.mb, "before_load_mb": before, "scope": peak.scope}))


def peak_rss(
    backend: str, model_folder: Path, export: Path, threads: int, inputs: Path
) -> dict[str, Any]:
    """Peak RSS (MB) of `backend` loaded and run alone, in a fresh subprocess."""
    command = [
        sys.executable, "-m", "bench.onnx", "--probe", backend, "--model", str(model_folder),
        "--export", str(export), "--threads", str(threads), "--probe-inputs", str(inputs),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ main
@contextlib.contextmanager
def saving(result: dict[str, Any], output: Path | None) -> Iterator[Callable[[], None]]:
    """A `save()` that writes the result so far to `output` (after each stage)."""

    def save() -> None:
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(rounded(result), indent=2) + "\n")

    yield save
    save()


def run(options, folder: Path) -> dict[str, Any]:
    import torch

    from mtnlp.export.onnx import export_onnx
    from mtnlp.export.quantize import SETTINGS, quantize
    from mtnlp.inference.onnx import INT8_FILE, ONNX_FILE
    from mtnlp.utils.errors import UserError

    threads = options.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if options.model:
        model_folder = Path(options.model)
    else:
        model_folder = quick_model(encoder_folder("tiny", folder / "encoder"), folder / "model")
    export = folder / "export"
    result: dict[str, Any] = {"benchmark": "onnx", "threads": threads, "model": model_folder.name}
    with saving(result, options.output) as save:
        started = time.perf_counter()
        try:  # the int8 agreement tables go to stderr: stdout is the JSON
            with contextlib.redirect_stdout(sys.stderr):
                export_onnx(
                    model_folder,
                    export,
                    quantize="int8",
                    data_dir=[options.data_dir],
                    max_eval_samples=options.max_eval_samples,
                )
            result["int8"] = json.loads((export / "quantization.json").read_text())["setting"]
        except UserError as error:  # refused: timed all the same, its dev scores say how it fares
            export_onnx(model_folder, export)
            setting = next(setting for setting in SETTINGS if setting.name == UNCHECKED)
            quantize(export / ONNX_FILE, export / INT8_FILE, setting, [])
            result["int8"] = f"{UNCHECKED}, unchecked; the export refused int8: {error}"
        result["export_seconds"] = time.perf_counter() - started
        names = list(BACKENDS)
        result["size_mb"] = {name: file_size_mb(name, model_folder, export) for name in names}
        save()
        inputs = glue_inputs(options.data_dir, options.sentences)
        probe_inputs = folder / "probe.json"
        probe_inputs.write_text(json.dumps(inputs["short"]))
        result["memory"] = {
            name: peak_rss(name, model_folder, export, threads, probe_inputs) for name in names
        }
        save()
        backends = {
            name: backend(name, model_folder, export, threads, options.batch_size) for name in names
        }
        result["tasks"] = backends[names[0]][2]
        result["speed"] = measure_speed(backends, inputs, options.rounds, options.batch_size)
        save()
        result["dev"] = dev_scores(backends, export, options.data_dir, options.max_eval_samples)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--model", type=Path, help="a trained mtnlp model folder (with its cards/)")
    cli.add_argument("--data-dir", type=Path, default=DATA_DIR / "glue", help="GLUE's files")
    cli.add_argument("--sentences", type=int, default=512, help="inputs of each kind per pass")
    cli.add_argument("--batch-size", type=int, default=32)
    cli.add_argument("--rounds", type=int, default=3)
    cli.add_argument(
        "--max-eval-samples", type=int, default=2000, help="dev examples per task, at most"
    )
    cli.add_argument("--probe", choices=BACKENDS, help="(internal) one backend's peak RSS")
    cli.add_argument("--export", type=Path, help="(internal, --probe) the export folder")
    cli.add_argument("--probe-inputs", type=Path, help="(internal, --probe) inputs as JSON")
    options = cli.parse_args(argv)
    if options.probe:
        setup(options)
        probe(options)
        return None
    if options.quick:
        options.sentences, options.rounds, options.max_eval_samples = 32, 1, 64
    elif options.model is None:
        cli.error("--model: a trained model folder (or --quick for a tiny random one)")
    setup(options)
    with temporary_folder() as folder:
        result = run(options, folder)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()}
    return emit({**result, "config": config}, options.output)


if __name__ == "__main__":
    main()
