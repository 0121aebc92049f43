"""Padding per training batch with and without length-grouped batching (`--group-by-length`).

    python -m bench.padding                  # every GLUE and CoNLL-2003 training set found
    python -m bench.padding --quick          # 2,000 examples of RTE, MRPC and NER (< 1 min)

Part 1 (padding): each task's training set is tokenized as mtnlp trains it (its card,
MiniLM's WordPiece tokenizer) and batched by `mtnlp.data.make_dataloader` with and without
`group_by_length`, for one epoch. A batch pads every example to its longest one, so its padding
share is 1 - sum(lengths) / (batch size x longest); the batches come from the loader's own
batch sampler, and the first batches are collated to check the figure against the attention
masks. `pad_fraction_grouped` / `pad_fraction_random` are means over all batches of all tasks
(target: under 10% with grouping).

Part 2 (throughput): `mtnlp.training.train` for one epoch over `--throughput-samples` examples
per task, random and grouped batches alternating (A B A B), examples per second of each.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    CONLL_CARDS,
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

TARGET = 0.10
CHECKED_BATCHES = 3  # batches per task collated to check the computed padding


def batch_padding(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> list[float]:
    """Padding share of each batch (a list of example indices), padded to its longest example."""
    shares = []
    for batch in batches:
        sizes = [lengths[i] for i in batch]
        shares.append(1 - sum(sizes) / (len(sizes) * max(sizes)))
    return shares


def task_padding(card, dataset, tokenizer, batch_size: int, seed: int) -> dict[str, Any]:
    """One epoch's padding shares of a task, random and grouped, checked against the collator."""
    from mtnlp.data.loaders import example_lengths, make_dataloader

    sizes = example_lengths(dataset)
    result: dict[str, Any] = {"examples": len(sizes), "mean_length": sum(sizes) / len(sizes)}
    for name, grouped in (("random", False), ("grouped", True)):
        loader = make_dataloader(
            card, dataset, tokenizer, batch_size, shuffle=True, seed=seed, group_by_length=grouped
        )
        batches = list(loader.batch_sampler)
        shares = batch_padding(sizes, batches)
        for batch, share in zip(batches[:CHECKED_BATCHES], shares, strict=False):
            mask = loader.collate_fn([dataset[i] for i in batch])["attention_mask"]
            if abs((1 - mask.float().mean().item()) - share) > 1e-6:
                raise AssertionError(f"{card.name}: padding {share} disagrees with the collator")
        padded = sum(len(batch) * max(sizes[i] for i in batch) for batch in batches)
        result[f"pad_fraction_{name}"] = sum(shares) / len(shares)
        result[f"pad_fraction_tokens_{name}"] = 1 - sum(sizes) / padded
        result[f"batches_{name}"] = len(batches)
        result[f"_shares_{name}"] = shares
    return result


def padding(
    cards: Sequence,
    tokenizer,
    data_dirs: Sequence[Path],
    batch_size: int,
    max_train_samples: int | None,
    seed: int = 0,
) -> dict[str, Any]:
    """Padding per task and over every batch of every task."""
    from mtnlp.data.tokenize import load_task

    per_task = {}
    for card in cards:
        data = load_task(card, tokenizer, data_dirs, max_train_samples=max_train_samples)
        per_task[card.name] = task_padding(card, data.train, tokenizer, batch_size, seed)
    result: dict[str, Any] = {}
    for name in ("random", "grouped"):
        shares = [share for task in per_task.values() for share in task.pop(f"_shares_{name}")]
        result[f"pad_fraction_{name}"] = sum(shares) / len(shares)
    result["tasks"] = per_task
    return result


