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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState, skip_first_batches
from accelerate.utils import (
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase, get_scheduler

from mtnlp.affinity import measure_affinity, probe_batches, write_heatmap
from mtnlp.args import TrainArguments
from mtnlp.cards import TaskCard, load_cards
from mtnlp.checkpointing import (
    TrainState,
    check_finite,
    check_model,
    check_tasks,
    clean_leftovers,
    in_folder,
    list_checkpoints,
    load_checkpoint,
    only_leftovers,
    output_lock,
    remove_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from mtnlp.data import TaskData, load_raw, load_task, make_dataloader
from mtnlp.errors import UserError, first_line
from mtnlp.heads import HEADS, IGNORE_INDEX
from mtnlp.hierarchy import SuccessiveRegularizer
from mtnlp.hub import push_to_hub
from mtnlp.metrics import compute_metrics, main_metrics
from mtnlp.modeling import MultiTaskModel, check_weight_files
from mtnlp.regularizers import RunRegularizers
from mtnlp.report import write_report
from mtnlp.selection import BestCheckpoint
from mtnlp.task_mixing import (
    EpochLosses,
    average_gradients,
    backward,
    build_task_sampler,
    check_distributed,
    ddp_sync_off,
    epoch_length,
    tracker_config,
    tracker_values,
    trackers,
    window_record,
)
from mtnlp.weighting import build_weighting

logger = logging.getLogger(__name__)

EVAL_RESULTS = "eval_results.json"
TRAIN_LOG = "train_log.jsonl"
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


# ------------------------------------------------------------------------------ set-up
def tiny_tokenizer(
    cards: Sequence[TaskCard],
    data_dirs: Sequence[Path] | None,
    accelerator: Accelerator,
    resume: Path | None = None,
) -> PreTrainedTokenizerBase:
    """`--model tiny`'s tokenizer: a WordPiece vocabulary learned from the task text by the main
    process and sent to the others, or, resuming, the checkpoint's. (The trainer breaks ties in
    hash order, so two trainings on the same text can give different vocabularies.)"""
    if resume is not None:
        try:
            return AutoTokenizer.from_pretrained(resume)
        except (OSError, ValueError):
            raise UserError(
                f"--resume-from-checkpoint: {resume}: holds no tokenizer (--model tiny needs it)"
            ) from None
    from mtnlp.tiny import train_wordpiece

    main = accelerator.is_main_process
    shared = [train_wordpiece(_training_text(cards, data_dirs)) if main else None]
    return broadcast_object_list(shared)[0]


def load_encoder(
    name: str,
    cards: Sequence[TaskCard],
    data_dirs: Sequence[Path] | None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    """Tokenizer and pretrained encoder for `--model` ('tiny': a tiny BERT for `tokenizer`, see
    `tiny_tokenizer`)."""
    if name == "tiny":
        from mtnlp.tiny import tiny_bert

        return tokenizer, tiny_bert(tokenizer)
    folder = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) and not folder.is_dir():  # a path, not a Hub id
        raise UserError(f"--model: {name}: no such model folder")
    try:
        if folder.is_dir():
            check_weight_files(folder)  # safetensors only, and whole
        tokenizer = AutoTokenizer.from_pretrained(name)
        # never unpickles; a trained mtnlp model loads strictly (MultiTaskModel.from_pretrained)
        encoder = AutoModel.from_pretrained(name, use_safetensors=True)
    except UserError as error:
        raise UserError(f"--model: {error}") from None
    except OSError as error:
        raise UserError(
            f"--model: {name}: not a local model folder and not loadable from the Hub "
            f"({first_line(error)})"
        ) from None
    check_tokenizer(name, tokenizer, encoder, cards)
    return tokenizer, encoder


def check_tokenizer(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    encoder: torch.nn.Module,
    cards: Sequence[TaskCard],
) -> None:
    """The tokenizer must pad batches, and encode sentence pairs in token types the encoder has."""
    if tokenizer.pad_token is None:
        raise UserError(f"--model: {name}: its tokenizer has no padding token, so it cannot batch")
    pairs = [card.name for card in cards if len(card.inputs) == 2]
    type_vocab_size = getattr(encoder.config, "type_vocab_size", None)
    if pairs and type_vocab_size is not None:
        second = max(tokenizer("a", "b").get("token_type_ids") or [0])
        if second >= type_vocab_size:
            raise UserError(
                f"--model: {name}: cannot encode the sentence pairs of task {pairs[0]}: its "
                f"tokenizer marks the second sentence as token type {second}, but the encoder "
                f"has {type_vocab_size} token type(s)"
            )


def initial_model(
    pretrained: torch.nn.Module, specs: list[dict[str, Any]], sharing: dict | None = None
) -> MultiTaskModel:
    """The model to train: new heads on a pretrained encoder, or, when `--model` is a trained
    mtnlp model (MT-DNN's fine-tuning stage), its encoder and the weights of the tasks it knows
    (other tasks' weights are dropped, new tasks start fresh); `sharing`: see sharing.py. The
    strategy carries its own weights over (`SharingStrategy.inherit`): task columns, and mixing
    units cut down to the tasks kept."""
    if not isinstance(pretrained, MultiTaskModel):
        return MultiTaskModel.from_encoder(pretrained, specs, sharing)
    model = MultiTaskModel.from_encoder(pretrained.encoder, specs, sharing)
    for spec in specs:
        if spec["name"] in pretrained.config.task_names:
            old = pretrained.config.task(spec["name"])
            if (old["type"], old.get("labels")) != (spec["type"], spec.get("labels")):
                raise UserError(
                    f"--model: task {spec['name']} was trained with another type or labels than "
                    "its card has"
                )
    target = model.state_dict()
    kept = {
        key: value
        for key, value in pretrained.state_dict().items()
        if key in target and not key.startswith("sharing.")  # the strategy's: inherit() below
    }
    try:
        model.load_state_dict(kept, strict=False)
    except RuntimeError as error:  # same task, other head options: shapes differ
        reason = " ".join(str(error).split())
        raise UserError(f"--model: its task weights do not fit the cards ({reason})") from None
    model.sharing.inherit(pretrained.sharing)
    return model


def _training_text(cards: Sequence[TaskCard], data_dirs: Sequence[Path] | None) -> Iterator[str]:
    for card in cards:
        train = load_raw(card, [card.train_split], data_dirs)[card.train_split]
        for column in card.inputs:
            for value in train[column]:  # not text (a JSON null): tokenize_task says where
                if isinstance(value, list):
                    yield " ".join(word for word in value if isinstance(word, str))
                elif isinstance(value, str):
                    yield value


def check_output_dir(path: Path, overwrite: bool, resume: Path | None = None) -> None:
    """Refuse to write into a folder that holds something (beyond what a run killed before its
    first checkpoint leaves), unless told to overwrite or resuming a checkpoint of that folder."""
    if resume is not None and in_folder(resume, path):
        return
    if path.is_dir() and not overwrite and not only_leftovers(path):
        resumable = list_checkpoints(path)
        hint = ", or --resume-from-checkpoint latest to continue it" if resumable else ""
        raise UserError(
            f"--output-dir: {path} is not empty (it holds another run); "
            f"pass --overwrite-output-dir to replace it{hint}"
        )


def make_optimizer(
    model: torch.nn.Module,
    extra: torch.nn.Module,
    args: TrainArguments,
    device: torch.device | None = None,
):
    """AdamW without weight decay on biases and LayerNorm weights (BERT's recipe); fused when
    `device` (where training runs) has torch's fused kernel."""
    decay, no_decay = [], []
    mixing = model.sharing.mixing_parameters()  # cross-stitch / sluice units (sharing.py)
    for parameter in model.parameters():
        if parameter.requires_grad and not any(parameter is p for p in mixing):
            (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    learned = [p for p in extra.parameters() if p.requires_grad]
    if learned:  # learned loss weights: no decay, their own learning rate
        lr = args.weighting_learning_rate or args.learning_rate
        groups.append({"params": learned, "weight_decay": 0.0, "lr": lr})
    if mixing:  # they learn faster than the network (Misra et al. 2016)
        lr = args.learning_rate * model.sharing.options["lr_scale"]
        groups.append({"params": mixing, "weight_decay": 0.0, "lr": lr})
    # one fused kernel per step on CPU and CUDA: on CPU, torch's default per-tensor loop makes
    # AdamW's step ~6x slower (MiniLM: ~10% of a training step; bench/RESULTS.md)
    fused = True if device is not None and device.type in FUSED_ADAMW_DEVICES else None
    return torch.optim.AdamW(groups, lr=args.learning_rate, fused=fused)


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
            for row_pred, row_gold in zip(decoded.tolist(), labels.tolist(), strict=True):
                kept = [
                    (p, g) for p, g in zip(row_pred, row_gold, strict=True) if g != IGNORE_INDEX
                ]
                predictions.append([card.labels[p] for p, _ in kept])
                references.append([card.labels[g] for _, g in kept])
        else:
            predictions.extend(
                decoded.float().tolist() if card.type == "regression" else decoded.tolist()
            )
            references.extend(labels.tolist())
    return predictions, references


# ------------------------------------------------------------------------------ training
class TaskStreams:
    """An endless stream of batches per task: a task's loader restarts (reshuffled) at its end.

    The position (per task: epoch, batches taken from it, and its shuffling generator's state at
    the epoch start) is a `state_dict`: a resumed run replays the epoch's order and skips the
    batches already trained on (`skip_first_batches`, which loads none of them).
    """

    def __init__(self, loaders: dict[str, DataLoader]) -> None:
        self.loaders = loaders
        self.epochs = dict.fromkeys(loaders, 0)
        self.taken = dict.fromkeys(loaders, 0)
        self.epoch_rng: dict[str, torch.Tensor | None] = {}
        self.iterators = {task: self._start(task, loader) for task, loader in loaders.items()}

    def _start(self, task: str, loader: DataLoader) -> Iterator:
        generator = getattr(self.loaders[task], "generator", None)
        self.epoch_rng[task] = None if generator is None else generator.get_state()
        return iter(loader)

    def next(self, task: str) -> dict[str, torch.Tensor]:
        try:
            batch = next(self.iterators[task])
        except StopIteration:
            self.epochs[task] += 1
            self.taken[task] = 0
            loader = self.loaders[task]
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.epochs[task])
            self.iterators[task] = self._start(task, loader)
            batch = next(self.iterators[task])
        self.taken[task] += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epochs": dict(self.epochs),
            "taken": dict(self.taken),
            "epoch_rng": dict(self.epoch_rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for task, loader in self.loaders.items():
            self.epochs[task], self.taken[task] = state["epochs"][task], state["taken"][task]
            self.epoch_rng[task] = state["epoch_rng"][task]
            if self.epoch_rng[task] is not None:
                loader.generator.set_state(self.epoch_rng[task])
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.epochs[task])
            skipped = skip_first_batches(loader, self.taken[task]) if self.taken[task] else loader
            self.iterators[task] = iter(skipped)


def default_log_every(total_steps: int) -> int:
    """Every 50 steps, or often enough for 20 points on the curves of a shorter run."""
    return max(1, min(50, total_steps // 20))


def train(
    args: TrainArguments,
    cards: Sequence[TaskCard],
    on_step: Callable[[int, list[str]], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Train one shared encoder on `cards`; return the final dev metrics per task.

    `on_step(step, tasks)`, if given, runs after each optimizer step with the tasks of its
    micro-batches (benchmarks time the loop between calls: bench/overhead.py).
    """
    if not cards:
        raise UserError("no tasks to train: give task cards with --cards / --tasks")
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        # heads of tasks absent from a step get no gradient: DDP must not wait for them
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=trackers(args.report_to),
        project_config=ProjectConfiguration(str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    with output_lock(output_dir, accelerator.is_main_process):
        return _train(args, cards, on_step, accelerator)


def _train(
    args: TrainArguments,
    cards: Sequence[TaskCard],
    on_step: Callable[[int, list[str]], None] | None,
    accelerator: Accelerator,
) -> dict[str, dict[str, float]]:
    """`train` once the main process holds the output folder's lock."""
    output_dir = Path(args.output_dir)
    specs = [card.model_spec() for card in cards]
    resume = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    if resume is not None:
        check_tasks(resume, specs)
        check_model(resume, args.model)
    check_output_dir(output_dir, args.overwrite_output_dir, resume)
    if accelerator.is_main_process:  # a fresh start replaces the logs of the run it overwrites
        clean_leftovers(output_dir, logs=resume is None)
    if accelerator.log_with:
        accelerator.init_trackers("mtnlp", config=tracker_config(args))
    set_seed(args.seed)
    by_name = {card.name: card for card in cards}

    # --model tiny: the same vocabulary on every process (the checkpoint's when resuming)
    tiny = None
    if args.model == "tiny":
        tiny = tiny_tokenizer(cards, args.data_dirs, accelerator, resume)
    with accelerator.main_process_first():
        tokenizer, encoder = load_encoder(args.model, cards, args.data_dirs, tiny)
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
    model = initial_model(encoder, specs, args.sharing_config)
    del encoder
    weighting = build_weighting(
        args.weighting,
        list(by_name),
        task_types={card.name: card.type for card in cards},
        static_weights={card.name: card.loss_weight for card in cards},
        dwa_temperature=args.dwa_temperature,
        seed=args.seed,
    )
    check_distributed(args, weighting, accelerator)

    train_loaders = {
        name: make_dataloader(
            by_name[name],
            task.train,
            tokenizer,
            args.batch_size,
            shuffle=True,
            seed=args.seed,
            group_by_length=args.group_by_length,
        )
        for name, task in data.items()
    }
    eval_loaders = {
        name: {
            split: make_dataloader(
                by_name[name], dataset, tokenizer, args.eval_batch_size, shuffle=False
            )
            for split, dataset in task.evals.items()
        }
        for name, task in data.items()
    }
    # batches per process, as accelerate shards them (even_batches: every process gets as many)
    task_sizes = {
        name: math.ceil(len(loader) / accelerator.num_processes)
        for name, loader in train_loaders.items()
    }
    micro_per_epoch = epoch_length(args.batch_mode, task_sizes)
    steps_per_epoch = math.ceil(micro_per_epoch / args.gradient_accumulation_steps)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    num_epochs = math.ceil(total_steps * args.gradient_accumulation_steps / micro_per_epoch)
    log_every = args.log_every or default_log_every(total_steps)
    # all_tasks mode trains every task in each micro-batch and never asks the sampler
    sampler = build_task_sampler(args, task_sizes, cards, num_epochs, accelerator.num_processes)

    optimizer = make_optimizer(model, weighting, args, accelerator.device)
    # block-sparse heads and the adversarial task discriminator (regularizers.py)
    extra_losses = RunRegularizers(model, args.block_sparse, args.block_sparse_q, args.adversarial)
    extra_losses.to(accelerator.device)
    if any(True for _ in extra_losses.parameters()):
        optimizer.add_param_group({"params": list(extra_losses.parameters())})
    scheduler = get_scheduler(
        "linear",
        optimizer,
        num_warmup_steps=int(args.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    weighting.to(accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    # JMT successive regularization (Hashimoto et al. 2017); a no-op when every delta is 0
    regularizer = SuccessiveRegularizer(
        accelerator.unwrap_model(model),
        {card.name: card.successive_regularization for card in cards},
    )
    names = list(train_loaders)
    prepared = accelerator.prepare(*train_loaders.values())
    prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
    streams = TaskStreams(dict(zip(names, prepared, strict=True)))
    for loaders in eval_loaders.values():
        for split in loaders:
            loaders[split] = accelerator.prepare(loaders[split])
    state = TrainState(names, streams, accelerator.device)
    epoch_losses = EpochLosses(names, accelerator.device)
    best = BestCheckpoint(main_metrics(specs)) if args.keep_best else None
    # everything a resumed run needs beyond the model and optimizer (accelerate saves those),
    # named for errors; the order is the checkpoint's layout (custom_checkpoint_<i>.pkl), so a
    # new object goes at the end
    registered: dict[str, Any] = {
        "learning-rate schedule": scheduler,
        "task sampler": sampler,
        "loss weighting": weighting,
        "loop state": state,
        "epoch losses": epoch_losses,
    }
    if any(True for _ in extra_losses.parameters()):
        registered["block-sparse / adversarial regularizers"] = extra_losses
    if best is not None:
        registered["--keep-best tracker"] = best
    if regularizer.deltas:
        registered["successive regularization snapshots"] = regularizer
    accelerator.register_for_checkpointing(*registered.values())
    if resume is not None:
        resumed_at = load_checkpoint(accelerator, resume, list(registered), vars(args))
    if accelerator.is_main_process:
        if resume is not None and in_folder(resume, output_dir):
            remove_checkpoints(output_dir, after=resumed_at)
        elif args.overwrite_output_dir:  # another run's (also when resuming one from elsewhere)
            remove_checkpoints(output_dir)

    progress = tqdm(
        total=total_steps,
        initial=state.step,
        desc="training",
        disable=not accelerator.is_main_process,
    )
    started, start_examples = time.perf_counter(), state.examples
    all_tasks = args.batch_mode == "all_tasks"
    # gradients DDP does not average: the loss weights' and, in all_tasks mode (several forward
    # passes per backward, run under no_sync), the model's
    unsynced = [*weighting.parameters(), *(model.parameters() if all_tasks else [])]
    unsynced += list(extra_losses.parameters())  # the adversarial discriminator's
    probes = (  # task affinity diagnostics (affinity.py)
        probe_batches(cards, data, tokenizer, args.batch_size, accelerator.device)
        if args.affinity_every and len(cards) > 1
        else None
    )
    shared = list(accelerator.unwrap_model(model).encoder.parameters())  # for pcgrad
    eval_every = args.eval_every or (steps_per_epoch if args.keep_best else None)
    model.train()
    for step in range(state.step + 1, total_steps + 1):
        step_losses: list[tuple[str, torch.Tensor]] = []
        for micro in range(args.gradient_accumulation_steps):
            tasks = names if all_tasks else [sampler.next_task()]
            with accelerator.accumulate(model), ddp_sync_off(accelerator, model, all_tasks):
                losses = {}
                for task in tasks:
                    batch = streams.next(task)
                    state.examples += batch["input_ids"].shape[0] * accelerator.num_processes
                    losses[task] = model(task=task, **batch).loss
                penalty = sum(regularizer.penalty(task) for task in tasks)
                # the sharing strategy's penalty; block-sparse heads; adversarial discriminator
                penalty = penalty + extra_losses.loss(tasks)
                backward(losses, weighting, accelerator, shared, penalty)
                step_losses.extend((task, loss.detach()) for task, loss in losses.items())
                # a NaN/inf loss on any process: every process skips the update
                sync = accelerator.sync_gradients
                bad_tasks = nonfinite_tasks(step_losses, accelerator) if sync else []
                if sync and not bad_tasks:
                    average_gradients(unsynced, accelerator)
                    if args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    for task in tasks:
                        regularizer.update(task)
                optimizer.zero_grad()
            for task, loss in losses.items():
                state.loss_sums[task] += loss.detach().float()
                state.task_steps[task] += 1
                state.window_steps[task] += 1
            epoch_losses.add(losses)
            if ((step - 1) * args.gradient_accumulation_steps + micro + 1) % micro_per_epoch == 0:
                mean_losses = epoch_losses.end_epoch(accelerator)
                weighting.end_epoch(mean_losses)
                state.history.append({"step": step, "train_loss": mean_losses})
        state.step = step
        state.bad_steps = state.bad_steps + 1 if bad_tasks else 0
        if bad_tasks:
            _skip_bad_step(step, bad_tasks, state.bad_steps, args.max_bad_steps, accelerator)
        elif not accelerator.optimizer_step_was_skipped:
            scheduler.step()
        progress.update(1)
        if step % log_every == 0 or step == total_steps:
            record = window_record(
                step, state.loss_sums, state.window_steps, weighting, accelerator
            )
            state.history.append(record)
            accelerator.log(tracker_values(record), step=step)
            progress.set_postfix(
                {
                    task: f"{loss:.3f} s{record['share'][task]:.2f} w{record['weight'][task]:.2f}"
                    for task, loss in record["loss"].items()
                }
            )
            for task in names:
                state.loss_sums[task].zero_()
            state.window_steps = dict.fromkeys(names, 0)
        if eval_every and step % eval_every == 0 and step != total_steps:
            metrics = evaluate(model, eval_loaders, by_name, accelerator)
            state.history.append({"step": step, "eval": metrics})
            accelerator.log(tracker_values({"eval": metrics}), step=step)
            accelerator.print(f"step {step}: {json.dumps(metrics)}")
            if best is not None:
                best.update(step, metrics, accelerator.unwrap_model(model))
        if probes and step % args.affinity_every == 0:
            affinity = measure_affinity(accelerator.unwrap_model(model), probes, args.learning_rate)
            state.history.append({"step": step, "affinity": affinity})
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            check_finite(step, accelerator.unwrap_model(model), weighting)
            save_checkpoint(
                accelerator, output_dir, step, specs, args.keep_checkpoints, tokenizer, vars(args)
            )
        if on_step is not None:
            on_step(step, [task for task, _ in step_losses])
    progress.close()
    train_seconds = time.perf_counter() - started
    session_examples = state.examples - start_examples  # since the start or the resume

    results = evaluate(model, eval_loaders, by_name, accelerator)
    history = [*state.history, {"step": total_steps, "eval": results}]
    accelerator.log(tracker_values({"eval": results}), step=total_steps)
    if best is not None and not best.update(total_steps, results, accelerator.unwrap_model(model)):
        results = best.restore(accelerator.unwrap_model(model))  # the best dev checkpoint
    check_finite(total_steps, accelerator.unwrap_model(model), weighting)
    summary = {
        "steps": total_steps,
        "resumed_from": str(resume) if resume is not None else None,
        "train_seconds": round(train_seconds, 2),
        "train_examples": state.examples,
        "examples_per_second": round(session_examples / max(train_seconds, 1e-9), 2),
        "task_steps": state.task_steps,
        "loss_weights": weighting.weights(),
        "best_step": best.step if best is not None else None,
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
        if args.push_to_hub:
            push_to_hub(output_dir, args.hub_model_id, private=args.hub_private or None)
    accelerator.print(json.dumps({"eval": results, **summary}, indent=2))
    accelerator.end_training()
    return results


def nonfinite_tasks(losses: list[tuple[str, torch.Tensor]], accelerator: Accelerator) -> list[str]:
    """The tasks whose loss was NaN/inf in this step on any process (the same list on every
    process, so every process skips the same updates and DDP stays in step)."""
    finite = torch.stack([torch.isfinite(loss.float()) for _, loss in losses]).float()
    if accelerator.num_processes > 1:
        # (processes, micro-batches) -> (micro-batches,): finite only if finite everywhere
        finite = accelerator.gather(finite[None]).amin(0)
    return sorted({task for (task, _), ok in zip(losses, finite.tolist(), strict=True) if not ok})


def _skip_bad_step(
    step: int, tasks: list[str], in_a_row: int, limit: int, accelerator: Accelerator
) -> None:
    """Warn about a skipped update; stop once `limit` steps in a row had a non-finite loss."""
    names = ", ".join(tasks)
    if in_a_row >= limit:
        raise UserError(
            f"step {step}: the loss of task {names} was NaN/inf in {in_a_row} steps in a row "
            f"(--max-bad-steps {limit}); training stopped. Lower --learning-rate, check the "
            "data, or resume from an earlier checkpoint"
        )
    if accelerator.is_main_process:
        logger.warning(
            "step %d: the loss of task %s is NaN/inf; this update is skipped (%d in a row, "
            "stopping at --max-bad-steps %d)", step, names, in_a_row, limit,
        )  # fmt: skip


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
        (staging / "train_summary.json").write_text(
            json.dumps(summary, indent=2, default=str) + "\n"
        )
        with open(staging / TRAIN_LOG, "w") as log:
            for record in history:
                log.write(json.dumps(record) + "\n")
        write_heatmap(staging, history)  # task affinity, when --affinity-every logged it
        write_report(staging, history, results, summary)
        for item in staging.iterdir():
            target = output_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)


def run(args: TrainArguments, default_cards: Sequence[str | Path]) -> dict[str, dict[str, float]]:
    """Load the cards named by the arguments (or the defaults) and train; with
    `--finetune-each`, then fine-tune each task alone from the result (MT-DNN's two stages)."""
    cards = load_cards(args.cards or default_cards, args.task_list)
    results = train(args, cards)
    if args.finetune_each:
        from mtnlp.finetune import finetune_each  # it calls train(): imported here, not above

        # the fine-tuning runs read the multi-task model from the folder and write their table
        # into it: hold its lock (train() has set up accelerate's process state)
        with output_lock(Path(args.output_dir), PartialState().is_main_process):
            finetune_each(args, cards, results)
    return results
