"""The multi-task training loop on accelerate (MT-DNN: one task per micro-batch).

prepare -> per step: sampler picks a task -> that task's next batch -> model(task=...) ->
loss weighting -> accelerator.backward -> clip -> optimizer/scheduler step; evaluation on every
task's dev splits with `gather_for_metrics`; the final model, tokenizer, cards and
`eval_results.json` go to `--output-dir`. Mixed precision and the number of processes come from
`accelerate launch`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase, get_scheduler

from mtnlp.args import TrainArguments
from mtnlp.cards import TaskCard, load_cards
from mtnlp.data import TaskData, load_raw, load_task, make_dataloader
from mtnlp.errors import UserError
from mtnlp.heads import HEADS, IGNORE_INDEX
from mtnlp.metrics import compute_metrics
from mtnlp.modeling import MultiTaskModel
from mtnlp.samplers import build_sampler
from mtnlp.weighting import build_weighting

logger = logging.getLogger(__name__)

EVAL_RESULTS = "eval_results.json"
TRAIN_LOG = "train_log.jsonl"


# ------------------------------------------------------------------------------ set-up
def load_encoder(
    name: str, cards: Sequence[TaskCard], data_dirs: Sequence[Path] | None
) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    """Tokenizer and pretrained encoder for `--model` ('tiny': trained here on the task text)."""
    if name == "tiny":
        from mtnlp.tiny import tiny_bert, train_wordpiece

        tokenizer = train_wordpiece(_training_text(cards, data_dirs))
        return tokenizer, tiny_bert(tokenizer)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        encoder = AutoModel.from_pretrained(name)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"--model: {name}: not a local model folder and not loadable from the Hub ({first_line})"
        ) from None
    return tokenizer, encoder


def _training_text(cards: Sequence[TaskCard], data_dirs: Sequence[Path] | None) -> Iterator[str]:
    for card in cards:
        train = load_raw(card, [card.train_split], data_dirs)[card.train_split]
        for column in card.inputs:
            for value in train[column]:
                yield " ".join(value) if isinstance(value, list) else value


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that holds something, unless told to overwrite."""
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UserError(
            f"--output-dir: {path} is not empty (it holds another run); "
            "pass --overwrite-output-dir to replace it"
        )


def make_optimizer(model: torch.nn.Module, extra: torch.nn.Module, args: TrainArguments):
    """AdamW without weight decay on biases and LayerNorm weights (BERT's recipe)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    learned = [p for p in extra.parameters() if p.requires_grad]
    if learned:
        groups.append({"params": learned, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=args.learning_rate)


# ------------------------------------------------------------------------------ evaluation
def evaluate(
    model: torch.nn.Module,
    eval_loaders: dict[str, dict[str, DataLoader]],
    cards: dict[str, TaskCard],
    accelerator: Accelerator,
) -> dict[str, dict[str, float]]:
    """Dev metrics per task: the first dev split under the metric names, further dev splits as
    `<metric>_<split>` (e.g. MNLI's `accuracy_validation_mismatched`)."""
    model.eval()
    results: dict[str, dict[str, float]] = {}
    for task, loaders in eval_loaders.items():
        card = cards[task]
        results[task] = {}
        for index, (split, loader) in enumerate(loaders.items()):
            predictions, references = predict_split(model, task, loader, card, accelerator)
            scores = compute_metrics(card.metrics, predictions, references)
            suffix = "" if index == 0 else f"_{split}"
            results[task].update({f"{name}{suffix}": value for name, value in scores.items()})
    model.train()
    return results


@torch.no_grad()
def predict_split(
    model: torch.nn.Module, task: str, loader: DataLoader, card: TaskCard, accelerator: Accelerator
) -> tuple[list, list]:
    """Predictions and references of one dev split, gathered from every process exactly once."""
    head = accelerator.unwrap_model(model).heads[task]
    token_level = HEADS.get(card.type).token_level
    predictions: list = []
    references: list = []
    for batch in loader:
        labels = batch.pop("labels")
        output = model(task=task, **batch)
        decoded = head.decode(output.logits)
        if token_level:  # sequences differ in length across processes: pad before gathering
            decoded = accelerator.pad_across_processes(decoded, dim=1, pad_index=IGNORE_INDEX)
            labels = accelerator.pad_across_processes(labels, dim=1, pad_index=IGNORE_INDEX)
        decoded, labels = accelerator.gather_for_metrics((decoded, labels))
        if token_level:
            for row_pred, row_gold in zip(decoded.tolist(), labels.tolist()):
                kept = [(p, g) for p, g in zip(row_pred, row_gold) if g != IGNORE_INDEX]
                predictions.append([card.labels[p] for p, _ in kept])
                references.append([card.labels[g] for _, g in kept])
        else:
            predictions.extend(decoded.float().tolist() if card.type == "regression" else decoded.tolist())
            references.extend(labels.tolist())
    return predictions, references


# ------------------------------------------------------------------------------ training
class TaskStreams:
    """An endless stream of batches per task: a task's loader restarts (reshuffled) at its end."""

    def __init__(self, loaders: dict[str, DataLoader]) -> None:
        self.loaders = loaders
        self.epochs = dict.fromkeys(loaders, 0)
        self.iterators = {task: iter(loader) for task, loader in loaders.items()}

    def next(self, task: str) -> dict[str, torch.Tensor]:
        try:
            return next(self.iterators[task])
        except StopIteration:
            self.epochs[task] += 1
            loader = self.loaders[task]
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.epochs[task])
            self.iterators[task] = iter(loader)
            return next(self.iterators[task])


