"""Sharing strategies, block-sparse and adversarial regularizers, task affinity diagnostics."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

from mtnlp.artifacts.affinity import AFFINITY_PLOT, mean_affinity, write_heatmap
from mtnlp.modeling.heads import IGNORE_INDEX
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.sharing import (
    SHARING,
    SharingConfig,
    SharingMismatch,
    l2_distance_penalty,
    orthogonality_penalty,
    resolve_sharing,
    trace_norm_penalty,
)
from mtnlp.modeling.sharing.columns import SluiceSharingConfig, carry_mixing
from mtnlp.training.affinity import measure_affinity
from mtnlp.training.args import sharing_mismatch_error
from mtnlp.training.regularizers import (
    RunRegularizers,
    block_sparse_penalty,
    head_feature_weights,
    mixed_norm,
    reverse_gradient,
)
from mtnlp.utils.errors import UserError

from conftest import TINY_TASKS

STRATEGIES = ["hard", "soft", "cross_stitch", "sluice"]
TASKS = [spec["name"] for spec in TINY_TASKS]
BATCH, TOKENS, VOCAB = 3, 7, 100


def tiny_encoder() -> BertModel:
    """3 layers: with the top 2 per task, one shared layer stays below the columns."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return BertModel(config, add_pooling_layer=False)


def build(strategy: str, **options) -> MultiTaskModel:
    sharing = None if strategy == "hard" else {"name": strategy, **options}
    torch.manual_seed(1)
    return MultiTaskModel.from_encoder(tiny_encoder(), TINY_TASKS, sharing=sharing)


def labels_for(model: MultiTaskModel, task: str) -> torch.Tensor:
    spec = model.config.task(task)
    if spec["type"] == "tagging":
        labels = torch.randint(0, len(spec["labels"]), (BATCH, TOKENS))
        labels[:, 0] = IGNORE_INDEX  # [CLS]
        return labels
    if spec["type"] == "classification":
        return torch.randint(0, len(spec["labels"]), (BATCH,))
    return torch.rand(BATCH) * 5


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[0, 5:] = 0  # one padded sequence
    return {"input_ids": torch.randint(5, VOCAB, (BATCH, TOKENS)), "attention_mask": mask}


