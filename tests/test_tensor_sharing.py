"""Tensor-factorised task columns (`--sharing tensor`, Yang & Hospedales 2017): the truncated
HOSVD, the start at the pretrained function, the parameter count, which parameters a task's loss
moves, save/load, MT-DNN's fine-tuning stage and the flags."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.sharing import SharingMismatch, TensorSharing, truncated_hosvd
from mtnlp.modeling.sharing.tensor import (
    TaskSliceLinear,
    TuckerWeight,
    tucker_parameter_count,
    tucker_to_tensor,
)
from mtnlp.training.args import parse_args, sharing_mismatch_error
from mtnlp.training.setup import pretrained_parameters

from conftest import TINY_TASKS

TASKS = [spec["name"] for spec in TINY_TASKS]  # cls, reg, tag
HIDDEN, INNER, VOCAB, BATCH, TOKENS = 32, 64, 100, 3, 7
LINEARS = (
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense",
)  # fmt: skip


def tiny_encoder() -> BertModel:
    """3 layers: with the top 2 per task, one shared layer stays below the columns."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=INNER, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertModel(config, add_pooling_layer=False)


def build(sharing: dict | None = None, tasks: list[dict] = TINY_TASKS) -> MultiTaskModel:
    torch.manual_seed(1)
    return MultiTaskModel.from_encoder(tiny_encoder(), tasks, sharing=sharing).eval()


def tensor(**options) -> MultiTaskModel:
    return build({"name": "tensor", **options})


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[0, 5:] = 0
    return {"input_ids": torch.randint(5, VOCAB, (BATCH, TOKENS)), "attention_mask": mask}


def logits(model: MultiTaskModel, inputs, tasks=TASKS) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {t: out.logits for t, out in model.forward_tasks(tasks, **inputs).items()}


def column_states(model: MultiTaskModel, inputs) -> dict[str, torch.Tensor]:
    """Each task's states at the top of its column."""
    with torch.no_grad():
        top = {task: 3 for task in TASKS}
        return model.sharing.encode(model.encoder, top, inputs).states


# ------------------------------------------------------------------------------ HOSVD
def test_truncated_hosvd_reconstructs_a_low_rank_tensor_exactly():
    torch.manual_seed(0)
    core = torch.randn(2, 3, 4, dtype=torch.float64)
    factors = [
        torch.randn(size, rank, dtype=torch.float64) for size, rank in ((5, 2), (6, 3), (7, 4))
    ]
    low_rank = tucker_to_tensor(core, factors)  # (5, 6, 7) of multilinear rank (2, 3, 4)
    found_core, found = truncated_hosvd(low_rank, (2, 3, 4))
    assert found_core.shape == (2, 3, 4) and [f.shape for f in found] == [(5, 2), (6, 3), (7, 4)]
    for factor in found:  # orthonormal columns
        torch.testing.assert_close(
            factor.T @ factor, torch.eye(factor.shape[1], dtype=torch.float64)
        )
    torch.testing.assert_close(tucker_to_tensor(found_core, found), low_rank, rtol=0, atol=1e-10)
    # one rank short in the input mode: only an approximation
    short_core, short = truncated_hosvd(low_rank, (2, 2, 4))
    assert (tucker_to_tensor(short_core, short) - low_rank).abs().max() > 1e-3
    # a rank past the unfolding's rank count: zero columns
    _, (task, _, _) = truncated_hosvd(low_rank[:2], (3, 3, 4))
    assert task.shape == (2, 3) and task[:, 2].abs().sum() == 0


# ------------------------------------------------------------------------------ the start
@pytest.mark.parametrize("ranks", [(1, 2, 2), (2, 16, 16), (3, HIDDEN, HIDDEN)])
def test_every_task_starts_at_the_pretrained_layer(ranks, inputs):
    rank_task, rank_in, rank_out = ranks
    model = tensor(rank_task=rank_task, rank_in=rank_in, rank_out=rank_out)
    top = model.encoder.encoder.layer[1:]
    for layer in (0, 1):
        for name in LINEARS:
            pretrained = top[layer].get_submodule(name)
            weights = model.sharing.factors[f"{layer}-{name.replace('.', '-')}"]
            for index, task in enumerate(TASKS):
                sliced = model.sharing.column[task][layer].get_submodule(name)
                assert isinstance(sliced, TaskSliceLinear) and sliced.task == index
                torch.testing.assert_close(
                    weights.weight(index), pretrained.weight, rtol=0, atol=1e-6
                )
                assert torch.equal(sliced.bias, pretrained.bias)
    # the same logits as hard sharing with the same heads (the columns are the encoder's top)
    hard = build()
    hard.heads.load_state_dict(model.heads.state_dict())
    expected, got = logits(hard, inputs), logits(model, inputs)
    for task in TASKS:
        torch.testing.assert_close(got[task], expected[task], rtol=0, atol=1e-5)


