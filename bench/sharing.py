"""Parameter-sharing strategies and run-level regularizers on small GLUE tasks, at a fixed budget.

    python -m bench.sharing            # MiniLM; RTE MRPC STS-B; every setting below, 300 steps
    python -m bench.sharing --quick    # tiny random BERT, 8 steps, 64 dev examples: a smoke run

Every setting trains the same encoder for the same number of optimizer steps (`--steps`) with the
same sampler, so settings differ only in how the tasks share parameters:

- `hard`: one encoder, one head per task (MT-DNN), the baseline;
- `soft-l2`, `soft-trace`: per-task copies of the top `--sharing-layers` layers tied by the L2
  (Duong et al. 2015) or trace-norm (Yang & Hospedales 2017) penalty;
- `cross_stitch` (Misra et al. 2016) and `sluice` (Ruder et al. 2019) columns;
- `tensor`: columns whose linear weights are slices of a Tucker-factorised tensor shared by the
  tasks, plus a shared residual (Yang & Hospedales 2017; default ranks 2, 16, 16);
- `hard+block_sparse` (l1/l2 over the stacked heads; Argyriou et al. 2007) and
  `hard+adversarial` (a task discriminator behind gradient reversal; Liu et al. 2017).

The JSON holds, per setting, the dev metrics, GLUE scores (the mean of a task's metrics x 100)
and their average, the wall time, training examples/s and the model's parameter count; the hard
run also logs task affinity (`--affinity-every`) and its mean matrices are reported.
`--markdown FILE` writes the table for bench/RESULTS.md.

Cost: 8 settings, the column settings running 3 copies of 2 layers; bench/RESULTS.md gives the
command and minutes of a real run (MiniLM, bf16, 2 CPU cores). Lower `--steps`, cap
`--max-eval-samples` or pick `--settings` for a cheaper run.
"""

from __future__ import annotations

import contextlib
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

# setting -> TrainArguments overrides
SETTINGS: dict[str, dict[str, Any]] = {
    "hard": {},
    "soft-l2": {"sharing": "soft", "soft_penalty": "l2"},
    "soft-trace": {"sharing": "soft", "soft_penalty": "trace"},
    "cross_stitch": {"sharing": "cross_stitch"},
    "sluice": {"sharing": "sluice"},
    "tensor": {"sharing": "tensor"},
    "hard+block_sparse": {"block_sparse": 1e-3, "block_sparse_q": "2"},
    "hard+adversarial": {"adversarial": 0.05},
}


def train_setting(options, setting: str, output_dir: Path, cards) -> dict[str, Any]:
    """One multi-task run: dev metrics, GLUE scores, wall time, speed, parameter count."""
    from mtnlp import train
    from mtnlp.artifacts.affinity import mean_affinity
    from mtnlp.artifacts.report import read_history
    from mtnlp.modeling.model import MultiTaskModel

    args = fixed_step_arguments(
        options,
        output_dir,
        sharing_layers=options.sharing_layers,
        affinity_every=options.affinity_every if setting == "hard" else None,
        **SETTINGS[setting],
    )
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        metrics = train(args, cards)
    wall = time.perf_counter() - started
    summary = json.loads((output_dir / "train_summary.json").read_text())
    model = MultiTaskModel.from_pretrained(output_dir)
    run = {
        "metrics": metrics,
        "scores": scores_of(metrics, cards),
        "wall_seconds": wall,
        "train_seconds": summary["train_seconds"],
        "examples_per_second": summary["examples_per_second"],
        "parameters_millions": sum(p.numel() for p in model.parameters()) / 1e6,
        "sharing": model.config.sharing,
    }
    affinity = mean_affinity(read_history(output_dir / "train_log.jsonl"))
    if affinity:
        run["affinity"] = affinity
    return run


def markdown(result: dict[str, Any]) -> str:
    """The table of bench/RESULTS.md: GLUE dev scores, the change of the average against hard,
    wall time, training speed and parameters per setting."""
    tasks = result["config"]["tasks"].split(",")
    baseline = result["settings"].get("hard", {}).get("scores", {}).get("average")
    head = "| setting | " + " | ".join(tasks) + " | average | vs hard | wall s | ex/s | params M |"
    lines = [head, "|---" * (len(tasks) + 6) + "|"]
    for name, run in result["settings"].items():
        cells = [f"{run['scores'][t]:.1f}" for t in [*tasks, "average"]]
        delta = "" if baseline is None else f"{run['scores']['average'] - baseline:+.1f}"
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {delta} | {run['wall_seconds']:.0f} | "
            f"{run['examples_per_second']:.1f} | {run['parameters_millions']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0], mixed_precision=True)
    cli.add_argument("--model", default="minilm", help="minilm, tiny, mini, base or a folder")
    cli.add_argument("--tasks", default="rte,mrpc,stsb")
    cli.add_argument("--data-dir", type=Path, default=DATA_DIR / "glue")
    cli.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated")
    cli.add_argument("--steps", type=int, default=300, help="optimizer steps of every setting")
    cli.add_argument("--batch-size", type=int, default=16)
    cli.add_argument("--learning-rate", type=float, default=5e-5)
    cli.add_argument("--sharing-layers", type=int, default=2, help="top layers each task copies")
    cli.add_argument("--affinity-every", type=int, default=50, help="of the hard run")
    cli.add_argument("--max-train-samples", type=int, help="cap each training set")
    cli.add_argument("--max-eval-samples", type=int, help="cap each dev set")
    cli.add_argument("--seed", type=int, default=1)
    cli.add_argument("--markdown", type=Path, help="also write the Markdown table here")
    options = cli.parse_args(argv)
    if options.quick:
        options.model, options.steps, options.affinity_every = "tiny", 8, 4
        options.max_train_samples = options.max_train_samples or 256
        options.max_eval_samples = options.max_eval_samples or 64
        options.learning_rate = 1e-3
    settings = options.settings.split(",")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"--settings: unknown {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    setup(options)
    from mtnlp import load_cards

    cards = load_cards([GLUE_CARDS], options.tasks.split(","))
    runs: dict[str, dict[str, Any]] = {}
    with temporary_folder() as folder:
        options.model_folder = encoder_folder(options.model, folder / "encoder")
        for index, setting in enumerate(settings):
            runs[setting] = train_setting(options, setting, folder / f"run{index}", cards)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()}
    result = {"benchmark": "sharing", "settings": runs, "config": config}
    if options.markdown is not None:
        options.markdown.write_text(markdown(result))
    return emit(result, options.output)


if __name__ == "__main__":
    main()
