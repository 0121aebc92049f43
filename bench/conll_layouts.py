"""Flat vs low supervision vs joint many-task layering on CoNLL-2003 (POS, chunking, NER).

    python -m bench.conll_layouts                          # MiniLM, 300 steps, seeds 1 2 3
    python -m bench.conll_layouts --max-steps 150 --seeds 1 --max-eval-samples 1000 --threads 1
    python -m bench.conll_layouts --quick                  # tiny random BERT, a smoke run

Every (layout, seed) trains `recipes/conll_hierarchical.py` with the same budget (steps, batch
size, learning rate, sampler, seed) and reads its dev metrics: NER entity F1 (seqeval, strict
IOB2), chunk F1 (the same over chunks), POS and chunk word accuracy, and the training loop's
wall time (`train_seconds`, from `train_summary.json`; set-up and evaluation excluded). Prints
one JSON object: the runs and, per layout, median and quartiles over seeds.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import (
    DATA_DIR,
    REPO,
    emit,
    encoder_folder,
    parser,
    setup,
    spread,
    temporary_folder,
)

LAYOUTS = ("flat", "low", "jmt")
METRICS = {  # reported name -> (task, metric in eval_results.json)
    "ner_f1": ("ner", "overall_f1"),
    "pos_accuracy": ("pos", "accuracy"),
    "chunk_f1": ("chunk", "overall_f1"),  # chunking's score: chunk F1 (seqeval, IOB2)
    "chunk_accuracy": ("chunk", "accuracy"),
}


def run_layout(layout: str, seed: int, model: str, output: str, options) -> dict[str, Any]:
    """Train one layout with one seed; its dev metrics and training time."""
    sys.path.insert(0, str(REPO / "recipes"))
    import conll_hierarchical

    argv = [
        "--layout", layout, "--model", model, "--data-dir", str(DATA_DIR / "conll2003"),
        "--output-dir", output, "--seed", str(seed), "--max-steps", str(options.max_steps),
        "--batch-size", str(options.batch_size), "--learning-rate", str(options.learning_rate),
        "--log-every", str(options.max_steps), "--sampler", "round_robin",
    ]  # fmt: skip
    for flag in ("max_train_samples", "max_eval_samples"):
        if getattr(options, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(options, flag))]
    with contextlib.redirect_stdout(sys.stderr):  # the run's own report; stdout is for the JSON
        results = conll_hierarchical.main(argv)
    summary = json.loads((Path(output) / "train_summary.json").read_text())
    row = {name: results[task][metric] for name, (task, metric) in METRICS.items()}
    return {"layout": layout, "seed": seed, **row, "train_seconds": summary["train_seconds"]}


def main() -> dict[str, Any]:
    cli = parser(__doc__.split("\n\n")[0], mixed_precision=True)
    cli.add_argument("--model", default="minilm", help="minilm (default), tiny, or a model folder")
    cli.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    cli.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    cli.add_argument("--max-steps", type=int, default=300)
    cli.add_argument("--batch-size", type=int, default=16)
    cli.add_argument("--learning-rate", type=float, default=1e-4)
    cli.add_argument("--max-train-samples", type=int)
    cli.add_argument("--max-eval-samples", type=int)
    options = cli.parse_args()
    if options.quick:
        options.model, options.seeds, options.max_steps = "tiny", [1], 6
        options.max_train_samples, options.max_eval_samples = 64, 32
    setup(options)
    runs = []
    with temporary_folder() as folder:
        model = "tiny" if options.model == "tiny" else encoder_folder(options.model, folder)
        for seed in options.seeds:
            for layout in options.layouts:
                output = str(folder / f"{layout}-{seed}")
                runs.append(run_layout(layout, seed, model, output, options))
    names = [*METRICS, "train_seconds"]
    summary = {
        layout: {
            name: spread([run[name] for run in runs if run["layout"] == layout]) for name in names
        }
        for layout in options.layouts
    }
    config = {
        key: getattr(options, key)
        for key in ("model", "seeds", "max_steps", "batch_size", "learning_rate")
    }
    config.update(max_train_samples=options.max_train_samples, sampler="round_robin")
    config["max_eval_samples"] = options.max_eval_samples
    return emit({"config": config, "summary": summary, "runs": runs}, options.output)


if __name__ == "__main__":
    main()
