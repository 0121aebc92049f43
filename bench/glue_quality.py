"""Quality: single-task fine-tuning against mtnlp multi-task training on small GLUE tasks.

    python -m bench.glue_quality                      # MiniLM, RTE MRPC STS-B CoLA, 3 seeds
    python -m bench.glue_quality --quick              # tiny random BERT, 64 examples, 1 seed

For each seed: one `mtnlp.training.train` run per task alone (single-task), one run of all tasks
together (multi-task, MT-DNN's proportional sampling), and, with `--finetune`, MT-DNN's second
stage (`mtnlp.finetune.finetune_each`: each task fine-tuned alone from the multi-task model,
keeping its best dev epoch, so with extra examples and dev-based selection). Single-task and
multi-task see the same total number of training examples: an epoch of the multi-task run is
every task's batches once. Dev scores are GLUE's: the mean of a task's metrics (MRPC: accuracy
and F1; STS-B: Pearson and Spearman), x 100, and the GLUE-style average is their mean. The JSON
has mean and standard deviation over seeds, each run's wall time and examples, and per task
whether multi-task training beat single-task (MT-DNN reports the gains on the small tasks).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    DATA_DIR,
    GLUE_CARDS,
    PeakRSS,
    emit,
    encoder_folder,
    parser,
    setup,
    temporary_folder,
)

SINGLE, MULTI, FINETUNED = "single-task", "multi-task", "multi-task + fine-tune"


def glue_score(metrics: dict[str, float], names: Sequence[str]) -> float:
    """GLUE's score of a task: the mean of its metrics on the first dev split, x 100."""
    return 100 * statistics.fmean(metrics[name] for name in names)


def scores_of(metrics: dict[str, dict[str, float]], cards) -> dict[str, float]:
    """GLUE score per task (`cards`' metrics) and their average."""
    scores = {card.name: glue_score(metrics[card.name], card.metrics) for card in cards}
    return {**scores, "average": statistics.fmean(scores.values())}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def one_run(options, tasks: str, seed: int, output_dir: Path, finetune: bool) -> dict[str, Any]:
    """Train `tasks` (comma-separated) with `seed`; dev metrics, wall time, examples, peak RSS
    (and the fine-tuned stage's metrics with `finetune`)."""
    from mtnlp import TrainArguments, load_cards, train

    args = TrainArguments(
        model=options.model_folder,
        data_dir=[str(options.data_dir)],
        tasks=tasks,
        output_dir=str(output_dir),
        overwrite_output_dir=True,
        epochs=options.epochs,
        batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        max_train_samples=options.max_train_samples,
        max_eval_samples=options.max_eval_samples,
        seed=seed,
        finetune_epochs=options.finetune_epochs,
        group_by_length=options.group_by_length,
    )
    cards = load_cards([GLUE_CARDS], args.task_list)
    started = time.perf_counter()
    with PeakRSS() as memory, contextlib.redirect_stdout(sys.stderr):
        results = train(args, cards)
    run = {
        "metrics": results,
        "wall_seconds": time.perf_counter() - started,
        "train_examples": json.loads((output_dir / "train_summary.json").read_text())[
            "train_examples"
        ],
        "peak_rss_mb": memory.mb,
    }
    if finetune:
        from mtnlp.artifacts.run_folder import FINETUNED_DIR
        from mtnlp.training.stages import FINETUNED as STAGE
        from mtnlp.training.stages import finetune_each

        started = time.perf_counter()
        with PeakRSS() as memory, contextlib.redirect_stdout(sys.stderr):
            table = finetune_each(args, cards, results)
        summaries = [
            output_dir / FINETUNED_DIR / card.name / "train_summary.json" for card in cards
        ]
        examples = sum(json.loads(path.read_text())["train_examples"] for path in summaries)
        run["finetuned"] = {  # both stages: what the fine-tuned models cost in all
            "metrics": {task: stages[STAGE] for task, stages in table.items()},
            "wall_seconds": run["wall_seconds"] + time.perf_counter() - started,
            "train_examples": run["train_examples"] + examples,
            "peak_rss_mb": max(run["peak_rss_mb"], memory.mb),
        }
    return run