def throughput(
    model_folder: str,
    tasks: str,
    data_dirs: Sequence[Path],
    card_folders: Sequence[Path],
    samples: int,
    rounds: int,
    batch_size: int,
    output_dir: Path,
) -> dict[str, Any]:
    """Examples per second of one-epoch training runs, random and grouped batches alternating."""
    import json

    from mtnlp import TrainArguments, load_cards, train

    speeds: dict[str, list[float]] = {"random": [], "grouped": []}
    peaks = []
    for _ in range(rounds):
        for name, grouped in (("random", False), ("grouped", True)):
            args = TrainArguments(
                model=model_folder,
                data_dir=[str(folder) for folder in data_dirs],
                tasks=tasks,
                output_dir=str(output_dir),
                overwrite_output_dir=True,
                epochs=1,
                batch_size=batch_size,
                eval_batch_size=batch_size,
                max_train_samples=samples,
                max_eval_samples=batch_size,
                group_by_length=grouped,
            )
            cards = load_cards(card_folders, args.task_list)
            with PeakRSS() as memory, contextlib.redirect_stdout(sys.stderr):
                train(args, cards)
            summary = json.loads((output_dir / "train_summary.json").read_text())
            speeds[name].append(summary["examples_per_second"])
            peaks.append(memory.mb)
    random, grouped = (spread(speeds[name])["median"] for name in ("random", "grouped"))
    return {
        "examples_per_s_random": random,
        "examples_per_s_grouped": grouped,
        "speedup": grouped / random,
        "runs": speeds,
        "peak_rss_mb_train": max(peaks),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--tasks", help="task names (default: every card whose training file exists)")
    cli.add_argument("--data-dir", type=Path, nargs="+", help="default: shared glue + conll2003")
    cli.add_argument("--batch-size", type=int, default=32)
    cli.add_argument("--max-train-samples", type=int, help="cap each training set")
    cli.add_argument("--throughput-model", default="minilm", help="minilm, tiny, mini, base, path")
    cli.add_argument("--throughput-tasks", default="rte,mrpc,cola,ner")
    cli.add_argument("--throughput-samples", type=int, default=512, help="examples per task")
    cli.add_argument("--rounds", type=int, default=2, help="throughput runs of each kind")
    options = cli.parse_args(argv)
    if options.quick:
        options.tasks = options.tasks or "rte,mrpc,ner"
        options.max_train_samples = options.max_train_samples or 2000
        options.throughput_model, options.throughput_tasks = "tiny", "rte,ner"
        options.throughput_samples, options.rounds = 128, 1
    setup(options)
    from transformers import AutoTokenizer

    from mtnlp import load_cards
    from mtnlp.data.read import resolve_file
    from mtnlp.utils.errors import UserError

    data_dirs = options.data_dir or [DATA_DIR / "glue", DATA_DIR / "conll2003"]
    card_folders = [folder for folder in (GLUE_CARDS, CONLL_CARDS) if folder.is_dir()]
    names = options.tasks.split(",") if options.tasks else None
    cards = load_cards(card_folders, names)
    missing = []
    if names is None:  # every card whose training file is there (no MNLI, QQP in the shared copy)
        found = []
        for card in cards:
            try:
                resolve_file(card, card.train_split, data_dirs)
                found.append(card)
            except UserError:
                missing.append(card.name)
        cards = found
    with temporary_folder() as folder:
        tokenizer_folder = encoder_folder("minilm", folder)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        result = padding(cards, tokenizer, data_dirs, options.batch_size, options.max_train_samples)
        model_folder = encoder_folder(options.throughput_model, folder / "encoder")
        result["throughput"] = throughput(
            model_folder,
            options.throughput_tasks,
            data_dirs,
            card_folders,
            options.throughput_samples,
            options.rounds,
            options.batch_size,
            folder / "run",
        )
    result["meets_target"] = result["pad_fraction_grouped"] < TARGET
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()}
    config["data_dir"] = [str(folder) for folder in data_dirs]
    config["tasks_without_data"] = missing
    return emit(
        {"benchmark": "padding", "target": TARGET, **result, "config": config}, options.output
    )


if __name__ == "__main__":
    main()
