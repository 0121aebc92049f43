"""What made JMT work (Hashimoto et al. 2017; issue 21, item 4): the `ordered` sampler (tasks low
to high within each epoch), `--clip-by-depth` (clipping at --max-grad-norm x min(3, depth)) and
the conll_hierarchical recipe's jmt defaults (ordered, clipping by depth, head learning rate
1e-3), which flags and config values given by the user override."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from tiny_runs import reset_accelerate

from mtnlp import load_cards
from mtnlp.training.samplers import SAMPLERS, build_sampler
from mtnlp.training.setup import (
    depth_clip_scales,
    hierarchy_levels,
    make_schedule,
    warn_short_budget,
)
from mtnlp.training.state import Schedule
from mtnlp.training.step import clip_norm, optimizer_step

from conftest import REPO

sys.path.insert(0, str(REPO / "recipes"))
import conll_hierarchical

# card order ner, pos, chunk; hierarchy pos (stacks on nothing) < chunk < ner
SIZES = {"ner": 1, "pos": 3, "chunk": 2}
LEVELS = {"ner": (2, 6), "pos": (0, 2), "chunk": (1, 4)}
EPOCH = ["pos", "pos", "pos", "chunk", "chunk", "ner"]


def ordered(levels: dict | None = LEVELS):
    return build_sampler("ordered", SIZES, seed=3, task_levels=levels)


def jmt_cards():
    cards = load_cards([conll_hierarchical.CONLL_CARDS], ["pos", "chunk", "ner"])
    return conll_hierarchical.apply_layout(cards, "jmt", 6)


def test_ordered_sampler_is_registered():
    assert "ordered" in SAMPLERS


def test_ordered_sampler_trains_low_to_high_in_every_epoch():
    sampler = ordered()
    assert [sampler.next_task() for _ in range(12)] == EPOCH + EPOCH
    assert sampler.epoch == 2
    assert sampler.probabilities() == {"ner": 1 / 6, "pos": 3 / 6, "chunk": 2 / 6}


def test_ordered_sampler_ties_keep_card_order():
    sampler = ordered({"ner": (0, 6), "pos": (0, 6), "chunk": (0, 2)})
    assert [sampler.next_task() for _ in range(6)] == ["chunk", "chunk", "ner", "pos", "pos", "pos"]


def test_ordered_sampler_resumes_mid_epoch_exactly():
    sampler = ordered()
    assert [sampler.next_task() for _ in range(4)] == EPOCH[:4]
    resumed = ordered()
    resumed.load_state_dict(sampler.state_dict())
    assert [resumed.next_task() for _ in range(8)] == EPOCH[4:] + EPOCH
    assert [sampler.next_task() for _ in range(8)] == EPOCH[4:] + EPOCH


def test_a_budget_shorter_than_an_epoch_warns_with_one_line(caplog):
    sampler = ordered()
    assert sampler.tasks_past(4) == ["ner"]
    assert sampler.tasks_past(3) == ["chunk", "ner"]
    assert sampler.tasks_past(6) == []
    with caplog.at_level(logging.WARNING):
        warn_short_budget("ordered", sampler, Schedule(2, 3, 6, accumulation_steps=2))
        warn_short_budget("ordered", sampler, Schedule(3, 3, 6, accumulation_steps=2))
        warn_short_budget("proportional", build_sampler("proportional", SIZES), Schedule(1, 6, 6))
    assert caplog.messages == [
        "--sampler ordered: 4 micro-batches are less than one epoch (6); ner never trains"
    ]


def test_hierarchy_levels_rank_by_stacking_then_layer():
    cards = jmt_cards()
    layers = {"pos": 2, "chunk": 4, "ner": 6}
    assert hierarchy_levels(cards, layers.__getitem__) == {
        "pos": (0, 2),
        "chunk": (1, 4),
        "ner": (2, 6),
    }
    low = conll_hierarchical.apply_layout(list(reversed(cards)), "low", 6)
    assert hierarchy_levels(low, {"ner": 2, "chunk": 4, "pos": 6}.__getitem__) == {
        "ner": (0, 2),
        "chunk": (0, 4),
        "pos": (0, 6),
    }


def test_make_schedule_gives_the_sampler_the_levels_and_the_clip_scales():
    cards = jmt_cards()
    args = conll_hierarchical.parse_args(
        ["--model", "tiny", "--tasks", "pos,chunk,ner", "--max-steps", "4"],
        defaults=conll_hierarchical.layout_defaults("jmt"),
    )
    loaders = {"pos": range(3), "chunk": range(2), "ner": range(1)}
    levels = {"pos": (0, 2), "chunk": (1, 4), "ner": (2, 6)}
    schedule, sampler = make_schedule(args, cards, loaders, 1, levels=levels)
    assert schedule.clip_scales == {"pos": 1.0, "chunk": 2.0, "ner": 3.0}
    assert [sampler.next_task() for _ in range(6)] == ["pos"] * 3 + ["chunk"] * 2 + ["ner"]
    groups = {"pos+chunk+ner": ("pos", "chunk", "ner")}
    _, joint = make_schedule(args, cards, {"pos+chunk+ner": range(3)}, 1, groups, levels)
    assert joint.task_levels == {"pos+chunk+ner": (0, 2)}


def test_clip_scales_are_min_3_and_the_stack_depth():
    cards = jmt_cards()
    fourth = cards[2].replace(name="srl", stack_on="ner")
    assert depth_clip_scales([*cards, fourth]) == {"pos": 1.0, "chunk": 2.0, "ner": 3.0, "srl": 3.0}
    flat = conll_hierarchical.apply_layout(cards, "flat", 6)
    assert depth_clip_scales(flat) == {"pos": 1.0, "chunk": 1.0, "ner": 1.0}
    schedule = Schedule(1, 1, 1, max_grad_norm=0.5, clip_scales=depth_clip_scales(cards))
    assert [clip_norm(schedule, [task]) for task in ("pos", "chunk", "ner")] == [0.5, 1.0, 1.5]
    assert clip_norm(schedule, ["pos", "chunk"]) == 1.0  # a step of several: the deepest's
    assert clip_norm(Schedule(1, 1, 1, max_grad_norm=0.5), ["ner"]) == 0.5  # off: one norm


@pytest.mark.parametrize(("task", "norm"), [("pos", 0.5), ("chunk", 1.0), ("ner", 1.5)])
def test_optimizer_step_clips_each_task_at_its_depth(task, norm):
    """A gradient of norm 50 (30, 40) is clipped to --max-grad-norm 0.5 x the task's scale."""
    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.tensor([[30.0, 40.0]])
    scales = {"pos": 1.0, "chunk": 2.0, "ner": 3.0}
    run = SimpleNamespace(
        accelerator=accelerator,
        model=model,
        unsynced=[],
        schedule=Schedule(1, 1, 1, max_grad_norm=0.5, clip_scales=scales),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        successive=SimpleNamespace(update=lambda task: None),
    )
    optimizer_step(run, [task])
    expected = torch.tensor([[0.6, 0.8]]) * norm
    torch.testing.assert_close(model.weight.grad, expected)
    reset_accelerate()


