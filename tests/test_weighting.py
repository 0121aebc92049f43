import math

import pytest
import torch
from torch import nn

from mtnlp.training.weighting import (
    WEIGHTINGS,
    build_weighting,
    check_batch_mode,
    project_conflicting,
)
from mtnlp.utils.errors import UserError

TASKS = ["a", "b", "c"]


def test_all_weightings_are_tested():
    assert WEIGHTINGS.names() == ["dwa", "pcgrad", "static", "uncertainty"]


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_combine_is_a_differentiable_scalar(name):
    weighting = build_weighting(name, TASKS, task_types={"a": "regression"})
    losses = {"a": torch.tensor(0.7, requires_grad=True), "c": torch.tensor(1.3)}
    losses["c"] = losses["c"].bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = weighting.combine(losses)
    assert total.shape == () and total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert losses["a"].grad is not None and losses["a"].grad > 0
    assert losses["c"].grad is not None and losses["c"].grad > 0
    assert set(weighting.weights()) == set(TASKS)


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_state_dict_round_trip(name, tmp_path):
    weighting = build_weighting(name, TASKS, static_weights={"a": 2.0}, seed=1)
    with torch.no_grad():
        for parameter in weighting.parameters():
            parameter.add_(torch.tensor([0.5, -1.0, 2.0]))
    weighting.end_epoch({"a": 2.0, "b": 1.0, "c": 1.0})
    weighting.end_epoch({"a": 1.0, "b": 1.0, "c": 3.0})
    torch.save(weighting.state_dict(), tmp_path / "weighting.pt")

    # the loss weights come from the cards, at build; static keeps them in its state as well
    loss_weights = None if name == "static" else {"a": 2.0}
    restored = build_weighting(name, TASKS, static_weights=loss_weights, seed=2)
    fresh_weights = restored.weights()
    restored.load_state_dict(torch.load(tmp_path / "weighting.pt"))
    assert restored.weights() == pytest.approx(weighting.weights())
    if name == "pcgrad":  # its state is the generator of the task order
        expected = torch.randperm(10, generator=weighting.generator)
        assert torch.equal(torch.randperm(10, generator=restored.generator), expected)
    else:
        assert restored.weights() != pytest.approx(fresh_weights)


def test_static_values():
    weighting = build_weighting("static", TASKS, static_weights={"a": 2.0, "c": 0.5})
    assert weighting.weights() == {"a": 2.0, "b": 1.0, "c": 0.5}
    total = weighting.combine(
        {"a": torch.tensor(3.0), "b": torch.tensor(5.0), "c": torch.tensor(4.0)}
    )
    assert total.item() == pytest.approx(2 * 3 + 5 + 0.5 * 4)


def test_static_weights_for_unknown_tasks():
    with pytest.raises(UserError, match=r"static weights for unknown tasks \['x'\]"):
        build_weighting("static", TASKS, static_weights={"x": 1.0})


def test_uncertainty_formula():
    weighting = build_weighting("uncertainty", ["r", "k"], task_types={"r": "regression"})
    with torch.no_grad():
        weighting.log_variances.copy_(torch.tensor([math.log(4.0), math.log(2.0)]))
    assert weighting.weights() == pytest.approx({"r": 0.5 / 4, "k": 1 / 2})
    total = weighting.combine({"r": torch.tensor(8.0), "k": torch.tensor(3.0)})
    expected = (0.5 / 4 * 8 + 0.5 * math.log(4.0)) + (1 / 2 * 3 + 0.5 * math.log(2.0))
    assert total.item() == pytest.approx(expected)


def test_uncertainty_learns_larger_variance_for_noisy_task(one_thread):
    torch.manual_seed(0)
    inputs = torch.randn(256, 4)
    targets = {"clean": inputs @ torch.tensor([1.0, -2.0, 0.5, 3.0]), "noise": torch.randn(256) * 3}
    shared = nn.Linear(4, 8)
    heads = nn.ModuleDict({task: nn.Linear(8, 1) for task in targets})
    types = dict.fromkeys(targets, "regression")
    weighting = build_weighting("uncertainty", list(targets), task_types=types)
    parameters = [*shared.parameters(), *heads.parameters(), *weighting.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=0.05)
    for _ in range(200):
        hidden = shared(inputs)
        losses = {
            task: nn.functional.mse_loss(heads[task](hidden).squeeze(-1), target)
            for task, target in targets.items()
        }
        optimizer.zero_grad()
        weighting.combine(losses).backward()
        optimizer.step()
    clean, noise = weighting.log_variances.tolist()
    # the optimum of 0.5·exp(-s)·L + 0.5·s is s = log L: about log 9 for the noise (variance 9)
    assert noise == pytest.approx(math.log(losses["noise"].item()), abs=0.1)
    assert noise > 2.0 and clean < -1.0
    assert weighting.weights()["noise"] < weighting.weights()["clean"]


