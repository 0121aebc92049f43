"""Joint batches against one task per batch on CoNLL-2003 POS, chunking and NER.

    python -m bench.joint_batches                   # MiniLM, 30 steps per batch mode
    python -m bench.joint_batches --steps 60 --layout low --threads 1
    python -m bench.joint_batches --quick           # tiny random BERT, a smoke run

Each batch mode trains `recipes/conll_hierarchical.py` (`--layout`, default flat) for the same
optimizer steps, batch size, learning rate and seed, with the round-robin sampler: `one_task`
trains one task's batch per step (three encoder passes per round of the three tasks), `joint` one
batch carrying the three tasks' labels (one encoder pass). It reports the training loop's wall
time (`train_seconds`, set-up and evaluation excluded), seconds per step and task examples per
second (a sentence trained for three tasks counts three times in both modes), and the ratios
joint / one_task. Prints one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import DATA_DIR, REPO, emit, encoder_folder, parser, setup, temporary_folder

MODES = ("one_task", "joint")


def run_mode(batch_mode: str, model: str, output: str, options) -> dict[str, Any]:
    """Train one batch mode; its steps, loop time and throughput from `train_summary.json`."""
    sys.path.insert(0, str(REPO / "recipes"))
    import conll_hierarchical

    argv = [
        "--layout", options.layout, "--batch-mode", batch_mode, "--model", model,
        "--data-dir", str(DATA_DIR / "conll2003"), "--output-dir", output,
        "--seed", str(options.seed), "--max-steps", str(options.steps),
        "--batch-size", str(options.batch_size), "--learning-rate", "1e-4",
        "--sampler", "round_robin", "--log-every", str(options.steps),
        "--max-eval-samples", str(options.max_eval_samples),
    ]  # fmt: skip
    if options.max_train_samples is not None:
        argv += ["--max-train-samples", str(options.max_train_samples)]
    with contextlib.redirect_stdout(sys.stderr):  # the run's own report; stdout is for the JSON
        conll_hierarchical.main(argv)
    summary = json.loads((Path(output) / "train_summary.json").read_text())
    return {
        "batch_mode": batch_mode,
        "steps": summary["steps"],
        "task_steps": summary["task_steps"],
        "train_seconds": summary["train_seconds"],
        "seconds_per_step": summary["train_seconds"] / summary["steps"],
        "task_examples_per_second": summary["examples_per_second"],
    }


def main() -> dict[str, Any]:
    cli = parser(__doc__.split("\n\n")[0], mixed_precision=True)
    cli.add_argument("--model", default="minilm", help="minilm (default), tiny, or a model folder")
    cli.add_argument("--layout", default="flat", choices=("flat", "low", "jmt"))
    cli.add_argument("--steps", type=int, default=30)
    cli.add_argument("--batch-size", type=int, default=16)
    cli.add_argument("--seed", type=int, default=1)
    cli.add_argument("--max-train-samples", type=int)
    cli.add_argument("--max-eval-samples", type=int, default=32)
    cli.add_argument(
        "--order", nargs=2, default=list(MODES), choices=MODES, help="which mode runs first"
    )
    options = cli.parse_args()
    if sorted(options.order) != sorted(MODES):
        cli.error(f"--order: give each of {', '.join(MODES)} once")
    if options.quick:
        options.model, options.steps, options.max_train_samples = "tiny", 4, 64
    setup(options)
    with temporary_folder() as folder:
        model = "tiny" if options.model == "tiny" else encoder_folder(options.model, folder)
        runs = [run_mode(mode, model, str(folder / mode), options) for mode in options.order]
    one_task, joint = sorted(runs, key=lambda run: MODES.index(run["batch_mode"]))
    ratios = {
        "seconds_per_step": joint["seconds_per_step"] / one_task["seconds_per_step"],
        "task_examples_per_second": joint["task_examples_per_second"]
        / one_task["task_examples_per_second"],
    }
    config = {
        key: getattr(options, key)
        for key in ("model", "layout", "steps", "batch_size", "seed", "max_train_samples", "order")
    }
    config.update(sampler="round_robin", tasks=["pos", "chunk", "ner"])
    return emit({"config": config, "runs": runs, "joint_over_one_task": ratios}, options.output)


if __name__ == "__main__":
    main()
