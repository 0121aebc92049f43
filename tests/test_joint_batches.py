"""`--batch-mode joint`: tasks that read the same inputs (CoNLL-2003 POS, chunk, NER) share each
batch and one encoder pass. Tiny pos/chunk/ner-like tagging cards on one CoNLL file, and a
classification card on other data that is sampled on its own."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from tiny_runs import reset_accelerate
from torch.utils.data import DataLoader

from mtnlp import load_cards
from mtnlp.artifacts.run_folder import MODEL_FILE
from mtnlp.data.loaders import JointCollator, joint_dataset, make_collator
from mtnlp.data.tokenize import load_task
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.tiny import tiny_bert, train_wordpiece
from mtnlp.training.args import TrainArguments, parse_args
from mtnlp.training.loop import train
from mtnlp.training.mixing import (
    TaskStreams,
    check_distributed,
    check_joint,
    epoch_length,
    joint_groups,
)
from mtnlp.training.setup import make_schedule
from mtnlp.training.state import Schedule, joint_name
from mtnlp.training.step import joint_forward
from mtnlp.training.weighting import build_weighting
from mtnlp.utils.errors import UserError

WORDS = {"the": ("DT", "B-NP", "O"), "cat": ("NN", "I-NP", "O"), "sat": ("VB", "B-VP", "O")}
NAMES = {"alice": ("NNP", "B-NP", "B-PER"), "bob": ("NNP", "B-NP", "B-PER")}
COLUMNS = "column_names: [tokens, pos_tags, chunk_tags, ner_tags]"
TAGGING = """name: {name}
type: tagging
source:
  local:
    format: conll
    files: {{train: conll/train.txt, validation: conll/dev.txt}}
    {columns}
inputs: [tokens]
label_column: {name}_tags
labels: [{labels}]
metrics: [accuracy]
max_length: {max_length}
"""
LABELS = {"pos": "DT, NN, VB, NNP", "chunk": "B-NP, I-NP, B-VP", "ner": "O, B-PER"}
CLS = """name: cls
type: classification
source:
  local:
    format: tsv
    files: {train: cls/train.tsv, validation: cls/dev.tsv}
