"""Training-step overhead: mtnlp's multi-task loop against a plain single-task accelerate loop.

    python -m bench.overhead                      # MiniLM, fp32 and bf16
    python -m bench.overhead --quick              # tiny random BERT, a smoke run (< 1 min)

A: mtnlp's real loop, `mtnlp.training.train` (task sampling, per-task streams, collation, head
dispatch, loss weighting, NaN check, logging). B: the loop of accelerate's `nlp_example.py` with
`AutoModelForSequenceClassification` on the same encoder weights. `train` calls back after each
optimizer step with the step's tasks; the callback then runs one plain step on the very batch
mtnlp just trained on (same task stream, seed, collator, so the same examples and sequence
length), so A and B alternate step by step in one process and every pair is timed on the same
shapes. mtnlp's step time runs from the end of one callback to the start of the next, so it holds
everything the loop does and nothing of the plain step. The figure is the median over pairs of
A-time / B-time (`ratio_median`; target: at most 1.03), per precision after warm-up pairs; the
top-level `ratio_median` is the higher of the precisions'. Both loops use the fused AdamW that
mtnlp uses (`--plain-optimizer default` gives the plain loop torch's default AdamW instead).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
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
    spread,
    temporary_folder,
)

TARGET = 1.03
PRECISIONS = {"fp32": "no", "bf16": "bf16"}  # name -> accelerate's mixed_precision


class PlainLoop:
    """The baseline: one `AutoModelForSequenceClassification`, AdamW, linear schedule, clipping;
    per task an endless pass over a DataLoader built exactly as mtnlp builds its own."""

    def __init__(
        self, model_folder: str, cards: Sequence, train_args, precision: str, fused: bool = True
    ) -> None:
        import torch
        from accelerate import Accelerator
        from transformers import (
            AutoModelForSequenceClassification,
            AutoTokenizer,
            get_scheduler,
        )

        from mtnlp.data.loaders import make_dataloader
        from mtnlp.data.tokenize import load_task

        self.accelerator = Accelerator(mixed_precision=PRECISIONS[precision])
        tokenizer = AutoTokenizer.from_pretrained(model_folder)
        model = AutoModelForSequenceClassification.from_pretrained(model_folder, num_labels=2)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": train_args.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=train_args.learning_rate,
            fused=fused or None,  # as mtnlp's make_optimizer on CPU/CUDA, unless told otherwise
        )
        steps = train_args.max_steps
        scheduler = get_scheduler(
            "linear", optimizer, int(train_args.warmup_ratio * steps), num_training_steps=steps
        )
        loaders = []
        for card in cards:
            data = load_task(
                card,
                tokenizer,
                train_args.data_dirs,
                max_train_samples=train_args.max_train_samples,
                max_eval_samples=1,
            )
            loader = make_dataloader(
                card, data.train, tokenizer, train_args.batch_size,
                shuffle=True, seed=train_args.seed, group_by_length=train_args.group_by_length,
            )  # fmt: skip
            loaders.append(loader)
        self.model, self.optimizer, self.scheduler, *loaders = self.accelerator.prepare(
            model, optimizer, scheduler, *loaders
        )
        self.model.train()
        self.max_grad_norm = train_args.max_grad_norm
        pairs = zip(cards, loaders, strict=True)
        self.streams = {card.name: _endless(loader) for card, loader in pairs}

    def step(self, task: str) -> int:
        """One training step on the next batch of `task`; returns its number of examples."""
        batch = next(self.streams[task])
        outputs = self.model(**batch)
        self.accelerator.backward(outputs.loss)
        self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return batch["input_ids"].shape[0]


def _endless(loader) -> Iterator[dict]:
    while True:
        yield from loader


class Pairs:
    """The callback `train` runs after each step: it times mtnlp's step (since the previous call)
    and then one plain step on the same batch."""

    def __init__(self, plain: PlainLoop, warmup: int) -> None:
        self.plain = plain
        self.warmup = warmup
        self.last: float | None = None
        self.times: list[tuple[float, float, int]] = []  # (mtnlp s, plain s, examples)

    def __call__(self, step: int, tasks: list[str]) -> None:
        mtnlp_seconds = time.perf_counter() - self.last if self.last is not None else math.nan
        started = time.perf_counter()
        examples = sum(self.plain.step(task) for task in tasks)
        plain_seconds = time.perf_counter() - started
        if step > self.warmup:  # step 1 also holds the set-up before the first step
            self.times.append((mtnlp_seconds, plain_seconds, examples))
        self.last = time.perf_counter()


@contextlib.contextmanager
def accelerate_precision(precision: str) -> Iterator[None]:
    """A fresh accelerate state with this mixed precision (as `accelerate launch
    --mixed_precision` gives `train`), reset again afterwards. Accelerate's own tests reset its
    state the same way."""
    from accelerate.state import AcceleratorState, GradientState

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    before = os.environ.get("ACCELERATE_MIXED_PRECISION")
    reset()
    os.environ["ACCELERATE_MIXED_PRECISION"] = PRECISIONS[precision]
    try:
        yield
    finally:
        reset()
        if before is None:
            del os.environ["ACCELERATE_MIXED_PRECISION"]
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = before


def measure(
    model_folder: str,
    precision: str,
    *,
    tasks: str,
    steps: int,
    warmup: int,
    batch_size: int,
    max_train_samples: int,
    data_dir: Path,
    output_dir: Path,
    group_by_length: bool = False,
    plain_fused: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Time `steps` interleaved pairs (after `warmup`) at one precision; ratios and throughputs."""
    from mtnlp import TrainArguments, load_cards, train
    from mtnlp.training.callbacks import OnStep

    train_args = TrainArguments(
        model=model_folder,
        data_dir=[str(data_dir)],
        tasks=tasks,
        output_dir=str(output_dir),
        overwrite_output_dir=True,
        max_steps=warmup + steps,
        batch_size=batch_size,
        eval_batch_size=batch_size,
        max_train_samples=max_train_samples,
        max_eval_samples=batch_size,
        group_by_length=group_by_length,
        seed=seed,
    )
    cards = load_cards([GLUE_CARDS], train_args.task_list)
    for card in cards:
        if card.type != "classification" or len(card.labels or []) != 2:
            raise SystemExit(f"--tasks: {card.name}: not a two-class task (the plain model has 2)")
    with accelerate_precision(precision), PeakRSS() as memory:
        plain = PlainLoop(model_folder, cards, train_args, precision, plain_fused)
        pairs = Pairs(plain, warmup)
        started = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # train() prints its summary
            train(train_args, cards, callbacks=[OnStep(pairs)])
        wall = time.perf_counter() - started
    ratios = [a / b for a, b, _ in pairs.times]
    examples = sum(n for _, _, n in pairs.times)
    mtnlp_total = sum(a for a, _, _ in pairs.times)
    plain_total = sum(b for _, b, _ in pairs.times)
    return {
        "ratio_median": spread(ratios)["median"],
        "ratio": spread(ratios),
        "ratio_total_time": mtnlp_total / plain_total,
        "pairs": len(ratios),
        "mtnlp_ms_per_example": 1000 * spread([a / n for a, _, n in pairs.times])["median"],
        "plain_ms_per_example": 1000 * spread([b / n for _, b, n in pairs.times])["median"],
        "mtnlp_examples_per_s": examples / mtnlp_total,
        "plain_examples_per_s": examples / plain_total,
        "wall_seconds": wall,
        "peak_rss_mb_train": memory.mb,
        "peak_rss_scope": memory.scope,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--model", default="minilm", help="minilm, tiny, mini, base or a folder")
    cli.add_argument("--tasks", default="rte,mrpc", help="two-class GLUE tasks (comma-separated)")
    cli.add_argument("--data-dir", type=Path, default=DATA_DIR / "glue")
    cli.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16")
    cli.add_argument("--steps", type=int, default=40, help="timed pairs in fp32")
    cli.add_argument("--bf16-steps", type=int, default=6, help="timed pairs in bf16 (slow on CPU)")
    cli.add_argument("--warmup", type=int, default=3, help="untimed pairs first")
    cli.add_argument("--batch-size", type=int, default=16)
    cli.add_argument("--max-train-samples", type=int, default=1000)
    cli.add_argument("--group-by-length", action="store_true")
    cli.add_argument(
        "--plain-optimizer",
        choices=["fused", "default"],
        default="fused",
        help="the plain loop's AdamW: fused as mtnlp's (compares the loops), or torch's default",
    )
    options = cli.parse_args(argv)
    if options.quick:
        options.model, options.steps, options.bf16_steps, options.warmup = "tiny", 12, 3, 2
        options.max_train_samples = 200
    setup(options)
    precisions = [name.strip() for name in options.precisions.split(",") if name.strip()]
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise SystemExit(f"--precisions: unknown {', '.join(unknown)}; expected fp32, bf16")
    results = {}
    with temporary_folder() as folder:
        model_folder = encoder_folder(options.model, folder / "encoder")
        for precision in precisions:
            results[precision] = measure(
                model_folder,
                precision,
                tasks=options.tasks,
                steps=options.bf16_steps if precision == "bf16" else options.steps,
                warmup=options.warmup,
                batch_size=options.batch_size,
                max_train_samples=options.max_train_samples,
                data_dir=options.data_dir,
                output_dir=folder / f"run-{precision}",
                group_by_length=options.group_by_length,
                plain_fused=options.plain_optimizer == "fused",
            )
    worst = max(result["ratio_median"] for result in results.values())
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()}
    return emit(
        {
            "benchmark": "overhead",
            "ratio_median": worst,  # the higher of the precisions' medians
            "target": TARGET,
            "meets_target": worst <= TARGET,
            "precisions": results,
            "config": config,
        },
        options.output,
    )


if __name__ == "__main__":
    main()
