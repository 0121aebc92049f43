"""The task-affinity heat map of a run: the mean over the run of the affinity records that
`--affinity-every` wrote to `train_log.jsonl` (measured by `mtnlp.training.affinity`), drawn as
`plots/affinity.png`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

AFFINITY_PLOT = "plots/affinity.png"


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
        bound = max(abs(v) for row in values for v in row) or 1.0
        image = axes.imshow(values, cmap="RdBu", vmin=-bound, vmax=bound)
        for r, row in enumerate(values):
            for c, value in enumerate(row):
                color = "white" if abs(value) > 0.6 * bound else "black"
                axes.text(c, r, f"{value:.2g}", ha="center", va="center", color=color)
        axes.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        axes.set_yticks(range(len(tasks)), tasks)
        axes.set(title=title, xlabel="task j (measured)", ylabel="task i (gradient / step)")
        figure.colorbar(image, ax=axes, shrink=0.8)
    path = Path(output_dir) / AFFINITY_PLOT
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