def test_dwa_weights_from_epoch_losses():
    weighting = build_weighting("dwa", ["a", "b"], dwa_temperature=2.0)
    assert weighting.weights() == {"a": 1.0, "b": 1.0}
    weighting.end_epoch({"a": 4.0, "b": 2.0})
    assert weighting.weights() == {"a": 1.0, "b": 1.0}
    weighting.end_epoch({"a": 2.0, "b": 2.0})  # ratios r = (0.5, 1.0)
    ea, eb = math.exp(0.5 / 2), math.exp(1.0 / 2)
    expected = {"a": 2 * ea / (ea + eb), "b": 2 * eb / (ea + eb)}
    assert weighting.weights() == pytest.approx(expected)
    total = weighting.combine({"a": torch.tensor(1.0), "b": torch.tensor(3.0)})
    assert total.item() == pytest.approx(expected["a"] + 3 * expected["b"])
    weighting.end_epoch({"a": 3.0})  # b had no batch: it keeps 2.0, r = (1.5, 1.0)
    ea, eb = math.exp(1.5 / 2), math.exp(1.0 / 2)
    assert weighting.weights() == pytest.approx({"a": 2 * ea / (ea + eb), "b": 2 * eb / (ea + eb)})


def test_dwa_temperature_must_be_positive():
    with pytest.raises(UserError, match="dwa_temperature must be > 0"):
        build_weighting("dwa", TASKS, dwa_temperature=0)


def test_project_conflicting_by_hand():
    g1, g2 = torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 0.0])
    # g1·g2 = -1 < 0: g1 - (-1/1) g2 = (0, 1); g2 - (-1/2) g1 = (-0.5, 0.5)
    projected = project_conflicting([g1, g2], [0, 1])
    assert torch.allclose(projected[0], torch.tensor([0.0, 1.0]))
    assert torch.allclose(projected[1], torch.tensor([-0.5, 0.5]))
    assert torch.dot(projected[0], g2) == pytest.approx(0.0)


def test_project_conflicting_keeps_agreeing_gradients():
    g1, g2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.25])  # g1·g2 = 0.5 > 0
    projected = project_conflicting([g1, g2], [1, 0])
    assert torch.equal(projected[0], g1) and torch.equal(projected[1], g2)
    zero = torch.zeros(2)  # a task with no gradient: g·0 = 0, nothing to project (and no 0/0)
    projected = project_conflicting([g1, zero], [0, 1])
    assert torch.equal(projected[0], g1) and torch.equal(projected[1], zero)


def test_project_conflicting_order_matters_for_three_tasks():
    g = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor([-1.0, -1.0])]
    # g0 against g1 first: (1,0) + 0.5(-1,1) = (0.5,0.5); then against g2: -1 -> (0,0)
    assert torch.allclose(project_conflicting(g, [0, 1, 2])[0], torch.tensor([0.0, 0.0]))
    # g0 against g2 first: (1,0) - 0.5(-1,-1)... = (0.5,-0.5); then against g1: -1 -> (0,0)
    assert torch.allclose(project_conflicting(g, [2, 1, 0])[0], torch.tensor([0.0, 0.0]))
    # g1 against g0: (-1,1) + (1,0) = (0,1); then g2: (0,1)·(-1,-1) = -1 -> (0,1) + 0.5(-1,-1)
    assert torch.allclose(project_conflicting(g, [0, 2])[1], torch.tensor([-0.5, 0.5]))
    # g1 against g2 first: (-1,1)·(-1,-1) = 0, kept; then g0: (0,1)
    assert torch.allclose(project_conflicting(g, [2, 0])[1], torch.tensor([0.0, 1.0]))