def logits(model: MultiTaskModel, inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {task: out.logits for task, out in model.forward_tasks(TASKS, **inputs).items()}


# ------------------------------------------------------------------------------ strategies
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forward_backward(strategy, inputs):
    model = build(strategy).train()
    labels = {task: labels_for(model, task) for task in TASKS}
    outputs = model.forward_tasks(TASKS, labels=labels, **inputs)
    loss = sum(output.loss for output in outputs.values()) + model.regularization_loss()
    assert torch.isfinite(loss)
    loss.backward()
    assert model.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    for task in TASKS:
        assert model.heads[task].out.weight.grad.abs().sum() > 0
    own = [p for p in model.sharing.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)
    assert (len(own) == 0) == (strategy == "hard")


def test_columns_start_from_the_pretrained_top_layers():
    model = build("soft")
    top = model.encoder.encoder.layer[1:].state_dict()
    for task in TASKS:
        column = model.sharing.column[task].state_dict()
        assert all(torch.equal(column[name], top[name]) for name in top)


def test_soft_runs_only_the_requested_columns(inputs):
    model = build("soft").train()
    model(task="cls", labels=labels_for(model, "cls"), **inputs).loss.backward()
    grads = {t: [p.grad for p in model.sharing.column[t].parameters()] for t in TASKS}
    assert all(g is not None for g in grads["cls"])
    assert all(g is None for g in grads["reg"] + grads["tag"])


def test_cross_stitch_at_identity_equals_independent_columns(inputs):
    stitched = build("cross_stitch", init=1.0).eval()
    with torch.no_grad():  # columns that differ, as after training
        for parameter in stitched.sharing.column.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    independent = build("soft").eval()
    missing, _ = independent.load_state_dict(stitched.state_dict(), strict=False)
    assert missing == []
    expected, got = logits(independent, inputs), logits(stitched, inputs)
    assert all(torch.allclose(got[t], expected[t], atol=1e-6) for t in TASKS)
    mixed = build("cross_stitch").eval()  # 0.9 / 0.05 mixing: the tasks' columns interact
    mixed.load_state_dict({k: v for k, v in stitched.state_dict().items() if "stitch" not in k},
                          strict=False)  # fmt: skip
    assert not torch.allclose(logits(mixed, inputs)["cls"], expected["cls"], atol=1e-4)


def test_sluice_mixing_starts_near_identity_and_top_beta():
    model = build("sluice", subspaces=4)
    alpha, beta = model.sharing.alpha.detach(), model.sharing.beta.detach()
    assert alpha.shape == (2, 12, 12) and beta.shape == (3, 3)
    assert torch.allclose(alpha[0].sum(1), torch.ones(12))  # rows sum to 1
    assert alpha[0, 0, 0] == pytest.approx(0.9) and alpha[0, 0, 1] == 0  # subspace k with k
    assert alpha[0, 0, 4] == pytest.approx(0.05)  # task 0 subspace 0 <- task 1 subspace 0
    assert beta[:, -1].tolist() == [1.0, 1.0, 1.0] and beta[:, :-1].abs().sum() == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_save_load_round_trip(strategy, inputs, tmp_path):
    model = build(strategy).eval()
    with torch.no_grad():  # move every learned parameter away from its initial value
        for parameter in model.sharing.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    loaded = MultiTaskModel.from_pretrained(tmp_path).eval()
    assert loaded.config.sharing == resolve_sharing(model.config.sharing)
    assert type(loaded.sharing) is SHARING.get(strategy)
    expected, got = logits(model, inputs), logits(loaded, inputs)
    assert all(torch.allclose(got[t], expected[t], atol=1e-6) for t in TASKS)


def test_options_are_stored_in_full_and_checked():
    assert build("soft").config.sharing == {
        "name": "soft", "layers": 2, "penalty": "l2", "weight": 0.01,
    }  # fmt: skip
    with pytest.raises(UserError, match="sharing: depth: not an option of soft"):
        build("soft", depth=1)
    with pytest.raises(UserError, match=r"--sharing-layers: 4 .* \(1\.\.3\)"):
        build("cross_stitch", layers=4)
    with pytest.raises(UserError, match="--soft-penalty: 'l1'"):
        build("soft", penalty="l1")
    with pytest.raises(UserError, match="--sluice-subspaces: 5 does not divide"):
        build("sluice", subspaces=5)


def test_each_strategy_registers_a_typed_config_class():
    for name in STRATEGIES:
        config_class = SHARING.get(name).config_class
        assert issubclass(config_class, SharingConfig)
        assert dataclasses.is_dataclass(config_class)
    assert SHARING.get("hard").config_class.option_names() == ()
    assert SHARING.get("soft").config_class.shape_options() == ("layers",)
    assert SluiceSharingConfig.shape_options() == ("layers", "subspaces")
    # the options in field order, as config.json stores them (keys and values unchanged)
    assert resolve_sharing({"lr_scale": 1, "name": "sluice"}) == {
        "name": "sluice", "layers": 2, "subspaces": 2, "orthogonality_weight": 1e-4,
        "init": 0.9, "lr_scale": 1,
    }  # fmt: skip
    assert list(resolve_sharing({"name": "cross_stitch"})) == ["name", "layers", "init", "lr_scale"]
    assert resolve_sharing(None) is None and resolve_sharing({"name": "hard"}) is None
    with pytest.raises(UserError, match=r"^sharing: layers: not an option of hard \(none\)$"):
        resolve_sharing({"name": "hard", "layers": 2})
    model = build("sluice", subspaces=4)
    assert model.sharing.config == SluiceSharingConfig(subspaces=4)
    assert model.sharing.options == {k: v for k, v in model.config.sharing.items() if k != "name"}


def test_a_not_bert_like_encoder_is_a_user_error():
    config = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    with pytest.raises(UserError, match="--sharing soft: needs a BERT-like encoder"):
        MultiTaskModel.from_encoder(DistilBertModel(config), TINY_TASKS, sharing={"name": "soft"})


def test_low_supervision_task_reads_the_shared_bottom(inputs):
    specs = [dict(TINY_TASKS[0], layer=1), TINY_TASKS[1]]
    model = MultiTaskModel.from_encoder(tiny_encoder(), specs, sharing={"name": "soft"}).eval()
    hidden = model.encode(["cls", "reg"], **inputs)
    with torch.no_grad():
        states = model.encoder(**inputs, output_hidden_states=True).hidden_states
    assert torch.allclose(hidden["cls"], states[1], atol=1e-6)  # shared layer 1
    assert torch.allclose(hidden["reg"], states[3], atol=1e-5)  # its column = pretrained top


# ------------------------------------------------------------------------------ penalties
def test_l2_distance_penalty():
    stacked = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    assert l2_distance_penalty(stacked).item() == pytest.approx(8 + 5 + 25)  # the three pairs


def test_trace_norm_penalty_and_its_gradient_at_identical_tasks():
    assert trace_norm_penalty(torch.tensor([[3.0, 0.0], [0.0, 4.0]])).item() == pytest.approx(7)
    same = torch.ones(3, 2, 2, requires_grad=True)  # rank one: singular values 2*sqrt(3), 0, 0
    penalty = trace_norm_penalty(same)
    assert penalty.item() == pytest.approx(2 * 3**0.5, rel=1e-5)
    penalty.backward()
    assert torch.isfinite(same.grad).all()


def test_soft_regularization_loss():
    model = build("soft", penalty="l2", weight=0.5, layers=1)
    assert model.regularization_loss().item() == pytest.approx(0, abs=1e-10)  # equal columns
    with torch.no_grad():  # a change of norm 5 in one task's column: two pairs differ by it
        model.sharing.column["cls"][0].output.dense.bias[:2] += torch.tensor([3.0, 4.0])
    assert model.regularization_loss().item() == pytest.approx(0.5 * 2 * 25, rel=1e-4)
    model = build("soft", penalty="trace", weight=0.5, layers=1)
    parameters = list(model.sharing.column["cls"].parameters())
    rank_one = sum(3**0.5 * p.norm() for p in parameters)  # three equal rows: sqrt(3) ||W||
    assert model.regularization_loss().item() == pytest.approx(0.5 * rank_one.item(), rel=1e-4)


def test_orthogonality_penalty():
    orthogonal = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]])  # (tokens=2, K=2, d=1)
    assert orthogonality_penalty(orthogonal).item() == 0
    aligned = torch.tensor([[[1.0], [2.0]], [[1.0], [2.0]]])  # G1^T G2 / n = 4 / 2
    assert orthogonality_penalty(aligned).item() == pytest.approx(4.0)
    three = torch.ones(2, 3, 1)  # three pairs, each (2 / 2)^2
    assert orthogonality_penalty(three).item() == pytest.approx(3.0)


