"""Task sampling and loss weighting on small GLUE tasks, at a fixed step budget.

    python -m bench.sampling            # MiniLM; RTE MRPC STS-B CoLA; 3 samplers x 2 weightings
    python -m bench.sampling --quick    # tiny random BERT, 10 steps, 64 dev examples: a smoke run

Every setting (sampler x weighting: by default `proportional`, `temperature` with T=2 and
`uniform`, each with `static` and `uncertainty`) trains the same encoder for the same number of
optimizer steps (`--steps`), so settings differ only in which tasks those steps go to and how
their losses count. Then MT-DNN's second stage (`mtnlp.finetune.finetune_each`) fine-tunes each
task alone from the multi-task model of one setting (`--finetune-setting`, default
proportional/static) for `--finetune-steps`, checking the task's dev set every
`--finetune-eval-every` steps and keeping the best checkpoint, and reports the gain.
Dev scores are GLUE's (the mean of a task's metrics x 100) and the average is their mean. The JSON
also holds each setting's share of steps per task, its final loss weights and its wall time;
`--markdown FILE` writes the tables for bench/RESULTS.md.

Cost: MiniLM trains RTE/MRPC/STS-B/CoLA batches at roughly 50 (fp32) to 100 (`--mixed-precision
bf16`, AMX) examples/s on 2 CPU cores; bench/RESULTS.md gives the command and minutes of a real
run. Lower `--steps` or cap `--max-eval-samples` for a cheaper run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DATA_DIR,
    GLUE_CARDS,
    emit,
    encoder_folder,
    fixed_step_arguments,
    parser,
    setup,
    temporary_folder,
)
from bench.glue_quality import scores_of


def train_setting(options, sampler: str, weighting: str, output_dir: Path, cards) -> dict[str, Any]:
    """One multi-task run: dev metrics, GLUE scores, step shares, final weights, wall time."""
    from mtnlp import train

    args = fixed_step_arguments(
        options,
        output_dir,
        sampler=sampler,
        temperature=options.temperature,
        weighting=weighting,
        weighting_learning_rate=options.weighting_learning_rate,
        finetune_max_steps=options.finetune_steps or None,
        finetune_learning_rate=options.finetune_learning_rate,
    )
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        metrics = train(args, cards)
    summary = json.loads((output_dir / "train_summary.json").read_text())
    total = sum(summary["task_steps"].values())
    return {
        "args": args,
        "metrics": metrics,
        "scores": scores_of(metrics, cards),
        "share": {task: count / total for task, count in summary["task_steps"].items()},
        "loss_weights": summary["loss_weights"],
        "wall_seconds": time.perf_counter() - started,
    }


def finetune_gain(run: dict[str, Any], cards, eval_every: int | None) -> dict[str, Any]:
    """MT-DNN's second stage from a setting's multi-task model (each task evaluated every
    `eval_every` steps, its best dev checkpoint kept); scores of both stages."""
    from mtnlp.training.stages import FINETUNED, finetune_each

    args = dataclasses.replace(run["args"], eval_every=eval_every)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        table = finetune_each(args, cards, run["metrics"])
    after = scores_of({task: stages[FINETUNED] for task, stages in table.items()}, cards)
    before = run["scores"]
    return {
        "multi-task": before,
        "multi-task + fine-tune": after,
        "gain": {name: after[name] - before[name] for name in before},
        "wall_seconds": time.perf_counter() - started,
    }


def markdown(result: dict[str, Any]) -> str:
    """The tables of bench/RESULTS.md: GLUE dev scores per setting, and the fine-tuning gain."""
    tasks = result["config"]["tasks"].split(",")
    head = "| setting | " + " | ".join(tasks) + " | average | steps per task | wall s |"
    lines = [head, "|---" * (len(tasks) + 4) + "|"]
    for name, run in result["settings"].items():
        cells = [f"{run['scores'][t]:.1f}" for t in [*tasks, "average"]]
        shares = " / ".join(f"{run['share'][t]:.2f}" for t in tasks)
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {shares} | {run['wall_seconds']:.0f} |"
        )
    finetune = result.get("finetune")
    if finetune:
        lines += [
            "",
            "| stage | " + " | ".join(tasks) + " | average |",
            "|---" * (len(tasks) + 2) + "|",
        ]
        for stage in ("multi-task", "multi-task + fine-tune", "gain"):
            form = "{:+.1f}" if stage == "gain" else "{:.1f}"
            cells = [form.format(finetune[stage][t]) for t in [*tasks, "average"]]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0], mixed_precision=True)
    cli.add_argument("--model", default="minilm", help="minilm, tiny, mini, base or a folder")
    cli.add_argument("--tasks", default="rte,mrpc,stsb,cola")
    cli.add_argument("--data-dir", type=Path, default=DATA_DIR / "glue")
    cli.add_argument("--samplers", default="proportional,temperature,uniform")
    cli.add_argument("--weightings", default="static,uncertainty")
    cli.add_argument("--temperature", type=float, default=2.0, help="of the temperature sampler")
    cli.add_argument("--steps", type=int, default=300, help="optimizer steps of every setting")
    cli.add_argument("--batch-size", type=int, default=16)
    cli.add_argument("--learning-rate", type=float, default=5e-5)
    cli.add_argument("--weighting-learning-rate", type=float, default=1e-2)
    cli.add_argument("--max-train-samples", type=int, help="cap each training set")
    cli.add_argument("--max-eval-samples", type=int, help="cap each dev set")
    cli.add_argument("--seed", type=int, default=1)
    cli.add_argument("--finetune-setting", default="proportional/static")
    cli.add_argument("--finetune-steps", type=int, default=100, help="per task; 0: skip")
    cli.add_argument("--finetune-learning-rate", type=float, default=2e-5)
    cli.add_argument("--finetune-eval-every", type=int, default=25, help="dev checks per task")
    cli.add_argument("--markdown", type=Path, help="also write the Markdown tables here")
    options = cli.parse_args(argv)
    if options.quick:
        options.model, options.steps, options.finetune_steps = "tiny", 10, 4
        options.finetune_eval_every = 2
        options.max_eval_samples = options.max_eval_samples or 64  # full training sets: the
        # samplers' probabilities depend on their sizes
        options.learning_rate = options.finetune_learning_rate = 1e-3
    setup(options)
    from mtnlp import load_cards

    cards = load_cards([GLUE_CARDS], options.tasks.split(","))
    settings = [
        f"{s}/{w}" for s in options.samplers.split(",") for w in options.weightings.split(",")
    ]
    if options.finetune_steps and options.finetune_setting not in settings:
        raise SystemExit(f"--finetune-setting {options.finetune_setting}: not one of {settings}")
    runs: dict[str, dict[str, Any]] = {}
    finetune = None
    with temporary_folder() as folder:
        options.model_folder = encoder_folder(options.model, folder / "encoder")
        for index, setting in enumerate(settings):
            sampler, weighting = setting.split("/")
            runs[setting] = train_setting(
                options, sampler, weighting, folder / f"run{index}", cards
            )
            if options.finetune_steps and setting == options.finetune_setting:
                gain = finetune_gain(runs[setting], cards, options.finetune_eval_every)
                finetune = {"setting": setting, **gain}
    for run in runs.values():
        del run["args"]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()}
    result = {"benchmark": "sampling", "settings": runs, "finetune": finetune, "config": config}
    if options.markdown is not None:
        options.markdown.write_text(markdown(result))
    return emit(result, options.output)


if __name__ == "__main__":
    main()
