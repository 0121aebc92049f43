"""The peer baseline: what a user would run instead of mtnlp, `transformers.Trainer` on one task.

    python -m bench.peer --bf16 --threads 1 --output peer.jsonl          # GLUE 4, seeds 42 1 2
    python -m bench.peer --bf16 --group-by-length --output peer-grouped.jsonl
    python -m bench.peer --tasks ner,pos,chunk --bf16 --score-test --output peer-conll.jsonl
    python -m bench.peer --quick                                         # tiny random BERT

One task at a time, one fine-tune per seed: the `run_glue` recipe for sentence tasks
(AutoModelForSequenceClassification, one output for regression such as STS-B) and the `run_ner`
recipe for CoNLL-2003 tagging (AutoModelForTokenClassification, the label on each word's first
sub-word, -100 elsewhere), with their defaults: AdamW, a linear schedule without warm-up, weight
decay 0, dynamic padding, the last epoch kept. Both sides read the same examples (mtnlp's task
cards and readers, the same caps: the first N rows) and are scored by the same functions
(`mtnlp.metrics`). Inputs are truncated to the card's `max_length` unless `--max-length` says
otherwise (128 for most GLUE cards, run_glue's default; CoLA 64; CoNLL-2003 256).

`--output FILE` is JSON lines, written as the runs go (an interrupted run keeps what it did;
`--resume` continues it): a header (settings, machine), one line per (task, seed) in the form of
bench/glue_quality.py's runs, and a last line with the summary (mean and sd over seeds per task,
the average over the tasks, wall time and examples per seed). `python -m bench.compare` puts this
file and glue_quality's JSON in one table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    CONLL_CARDS,
    DATA_DIR,
    GLUE_CARDS,
    PeakRSS,
    data_dirs,
    emit,
    encoder_folder,
    machine_info,
    parser,
    rounded,
    score_names,
    setup,
    temporary_folder,
)
from bench.glue_quality import glue_score, summarize

IGNORE_INDEX = -100  # run_ner's label for special tokens and later sub-words


def setting_name(group_by_length: bool) -> str:
    """The peer's row in the comparison table."""
    return "peer (Trainer, group_by_length)" if group_by_length else "peer (Trainer)"


def first_subword_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """run_ner's alignment (label_all_tokens=False): each word's label on its first sub-word,
    IGNORE_INDEX on special tokens and on the word's later sub-words."""
    aligned, previous = [], None
    for word in word_ids:
        first = word is not None and word != previous
        aligned.append(word_labels[word] if first else IGNORE_INDEX)
        previous = word
    return aligned


def tokenized(card, tokenizer, dataset, max_length: int, split: str):
    """The split tokenized as run_glue / run_ner do (no padding: the collator pads per batch),
    labels encoded by mtnlp's `encode_label`, so both sides train on the same targets."""
    from mtnlp.data.labels import encode_label

    tagging = card.type == "tagging"

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        texts = [batch[column] for column in card.inputs]
        encoded = tokenizer(
            *texts, truncation=True, max_length=max_length, is_split_into_words=tagging
        )
        labels = [
            encode_label(card, value, f"{card.name} {split} example {index}")
            for value, index in zip(batch[card.label_column], indices, strict=True)
        ]
        if tagging:
            labels = [
                first_subword_labels(encoded.word_ids(i), ids) for i, ids in enumerate(labels)
            ]
        encoded["labels"] = labels
        return encoded

    return dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names)


def decoded(card, logits, label_ids) -> tuple[list, list]:
    """Predictions and references in the form mtnlp's metrics take: label ids for
    classification, floats for regression, tag names of the labelled words for tagging."""
    import numpy as np

    if card.type == "regression":
        return np.squeeze(logits, -1).tolist(), label_ids.tolist()
    predicted = np.argmax(logits, axis=-1)
    if card.type != "tagging":
        return predicted.tolist(), label_ids.tolist()
    predictions, references = [], []
    for row_predicted, row_gold in zip(predicted, label_ids, strict=True):
        kept = row_gold != IGNORE_INDEX
        predictions.append([card.labels[i] for i in row_predicted[kept]])
        references.append([card.labels[i] for i in row_gold[kept]])
    return predictions, references