def test_sluice_regularization_loss_is_taken_once(inputs):
    model = build("sluice", orthogonality_weight=0.5).train()
    model(task="cls", **inputs)
    first = model.regularization_loss()
    assert isinstance(first, torch.Tensor) and first.item() > 0
    assert model.regularization_loss() == 0  # consumed
    model.eval()
    model(task="cls", **inputs)
    assert model.regularization_loss() == 0  # not recorded outside training


def test_mixed_norms():
    weights = torch.tensor([[3.0, -4.0], [0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    assert mixed_norm(weights, 2.0).item() == pytest.approx(5 + 0 + 1)
    assert mixed_norm(weights, float("inf")).item() == pytest.approx(4 + 0 + 1)
    mixed_norm(weights, 2.0).backward()
    assert torch.isfinite(weights.grad).all() and weights.grad[1].abs().sum() == 0


def test_block_sparse_stacks_the_heads_over_features():
    model = build("hard")
    weights = head_feature_weights(model)
    assert {t: tuple(w.shape) for t, w in weights.items()} == {
        "cls": (2, 32), "reg": (1, 32), "tag": (3, 32),
    }  # fmt: skip
    stacked = torch.cat([model.heads[t].out.weight for t in TASKS]).T  # (features, 6)
    expected = stacked.norm(dim=1).sum()
    assert block_sparse_penalty(model, 2.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_run_penalties_are_in_the_forward_output_and_averaged(inputs):
    model = build("soft", weight=0.5).train()
    extra = RunRegularizers(model, block_sparse=0.1, q="inf")
    with torch.no_grad():
        model.sharing.column["cls"][0].output.dense.bias[:2] += torch.tensor([3.0, 4.0])
    stacked = torch.cat([model.heads[t].out.weight for t in TASKS]).T  # (features, 6)
    expected = 0.5 * 2 * 25 + 0.1 * stacked.abs().amax(dim=1).sum().item()
    with extra.hooked(model):
        output = model(task="reg", **inputs)  # the penalty reaches other tasks' columns and heads
        assert output["regularization"].item() == pytest.approx(expected, rel=1e-4)
        model(task="tag", **inputs)
        assert extra.loss(["reg", "tag"]).item() == pytest.approx(expected, rel=1e-4)  # the mean
        assert extra.loss(["reg"]) == 0.0  # taken
        model.eval()
        assert "regularization" not in model(task="reg", **inputs)  # only while training
    model.train()  # outside hooked(): the hooks are removed
    assert "regularization" not in model(task="reg", **inputs)
    assert not model._forward_hooks and not model.encoder._forward_hooks


# ------------------------------------------------------------------------------ adversarial
def test_gradient_reversal_flips_and_scales():
    x = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(4, 3)
    y = reverse_gradient(x, 0.25)
    assert torch.equal(y, x)
    (y * weight).sum().backward()
    assert torch.allclose(x.grad, -0.25 * weight)


def test_adversarial_discriminator_trains_on_the_shared_representation(inputs):
    model = build("soft", weight=0.0).train()  # no soft penalty: only the discriminator
    extra = RunRegularizers(model, adversarial=0.5)
    with extra.hooked(model):
        assert extra.loss([]) == 0.0  # nothing captured yet
        model(task="reg", **inputs)
        model(task="tag", **inputs)
        loss = extra.loss(["reg", "tag"])  # the discriminator's loss on both passes
        assert loss.item() == pytest.approx(2 * torch.log(torch.tensor(3.0)).item(), rel=0.2)
        loss.backward()
        assert extra.discriminator.out.weight.grad.abs().sum() > 0
        assert model.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.sharing.parameters())  # columns: task-private
        model.eval()
        model(task="cls", **inputs)
        with pytest.raises(ValueError, match="shorter"):  # evaluation passes are not captured
            extra.loss(["cls"])
    shared = model.sharing.shared_output
    assert not model._forward_hooks and not shared._forward_hooks_with_kwargs  # handles removed


# ------------------------------------------------------------------------------ affinity
def test_affinity_matrices_and_heat_map(inputs, tmp_path):
    model = build("hard").train()
    probes = {task: {**inputs, "labels": labels_for(model, task)} for task in TASKS}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    affinity = measure_affinity(model, probes, learning_rate=1e-2)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    cosine, lookahead = affinity["gradient_cosine"], affinity["lookahead"]
    for i in TASKS:
        assert cosine[i][i] == pytest.approx(1.0, abs=1e-5)
        assert lookahead[i][i] > 0  # a step on a task's own gradient lowers its loss
        for j in TASKS:
            assert cosine[i][j] == pytest.approx(cosine[j][i], abs=1e-6)
    history = [{"step": 2, "affinity": affinity}, {"step": 4, "loss": {}},
               {"step": 6, "affinity": json.loads(json.dumps(affinity))}]  # fmt: skip
    mean = mean_affinity(history)
    assert mean["gradient_cosine"]["cls"]["tag"] == pytest.approx(cosine["cls"]["tag"])
    path = write_heatmap(tmp_path, history)
    assert path == tmp_path / AFFINITY_PLOT
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_heatmap(tmp_path / "none", [{"step": 1, "loss": {}}]) is None


# ------------------------------------------------------------------------------ one task of many
def test_carry_mixing_keeps_known_entries_and_folds_the_dropped_tasks():
    trained = torch.arange(1.0, 19.0).view(2, 3, 3)  # 2 layers, tasks a, b, c
    start = torch.full((2, 2, 2), -1.0)
    got = carry_mixing(start, trained, ["b", "new"], ["a", "b", "c"])
    assert got[:, 0, 0].tolist() == [4 + 5 + 6, 13 + 14 + 15]  # b's row: a and c fold into b
    assert got[:, 0, 1].tolist() == [-1, -1] and got[:, 1].flatten().tolist() == [-1] * 4
    assert carry_mixing(start, trained, ["c", "a"], ["a", "b", "c"])[0].tolist() == [
        [9 + 8, 7],  # c <- c (+ b, gone), c <- a
        [3, 1 + 2],  # a <- c, a <- a (+ b)
    ]
    blocks = torch.arange(1.0, 17.0).view(1, 4, 4)  # sluice: 2 tasks of 2 x 2 blocks
    folded = carry_mixing(torch.zeros(1, 2, 2), blocks, ["b"], ["a", "b"], block=2)
    assert folded[0].tolist() == [[11 + 9, 12 + 10], [15 + 13, 16 + 14]]


@pytest.mark.parametrize("strategy", ["cross_stitch", "sluice"])
def test_a_one_task_model_of_a_trained_mixing_model_computes_the_same(strategy, inputs):
    trained = build(strategy, layers=1).eval()
    with torch.no_grad():  # trained mixing units: rows no longer sum to 1
        for parameter in trained.sharing.mixing_parameters():
            parameter.copy_(torch.rand_like(parameter))
    alone = MultiTaskModel.from_multitask(trained, [TINY_TASKS[2]], trained.config.sharing).eval()
    assert alone.config.task_names == ["tag"]
    with torch.no_grad():  # one column layer: every column's states agree, so no loss at all
        expected = trained(task="tag", **inputs).logits
        assert torch.allclose(alone(task="tag", **inputs).logits, expected, atol=1e-5)
    if strategy == "sluice":
        assert torch.equal(alone.sharing.beta[0], trained.sharing.beta[2])


@pytest.mark.parametrize("strategy", ["soft", "cross_stitch", "sluice"])
def test_a_trained_column_model_keeps_its_columns_only_with_the_same_sharing(strategy):
    trained = build(strategy)
    with torch.no_grad():
        for parameter in trained.sharing.parameters():
            parameter.add_(torch.rand_like(parameter))
    alone = MultiTaskModel.from_multitask(trained, [TINY_TASKS[1]], trained.config.sharing)
    expected = trained.sharing.column["reg"].state_dict()
    assert all(
        torch.equal(v, expected[k]) for k, v in alone.sharing.column["reg"].state_dict().items()
    )
    with pytest.raises(SharingMismatch) as error:  # a UserError, in option words
        MultiTaskModel.from_multitask(trained, [TINY_TASKS[1]], {"name": strategy, "layers": 1})
    assert error.value.trained == resolve_sharing(trained.config.sharing)
    assert error.value.requested == resolve_sharing({"name": strategy, "layers": 1})
    shape = ", subspaces=2" if strategy == "sluice" else ""
    assert str(error.value) == (
        f"sharing: the trained model has {strategy} sharing (layers=2{shape}), this model asks "
        f"for {strategy} sharing (layers=1{shape}); its task columns fit only the same strategy "
        "and shape options"
    )
    assert "--" not in str(error.value)  # the model layer speaks no CLI
    flags = " --sluice-subspaces 2" if strategy == "sluice" else ""
    assert str(sharing_mismatch_error(error.value)) == (  # the training layer's words
        f"--sharing: --model was trained with --sharing {strategy} --sharing-layers 2{flags}, "
        f"this run asks for --sharing {strategy} --sharing-layers 1{flags}; give the same flags "
        "to keep its task columns"
    )
    with pytest.raises(SharingMismatch, match="this model asks for hard sharing; its") as error:
        MultiTaskModel.from_multitask(trained, [TINY_TASKS[1]], None)
    assert error.value.requested == {"name": "hard"}
    assert str(sharing_mismatch_error(error.value)).endswith(
        "this run asks for --sharing hard; give the same flags to keep its task columns"
    )


def test_a_column_model_starts_from_a_trained_hard_model():
    trained = build("hard")
    model = MultiTaskModel.from_multitask(trained, TINY_TASKS[:2], {"name": "cross_stitch"})
    top = trained.encoder.encoder.layer[1:].state_dict()
    column = model.sharing.column["cls"].state_dict()
    assert all(torch.equal(column[name], top[name]) for name in top)
    assert torch.allclose(model.sharing.stitch[0], torch.tensor([[0.9, 0.1], [0.1, 0.9]]))


# ------------------------------------------------------------------------------ training run
def test_training_run_with_every_option(tmp_path):
    from tiny_runs import reset_accelerate, write_tiny_tasks

    from mtnlp.cards.load import load_cards
    from mtnlp.training.args import parse_args
    from mtnlp.training.loop import train

    reset_accelerate()
    cards, data = write_tiny_tasks(tmp_path / "tasks")
    output = tmp_path / "out"
    args = parse_args([
        "--model", "tiny", "--cards", str(cards), "--data-dir", str(data), "--output-dir",
        str(output), "--max-steps", "4", "--batch-size", "8", "--max-train-samples", "16",
        "--sharing", "sluice", "--sharing-layers", "1", "--block-sparse", "0.01",
        "--adversarial", "0.1", "--affinity-every", "2", "--log-every", "2",
    ])  # fmt: skip
    results = train(args, load_cards([cards]))
    assert set(results) == {"cls", "reg", "tag"}
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "affinity" in r] == [2, 4]
    assert (output / AFFINITY_PLOT).is_file()
    assert "plots/affinity.png" in (output / "report.md").read_text()
    model = MultiTaskModel.from_pretrained(output)
    assert model.config.sharing["name"] == "sluice" and model.config.sharing["layers"] == 1
    assert not torch.equal(model.sharing.alpha[0], torch.kron(
        torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]]), torch.eye(2)
    ))  # fmt: skip  # the mixing units trained
