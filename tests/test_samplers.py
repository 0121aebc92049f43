import json
from collections import Counter
from itertools import islice

import numpy as np
import pytest

from mtnlp.training.samplers import SAMPLERS, build_sampler
from mtnlp.utils.errors import UserError

SIZES = {"a": 100, "b": 30, "c": 10}
OPTIONS = {"sampling_weights": {"a": 1.0, "b": 2.0, "c": 5.0}, "temperature": 2.0}
STOCHASTIC = ["annealed", "proportional", "specified", "temperature", "uniform"]


def expected_shares(name: str) -> list[float]:
    """The formula of each sampler, written out by hand for SIZES and OPTIONS (one epoch: E=1)."""
    sizes = np.array([100, 30, 10], dtype=float)
    weights = {
        "sequential": sizes,
        "ordered": sizes,
        "round_robin": np.ones(3),
        "proportional": sizes,
        "uniform": np.ones(3),
        "temperature": sizes**0.5,
        "annealed": sizes,
        "specified": np.array([1.0, 2.0, 5.0]),
    }[name]
    return (weights / weights.sum()).tolist()


def test_all_samplers_are_tested():
    assert SAMPLERS.names() == sorted(["ordered", "round_robin", "sequential", *STOCHASTIC])


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_frequencies_match_formula(name):
    sampler = build_sampler(name, SIZES, **OPTIONS)
    counts = Counter(islice(sampler, 10_000))
    expected = expected_shares(name)
    frequencies = [counts[task] / 10_000 for task in SIZES]
    assert frequencies == pytest.approx(expected, abs=0.02)
    assert list(sampler.probabilities().values()) == pytest.approx(expected, abs=1e-12)


def test_sequential_order():
    sampler = build_sampler("sequential", {"a": 3, "b": 1, "c": 2})
    assert sampler.epoch_length == 6
    draws = [sampler.next_task() for _ in range(12)]
    assert draws == list("aaabcc") * 2
    assert sampler.epoch == 2


def test_round_robin_order_cycles_small_tasks():
    sampler = build_sampler("round_robin", {"a": 3, "b": 1, "c": 2})
    assert [sampler.next_task() for _ in range(8)] == list("abcabcab")


def test_temperature_limits():
    proportional = build_sampler("proportional", SIZES).probabilities()
    assert build_sampler("temperature", SIZES, temperature=1.0).probabilities() == pytest.approx(
        proportional
    )
    hot = build_sampler("temperature", SIZES, temperature=1e6).probabilities()
    assert list(hot.values()) == pytest.approx([1 / 3] * 3, abs=1e-5)


def test_annealed_alpha_over_epochs():
    sizes = {"a": 4, "b": 1}
    sampler = build_sampler("annealed", sizes, num_epochs=3)
    alphas, probabilities = [], []
    for _ in range(4):  # one past num_epochs: alpha stays at its final 0.2
        alphas.append(sampler.alpha())
        probabilities.append(sampler.probabilities()["a"])
        for _ in range(sampler.epoch_length):
            sampler.next_task()
    assert alphas == pytest.approx([1.0, 0.6, 0.2, 0.2])
    assert probabilities == pytest.approx(
        [4 / 5, 4**0.6 / (4**0.6 + 1), 4**0.2 / (4**0.2 + 1), 4**0.2 / (4**0.2 + 1)]
    )
    assert build_sampler("annealed", sizes, num_epochs=1).alpha() == 1.0


def test_examples_cap():
    capped = build_sampler("proportional", SIZES, examples_cap=30)
    assert capped.probabilities() == pytest.approx({"a": 30 / 70, "b": 30 / 70, "c": 10 / 70})
    assert capped.epoch_length == 140  # the cap changes probabilities, not the epoch
    temperature = build_sampler("temperature", SIZES, examples_cap=30, temperature=2.0)
    root = [30**0.5, 30**0.5, 10**0.5]
    assert list(temperature.probabilities().values()) == pytest.approx(
        [r / sum(root) for r in root]
    )


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_same_seed_same_sequence(name):
    first = list(islice(build_sampler(name, SIZES, seed=7, **OPTIONS), 1000))
    second = list(islice(build_sampler(name, SIZES, seed=7, **OPTIONS), 1000))
    assert first == second
    other = list(islice(build_sampler(name, SIZES, seed=8, **OPTIONS), 1000))
    assert (other != first) == (name in STOCHASTIC)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_resume_continues_exactly(name):
    options = {**OPTIONS, "seed": 3, "num_epochs": 5}
    sizes = {"a": 100, "b": 30, "c": 10}  # epochs of 140 draws: resume crosses epoch boundaries
    uninterrupted = build_sampler(name, sizes, **options)
    expected = list(islice(uninterrupted, 637))[137:]

    interrupted = build_sampler(name, sizes, **options)
    list(islice(interrupted, 137))
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = build_sampler(name, sizes, **options)
    resumed.load_state_dict(state)
    assert resumed.epoch == 0 and resumed.draws == 137
    assert list(islice(resumed, 500)) == expected


def test_state_for_other_tasks_is_refused():
    state = build_sampler("uniform", SIZES).state_dict()
    with pytest.raises(UserError, match="sampler state is for tasks"):
        build_sampler("uniform", {"a": 1, "b": 2}).load_state_dict(state)


def test_unknown_name_lists_known():
    with pytest.raises(
        UserError, match="unknown sampler 'nope'; known: annealed, ordered, proportional"
    ):
        build_sampler("nope", SIZES)


@pytest.mark.parametrize(
    ("sizes", "options", "message"),
    [
        ({}, {}, "no training tasks"),
        ({"a": 3, "b": 0}, {}, "task 'b' has 0 training batches"),
        (SIZES, {"temperature": 0}, "temperature must be > 0"),
        (SIZES, {"examples_cap": -1}, "examples_cap must be > 0"),
        (SIZES, {"num_epochs": 0}, "num_epochs must be >= 1"),
    ],
)
def test_bad_options(sizes, options, message):
    with pytest.raises(UserError, match=message):
        build_sampler("proportional", sizes, **options)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (None, r"missing \['a', 'b', 'c'\]"),
        ({"a": 1.0, "b": 1.0}, r"missing \['c'\]"),
        ({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, r"unknown \['d'\]"),
        ({"a": 0.0, "b": 0.0, "c": 0.0}, "not all 0"),
        ({"a": 1.0, "b": -1.0, "c": 1.0}, "must be >= 0"),
    ],
)
def test_specified_needs_valid_weights(weights, message):
    with pytest.raises(UserError, match=message):
        build_sampler("specified", SIZES, sampling_weights=weights)


def test_specified_zero_weight_task_is_never_drawn():
    sampler = build_sampler("specified", SIZES, sampling_weights={"a": 1, "b": 0, "c": 1})
    assert "b" not in set(islice(sampler, 1000))