def read_splits(card, splits: list[str], options: argparse.Namespace, tokenizer) -> dict:
    """The card's `splits` read by mtnlp's reader, capped as mtnlp caps them (the first N rows),
    tokenized as the peer recipes do."""
    from mtnlp.data.read import load_raw

    raw = load_raw(card, splits, data_dirs(options.data_dir))
    max_length = options.max_length or card.max_length
    data = {}
    for split, dataset in raw.items():
        cap = options.max_train_samples if split == card.train_split else options.max_eval_samples
        if cap is not None and cap < len(dataset):
            dataset = dataset.select(range(cap))
        data[split] = tokenized(card, tokenizer, dataset, max_length, split)
    return data


def model_and_collator(card, folder: str, tokenizer) -> tuple[Any, Any]:
    """A new head on the encoder (run_ner's for tagging, run_glue's otherwise) and the collator
    that pads its batches."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
    )

    labels = card.labels or []
    names = {"id2label": dict(enumerate(labels)), "label2id": {x: i for i, x in enumerate(labels)}}
    if card.type == "tagging":
        model = AutoModelForTokenClassification.from_pretrained(
            folder, num_labels=len(labels), **names
        )
        return model, DataCollatorForTokenClassification(tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder,
        num_labels=len(labels) or 1,
        **(names if labels else {}),  # 1: regression
    )
    return model, DataCollatorWithPadding(tokenizer)


def training_arguments(options: argparse.Namespace, seed: int, output_dir: Path) -> Any:
    """run_glue's and run_ner's defaults (AdamW, linear decay, no warm-up, no weight decay), the
    bench's budget and precision; nothing saved, no evaluation during training."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=options.epochs,
        learning_rate=options.learning_rate,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        warmup_steps=0,  # run_glue's default (warmup_ratio 0 before transformers 5)
        weight_decay=0.0,
        lr_scheduler_type="linear",
        bf16=options.bf16,
        use_cpu=not torch.cuda.is_available(),  # the device accelerate gives mtnlp
        train_sampling_strategy="group_by_length" if options.group_by_length else "random",
        seed=seed,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
    )