def test_the_factors_are_the_truncated_hosvd_and_the_residual_the_rest():
    torch.manual_seed(0)
    pretrained = torch.randn(8, 6)  # nn.Linear's (d_out, d_in)
    weights = TuckerWeight(tasks=3, d_in=6, d_out=8, ranks=(2, 3, 4))
    weights.factorise(pretrained)
    # the input and output factors span W's leading singular subspaces
    left, _, right_t = torch.linalg.svd(pretrained)
    projection = left[:, :4] @ left[:, :4].T @ pretrained @ right_t[:3].T @ right_t[:3]
    approximation = pretrained - weights.residual.detach()
    torch.testing.assert_close(approximation, projection, rtol=0, atol=1e-5)
    # task mode of rank 1: a constant first column, nothing in the core past its first slice
    task = weights.task_factor.detach()
    torch.testing.assert_close(task[:, 0].abs(), torch.full((3,), 3**-0.5))
    assert weights.core.detach()[1:].abs().max() < 1e-5
    # full ranks: the factors alone give W
    full = TuckerWeight(tasks=3, d_in=6, d_out=8, ranks=(1, 6, 6))
    full.factorise(pretrained)
    assert full.residual.detach().abs().max() < 1e-5


# ------------------------------------------------------------------------------ parameters
def test_parameter_counts_against_hard_sharing_and_full_columns():
    model = tensor(rank_task=2, rank_in=4, rank_out=8)
    shapes = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, INNER), (INNER, HIDDEN)]  # (d_in, d_out)
    per_layer = sum(tucker_parameter_count(3, d_in, d_out, (2, 4, 8)) for d_in, d_out in shapes)
    layer_norms = 3 * 2 * 2 * HIDDEN  # each task's two LayerNorms
    assert (
        tucker_parameter_count(3, 32, 64, (2, 4, 8))
        == 2 * 4 * 8 + 3 * 2 + 32 * 4 + 64 * 8 + 32 * 64 + 3 * 64
    )
    counts = model.sharing.parameter_counts()
    assert counts["tensor"] == 2 * (per_layer + layer_norms) == 24_712
    assert counts["hard"] == 2 * (
        4 * (HIDDEN * HIDDEN + HIDDEN) + 2 * HIDDEN * INNER + INNER + HIDDEN + 4 * HIDDEN
    )
    assert counts == {"hard": 17_088, "columns": 51_264, "tensor": 24_712}
    assert counts["tensor"] == sum(p.numel() for p in model.sharing.parameters())


def test_setup_logs_the_counts(caplog):
    with caplog.at_level("INFO", logger="mtnlp.modeling.sharing.tensor"):
        tensor(rank_task=2, rank_in=4, rank_out=8)
    assert caplog.messages == [
        "--sharing tensor: 24,712 parameters in the top 2 layers (hard sharing: 17,088, full "
        "columns: 51,264)"
    ]


def test_the_factors_train_as_pretrained_parameters():
    model = tensor()
    pretrained = {id(p) for p in pretrained_parameters(model)}
    assert all(id(p) in pretrained for p in model.sharing.parameters())
    assert not any(id(p) in pretrained for p in model.heads.parameters())