def test_pcgrad_backward_writes_projected_grads():
    shared = nn.Parameter(torch.tensor([1.0, 1.0]))
    head_a, head_b = nn.Parameter(torch.tensor(2.0)), nn.Parameter(torch.tensor(3.0))
    # dL_a/dshared = (1, 1), dL_b/dshared = (-1, 0): the hand example above
    losses = {"a": shared.sum() * head_a / 2, "b": -shared[0] * head_b / 3}
    weighting = build_weighting("pcgrad", ["a", "b"])
    calls = []

    def backward_fn(loss):
        calls.append(loss)
        loss.backward()

    total = weighting.backward(losses, [shared], backward_fn)
    assert len(calls) == 1
    assert total.item() == pytest.approx(2 * 1 - 1) and not total.requires_grad
    assert torch.allclose(shared.grad, torch.tensor([0.0 - 0.5, 1.0 + 0.5]))
    # task-specific parameters get their ordinary gradients
    assert head_a.grad.item() == pytest.approx(2 / 2)
    assert head_b.grad.item() == pytest.approx(-1 / 3)

    # a second micro-batch accumulates into .grad (gradient accumulation)
    losses = {"a": shared.sum() * head_a / 2, "b": -shared[0] * head_b / 3}
    weighting.backward(losses, [shared], backward_fn)
    assert torch.allclose(shared.grad, 2 * torch.tensor([-0.5, 1.5]))
    assert head_b.grad.item() == pytest.approx(-2 / 3)


def test_pcgrad_backward_matches_projection_on_a_tiny_model():
    torch.manual_seed(0)
    encoder = nn.Linear(3, 4)
    heads = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    with torch.no_grad():  # nearly opposite heads: the tasks' encoder gradients conflict
        heads["b"].weight.copy_(-heads["a"].weight + 0.3 * torch.randn(1, 4))
    inputs = torch.randn(8, 3)
    weighting = build_weighting("pcgrad", ["a", "b"], seed=5)

    def losses():
        hidden = encoder(inputs)
        return {task: head(hidden).mean() for task, head in heads.items()}

    shared = list(encoder.parameters())
    per_task = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses().values()]
    flat = [torch.cat([g.flatten() for g in grads]) for grads in per_task]
    assert torch.dot(*flat) < 0  # the tasks conflict
    order = torch.randperm(2, generator=torch.Generator().manual_seed(5)).tolist()
    expected = sum(project_conflicting(flat, order))

    weighting.backward(losses(), shared, lambda loss: loss.backward())
    written = torch.cat([p.grad.flatten() for p in shared])
    assert torch.allclose(written, expected, atol=1e-6)
    assert not torch.allclose(written, sum(flat), atol=1e-3)


def test_check_batch_mode():
    pcgrad = build_weighting("pcgrad", TASKS)
    check_batch_mode(pcgrad, "all_tasks")
    check_batch_mode(build_weighting("static", TASKS), "one_task")
    message = (
        "loss weighting 'pcgrad' needs --batch-mode all_tasks "
        "(it compares the gradients of several tasks in one step)"
    )
    with pytest.raises(UserError) as error:
        check_batch_mode(pcgrad, "one_task")
    assert str(error.value) == message


def test_unknown_name_lists_known():
    with pytest.raises(UserError, match="unknown loss weighting 'gradnorm'; known: dwa, pcgrad"):
        build_weighting("gradnorm", TASKS)


@pytest.mark.parametrize("loss_scale", [1.0, 1024.0])
def test_pcgrad_takes_task_gradients_at_the_fp16_loss_scale(loss_scale):
    """fp16 activations: task gradients of 1e-8 underflow unless taken of the scaled loss, as the
    grad scaler does for the ordinary backward; PCGrad's projection must see them too."""
    shared = nn.Parameter(torch.tensor([1.0, 1.0]))  # fp32 master weights
    tiny = torch.tensor(1e-4, dtype=torch.float16)

    def losses():
        h = shared.half() * tiny  # fp16 activations, as under fp16 autocast
        # dL_a/dshared = (1, 1) 1e-8, dL_b/dshared = (-1, 0) 1e-8: the hand example, scaled
        return {"a": h.sum() * tiny, "b": -h[0] * tiny}

    weighting = build_weighting("pcgrad", ["a", "b"])
    # accelerate's backward with a GradScaler: backward of the scaled loss, unscaled afterwards
    scaled_backward = lambda loss: (loss * 1024.0).backward()  # noqa: E731
    weighting.backward(losses(), [shared], scaled_backward, loss_scale=loss_scale)
    written = shared.grad / 1024.0
    projected = torch.tensor([-0.5, 1.5]) * 1e-8
    plain_sum = torch.tensor([0.0, 1.0]) * 1e-8  # what an underflowed projection leaves
    expected = projected if loss_scale > 1 else plain_sum
    assert torch.allclose(written, expected, rtol=0.02, atol=1e-11)