def capture_recipe_args(monkeypatch, argv: list[str]):
    captured = {}
    monkeypatch.setattr(conll_hierarchical, "train", lambda args, cards: captured.update(a=args))
    conll_hierarchical.main(argv)
    return captured["a"]


def test_the_jmt_recipe_defaults_reach_the_parsed_arguments(monkeypatch):
    args = capture_recipe_args(monkeypatch, ["--layout", "jmt", "--model", "tiny"])
    assert (args.sampler, args.clip_by_depth, args.head_learning_rate) == ("ordered", True, 1e-3)
    assert (args.learning_rate, args.max_grad_norm) == (5e-5, 1.0)
    flat = capture_recipe_args(monkeypatch, ["--layout", "flat", "--model", "tiny"])
    assert (flat.sampler, flat.clip_by_depth, flat.head_learning_rate) == (
        "proportional",
        False,
        None,
    )


def test_values_the_user_gives_win_over_the_jmt_defaults(monkeypatch, tmp_path: Path):
    flags = ["--sampler", "round_robin", "--no-clip-by-depth", "--head-learning-rate", "2e-4"]
    args = capture_recipe_args(monkeypatch, ["--layout", "jmt", "--model", "tiny", *flags])
    assert (args.sampler, args.clip_by_depth, args.head_learning_rate) == (
        "round_robin",
        False,
        2e-4,
    )
    config = tmp_path / "run.yaml"
    config.write_text("sampler: uniform\nclip_by_depth: false\nhead_learning_rate: 3.0e-4\n")
    argv = ["--layout", "jmt", "--model", "tiny", "--config", str(config)]
    args = capture_recipe_args(monkeypatch, argv)
    assert (args.sampler, args.clip_by_depth, args.head_learning_rate) == ("uniform", False, 3e-4)