# ------------------------------------------------------------------------------ training
def test_a_step_on_one_task_moves_its_slice_and_the_shared_factors(inputs):
    model = tensor(rank_task=3, rank_in=8, rank_out=8).train()
    before = {name: p.detach().clone() for name, p in model.sharing.named_parameters()}
    start = column_states(model, inputs)
    torch.testing.assert_close(start["reg"], start["cls"], rtol=0, atol=1e-6)  # equal columns
    labels = torch.tensor([0, 1, 1])
    model(task="cls", labels=labels, **inputs).loss.backward()
    for name, weights in model.sharing.factors.items():
        rows = weights.task_factor.grad
        assert rows[0].abs().sum() > 0 and rows[1:].abs().sum() == 0, name  # cls is task 0
        for part in (weights.core, weights.input_factor, weights.output_factor, weights.residual):
            assert part.grad.abs().sum() > 0, name
    for task in ("reg", "tag"):  # their biases and layer norms did not run
        assert all(p.grad is None for p in model.sharing.column[task].parameters())
    assert all(p.grad is not None for p in model.sharing.column["cls"].parameters())
    with torch.no_grad():
        for p in model.sharing.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    after = dict(model.sharing.named_parameters())
    for name, value in before.items():
        kept = name.startswith(("column.reg.", "column.tag."))
        assert torch.equal(after[name], value) == kept, name
        if name.endswith("task_factor"):
            assert torch.equal(after[name][1:], value[1:]) and not torch.equal(
                after[name][0], value[0]
            )
    model.eval()
    states = column_states(model, inputs)
    assert not torch.allclose(states["cls"], states["reg"], atol=1e-4)  # the tasks now differ
    torch.testing.assert_close(states["reg"], states["tag"])  # untouched rows, same weights


def test_bf16_autocast(inputs):
    model = tensor()
    expected = logits(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = logits(model, inputs)
    for task in TASKS:
        torch.testing.assert_close(got[task].float(), expected[task], rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------------ save / load
def test_save_and_load_round_trip(inputs, tmp_path):
    model = tensor(rank_task=2, rank_in=4, rank_out=8)
    with torch.no_grad():
        for parameter in model.sharing.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    loaded = MultiTaskModel.from_pretrained(tmp_path).eval()
    assert loaded.config.sharing == {
        "name": "tensor", "layers": 2, "rank_task": 2, "rank_in": 4, "rank_out": 8,
    }  # fmt: skip
    assert isinstance(loaded.sharing, TensorSharing)
    expected, got = logits(model, inputs), logits(loaded, inputs)
    for task in TASKS:
        torch.testing.assert_close(got[task], expected[task], rtol=0, atol=1e-6)


def test_finetuning_one_task_keeps_its_function(inputs):
    """MT-DNN's fine-tuning stage: one task, the same flags (a task rank above one task)."""
    model = tensor(rank_task=2, rank_in=4, rank_out=4)
    with torch.no_grad():
        for parameter in model.sharing.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    sharing = model.config.sharing
    alone = MultiTaskModel.from_multitask(model, [TINY_TASKS[1]], sharing).eval()
    assert alone.sharing.factors["0-output-dense"].task_factor.shape == (1, 2)
    expected = logits(model, inputs, ["reg"])["reg"]
    torch.testing.assert_close(logits(alone, inputs, ["reg"])["reg"], expected, rtol=0, atol=1e-6)
    # a task the trained model lacks starts at the mean of the trained tasks' rows
    renamed = {**TINY_TASKS[0], "name": "new"}
    grown = MultiTaskModel.from_multitask(model, [TINY_TASKS[0], renamed], sharing)
    for name, weights in grown.sharing.factors.items():
        old = model.sharing.factors[name].task_factor
        assert torch.equal(weights.task_factor[0], old[0])
        torch.testing.assert_close(weights.task_factor[1], old.mean(0))


def test_other_ranks_refuse_the_trained_columns():
    model = tensor(rank_in=4)
    with pytest.raises(SharingMismatch) as error:
        MultiTaskModel.from_multitask(model, TINY_TASKS, {"name": "tensor", "rank_in": 8})
    assert str(sharing_mismatch_error(error.value)) == (
        "--sharing: --model was trained with --sharing tensor --sharing-layers 2 "
        "--tensor-rank-task 2 --tensor-rank-in 4 --tensor-rank-out 16, this run asks for "
        "--sharing tensor --sharing-layers 2 --tensor-rank-task 2 --tensor-rank-in 8 "
        "--tensor-rank-out 16; give the same flags to keep its task columns"
    )


def test_flags_set_the_ranks():
    args = parse_args(
        ["--model", "tiny", "--sharing", "tensor", "--sharing-layers", "1", "--tensor-rank-task",
         "3", "--tensor-rank-in", "8", "--tensor-rank-out", "4"]
    )  # fmt: skip
    assert args.sharing_config == {
        "name": "tensor", "layers": 1, "rank_task": 3, "rank_in": 8, "rank_out": 4,
    }  # fmt: skip
    assert parse_args(["--model", "tiny", "--sharing", "tensor"]).sharing_config == {
        "name": "tensor", "layers": 2, "rank_task": 2, "rank_in": 16, "rank_out": 16,
    }  # fmt: skip
