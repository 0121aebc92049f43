"""The training report: curves of each task's loss, dev metric and share of steps, and a page.

People look at curves rather than read logs. The report is drawn from the run's history, the
records of `train_log.jsonl`: `{"step", "loss": {task: value}, "share": {task: value}}` per
logging window and `{"step", "eval": {task: {metric: value}}}` per evaluation. It writes three
PNG plots (matplotlib's Agg renderer, no display or global pyplot state) under `plots/` and
`report.md`, which shows them with the final dev metrics and the steps each task got. The dev
curve of a task is its main score (`metrics.main_score`, the one model selection uses).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtnlp.metrics import main_metrics as tasks_main_metrics
from mtnlp.metrics import main_score
from mtnlp.utils.files import make_folder, write_file

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT = "report.md"
LOSS_PLOT = "plots/loss.png"
DEV_PLOT = "plots/dev_metrics.png"
SHARE_PLOT = "plots/task_share.png"
# the log records of --relationship-prior (task covariance and correlations) and --task-clusters
RELATIONSHIPS_KEY = "task_relationships"
CLUSTERS_KEY = "task_clusters"

Series = dict[str, tuple[list[int], list[float]]]  # label -> (steps, values)


# ------------------------------------------------------------------------------ series
def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `train_log.jsonl`."""
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def window_series(history: Sequence[dict[str, Any]], key: str) -> Series:
    """Per task, the values of `key` ("loss" or "share") over the logging windows."""
    series: Series = {}
    for record in history:
        for task, value in record.get(key, {}).items():
            steps, values = series.setdefault(task, ([], []))
            steps.append(record["step"])
            values.append(value)
    return series


def dev_series(
    history: Sequence[dict[str, Any]], main_metrics: dict[str, list[str] | None]
) -> Series:
    """Per task, its main score over the evaluations (`main_metrics`: task -> main metric)."""
    series: Series = {}
    for record in history:
        for task, metrics in record.get("eval", {}).items():
            main = main_metrics[task] or list(metrics)[:1]
            if not main or not set(main) <= set(metrics):
                continue  # no results, or an evaluate module's lack it (selection refuses them)
            name = main[0] if len(main) == 1 else f"mean of {', '.join(main)}"
            steps, values = series.setdefault(f"{task} ({name})", ([], []))
            steps.append(record["step"])
            values.append(main_score(metrics, main, task))
    return series


# ------------------------------------------------------------------------------ plots
def line_plot(series: Series, title: str, ylabel: str, log_scale: bool = False) -> Figure:
    """One line per task over the optimizer steps (markers, so a single point still shows);
    `log_scale` (when every value is positive) keeps losses of different scales readable."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, (steps, values) in series.items():
        axes.plot(steps, values, marker="o", markersize=3, label=label)
    axes.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log_scale and all(value > 0 for _, values in series.values() for value in values):
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    if series:
        axes.legend(fontsize="small")
    return figure


def plot_losses(history: Sequence[dict[str, Any]]) -> Figure:
    return line_plot(
        window_series(history, "loss"),
        "Training loss per task",
        "mean loss (log scale)",
        log_scale=True,
    )


def plot_dev_metrics(
    history: Sequence[dict[str, Any]], main_metrics: dict[str, list[str] | None]
) -> Figure:
    return line_plot(dev_series(history, main_metrics), "Dev main metric per task", "dev metric")


def plot_shares(history: Sequence[dict[str, Any]]) -> Figure:
    return line_plot(window_series(history, "share"), "Share of steps per task", "share of window")


# ------------------------------------------------------------------------------ the page
def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def _summary_line(summary: dict[str, Any]) -> str:
    args = summary.get("args", {})
    facts = [
        f"{summary['steps']} optimizer steps" if "steps" in summary else None,
        f"{summary['train_seconds']} s" if "train_seconds" in summary else None,
        f"{summary['examples_per_second']} examples/s"
        if "examples_per_second" in summary
        else None,
        f"sampler {args['sampler']}" if "sampler" in args else None,
        f"weighting {args['weighting']}" if "weighting" in args else None,
        f"mixed precision {summary['mixed_precision']}" if "mixed_precision" in summary else None,
    ]
    return ", ".join(fact for fact in facts if fact) + "."


def write_report(
    output_dir: str | Path,
    history: Sequence[dict[str, Any]] | None = None,
    results: dict[str, dict[str, float]] | None = None,
    summary: dict[str, Any] | None = None,
    main_metrics: dict[str, list[str] | None] | None = None,
) -> Path:
    """Write the plots and `report.md` into `output_dir`; return the page's path.

    `history`, `results` and `summary` default to the folder's `train_log.jsonl`,
    `eval_results.json` and `train_summary.json` (as `training.save_run` writes them), and
    `main_metrics` (task -> main metric) to those of the tasks in its `config.json`.
    """
    folder = Path(output_dir)
    if main_metrics is None:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        main_metrics = tasks_main_metrics(config["tasks"])
    if history is None:
        history = read_history(folder / "train_log.jsonl")
    if results is None:
        results = json.loads((folder / "eval_results.json").read_text(encoding="utf-8"))
    if summary is None:
        path = folder / "train_summary.json"
        summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    make_folder(folder / "plots")
    figures = {
        LOSS_PLOT: ("Training loss", plot_losses(history)),
        DEV_PLOT: ("Dev metric", plot_dev_metrics(history, main_metrics)),
        SHARE_PLOT: ("Share of steps", plot_shares(history)),
    }
    for path, (_, figure) in figures.items():
        save_figure(figure, folder / path)
    task_steps = summary.get("task_steps", {})
    total = sum(task_steps.values()) or 1
    lines = ["# Training report", "", _summary_line(summary), "", "## Final dev metrics", ""]
    lines += _table(
        ["task", "metric", "value"],
        [
            [task, name, f"{value:.4f}"]
            for task, metrics in results.items()
            for name, value in metrics.items()
        ],
    )
    if task_steps:
        lines += ["", "## Steps per task", ""]
        lines += _table(
            ["task", "steps", "share"],
            [[task, steps, f"{steps / total:.1%}"] for task, steps in task_steps.items()],
        )
    for path, (title, _) in figures.items():
        lines += ["", f"## {title}", "", f"![{title}]({path})"]
    if (folder / "plots/affinity.png").is_file():  # affinity.py, with --affinity-every
        lines += ["", "## Task affinity", "", "![Task affinity](plots/affinity.png)"]
    if (folder / "plots/task_relationships.png").is_file():  # affinity.py, --relationship-prior
        lines += ["", "## Task relationships", "", "Correlations of the learned task covariance."]
        lines += ["", "![Task relationships](plots/task_relationships.png)"]
    clusters = next((r for r in reversed(history) if CLUSTERS_KEY in r), None)
    if clusters is not None:  # --task-clusters
        lines += ["", "## Task clusters", "", f"At step {clusters['step']}.", ""]
        lines += _table(
            ["cluster", "tasks"],
            [
                [name, ", ".join(tasks)]
                for name, tasks in clusters[CLUSTERS_KEY]["clusters"].items()
                if tasks
            ],
        )
    return write_file(folder / REPORT, "\n".join(lines) + "\n")


def save_figure(figure: Figure, path: Path) -> Path:
    """Save `figure` as a PNG at `path` with `write_file` (a link there is replaced, never
    followed, as for every file mtnlp writes)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return write_file(path, buffer.getvalue())
