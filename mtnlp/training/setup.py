"""Setting up a run, in the order the loop needs it: the accelerator, the checks of the output
folder and the checkpoint to resume, then `build_run`: tokenizer and encoder, data, model,
loaders, schedule, sampler, weighting, regularizers, optimizer and learning-rate schedule,
prepared by accelerate; and the built-in callbacks. This module and `stages` are the only ones
that read `TrainArguments`: every component gets explicit values.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase, get_scheduler

from mtnlp.artifacts.run_folder import LOGS, clean_leftovers
from mtnlp.cards.schema import BALANCED, TaskCard, shown
from mtnlp.data.loaders import make_dataloader, make_joint_dataloader
from mtnlp.data.read import training_text
from mtnlp.data.tokenize import TaskData, load_task
from mtnlp.hub.card import encoder_metadata
from mtnlp.modeling.heads import IGNORE_INDEX
from mtnlp.modeling.hierarchy import stack_chain
from mtnlp.modeling.loading import (
    check_model_folder,
    check_tokenizer_files,
    check_tokenizer_fits,
)
from mtnlp.modeling.lora import default_target_modules, lora_entry
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.sharing import SharingMismatch, SharingStrategy
from mtnlp.training.affinity import probe_batches
from mtnlp.training.args import TrainArguments, sharing_mismatch_error
from mtnlp.training.callbacks import (
    AffinityCallback,
    Callback,
    CheckpointCallback,
    EvaluationCallback,
    ProgressCallback,
    default_log_every,
    trackers,
)
from mtnlp.training.checkpointing import (
    check_max_steps,
    check_model,
    check_output_dir,
    check_tasks,
    read_meta,
    resolve_checkpoint,
    start_optimizer_state,
)
from mtnlp.training.mixing import (
    TaskStreams,
    build_task_sampler,
    check_distributed,
    check_joint,
    epoch_length,
    joint_groups,
)
from mtnlp.training.regularizers import RunRegularizers, SuccessiveRegularizer, TaskPrior
from mtnlp.training.relationships import (
    TaskClustering,
    TaskRelationshipPrior,
    parse_task_clusters,
)
from mtnlp.training.samplers import SequentialSampler
from mtnlp.training.selection import selection_metrics
from mtnlp.training.state import (
    EpochLosses,
    Publishing,
    Run,
    RunState,
    Schedule,
    TrainState,
    joint_name,
)
from mtnlp.training.weighting import build_weighting
from mtnlp.utils.errors import UserError, first_line

FUSED_ADAMW_DEVICES = ("cpu", "cuda")

logger = logging.getLogger(__name__)


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
    from mtnlp.modeling.tiny import train_wordpiece

    main = accelerator.is_main_process
    shared = [train_wordpiece(training_text(cards, data_dirs)) if main else None]
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
        from mtnlp.modeling.tiny import tiny_bert

        return tokenizer, tiny_bert(tokenizer)
    folder = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) and not folder.is_dir():  # a path, not a Hub id
        raise UserError(f"--model: {name}: no such model folder")
    try:
        if folder.is_dir():  # checked before a loader opens anything: sizes, no FIFO, safetensors
            check_model_folder(folder)
            check_tokenizer_files(folder)
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
    """The tokenizer must pad batches, give only ids the encoder embeds, and encode sentence
    pairs in token types the encoder has."""
    if tokenizer.pad_token is None:
        raise UserError(f"--model: {name}: its tokenizer has no padding token, so it cannot batch")
    check_tokenizer_fits(f"--model: {name}", tokenizer, encoder)
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


def pretrained_parameters(model: MultiTaskModel) -> list[torch.nn.Parameter]:
    """The parameters that start from the pretrained encoder: the encoder's, and the task
    columns of a column sharing strategy (copies of its top layers, `load_from_encoder`). Every
    other parameter is new: heads, task layers and their label embeddings, mixing units."""
    parameters = list(model.encoder.parameters())
    if model.sharing.columns:  # the columns (tensor sharing: and their factors)
        parameters += model.sharing.pretrained_parameters()
    return parameters


def parameter_groups(
    model: MultiTaskModel,
    learning_rate: float,
    head_learning_rate: float | None,
    weight_decay: float,
    split: bool = True,
) -> list[dict[str, Any]]:
    """AdamW's groups of the model's parameters but the mixing units: without weight decay on
    biases and LayerNorm weights (BERT's recipe); with `split`, the pretrained parameters
    (`pretrained_parameters`) at `learning_rate` and the new ones at `head_learning_rate`
    (None: `learning_rate`), in four groups whatever the rates, so that a checkpoint resumes
    with another head rate (without `split`: two groups, the layout of checkpoints written
    before the head rate existed)."""
    mixing = model.sharing.mixing_parameters()
    pretrained = {id(p) for p in pretrained_parameters(model)}
    rates = [learning_rate, head_learning_rate or learning_rate] if split else [learning_rate]
    groups = [
        {"params": [], "weight_decay": decay, "lr": rate}
        for rate in rates
        for decay in (weight_decay, 0.0)
    ]
    for parameter in model.parameters():
        if parameter.requires_grad and not any(parameter is p for p in mixing):
            new = split and id(parameter) not in pretrained
            groups[2 * new + (parameter.ndim < 2)]["params"].append(parameter)
    return groups


def make_optimizer(
    model: MultiTaskModel,
    extra: torch.nn.Module,
    args: TrainArguments,
    device: torch.device | None = None,
    split: bool = True,
):
    """AdamW over the model's `parameter_groups` (`split`: a head learning rate of its own),
    the learned loss weights of `extra` at `--weighting-learning-rate` and the mixing units at
    `--mixing-lr-scale` x `--learning-rate` (`--head-learning-rate` leaves them alone); fused
    when `device` (where training runs) has torch's fused kernel."""
    groups = parameter_groups(
        model, args.learning_rate, args.head_learning_rate, args.weight_decay, split
    )
    learned = [p for p in extra.parameters() if p.requires_grad]
    if learned:  # learned loss weights: no decay, their own learning rate
        lr = args.weighting_learning_rate or args.learning_rate
        groups.append({"params": learned, "weight_decay": 0.0, "lr": lr})
    mixing = model.sharing.mixing_parameters()  # cross-stitch / sluice units (sharing.py)
    if mixing:  # they learn faster than the network (Misra et al. 2016)
        lr = args.learning_rate * model.sharing.options["lr_scale"]
        groups.append({"params": mixing, "weight_decay": 0.0, "lr": lr})
    # one fused kernel per step on CPU and CUDA: on CPU, torch's default per-tensor loop makes
    # AdamW's step ~6x slower (MiniLM: ~10% of a training step; bench/RESULTS.md)
    fused = True if device is not None and device.type in FUSED_ADAMW_DEVICES else None
    return torch.optim.AdamW(groups, lr=args.learning_rate, fused=fused)


def make_accelerator(args: TrainArguments) -> Accelerator:
    """The run's accelerator: gradient accumulation, DDP that tolerates heads without a gradient
    (tasks absent from a step), the `--report-to` trackers logging under the output folder; the
    engine `accelerate launch` asked for (`check_engine_device`, `fsdp_on_cpu`). accelerate's
    configuration errors (a launch it cannot run) are one line."""
    output_dir = Path(args.output_dir)
    check_engine_device()
    try:
        accelerator = Accelerator(
            # several processes on a machine without an accelerator: CPU and gloo (accelerate
            # would otherwise start each process alone unless ACCELERATE_USE_CPU=1)
            cpu=not torch.accelerator.is_available(),
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
            ),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            log_with=trackers(args.report_to),
            project_config=ProjectConfiguration(
                str(output_dir), logging_dir=str(output_dir / LOGS)
            ),
        )
    except (ValueError, RuntimeError, ImportError) as error:  # accelerate's configuration checks
        raise UserError(f"accelerate: {first_line(error)}{_engine_hint()}") from None
    if _requested("FSDP") and accelerator.distributed_type == DistributedType.MULTI_CPU:
        fsdp_on_cpu(accelerator)
    warn_lone_process(accelerator.num_processes)
    return accelerator


