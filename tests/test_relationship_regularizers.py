"""The task-relationship prior and task clustering (training/relationships.py, issue 17 items 1
and 4): the penalties and their gradients against hand computations, the closed-form task
covariance, k-means, short tiny runs that write the run folder's JSON files, and an exact resume
across an update of the learned state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from tiny_runs import reset_accelerate, write_tiny_tasks

from mtnlp import training
from mtnlp.artifacts.report import write_report
from mtnlp.artifacts.run_folder import (
    MODEL_FILE,
    TASK_CLUSTERS,
    TASK_RELATIONSHIPS,
    write_task_structure,
)
from mtnlp.training.args import parse_args
from mtnlp.training.mixing import check_distributed, check_joint
from mtnlp.training.relationships import (
    as_correlations,
    cluster_penalty,
    kmeans,
    relationship_penalty,
    task_covariance,
)
from mtnlp.training.weighting import build_weighting
from mtnlp.utils.errors import UserError

W = torch.tensor([[1.0, 0, 2, 0], [0, 1, 0, 1], [1, 1, 0, 0]])  # T = 3 tasks, D = 4


# ------------------------------------------------------------------------------ the math
def test_relationship_penalty_and_gradient_by_hand():
    # Omega = [[2, 1, 0], [1, 2, 0], [0, 0, 1]] / 5: its inverse is 5 [[2, -1, 0], [-1, 2, 0],
    # [0, 0, 3]] / 3; W W^T = [[5, 0, 1], [0, 2, 1], [1, 1, 2]]
    omega = torch.tensor([[2.0, 1, 0], [1, 2, 0], [0, 0, 1]]) / 5
    rows = W.clone().requires_grad_()
    penalty = relationship_penalty(rows, torch.linalg.inv(omega))
    # 5 (2/3 x 5 + 2/3 x 2 + 1 x 2) = 100 / 3
    assert penalty.item() == pytest.approx(100 / 3)
    penalty.backward()
    expected = torch.tensor(  # 2 Omega^-1 W
        [[20 / 3, -10 / 3, 40 / 3, -10 / 3], [-10 / 3, 20 / 3, -20 / 3, 20 / 3], [10, 10, 0, 0]]
    )
    torch.testing.assert_close(rows.grad, expected)


def test_closed_form_task_covariance_by_hand():
    # two identical tasks and an unrelated one: W W^T = [[2, 2, 0], [2, 2, 0], [0, 0, 4]], whose
    # square root is [[1, 1, 0], [1, 1, 0], [0, 0, 2]] (trace 4)
    rows = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 2]])
    expected = torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 2]], dtype=torch.float64) / 4
    torch.testing.assert_close(task_covariance(rows, ridge=0.0), expected)
    # the default ridge, eps = 1e-4 x the mean of diag(W W^T) (8/3), keeps it invertible: the
    # twins' block has eigenvalues 4 + eps and eps, so their correlation is (a - b) / (a + b)
    # with a = sqrt(4 + eps), b = sqrt(eps); the third task stays apart
    covariance = task_covariance(rows)
    assert covariance.trace().item() == pytest.approx(1.0)
    assert torch.linalg.matrix_rank(covariance) == 3
    correlations = as_correlations(covariance)
    a, b = (4 + 1e-4 * 8 / 3) ** 0.5, (1e-4 * 8 / 3) ** 0.5
    assert correlations[0, 1].item() == pytest.approx((a - b) / (a + b))
    assert correlations[0, 2].abs() < 1e-6
    torch.testing.assert_close(correlations.diagonal(), torch.ones(3, dtype=torch.float64))


def test_cluster_penalty_by_hand():
    rows = torch.tensor([[1.0, 0], [3, 0], [0, 2]])  # clusters {0, 1} and {2}
    # mean (4/3, 2/3): T ||mean||^2 = 20/3; between 2 x 8/9 + 32/9 = 16/3; within 1 + 1 = 2
    assert cluster_penalty(rows, [0, 0, 1], 1.0, 0.0, 0.0).item() == pytest.approx(20 / 3)
    assert cluster_penalty(rows, [0, 0, 1], 0.0, 1.0, 0.0).item() == pytest.approx(16 / 3)
    assert cluster_penalty(rows, [0, 0, 1], 0.0, 0.0, 1.0).item() == pytest.approx(2.0)
    # with equal weights the three terms sum to ||W||^2 = 14
    assert cluster_penalty(rows, [0, 0, 1], 1.0, 1.0, 1.0).item() == pytest.approx(14.0)
    rows.requires_grad_()
    cluster_penalty(rows, [0, 0, 1], 0.0, 0.0, 1.0).backward()
    # within: 2 (w_t - w_c) for each task (the centre's own gradient sums to 0)
    torch.testing.assert_close(rows.grad, torch.tensor([[-2.0, 0], [2, 0], [0, 0]]))


def test_kmeans_finds_the_obvious_clusters_deterministically():
    rows = torch.tensor([[10.0, 10], [0, 0], [0.1, 0], [10.1, 10], [0, 0.1]])
    found = {seed: kmeans(rows, 2, seed) for seed in range(5)}
    # numbered in the order of the rows, whatever the start
    assert set(map(tuple, found.values())) == {(0, 1, 1, 0, 1)}
    assert kmeans(rows, 2, 3) == found[3]
    assert kmeans(rows, 3, 0) == kmeans(rows, 3, 0) and len(set(kmeans(rows, 3, 0))) == 3
    assert kmeans(rows, 5, 0) == [0, 1, 2, 3, 4]
    assert kmeans(torch.zeros(3, 2), 2, 0).count(0) in (1, 2)  # no empty cluster


# ------------------------------------------------------------------------------ tiny runs
@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_tasks(tmp_path_factory.mktemp("tiny"), train_size=12, dev_size=4)


def train(tiny_tasks, output: Path, *extra: str) -> None:
    cards, data = tiny_tasks
    flags = [
        "--model", "tiny", "--cards", str(cards), "--data-dir", str(data), "--tasks", "cls,tag",
        "--output-dir", str(output), "--batch-size", "4", "--max-steps", "4", "--log-every", "1",
        "--learning-rate", "1e-2", "--seed", "3", *extra,
    ]  # fmt: skip
    reset_accelerate()
    try:
        training.run(parse_args(flags), [])
    finally:
        reset_accelerate()


def log_records(output: Path, key: str) -> list[dict]:
    lines = (output / "train_log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if key in record]


def test_relationship_prior_run_writes_the_task_correlations(
    tiny_tasks, tmp_path, fresh_accelerate
):
    train(tiny_tasks, tmp_path, "--relationship-prior", "0.5", "--relationship-update-every", "2")
    assert [r["step"] for r in log_records(tmp_path, "task_relationships")] == [2, 4]
    written = json.loads((tmp_path / TASK_RELATIONSHIPS).read_text())
    assert written["step"] == 4 and set(written) == {"step", "covariance", "correlation"}
    assert written["correlation"]["cls"]["cls"] == pytest.approx(1.0)
    assert written["correlation"]["cls"]["tag"] == written["correlation"]["tag"]["cls"]
    trace = written["covariance"]["cls"]["cls"] + written["covariance"]["tag"]["tag"]
    assert trace == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "plots" / "task_relationships.png").is_file()
    assert not (tmp_path / TASK_CLUSTERS).exists()


def test_learned_and_card_clusters_runs_write_the_clusters(tiny_tasks, tmp_path, fresh_accelerate):
    train(tiny_tasks, tmp_path / "learned", "--task-clusters", "2", "--cluster-update-every", "2")
    written = json.loads((tmp_path / "learned" / TASK_CLUSTERS).read_text())
    assert written == {"step": 4, "clusters": {"cluster1": ["cls"], "cluster2": ["tag"]}}
    assert [r["step"] for r in log_records(tmp_path / "learned", "task_clusters")] == [1, 2, 4]

    cards, data = tiny_tasks
    given = tmp_path / "cards"
    shutil.copytree(cards, given)
    for name in ("cls", "tag"):
        card = given / f"{name}.yaml"
        card.write_text(card.read_text() + "cluster: words\n")
    train((given, data), tmp_path / "cards_out", "--task-clusters", "cards")
    written = json.loads((tmp_path / "cards_out" / TASK_CLUSTERS).read_text())
    assert written == {"step": 1, "clusters": {"words": ["cls", "tag"]}}  # as of step 1


def test_resume_across_updates_is_exact(tiny_tasks, tmp_path, fresh_accelerate):
    """Omega and the learned clusters change at steps 2 and 4; a run resumed at step 3 ends with
    the uninterrupted run's weights and task structure."""
    options = (
        "--relationship-prior", "0.5", "--relationship-update-every", "2",
        "--task-clusters", "2", "--cluster-update-every", "2",
        "--max-steps", "6", "--checkpoint-every", "3",
    )  # fmt: skip
    train(tiny_tasks, tmp_path / "reference", *options)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "reference" / "checkpoint-3", resumed / "checkpoint-3")
    train(tiny_tasks, resumed, *options, "--resume-from-checkpoint", "latest")
    expected, weights = (
        load_file(tmp_path / "reference" / MODEL_FILE),
        load_file(resumed / MODEL_FILE),
    )
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6, msg=name)
    for name in (TASK_RELATIONSHIPS, TASK_CLUSTERS):
        want = json.loads((tmp_path / "reference" / name).read_text())
        assert json.loads((resumed / name).read_text()) == want


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("flag", ["--relationship-prior", "--task-clusters"])
def test_sharded_heads_and_joint_batches_are_refused(flag):
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    static = build_weighting("static", ["a"], task_types={"a": "classification"})
    with pytest.raises(UserError) as error:
        check_distributed(fsdp, False, static, "static", task_priors=[flag])
    assert str(error.value) == f"{flag}: needs whole task heads in every process (DDP), not FSDP"
    with pytest.raises(UserError) as error:
        check_joint(adversarial=False, block_sparse=False, sharing=None, task_priors=[flag])
    assert str(error.value) == (
        f"--batch-mode joint: not with {flag} (it needs one task per encoder pass); use "
        "--batch-mode one_task"
    )


# ------------------------------------------------------------------------------ the report
def test_report_shows_the_relationships_and_clusters(tmp_path):
    history = [
        {"step": 1, "loss": {"a": 1.0, "b": 2.0}},
        {
            "step": 2,
            "task_relationships": {
                "covariance": {"a": {"a": 0.6, "b": 0.1}, "b": {"a": 0.1, "b": 0.4}},
                "correlation": {"a": {"a": 1.0, "b": 0.2}, "b": {"a": 0.2, "b": 1.0}},
            },
        },
        {"step": 2, "task_clusters": {"clusters": {"cluster1": ["a", "b"], "cluster2": []}}},
    ]
    write_task_structure(tmp_path, history)
    main = {"a": ["accuracy"], "b": ["accuracy"]}
    report = write_report(tmp_path, history, {}, {}, main).read_text()
    assert "![Task relationships](plots/task_relationships.png)" in report
    assert "| cluster1 | a, b |" in report and "cluster2" not in report
    assert json.loads((tmp_path / TASK_CLUSTERS).read_text())["clusters"]["cluster1"] == ["a", "b"]
    assert json.loads((tmp_path / TASK_RELATIONSHIPS).read_text())["step"] == 2