inputs: [sentence]
labels: [neg, pos]
metrics: [accuracy]
max_length: 32
"""
TASKS = ["pos", "chunk", "ner"]
GROUP = "pos+chunk+ner"


def sentence(rng: random.Random, size: int) -> list[str]:
    return [rng.choice([*WORDS, *NAMES]) for _ in range(size)]


def write_conll(path: Path, sentences: list[list[str]]) -> None:
    tags = {**WORDS, **NAMES}
    blocks = ["\n".join("\t".join([w, *tags[w]]) for w in words) for words in sentences]
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> tuple[Path, Path]:
    """Cards and data: pos, chunk, ner read one CoNLL file; `ner_short` reads it with a smaller
    max_length (the second sentence, 8 words, is cut); cls reads a TSV file of the same sentences
    in another order (not the same inputs row by row). 16 training rows."""
    root = tmp_path_factory.mktemp("joint")
    cards, data = root / "cards", root / "data"
    for folder in (cards, data / "conll", data / "cls"):
        folder.mkdir(parents=True)
    rng = random.Random(0)
    train = [
        sentence(rng, 3),
        sentence(rng, 8),
        *(sentence(rng, rng.randint(3, 6)) for _ in range(14)),
    ]
    write_conll(data / "conll" / "train.txt", train)
    write_conll(data / "conll" / "dev.txt", [sentence(rng, 4) for _ in range(5)])
    for split, rows in (("train", train[::-1]), ("dev", train[:5])):  # not the same order
        lines = [f"{' '.join(w)}\t{'pos' if 'bob' in w else 'neg'}" for w in rows]
        text = "\n".join(["sentence\tlabel", *lines]) + "\n"
        (data / "cls" / f"{split}.tsv").write_text(text, encoding="utf-8")
    for name in TASKS:
        text = TAGGING.format(name=name, columns=COLUMNS, labels=LABELS[name], max_length=32)
        (cards / f"{name}.yaml").write_text(text, encoding="utf-8")
    short = TAGGING.format(name="ner", columns=COLUMNS, labels=LABELS["ner"], max_length=6)
    (root / "ner_short.yaml").write_text(short.replace("name: ner", "name: ner_short"))
    (cards / "cls.yaml").write_text(CLS, encoding="utf-8")
    return cards, data


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece([" ".join([*WORDS, *NAMES])], vocab_size=60)


def tokenized(cards, data: Path, tokenizer) -> dict:
    return {card.name: load_task(card, tokenizer, [data]).train for card in cards}


# ------------------------------------------------------------------------------ grouping
def test_tasks_with_the_same_inputs_are_grouped(tasks, tokenizer):
    cards_dir, data = tasks
    cards = load_cards([cards_dir], ["cls", *TASKS])
    assert joint_groups(cards, tokenized(cards, data, tokenizer), [data]) == [TASKS]


def test_same_data_tokenized_differently_is_refused(tasks, tokenizer):
    cards_dir, data = tasks
    cards = [*load_cards([cards_dir], ["pos"]), *load_cards([cards_dir.parent / "ner_short.yaml"])]
    pos, short = cards
    with pytest.raises(UserError) as error:
        joint_groups(cards, tokenized(cards, data, tokenizer), [data])
    # the second sentence (line 5 of the file) is the first longer than max_length 6
    assert str(error.value) == (
        f"--batch-mode joint: {pos.where} and {short.where} read the same training inputs, but "
        f"their tokenized inputs differ at {data / 'conll' / 'train.txt'}: line 5 (same "
        "max_length?); use --batch-mode one_task to train them in separate batches"
    )


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"adversarial": True}, "--adversarial"),
        ({"block_sparse": True}, "--block-sparse"),
        ({"sharing": "soft"}, "--sharing soft"),
    ],
)
def test_what_reads_each_forward_pass_is_refused_with_a_group(options, flag):
    with pytest.raises(UserError) as error:
        check_joint(**{"adversarial": False, "block_sparse": False, "sharing": None, **options})
    assert str(error.value) == (
        f"--batch-mode joint: not with {flag} (it needs one task per encoder pass); use "
        "--batch-mode one_task"
    )
    check_joint(adversarial=False, block_sparse=False, sharing=None)


def test_joint_batches_are_refused_under_fsdp():
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    static = build_weighting("static", ["a"], task_types={"a": "classification"})
    with pytest.raises(UserError) as error:
        check_distributed(fsdp, False, static, "static", joint=True)
    assert str(error.value) == "--batch-mode joint: not supported with FSDP (use DDP)"


# ------------------------------------------------------------------------------ one pass
def test_a_joint_batch_is_one_encoder_pass_whose_loss_is_the_sum_of_the_tasks(
    tasks, tokenizer, fresh_accelerate
):
    cards_dir, data = tasks
    cards = load_cards([cards_dir], TASKS)
    train_sets = tokenized(cards, data, tokenizer)
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(tiny_bert(tokenizer), [c.model_spec() for c in cards])
    model.eval()  # dropout off
    # the first 4 sentences, in order
    loader = DataLoader(joint_dataset(train_sets), 4, collate_fn=JointCollator(cards, tokenizer))
    run = SimpleNamespace(
        streams=TaskStreams({GROUP: loader}),
        state=SimpleNamespace(examples=0),
        accelerator=Accelerator(cpu=True),
        unwrapped=model,
    )
    passes = []
    model.get_input_embeddings().register_forward_hook(lambda *args: passes.append(1))
    losses = joint_forward(run, TASKS)
    assert len(passes) == 1 and list(losses) == TASKS
    assert run.state.examples == 4 * 3  # 4 sentences, each trained for 3 tasks

    # the same sentences, each task on its own: its own collator, its own encoder pass
    separate = {}
    for card in cards:
        batch = make_collator(card, tokenizer)([train_sets[card.name][i] for i in range(4)])
        separate[card.name] = model(task=card.name, **batch).loss
    assert len(passes) == 4
    for task in TASKS:
        assert torch.equal(losses[task], separate[task]), task
    weighting = build_weighting("static", TASKS, task_types=dict.fromkeys(TASKS, "tagging"))
    total = weighting.combine(losses)
    assert torch.equal(total, weighting.combine(separate))
    assert torch.equal(total, separate["pos"] + separate["chunk"] + separate["ner"])

    model.train()
    total.backward()
    for task in TASKS:  # every head of the group gets a gradient from the one pass
        assert all(
            p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads[task].parameters()
        )


# ------------------------------------------------------------------------------ sampler
def test_a_group_is_one_task_of_the_sampler(tasks, tmp_path):
    cards = load_cards([tasks[0]], ["cls", *TASKS])
    cards = [
        card.replace(sampling_weight=weight)
        for card, weight in zip(cards, [1, 1, 2, 3], strict=True)
    ]
    args = TrainArguments(
        output_dir=str(tmp_path), batch_mode="joint", sampler="specified", max_steps=5
    )
    groups = {GROUP: tuple(TASKS)}
    loaders = {"cls": range(3), GROUP: range(4)}  # batches per task, per group
    schedule, sampler = make_schedule(args, cards, loaders, 1, groups)
    assert schedule.micro_per_epoch == 7  # one_task would be 3 + 3 x 4
    assert schedule.groups == groups and schedule.syncs_itself
    assert sampler.task_sizes == {"cls": 3, GROUP: 4}
    assert sampler.probabilities() == pytest.approx({"cls": 1 / 7, GROUP: 6 / 7})
    assert epoch_length("joint", {"cls": 3, GROUP: 4}) == 7
    assert joint_name(TASKS) == GROUP
    assert not Schedule(total_steps=1, steps_per_epoch=1, micro_per_epoch=1).syncs_itself


# ------------------------------------------------------------------------------ training
def joint_run(tasks, output: Path, *extra: str) -> dict:
    cards_dir, data = tasks
    argv = [
        "--model", "tiny", "--cards", str(cards_dir), "--data-dir", str(data),
        "--tasks", "cls,pos,chunk,ner", "--output-dir", str(output), "--batch-mode", "joint",
        "--batch-size", "4", "--max-steps", "6", "--gradient-accumulation-steps", "2",
        "--learning-rate", "3e-3", "--log-every", "1", "--seed", "3", *extra,
    ]  # fmt: skip
    args = parse_args(argv)
    reset_accelerate()
    train(args, load_cards(args.cards, args.task_list))
    return json.loads((output / "train_summary.json").read_text())


def test_joint_training_steps_every_head_and_resumes_exactly(tasks, tmp_path, fresh_accelerate):
    output = tmp_path / "out"
    summary = joint_run(tasks, output, "--checkpoint-every", "3")
    steps = summary["task_steps"]
    assert steps["pos"] == steps["chunk"] == steps["ner"] > 0 and steps["cls"] > 0
    assert steps["pos"] + steps["cls"] == 6 * 2  # micro-batches: the group's count once
    final, log = load_file(output / MODEL_FILE), (output / "train_log.jsonl").read_text()
    middle = load_file(output / "checkpoint-3" / MODEL_FILE)
    for task in [*TASKS, "cls"]:  # every head trained after step 3
        head = [name for name in final if name.startswith(f"heads.{task}.")]
        assert head and any(not torch.equal(final[n], middle[n]) for n in head), task

    resumed = joint_run(
        tasks,
        output,
        "--checkpoint-every",
        "3",
        "--resume-from-checkpoint",
        str(output / "checkpoint-3"),
    )
    assert resumed["task_steps"] == steps and resumed["train_examples"] == summary["train_examples"]
    weights = load_file(output / MODEL_FILE)
    for name, value in final.items():
        assert torch.equal(weights[name], value), name
    assert (output / "train_log.jsonl").read_text() == log