def train(args: TrainArguments, cards: Sequence[TaskCard]) -> dict[str, dict[str, float]]:
    """Train one shared encoder on `cards`; return the final dev metrics per task."""
    if not cards:
        raise UserError("no tasks to train: give task cards with --cards / --tasks")
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, args.overwrite_output_dir)
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        # heads of tasks absent from a step get no gradient: DDP must not wait for them
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(args.seed)
    by_name = {card.name: card for card in cards}

    with accelerator.main_process_first():
        tokenizer, encoder = load_encoder(args.model, cards, args.data_dirs)
        data: dict[str, TaskData] = {
            card.name: load_task(
                card,
                tokenizer,
                args.data_dirs,
                max_train_samples=args.max_train_samples,
                max_eval_samples=args.max_eval_samples,
                label_all_subtokens=args.label_all_subtokens,
            )
            for card in cards
        }
    model = MultiTaskModel.from_encoder(encoder, [card.model_spec() for card in cards])
    del encoder
    weighting = build_weighting(
        "static",
        list(by_name),
        task_types={card.name: card.type for card in cards},
        static_weights={card.name: card.loss_weight for card in cards},
    )

    train_loaders = {
        name: make_dataloader(by_name[name], task.train, tokenizer, args.batch_size, shuffle=True, seed=args.seed)
        for name, task in data.items()
    }
    eval_loaders = {
        name: {
            split: make_dataloader(by_name[name], dataset, tokenizer, args.eval_batch_size, shuffle=False)
            for split, dataset in task.evals.items()
        }
        for name, task in data.items()
    }
    sampler = build_sampler(
        args.sampler,
        {name: len(loader) for name, loader in train_loaders.items()},
        seed=args.seed,
        sampling_weights={card.name: card.sampling_weight for card in cards},
        num_epochs=max(1, math.ceil(args.epochs)),
    )
    steps_per_epoch = math.ceil(sampler.epoch_length / args.gradient_accumulation_steps)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))

    optimizer = make_optimizer(model, weighting, args)
    scheduler = get_scheduler(
        "linear",
        optimizer,
        num_warmup_steps=int(args.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    weighting.to(accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    names = list(train_loaders)
    prepared = accelerator.prepare(*train_loaders.values())
    prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
    streams = TaskStreams(dict(zip(names, prepared)))
    for task, loaders in eval_loaders.items():
        for split in loaders:
            loaders[split] = accelerator.prepare(loaders[split])
    accelerator.register_for_checkpointing(scheduler)

    history: list[dict[str, Any]] = []
    loss_sums = {task: torch.zeros((), device=accelerator.device) for task in names}
    task_steps = dict.fromkeys(names, 0)
    window_steps = dict.fromkeys(names, 0)
    progress = tqdm(total=total_steps, desc="training", disable=not accelerator.is_main_process)
    started = time.perf_counter()
    examples = 0
    model.train()
    for step in range(1, total_steps + 1):
        for _ in range(args.gradient_accumulation_steps):
            task = sampler.next_task()
            batch = streams.next(task)
            examples += batch["input_ids"].shape[0] * accelerator.num_processes
            with accelerator.accumulate(model):
                output = model(task=task, **batch)
                loss = weighting.combine({task: output.loss})
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            loss_sums[task] += output.loss.detach().float()
            task_steps[task] += 1
            window_steps[task] += 1
        if not accelerator.optimizer_step_was_skipped:
            scheduler.step()
        progress.update(1)
        if step % args.log_every == 0 or step == total_steps:
            record = _log_window(step, loss_sums, window_steps, accelerator)
            history.append(record)
            progress.set_postfix({task: f"{value:.3f}" for task, value in record["loss"].items()})
            for task in names:
                loss_sums[task].zero_()
            window_steps = dict.fromkeys(names, 0)
        if args.eval_every and step % args.eval_every == 0 and step != total_steps:
            metrics = evaluate(model, eval_loaders, by_name, accelerator)
            history.append({"step": step, "eval": metrics})
            accelerator.print(f"step {step}: {json.dumps(metrics)}")
    progress.close()
    train_seconds = time.perf_counter() - started

    results = evaluate(model, eval_loaders, by_name, accelerator)
    history.append({"step": total_steps, "eval": results})
    summary = {
        "steps": total_steps,
        "train_seconds": round(train_seconds, 2),
        "train_examples": examples,
        "examples_per_second": round(examples / max(train_seconds, 1e-9), 2),
        "task_steps": task_steps,
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_run(
            output_dir,
            accelerator.unwrap_model(model),
            tokenizer,
            cards,
            results,
            history,
            {"args": vars(args), **summary},
        )
        logger.info("saved to %s", output_dir)
    accelerator.print(json.dumps({"eval": results, **summary}, indent=2))
    accelerator.end_training()
    return results


def _log_window(step, loss_sums, window_steps, accelerator) -> dict[str, Any]:
    """Mean loss per task over the last logging window, and the share of steps each task got."""
    total = sum(window_steps.values()) or 1
    losses = {
        task: (loss_sums[task] / count).item() for task, count in window_steps.items() if count
    }
    return {
        "step": step,
        "loss": losses,
        "share": {task: count / total for task, count in window_steps.items()},
    }


def save_run(
    output_dir: Path,
    model: MultiTaskModel,
    tokenizer: PreTrainedTokenizerBase,
    cards: Sequence[TaskCard],
    results: dict[str, dict[str, float]],
    history: list[dict[str, Any]],
    summary: dict[str, Any],
) -> None:
    """Write everything into a temporary folder, then move it into `output_dir` file by file, so an
    interrupted save never leaves a half-written model behind."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".saving-") as staging:
        staging = Path(staging)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "cards").mkdir()
        for card in cards:
            (staging / "cards" / f"{card.name}.yaml").write_text(card.to_yaml(), encoding="utf-8")
        (staging / EVAL_RESULTS).write_text(json.dumps(results, indent=2) + "\n")
        (staging / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        with open(staging / TRAIN_LOG, "w") as log:
            for record in history:
                log.write(json.dumps(record) + "\n")
        for item in staging.iterdir():
            target = output_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)


def run(args: TrainArguments, default_cards: Sequence[str | Path]) -> dict[str, dict[str, float]]:
    """Load the cards named by the arguments (or the defaults) and train."""
    cards = load_cards(args.cards or default_cards, args.task_list)
    return train(args, cards)