def warn_lone_process(num_processes: int) -> None:
    """Warn when the launch asked for more processes than run: `accelerate launch --cpu
    --num_processes 2` starts ONE process (its CPU launcher spreads only through MPI; it sets
    MASTER_ADDR but no RANK), and a `WORLD_SIZE` above the processes accelerate sees."""
    world = os.environ.get("WORLD_SIZE", "")
    asked = int(world) if world.isdigit() else None
    lone_launch = (
        "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ and world == ""
    )  # accelerate's simple launcher with --num_processes above 1
    if num_processes == 1 and lone_launch:
        logger.warning(
            "accelerate launch asked for several processes, but this run is ONE process "
            "(`accelerate launch --cpu --num_processes N` starts one); for N processes on CPU use "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` "
            "(docs/distributed.md)"
        )
    elif asked is not None and asked > num_processes:
        logger.warning(
            "WORLD_SIZE is %d, but this run has %d process(es): the launch did not start the "
            "processes it asked for (docs/distributed.md)", asked, num_processes,
        )  # fmt: skip


CONFIGS = "recipes/accelerate/"  # the launch configurations docs/distributed.md explains


def _requested(engine: str) -> bool:
    """Whether `accelerate launch` asked for `engine` (FSDP, DEEPSPEED): its environment flag."""
    return os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true"


def _engine_hint() -> str:
    """Where an engine's launch mistake is explained: the CPU settings, or the guide."""
    if _requested("FSDP") and not torch.accelerator.is_available():
        return f" (on CPU, see {CONFIGS}fsdp_cpu.yaml)"
    return " (see docs/distributed.md)" if _requested("FSDP") or _requested("DEEPSPEED") else ""


def check_engine_device() -> None:
    """DeepSpeed needs an accelerator: on CPU accelerate starts each process alone or falls back
    to DDP without a word, so it is refused before anything starts."""
    if _requested("DEEPSPEED") and not torch.accelerator.is_available():
        raise UserError(
            "accelerate launch: DeepSpeed needs GPUs, and this machine has none; on CPU, launch "
            f"with DDP or FSDP ({CONFIGS}fsdp_cpu.yaml, docs/distributed.md)"
        )


def fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Turn an FSDP launch on CPU into FSDP: accelerate 1.x makes FSDP only of accelerator
    processes, and runs CPU processes as DDP even when FSDP was asked for. torch's FSDP2
    (`fully_shard`) shards over gloo, so the run's state becomes FSDP with the launch's
    plugin, as accelerate would set it on GPUs."""
    plugin = FullyShardedDataParallelPlugin()  # the launch's settings, from the environment
    if plugin.fsdp_version != 2:
        raise UserError(
            f"accelerate launch: FSDP on CPU needs fsdp_version: 2 (FSDP1 wraps models on GPUs "
            f"only), got {plugin.fsdp_version}; see {CONFIGS}fsdp_cpu.yaml"
        )
    state = accelerator.state  # one dict shared by every AcceleratorState
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does


def run_arguments(args: TrainArguments) -> dict[str, Any]:
    """The run's flags as its checkpoints and summary record them, with what its model card
    takes from the encoder's (`hub.card.encoder_metadata`): `base_model`, and the license and
    languages where the flags give none."""
    encoder = encoder_metadata(args.model)
    return {
        **vars(args),
        "license": args.license or encoder.get("license"),
        "language": args.language or encoder.get("language"),
        "base_model": encoder.get("base_model"),
    }


def tracker_config(args: TrainArguments) -> dict[str, Any]:
    """The arguments as tracker hyper-parameters (TensorBoard takes only scalars and strings)."""
    simple = (int, float, str, bool)
    return {k: v if isinstance(v, simple) else str(v) for k, v in vars(args).items()}


def build_run(args: TrainArguments, cards: Sequence[TaskCard], accelerator: Accelerator) -> Run:
    """Everything the loop needs, in an order that keeps a seeded run reproducible: checks of the
    output folder and checkpoint, seed, tokenizer, encoder and data, model, weighting, loaders,
    schedule and sampler, optimizer and regularizers, accelerate's preparation."""
    specs = [card.model_spec() for card in cards]
    resume = start_checks(args, specs, accelerator)
    set_seed(args.seed)
    tokenizer, encoder, data = load_model_and_data(args, cards, accelerator, resume)
    # the model's specs hold the class weights that 'balanced' stands for in the cards' (and the
    # checkpoints') specs: a saved model computes the loss it was trained with
    model = build_model(encoder, with_balanced_weights(specs, cards, data), args.sharing_config)
    del encoder
    if args.peft:
        add_lora(model, args)
    weighting = build_weighting(
        args.weighting,
        [card.name for card in cards],
        task_types={card.name: card.type for card in cards},
        static_weights={card.name: card.loss_weight for card in cards},
        dwa_temperature=args.dwa_temperature,
        seed=args.seed,
    )
    check_distributed(
        accelerator,
        args.batch_mode == "all_tasks",
        weighting,
        args.weighting,
        joint=args.batch_mode == "joint",
        affinity=bool(args.affinity_every) and len(cards) > 1,
        adversarial=args.adversarial > 0,
        successive=next((c.where for c in cards if c.successive_regularization > 0), None),
        task_priors=task_prior_flags(args),
    )
    groups = find_joint_groups(args, cards, data, model)
    train_loaders, eval_loaders = make_loaders(args, cards, data, tokenizer, groups)
    schedule, sampler = make_schedule(
        args,
        cards,
        train_loaders,
        accelerator.num_processes,
        groups,
        levels=hierarchy_levels(cards, model.layer_index),
    )
    if accelerator.is_main_process:
        warn_short_budget(args.sampler, sampler, schedule)
    split = head_rate_split(resume, args.head_learning_rate)
    optimizer = make_optimizer(model, weighting, args, accelerator.device, split)
    # block-sparse heads, task priors and the adversarial task discriminator (regularizers.py)
    priors = task_priors(args, cards, model)
    regularizers = RunRegularizers(
        model, args.block_sparse, args.block_sparse_q, args.adversarial, priors
    )
    regularizers.to(accelerator.device)
    if any(True for _ in regularizers.parameters()):  # new parameters: the head learning rate
        lr = args.head_learning_rate or args.learning_rate
        optimizer.add_param_group({"params": list(regularizers.parameters()), "lr": lr})
    scheduler = get_scheduler(
        "linear",
        optimizer,
        num_warmup_steps=int(args.warmup_ratio * schedule.total_steps),
        num_training_steps=schedule.total_steps,
    )
    weighting.to(accelerator.device)
    try:
        model, optimizer = accelerator.prepare(model, optimizer)
    except ValueError as error:  # accelerate's checks of the launch's settings against the model
        raise UserError(f"accelerate: {first_line(error)}{_engine_hint()}") from None
    if accelerator.distributed_type == DistributedType.FSDP:
        start_optimizer_state(optimizer.optimizer)  # so that every checkpoint loads
    # JMT successive regularization (Hashimoto et al. 2017); a no-op when every delta is 0
    successive = SuccessiveRegularizer(
        accelerator.unwrap_model(model),
        {card.name: card.successive_regularization for card in cards},
    )
    streams = prepare_loaders(accelerator, train_loaders, eval_loaders)
    state = TrainState(list(data), streams, accelerator.device)
    epoch_losses = EpochLosses(list(data), accelerator.device)
    run_state = resumable_state(scheduler, sampler, weighting, state, epoch_losses)
    if any(True for _ in regularizers.parameters()):
        run_state.add("regularizers", regularizers)
    if successive.deltas:
        run_state.add("successive", successive)
    for prior in priors:
        run_state.add(prior.name, prior)
    accelerator.register_for_checkpointing(run_state)
    model.train()
    return Run(
        accelerator=accelerator,
        model=model,
        tokenizer=tokenizer,
        cards=[data[card.name].card for card in cards],  # derived bins: with their range
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        streams=streams,
        weighting=weighting,
        regularizers=regularizers,
        successive=successive,
        eval_loaders=eval_loaders,
        data=data,
        state=state,
        epoch_losses=epoch_losses,
        run_state=run_state,
        output_dir=Path(args.output_dir),
        schedule=schedule,
        shared=list(accelerator.unwrap_model(model).encoder.parameters()),  # for pcgrad
        unsynced=[  # DDP does not average these (state.Run)
            *weighting.parameters(),
            *(model.parameters() if schedule.syncs_itself else []),
            *regularizers.parameters(),
        ],
        specs=specs,
        resume_from=resume,
        overwrite_output_dir=args.overwrite_output_dir,
        arguments=run_arguments(args),
        publishing=Publishing(args.hub_model_id, args.push_to_hub, args.hub_private),
    )


def head_rate_split(resume: Path | None, head_learning_rate: float | None) -> bool:
    """Whether the optimizer gives the new parameters groups of their own (`parameter_groups`):
    always, but when resuming a checkpoint written before `--head-learning-rate` existed, whose
    optimizer state has the two groups of that time."""
    if resume is None:
        return True
    saved = read_meta(resume).get("args")
    if isinstance(saved, dict) and "head_learning_rate" in saved:
        return True
    if head_learning_rate is not None:
        raise UserError(
            f"--head-learning-rate: {resume} was written before --head-learning-rate existed "
            "(one learning rate for the whole model); resume it without the flag"
        )
    return False


def with_balanced_weights(
    specs: list[dict[str, Any]], cards: Sequence[TaskCard], data: dict[str, TaskData]
) -> list[dict[str, Any]]:
    """`specs` with each `class_weights: balanced` replaced by the weights it stands for, from
    the task's training split (`balanced_class_weights`)."""
    by_name = {card.name: card for card in cards}
    resolved = []
    for spec in specs:
        loss = spec.get("loss") or {}
        if loss.get("class_weights") == BALANCED:
            card = by_name[spec["name"]]
            weights = balanced_class_weights(card, data[card.name].train["labels"])
            spec = {**spec, "loss": {**loss, "class_weights": weights}}
        resolved.append(spec)
    return resolved


def balanced_class_weights(card: TaskCard, labels: Sequence[Any]) -> list[float]:
    """n / (k * n_c) for each of the card's k labels, n_c its count among the n training labels
    (tagging: its labelled tokens), as sklearn's `compute_class_weight('balanced')`: each label
    weighs as much in the loss as the others together. A label that never occurs is refused."""
    counts = Counter(
        label
        for row in labels
        for label in (row if isinstance(row, list) else [row])
        if label != IGNORE_INDEX
    )
    names = card.labels or []
    for index, name in enumerate(names):
        if not counts[index]:
            raise UserError(
                f"{card.where}: class_weights: balanced: label {shown(name)} does not occur in "
                f"the training split ({card.train_split}); give the weights as a list"
            )
    total = sum(counts.values())
    return [total / (len(names) * counts[index]) for index in range(len(names))]


def hierarchy_levels(
    cards: Sequence[TaskCard], layer_index: Callable[[str], int]
) -> dict[str, tuple[int, int]]:
    """Each task's place in the hierarchy, low to high: (how many tasks it stacks on, the
    encoder layer it reads, `layer_index(task)`): the `ordered` sampler's order."""
    depths = stack_depths(cards)
    return {card.name: (depths[card.name] - 1, layer_index(card.name)) for card in cards}


def stack_depths(cards: Sequence[TaskCard]) -> dict[str, int]:
    """How many tasks each task's stack holds: itself and those it stacks on (JMT), 1 if none."""
    specs = {card.name: {"stack_on": card.stack_on} for card in cards}
    return {card.name: len(stack_chain(specs, card.name)) for card in cards}


def warn_short_budget(name: str, sampler: Any, schedule: Schedule) -> None:
    """One line when a fixed-order sampler's budget ends before some tasks' turn in epoch 1."""
    if not isinstance(sampler, SequentialSampler):
        return
    draws = schedule.total_steps * schedule.accumulation_steps
    missed = sampler.tasks_past(draws)
    if missed:
        logger.warning(
            "--sampler %s: %d micro-batches are less than one epoch (%d); %s never train%s",
            name, draws, sampler.epoch_length, ", ".join(missed), "s" if len(missed) == 1 else "",
        )  # fmt: skip


def make_schedule(
    args: TrainArguments,
    cards: Sequence[TaskCard],
    loaders: dict[str, Any],
    num_processes: int,
    groups: dict[str, tuple[str, ...]] | None = None,
    levels: dict[str, tuple[int, int]] | None = None,
) -> tuple[Schedule, Any]:
    """The run's numbers from the loaders' lengths, and the task sampler over them: one loader
    per task, or per joint group in `groups` (name -> tasks), which the sampler draws as one
    task whose sampling weight is the sum of its tasks' and whose level (`hierarchy_levels`)
    is its lowest task's."""
    groups = groups or {}
    levels = dict(levels or {})
    weights = {card.name: card.sampling_weight for card in cards}
    for name, tasks in groups.items():
        members = [weights.pop(task) for task in tasks]
        weights[name] = None if None in members else sum(members)
        if levels:
            levels[name] = min(levels[task] for task in tasks)
    # batches per process, as accelerate shards them (even_batches: every process gets as many)
    task_sizes = {name: math.ceil(len(loader) / num_processes) for name, loader in loaders.items()}
    micro_per_epoch = epoch_length(args.batch_mode, task_sizes)
    steps_per_epoch = math.ceil(micro_per_epoch / args.gradient_accumulation_steps)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    schedule = Schedule(
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        micro_per_epoch=micro_per_epoch,
        accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        clip_scales=depth_clip_scales(cards) if args.clip_by_depth else {},
        max_bad_steps=args.max_bad_steps,
        all_tasks=args.batch_mode == "all_tasks",  # never asks the sampler
        groups=groups,
    )
    sampler = build_task_sampler(
        args.sampler,
        task_sizes,
        seed=args.seed,
        sampling_weights={name: weights[name] for name in task_sizes},
        num_epochs=math.ceil(total_steps * args.gradient_accumulation_steps / micro_per_epoch),
        temperature=args.temperature,
        examples_cap=args.examples_cap,
        examples_per_batch=args.batch_size * num_processes,
        task_levels={name: levels[name] for name in task_sizes if name in levels},
    )
    return schedule, sampler


def depth_clip_scales(cards: Sequence[TaskCard]) -> dict[str, float]:
    """`--clip-by-depth`: each task's factor of `--max-grad-norm`, min(3, depth), depth being
    the number of tasks in its stack (itself and those it stacks on): Hashimoto et al. 2017
    clip at min(3.0, the number of BiLSTM layers a task's loss goes through)."""
    return {name: float(min(3, depth)) for name, depth in stack_depths(cards).items()}


def prepare_loaders(
    accelerator: Accelerator, train_loaders: dict[str, Any], eval_loaders: dict[str, dict]
) -> TaskStreams:
    """The loaders prepared by accelerate (sharded over processes; `eval_loaders` in place) and
    the endless streams of training batches over them."""
    names = list(train_loaders)
    prepared = accelerator.prepare(*train_loaders.values())
    prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
    for loaders in eval_loaders.values():
        for split in loaders:
            loaders[split] = accelerator.prepare(loaders[split])
    return TaskStreams(dict(zip(names, prepared, strict=True)), accelerator.num_processes)


def start_checks(
    args: TrainArguments, specs: list[dict[str, Any]], accelerator: Accelerator
) -> Path | None:
    """Before any work: the checkpoint to resume (it must be of these tasks and this `--model`),
    the output folder (not another run's), a killed run's leftovers removed, the trackers
    started. Returns the checkpoint, if resuming."""
    output_dir = Path(args.output_dir)
    resume = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    if resume is not None:
        check_tasks(resume, specs)
        check_model(resume, args.model)
        check_max_steps(resume, read_meta(resume)["step"], {"max_steps": args.max_steps})
    check_output_dir(output_dir, args.overwrite_output_dir, resume)
    if accelerator.is_main_process:  # a fresh start replaces the logs of the run it overwrites
        clean_leftovers(output_dir, logs=resume is None)
    if accelerator.log_with:
        accelerator.init_trackers("mtnlp", config=tracker_config(args))
    return resume


def load_model_and_data(
    args: TrainArguments, cards: Sequence[TaskCard], accelerator: Accelerator, resume: Path | None
) -> tuple[PreTrainedTokenizerBase, torch.nn.Module, dict[str, TaskData]]:
    """Tokenizer, encoder and tokenized data, read by the main process first (the others then
    find them in the cache); `--model tiny`: the same vocabulary on every process (the
    checkpoint's when resuming)."""
    tiny = None
    if args.model == "tiny":
        tiny = tiny_tokenizer(cards, args.data_dirs, accelerator, resume)
    with accelerator.main_process_first():
        tokenizer, encoder = load_encoder(args.model, cards, args.data_dirs, tiny)
        data = {
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
    return tokenizer, encoder, data


def build_model(
    encoder: torch.nn.Module, specs: list[dict[str, Any]], sharing: dict[str, Any] | None
) -> MultiTaskModel:
    """`MultiTaskModel.from_multitask`, its errors worded for `--model` and `--sharing`."""
    try:
        return MultiTaskModel.from_multitask(encoder, specs, sharing)
    except SharingMismatch as error:
        raise sharing_mismatch_error(error) from None
    except UserError as error:
        raise UserError(f"--model: {error}") from None


def add_lora(model: MultiTaskModel, args: TrainArguments) -> None:
    """`--peft lora`: a LoRA adapter on the frozen encoder (`MultiTaskModel.add_lora`); logs how
    many parameters train."""
    modules = args.lora_modules or default_target_modules(model.config.encoder.model_type)
    where = f"--peft {args.peft}"
    entry = lora_entry(
        args.lora_r, args.lora_alpha, args.lora_dropout, modules, args.peft_scope, where
    )
    try:
        model.add_lora(entry)
    except UserError as error:  # a target module that the encoder lacks
        raise UserError(f"{where}: {error}") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "--peft %s: %d of %d parameters train (%.2f%%)",
        args.peft,
        trainable,
        total,
        100 * trainable / total,
    )


def make_loaders(
    args: TrainArguments,
    cards: Sequence[TaskCard],
    data: dict[str, TaskData],
    tokenizer: PreTrainedTokenizerBase,
    groups: dict[str, tuple[str, ...]] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Each task's training loader (shuffled, seeded), or one per joint group in `groups`
    (name -> tasks: batches with every grouped task's labels; in the place of its first task),
    and each task's dev loaders, per split."""
    by_name = {card.name: card for card in cards}
    group_of = {tasks[0]: name for name, tasks in (groups or {}).items()}  # at its first task
    grouped = {task for tasks in (groups or {}).values() for task in tasks}
    train_loaders = {}
    for name, task_data in data.items():
        if name in group_of:
            tasks = groups[group_of[name]]
            train_loaders[group_of[name]] = make_joint_dataloader(
                [by_name[task] for task in tasks],
                {task: data[task].train for task in tasks},
                tokenizer,
                args.batch_size,
                seed=args.seed,
                group_by_length=args.group_by_length,
            )
        elif name not in grouped:
            train_loaders[name] = make_dataloader(
                by_name[name],
                task_data.train,
                tokenizer,
                args.batch_size,
                shuffle=True,
                seed=args.seed,
                group_by_length=args.group_by_length,
            )
    eval_loaders = {
        name: {
            split: make_dataloader(
                by_name[name], dataset, tokenizer, args.eval_batch_size, shuffle=False
            )
            for split, dataset in task.evals.items()
        }
        for name, task in data.items()
    }
    return train_loaders, eval_loaders


def find_joint_groups(
    args: TrainArguments,
    cards: Sequence[TaskCard],
    data: dict[str, TaskData],
    model: MultiTaskModel,
) -> dict[str, tuple[str, ...]]:
    """`--batch-mode joint`: the groups of tasks whose training inputs are the same, by their
    sampler name ('pos+chunk+ner'); none in the other modes. A group trains through the
    model's `forward_tasks`, which the per-pass regularizers (forward hooks) do not see: those
    are refused."""
    if args.batch_mode != "joint":
        return {}
    train_sets = {name: task.train for name, task in data.items()}
    groups = {joint_name(g): tuple(g) for g in joint_groups(cards, train_sets, args.data_dirs)}
    if not groups:
        logger.warning(
            "--batch-mode joint: no two tasks read the same inputs, so every batch holds one "
            "task (as --batch-mode one_task)"
        )
        return {}
    penalized = type(model.sharing).regularization_loss is not SharingStrategy.regularization_loss
    check_joint(
        adversarial=args.adversarial > 0,
        block_sparse=args.block_sparse > 0,
        sharing=args.sharing if penalized else None,
        task_priors=task_prior_flags(args),
    )
    logger.info("--batch-mode joint: one encoder pass per batch of %s", ", ".join(groups))
    return groups


def task_prior_flags(args: TrainArguments) -> list[str]:
    """The flags of the task priors the run asks for."""
    asked = {
        "--relationship-prior": args.relationship_prior > 0,
        "--task-clusters": args.task_clusters is not None,
    }
    return [flag for flag, on in asked.items() if on]


def task_priors(
    args: TrainArguments, cards: Sequence[TaskCard], model: MultiTaskModel
) -> list[TaskPrior]:
    """The penalties on the stacked task heads (relationships.py): the task-relationship prior
    and task clustering, with the cards' clusters or K learned ones."""
    priors: list[TaskPrior] = []
    if args.relationship_prior > 0:
        priors.append(
            TaskRelationshipPrior(model, args.relationship_prior, args.relationship_update_every)
        )
    if args.task_clusters is not None:
        clusters = parse_task_clusters(args.task_clusters)
        given = None
        if clusters == "cards":
            missing = [card.where for card in cards if card.cluster is None]
            if missing:
                raise UserError(
                    f"--task-clusters cards: {missing[0]}: cluster: missing; give every card a "
                    "cluster, or learn them with --task-clusters K"
                )
            given = {card.name: card.cluster for card in cards}
        weights = (
            args.cluster_mean_weight,
            args.cluster_between_weight,
            args.cluster_within_weight,
        )
        priors.append(
            TaskClustering(
                model,
                weights,
                given=given,
                k=None if given else clusters,
                update_every=args.cluster_update_every,
                seed=args.seed,
            )
        )
    return priors


def resumable_state(scheduler: Any, sampler: Any, weighting: Any, state: Any, epoch_losses: Any):
    """The run's keyed resumable state with its always-present entries."""
    run_state = RunState()
    for name, component in [
        ("schedule", scheduler),
        ("sampler", sampler),
        ("weighting", weighting),
        ("loop", state),
        ("epoch_losses", epoch_losses),
    ]:
        run_state.add(name, component)
    return run_state


def default_callbacks(run: Run, args: TrainArguments) -> list[Callback]:
    """The built-in periodic actions, in order: progress and logs, evaluation (keep-best), task
    affinity, checkpoints (after evaluation, so the keep-best state is in the checkpoint)."""
    eval_every = args.eval_every or (run.schedule.steps_per_epoch if args.keep_best else None)
    metrics = selection_metrics(run.specs) if args.keep_best else None
    callbacks: list[Callback] = [
        ProgressCallback(args.log_every or default_log_every(run.schedule.total_steps)),
        EvaluationCallback(eval_every, metrics),
    ]
    if args.affinity_every and len(run.cards) > 1:
        probes = probe_batches(
            run.cards, run.data, run.tokenizer, args.batch_size, run.accelerator.device
        )
        callbacks.append(AffinityCallback(args.affinity_every, probes, args.learning_rate))
    if args.checkpoint_every:
        callbacks.append(
            CheckpointCallback(args.checkpoint_every, args.keep_checkpoints, run.arguments)
        )
    return callbacks
