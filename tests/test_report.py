"""The training report: one curve per task in each plot, PNG files and a page with the metrics."""

from __future__ import annotations

import functools
import json

import pytest

from mtnlp.artifacts.report import (
    DEV_PLOT,
    LOSS_PLOT,
    REPORT,
    SHARE_PLOT,
    dev_series,
    plot_dev_metrics,
    plot_losses,
    plot_shares,
    write_report,
)
from mtnlp.metrics import main_metrics

from conftest import task_spec

TASKS = ["sst2", "rte", "ner"]
# each task's main metric, as the cards' model_spec() resolves it: rte lists f1 (binary F1 first)
MAIN_METRICS = {"sst2": ["accuracy"], "rte": ["f1"], "ner": ["overall_f1"]}


def window(step: int, loss: dict, share: dict) -> dict:
    return {"step": step, "loss": loss, "share": share}


def evaluation(step: int, sst2: float, rte: tuple[float, float], ner: float) -> dict:
    metrics = {"sst2": {"accuracy": sst2}, "rte": {"accuracy": rte[0], "f1": rte[1]}}
    return {"step": step, "eval": {**metrics, "ner": {"overall_f1": ner}}}


HISTORY = [
    window(10, {"sst2": 0.7, "rte": 0.69, "ner": 2.0}, {"sst2": 0.5, "rte": 0.2, "ner": 0.3}),
    evaluation(10, 0.6, (0.5, 0.4), 0.1),
    # rte was not sampled in this window: no loss for it, share 0
    window(20, {"sst2": 0.5, "ner": 1.2}, {"sst2": 0.6, "rte": 0.0, "ner": 0.4}),
    evaluation(20, 0.8, (0.55, 0.5), 0.3),
]
RESULTS = HISTORY[-1]["eval"]
SUMMARY = {
    "steps": 20,
    "train_seconds": 3.5,
    "examples_per_second": 91.4,
    "task_steps": {"sst2": 11, "rte": 2, "ner": 7},
    "mixed_precision": "no",
    "args": {"sampler": "temperature", "weighting": "static"},
}


@pytest.mark.parametrize(
    "plot",
    [plot_losses, functools.partial(plot_dev_metrics, main_metrics=MAIN_METRICS), plot_shares],
)
def test_one_line_per_task(plot):
    figure = plot(HISTORY)
    lines = figure.axes[0].get_lines()
    assert len(lines) == len(TASKS)
    labels = [line.get_label() for line in lines]
    assert [label.split(" ")[0] for label in labels] == TASKS


def test_curves_follow_the_history():
    lines = {line.get_label(): line for line in plot_losses(HISTORY).axes[0].get_lines()}
    assert list(lines["sst2"].get_xdata()) == [10, 20]
    assert list(lines["sst2"].get_ydata()) == [0.7, 0.5]
    assert list(lines["rte"].get_xdata()) == [10]  # no point where the task was not trained
    series = dev_series(HISTORY, MAIN_METRICS)
    assert series["rte (f1)"] == ([10, 20], [0.4, 0.5])  # the main metric, not the first one
    assert set(series) == {"sst2 (accuracy)", "rte (f1)", "ner (overall_f1)"}


def test_dev_curve_of_a_mean_main_metric():
    history = [{"step": 5, "eval": {"stsb": {"pearson": 0.8, "spearmanr": 0.6}}}]
    series = dev_series(history, {"stsb": ["pearson", "spearmanr"]})
    assert series == {"stsb (mean of pearson, spearmanr)": ([5], [pytest.approx(0.7)])}


def test_report_files(tmp_path):
    page = write_report(tmp_path, HISTORY, RESULTS, SUMMARY, MAIN_METRICS)
    assert page == tmp_path / REPORT
    for plot in (LOSS_PLOT, DEV_PLOT, SHARE_PLOT):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in page.read_text()
    text = page.read_text()
    assert "20 optimizer steps, 3.5 s, 91.4 examples/s, sampler temperature" in text
    assert "| rte | f1 | 0.5000 |" in text
    assert "| ner | overall_f1 | 0.3000 |" in text
    assert "| sst2 | 11 | 55.0% |" in text


def test_report_from_a_run_folder(tmp_path):
    """Without arguments the report reads what `training.save_run` wrote; the main metrics come
    from the tasks' metadata in config.json (saved before cards had `main_metric`: defaults)."""
    tasks = [
        task_spec("sst2", "classification", ["neg", "pos"]),
        task_spec("rte", "classification", ["yes", "no"], metrics=["accuracy", "f1"]),
        task_spec("ner", "tagging", ["O", "B-X"], metrics=["seqeval"]),
    ]
    (tmp_path / "config.json").write_text(json.dumps({"tasks": tasks}))
    with open(tmp_path / "train_log.jsonl", "w") as log:
        for record in HISTORY:
            log.write(json.dumps(record) + "\n")
    (tmp_path / "eval_results.json").write_text(json.dumps(RESULTS))
    page = write_report(tmp_path)
    assert "| sst2 | accuracy | 0.8000 |" in page.read_text()
    assert (tmp_path / LOSS_PLOT).is_file()
    assert dev_series(HISTORY, main_metrics(tasks)) == dev_series(HISTORY, MAIN_METRICS)
