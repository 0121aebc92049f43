"""The task-affinity heat map of a run: the mean over the run of the affinity records that
`--affinity-every` wrote to `train_log.jsonl` (measured by `mtnlp.training.affinity`), drawn as
`plots/affinity.png`; and the task correlations learned by `--relationship-prior`, drawn as
`plots/task_relationships.png`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtnlp.artifacts.report import RELATIONSHIPS_KEY, save_figure
from mtnlp.utils.files import make_folder

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

AFFINITY_PLOT = "plots/affinity.png"
RELATIONSHIPS_PLOT = "plots/task_relationships.png"


MATRICES = {
    "gradient_cosine": "gradient cosine similarity",
    "lookahead": "lookahead affinity (Fifty et al. 2021)",
}


Matrix = dict[str, dict[str, float]]  # row task -> column task -> value


def _as_dict(tasks: list[str], rows: list[list[float]]) -> Matrix:
    return {i: dict(zip(tasks, row, strict=True)) for i, row in zip(tasks, rows, strict=True)}


def mean_affinity(history: Sequence[dict[str, Any]]) -> dict[str, Matrix]:
    """Each matrix averaged over the run's affinity records (Fifty et al. average over steps)."""
    records = [record["affinity"] for record in history if "affinity" in record]
    if not records:
        return {}
    tasks = list(records[0]["gradient_cosine"])
    return {
        key: {
            i: {j: sum(r[key][i][j] for r in records) / len(records) for j in tasks} for i in tasks
        }
        for key in MATRICES
    }


def write_heatmap(output_dir: str | Path, history: Sequence[dict[str, Any]]) -> Path | None:
    """Draw the mean affinity matrices side by side into `output_dir/plots/affinity.png`
    (matplotlib's Agg renderer, no pyplot state); None when the run logged no affinity."""
    means = mean_affinity(history)
    if not means:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(means["gradient_cosine"])
    size = 1.5 + 0.8 * len(tasks)
    figure = Figure(figsize=(2 * size + 1.5, size), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (key, title) in zip(figure.subplots(1, 2), MATRICES.items(), strict=True):
        values = [[means[key][i][j] for j in tasks] for i in tasks]
        draw_matrix(figure, axes, tasks, values, max(abs(v) for row in values for v in row))
        axes.set(title=title, xlabel="task j (measured)", ylabel="task i (gradient / step)")
    path = Path(output_dir) / AFFINITY_PLOT
    make_folder(path.parent)
    return save_figure(figure, path)


def draw_matrix(
    figure: Figure, axes: Axes, tasks: list[str], values: list[list[float]], bound: float
) -> None:
    """A task x task heat map on `axes`, each cell labelled with its value, the colours
    symmetric around 0 within +-`bound`."""
    bound = bound or 1.0
    image = axes.imshow(values, cmap="RdBu", vmin=-bound, vmax=bound)
    for r, row in enumerate(values):
        for c, value in enumerate(row):
            color = "white" if abs(value) > 0.6 * bound else "black"
            axes.text(c, r, f"{value:.2g}", ha="center", va="center", color=color)
    axes.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    axes.set_yticks(range(len(tasks)), tasks)
    figure.colorbar(image, ax=axes, shrink=0.8)


def write_relationship_heatmap(
    output_dir: str | Path, history: Sequence[dict[str, Any]]
) -> Path | None:
    """Draw the latest task correlations that `--relationship-prior` logged (its learned task
    covariance, `training/relationships.py`) into `output_dir/plots/task_relationships.png`;
    None when the run logged none."""
    latest = next((r for r in reversed(history) if RELATIONSHIPS_KEY in r), None)
    if latest is None:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    correlation = latest[RELATIONSHIPS_KEY]["correlation"]
    tasks = list(correlation)
    size = 1.5 + 0.8 * len(tasks)
    figure = Figure(figsize=(size + 1.5, size), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    draw_matrix(figure, axes, tasks, [[correlation[i][j] for j in tasks] for i in tasks], 1.0)
    axes.set(title=f"task correlations (step {latest['step']})")
    path = Path(output_dir) / RELATIONSHIPS_PLOT
    make_folder(path.parent)
    return save_figure(figure, path)