def one_run(card, seed: int, options: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    """Fine-tune `card`'s task with `seed` through `transformers.Trainer`; its dev metrics (and
    test metrics with `--score-test`), main score, times, examples and peak memory. The wall
    time runs from reading the data to the last score, as bench/glue_quality.py's does."""
    from transformers import AutoTokenizer, Trainer, set_seed

    from mtnlp.metrics import compute_metrics, main_score

    labelled_test = options.score_test and card.type == "tagging"  # GLUE's test: no labels
    scored = list(card.eval_splits) + (["test"] if labelled_test else [])
    started = time.perf_counter()
    with PeakRSS() as memory, contextlib.redirect_stdout(sys.stderr):
        tokenizer = AutoTokenizer.from_pretrained(options.model_folder)
        data = read_splits(card, [card.train_split, *scored], options, tokenizer)
        set_seed(seed)  # before the model, as run_glue: the new head's weights follow the seed
        model, collator = model_and_collator(card, options.model_folder, tokenizer)
        trainer = Trainer(
            model=model,
            args=training_arguments(options, seed, output_dir),
            train_dataset=data[card.train_split],
            data_collator=collator,
            processing_class=tokenizer,
        )
        training = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - training
        metrics = {}
        for index, split in enumerate(scored):
            output = trainer.predict(data[split])
            predictions, references = decoded(card, output.predictions, output.label_ids)
            suffix = "" if index == 0 else f"_{split}"
            scores = compute_metrics(card.metrics, predictions, references)
            metrics.update({f"{name}{suffix}": value for name, value in scores.items()})
    train_examples = len(data[card.train_split]) * options.epochs
    return {
        "metrics": {card.name: metrics},
        "main_score": main_score(metrics, card.resolved_main_metric(), card.name),
        "score": glue_score(metrics, score_names(card)),
        "wall_seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "train_examples": train_examples,
        "train_examples_per_second": train_examples / train_seconds,
        "peak_rss_mb": memory.mb,
    }


def settings_of(options: argparse.Namespace) -> dict[str, Any]:
    """What a run's numbers depend on, besides the task and the seed (a resumed file must match)."""
    names = (
        "model", "epochs", "learning_rate", "batch_size", "max_length", "bf16", "group_by_length",
        "threads", "max_train_samples", "max_eval_samples", "score_test",
    )  # fmt: skip
    return {name: getattr(options, name) for name in names}


class RunLog:
    """The `--output` JSON lines: a header, then one line per finished run, flushed at once."""

    def __init__(self, path: Path | None, settings: dict[str, Any], resume: bool) -> None:
        self.path, self.done = path, {}
        if path is None:
            return
        if path.exists() and not resume:
            raise SystemExit(f"--output {path}: exists; pass --resume to continue it")
        for record in read_json_lines(path) if path.exists() else []:
            if "setting" in record:
                if record["settings"] != rounded(settings):
                    raise SystemExit(f"--resume: {path} holds runs with other settings")
                self.done[record["tasks"], record["seed"]] = record
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write({"benchmark": "peer", "settings": settings, "machine": machine_info()})

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(rounded(record)) + "\n")


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--tasks", default="rte,mrpc,stsb,cola", help="GLUE or CoNLL-2003 cards")
    cli.add_argument("--model", default="minilm", help="minilm, tiny, mini, base or a folder")
    cli.add_argument("--data-dir", type=Path, default=DATA_DIR, help="../shared/data or a folder")
    cli.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    cli.add_argument("--epochs", type=float, default=3.0)
    cli.add_argument("--learning-rate", type=float, default=5e-5)
    cli.add_argument("--batch-size", type=int, default=32)
    cli.add_argument("--max-length", type=int, help="tokens per example (default: the card's)")
    cli.add_argument("--max-train-samples", type=int, help="cap each training set (first N)")
    cli.add_argument("--max-eval-samples", type=int, help="cap each scored split (first N)")
    cli.add_argument("--bf16", action="store_true", help="bf16 autocast (as --mixed-precision)")
    cli.add_argument("--group-by-length", action="store_true", help="the peer's fairest setting")
    cli.add_argument(
        "--score-test", action="store_true", help="also score tagging cards' test split (testb)"
    )
    cli.add_argument("--resume", action="store_true", help="skip the runs --output already has")
    options = cli.parse_args(argv)
    if options.quick:
        options.model, options.seeds, options.epochs = "tiny", [42], 1.0
        options.max_train_samples = options.max_train_samples or 64
        options.max_eval_samples = options.max_eval_samples or 64
        options.learning_rate = 1e-3
    options.mixed_precision = "bf16" if options.bf16 else "no"  # for setup() and the machine info
    setup(options)
    from mtnlp import load_cards

    cards = load_cards([GLUE_CARDS, CONLL_CARDS], options.tasks.split(","))
    settings = settings_of(options)
    log = RunLog(options.output, settings, options.resume)
    setting = setting_name(options.group_by_length)
    runs = []
    with temporary_folder() as folder:
        options.model_folder = encoder_folder(options.model, folder / "encoder")
        for seed in options.seeds:
            for card in cards:
                run = log.done.get((card.name, seed))
                if run is None:
                    run = one_run(card, seed, options, folder / "run")
                    run = {"setting": setting, "seed": seed, "tasks": card.name, **run}
                    run["settings"] = settings
                    run = rounded(run)  # as the file keeps it: a resumed summary is the same
                    log.write(run)
                runs.append(run)
    summary = summarize(runs, {card.name: score_names(card) for card in cards})
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()}
    result = emit({"benchmark": "peer", **summary, "runs": runs, "config": config})
    log.write({"benchmark": "peer", "summary": result["settings"]})
    return result


if __name__ == "__main__":
    main()