def summarize(runs: list[dict[str, Any]], metric_names: dict[str, list[str]]) -> dict[str, Any]:
    """Per setting: each task's GLUE score and the average, mean and std over seeds; wall time
    and examples; and per task the multi-task gain over single-task (where both ran)."""
    tasks = list(metric_names)
    scores: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        per_task = scores.setdefault(run["setting"], {})
        for task, metrics in run["metrics"].items():
            per_task.setdefault(task, []).append(glue_score(metrics, metric_names[task]))
    settings: dict[str, Any] = {}
    for setting, per_task in scores.items():
        seeds = len(next(iter(per_task.values())))
        averages = [statistics.fmean(per_task[t][i] for t in tasks) for i in range(seeds)]
        chosen = [run for run in runs if run["setting"] == setting]
        settings[setting] = {
            "tasks": {task: mean_std(values) for task, values in per_task.items()},
            "glue_average": mean_std(averages),
            "wall_seconds": sum(run["wall_seconds"] for run in chosen) / seeds,
            "train_examples": sum(run["train_examples"] for run in chosen) / seeds,
            "peak_rss_mb_train": max(run["peak_rss_mb"] for run in chosen),
        }
    compared = SINGLE in settings and MULTI in settings  # the peer's runs have neither
    gain = {
        task: settings[MULTI]["tasks"][task]["mean"] - settings[SINGLE]["tasks"][task]["mean"]
        for task in tasks
        if compared
    }
    return {"settings": settings, "multi_task_gain": gain}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0], mixed_precision=True)
    cli.add_argument("--model", default="minilm", help="minilm, tiny, mini, base or a folder")
    cli.add_argument("--tasks", default="rte,mrpc,stsb,cola")
    cli.add_argument("--data-dir", type=Path, default=DATA_DIR / "glue")
    cli.add_argument("--seeds", default="1,2,3")
    cli.add_argument("--epochs", type=float, default=3.0)
    cli.add_argument("--batch-size", type=int, default=32)
    cli.add_argument("--learning-rate", type=float, default=5e-5)
    cli.add_argument("--max-train-samples", type=int, help="cap each training set (budget)")
    cli.add_argument("--max-eval-samples", type=int, help="cap each dev set")
    cli.add_argument("--finetune", action="store_true", help="add MT-DNN's fine-tuning stage")
    cli.add_argument("--finetune-epochs", type=float, default=1.0)
    cli.add_argument(
        "--group-by-length", action="store_true", help="length-grouped batches (every setting)"
    )
    options = cli.parse_args(argv)
    if options.quick:
        options.model, options.seeds, options.epochs = "tiny", "1", 1.0
        options.max_train_samples = options.max_train_samples or 64
        options.max_eval_samples = options.max_eval_samples or 64
        options.learning_rate = 1e-3
    setup(options)
    from mtnlp import load_cards

    seeds = [int(seed) for seed in options.seeds.split(",")]
    tasks = options.tasks.split(",")
    metric_names = {card.name: card.metrics for card in load_cards([GLUE_CARDS], tasks)}
    runs = []
    with temporary_folder() as folder:
        options.model_folder = encoder_folder(options.model, folder / "encoder")
        for seed in seeds:
            for task in tasks:
                run = one_run(options, task, seed, folder / f"st-{task}", finetune=False)
                runs.append({"setting": SINGLE, "seed": seed, "tasks": task, **run})
            run = one_run(options, options.tasks, seed, folder / "mt", options.finetune)
            finetuned = run.pop("finetuned", None)
            runs.append({"setting": MULTI, "seed": seed, "tasks": options.tasks, **run})
            if finetuned is not None:
                runs.append(
                    {"setting": FINETUNED, "seed": seed, "tasks": options.tasks, **finetuned}
                )
    summary = summarize(runs, metric_names)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()}
    result = {"benchmark": "glue_quality", **summary, "runs": runs, "config": config}
    return emit(result, options.output)


if __name__ == "__main__":
    main()
